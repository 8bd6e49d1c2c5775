"""Tiny offline fixtures for the Hugging Face tests: a byte-level BPE tokenizer trained here, a small Llama,
and generated multiple-choice questions. Nothing is downloaded."""

from __future__ import annotations

import functools
import random

import torch

from calibkern.hf.data import DEFAULT_TEMPLATE, MCQExample, answer_continuation, format_prompt

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "star"]


def make_examples(n: int, n_options: int = 4, seed: int = 0) -> list[MCQExample]:
    """``n`` questions "which goes with <word>?" over random word choices with a random answer."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        choices = tuple(rng.sample(WORDS, n_options))
        examples.append(
            MCQExample(
                question=f"which goes with {rng.choice(WORDS)} {i % 7}?",
                choices=choices,
                answer=rng.randrange(n_options),
                source=f"generated:{i + 1}",
            )
        )
    return examples


@functools.lru_cache(maxsize=None)
def make_tokenizer(template: str = DEFAULT_TEMPLATE, letters_as_tokens: bool = True):
    """A byte-level BPE tokenizer trained on prompts. With ``letters_as_tokens`` the corpus repeats the answer
    letters so that ``" A"`` becomes one token (GPT-2 style); without, the space stays a separate token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        format_prompt(example, template) + answer_continuation(example.answer)
        for example in make_examples(64, seed=123)
    ]
    if letters_as_tokens:
        corpus += [" A B C D E"] * 200
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right"
    )


def make_model(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A randomly initialised two-layer Llama sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)
