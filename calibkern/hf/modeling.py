"""Running a causal LM's decoder alone: final hidden states without the lm_head, for any wrapping.

The calibration losses need the final hidden states ``h`` and the output-embedding weight ``W`` (docs/hf.md):
the fused loss computes ``h · Wᵀ`` only where it needs it, so the ``[tokens, V]`` logits never exist.

:func:`decoder_forward` calls the *outermost* model (``DistributedDataParallel``, a PEFT wrapper, …) with
the causal LM's ``forward`` swapped, for that one call, for its decoder's. Going through the wrappers keeps
what they do on the way in — DDP's gradient-synchronisation set-up, PEFT's adapter hooks, gradient
checkpointing, autocast set up by a PEFT wrapper — and the lm_head is never called. When Accelerate's
autocast wrapper sits on the causal LM itself it is bypassed for that call, so the trainer enters
``accelerator.autocast()`` around it. The causal LM is found by unwrapping
``.module`` (DDP, Accelerate) and PEFT's ``get_base_model()``; its decoder is ``get_decoder()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["DecoderOutput", "causal_lm_of", "decoder_forward", "option_logits_at"]

# Arguments the decoder takes from a causal-LM call; everything else (labels, loss kwargs, output flags that
# PEFT fills with None) stays out.
DECODER_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The innermost module that has both ``get_decoder`` and ``get_output_embeddings`` (a ``*ForCausalLM``)."""
    seen = model
    while True:
        if hasattr(seen, "module") and isinstance(seen.module, nn.Module):  # DDP / Accelerate wrappers
            seen = seen.module
        elif hasattr(seen, "get_base_model"):  # PEFT
            seen = seen.get_base_model()
        else:
            break
    if not (hasattr(seen, "get_decoder") and hasattr(seen, "get_output_embeddings")):
        raise TypeError(
            f"model must be a causal LM with get_decoder() and get_output_embeddings(), got {type(seen).__name__}"
        )
    if seen.get_output_embeddings() is None:
        raise TypeError(f"{type(seen).__name__} has no output embeddings (lm_head)")
    return seen


class DecoderOutput(NamedTuple):
    """Final hidden states ``[B, T, D]`` and the output projection ``weight [V, D]``, ``bias [V] | None``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@contextlib.contextmanager
def _decoder_as_forward(causal_lm: nn.Module):
    """Within the block, calling ``causal_lm`` runs only its decoder and returns a :class:`DecoderOutput`.

    The weight and bias leave the forward as views, so the lm_head's parameters are part of the forward's
    output graph: DDP (with ``find_unused_parameters``) then counts them as used instead of marking them
    ready before the backward pass reaches them.
    """
    decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()

    def decoder_forward(*args, **kwargs):
        arguments = {key: kwargs[key] for key in DECODER_ARGUMENTS if kwargs.get(key) is not None}
        hidden = decoder(*args, **arguments, use_cache=False, return_dict=True).last_hidden_state
        bias = getattr(head, "bias", None)
        return DecoderOutput(hidden, head.weight.view_as(head.weight), None if bias is None else bias.view_as(bias))

    # Accelerate may already have set an instance ``forward`` (its autocast wrapper): put it back afterwards.
    previous = causal_lm.__dict__.get("forward")
    causal_lm.forward = decoder_forward
    try:
        yield
    finally:
        if previous is None:
            del causal_lm.forward
        else:
            causal_lm.forward = previous


def decoder_forward(model: nn.Module, inputs: dict) -> DecoderOutput:
    """One decoder pass of ``model`` on ``inputs`` (no lm_head): final (normed) hidden states and the output
    projection to apply to them."""
    causal_lm = causal_lm_of(model)
    arguments = {key: inputs[key] for key in DECODER_ARGUMENTS if inputs.get(key) is not None}
    with _decoder_as_forward(causal_lm):
        return DecoderOutput(*model(**arguments))


def eval_decoder_passes(model: nn.Module, batches, *, autocast=contextlib.nullcontext):
    """For each input dict of ``batches``: ``(batch, decoder_forward(model, batch))`` with the model in eval
    mode and no gradient, its training mode restored afterwards — the one loop of every statistics and
    evaluation pass. ``autocast`` is a context factory wrapped around each pass."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.no_grad(), autocast():  # not across the yield: the caller's grad mode stays its own
                output = decoder_forward(model, batch)
            yield batch, output
    finally:
        model.train(was_training)


def option_logits_at(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, option_ids: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Option logits ``h · W[option_ids]ᵀ (+ b[option_ids])`` in float32 for hidden rows ``[N, D]``."""
    index = torch.as_tensor(option_ids, dtype=torch.long, device=weight.device)
    logits = hidden.float() @ weight.index_select(0, index).float().t()
    if bias is not None:
        logits = logits + bias.index_select(0, index).float()
    return logits
