"""The demo's tiny Llama-architecture causal LM."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama(tokenizer: PreTrainedTokenizerBase, hidden_size: int = 64, n_layers: int = 2,
               n_heads: int = 4, max_positions: int = 128, seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with ``n_layers`` layers of width ``hidden_size`` (MLP 4× wider)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
