"""Running a causal LM's decoder alone: final hidden states without the lm_head, for any wrapping.

The calibration losses need the final hidden states ``h`` and the output-embedding weight ``W`` (docs/hf.md):
the fused loss computes ``h · Wᵀ`` only where it needs it, so the ``[tokens, V]`` logits never exist.

:func:`decoder_forward` calls the *outermost* model (``DistributedDataParallel``, a PEFT wrapper, …) with
the causal LM's ``forward`` swapped, for that one call, for its decoder's. Going through the wrappers keeps
what they do on the way in — DDP's gradient-synchronisation set-up, PEFT's adapter hooks, gradient
checkpointing, autocast set up by a PEFT wrapper — and the lm_head is never called. When Accelerate's
autocast wrapper sits on the causal LM itself it is bypassed for that call, so the trainer enters
``accelerator.autocast()`` around it. The causal LM is found by unwrapping
``.module`` (DDP, Accelerate), ``_orig_mod`` (``torch.compile``, which then compiles the decoder pass) and
PEFT's ``get_base_model()``; its decoder is ``get_decoder()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..ops.fused_linear import softcap_logits

__all__ = ["DecoderOutput", "LogitTransform", "causal_lm_of", "check_logit_parity", "decoder_forward",
           "logit_transform", "option_logits_at"]

# Arguments the decoder takes from a causal-LM call; everything else (labels, loss kwargs, output flags that
# PEFT fills with None) stays out.
DECODER_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")
# The attribute of a causal LM patched by calibkern.hf.apply_fused_loss that holds its FusedLoss.
FUSED_LOSS_ATTRIBUTE = "calibkern_fused_loss"


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The innermost module that has both ``get_decoder`` and ``get_output_embeddings`` (a ``*ForCausalLM``)."""
    seen = model
    while True:
        if hasattr(seen, "module") and isinstance(seen.module, nn.Module):  # DDP / Accelerate wrappers
            seen = seen.module
        elif isinstance(getattr(seen, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            seen = seen._orig_mod
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
    """Final hidden states ``[B, T, D]`` and the output projection: ``weight [V, D]``, ``bias [V] | None`` and
    the soft cap of the logits (None for none). The model's logits are ``softcap(hidden · weightᵀ + bias)``
    with ``softcap(z) = c · tanh(z / c)``; a constant scale of the logits is already folded into ``hidden``
    and ``bias`` (docs/hf.md#models-and-adapters)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None = None


class LogitTransform(NamedTuple):
    """What a causal LM does to ``lm_head(h)``: ``softcap(scale · lm_head(h))``."""

    scale: float = 1.0
    softcap: float | None = None


def _text_config(causal_lm: nn.Module):
    config = causal_lm.config
    return getattr(config, "text_config", None) or config


def logit_transform(causal_lm: nn.Module) -> LogitTransform:
    """The transform ``causal_lm``'s forward applies after its lm_head, from its class and config:
    ``final_logit_softcapping`` (Gemma 2/3/4 and others), ``logit_scale`` (Cohere), ``logits_scaling``
    (Granite divides, HyperCLOVA X multiplies, MiniCPM3 divides the hidden states), ``lm_head_multiplier``
    (Falcon-H1). :func:`check_logit_parity` verifies the result against the model's own logits."""
    config = _text_config(causal_lm)
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    logit_scale = getattr(causal_lm, "logit_scale", None)
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)
    if logits_scaling:
        if model_type.startswith("hyperclovax"):
            scale *= float(logits_scaling)
        else:  # Granite, MiniCPM3
            scale /= float(logits_scaling)
    multiplier = getattr(config, "lm_head_multiplier", None)
    if multiplier:
        scale *= float(multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale, float(softcap) if softcap else None)


def _head_projection(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's effective ``(weight, bias)``. A PEFT LoRA adapter on the lm_head takes part as
    ``W + s · B A`` (its gradients flow); one that cannot be written as a weight (dropout while training,
    DoRA) and any other adapter type are refused."""
    base = getattr(head, "base_layer", None)
    if base is None:
        bias = getattr(head, "bias", None)
        return head.weight.view_as(head.weight), None if bias is None else bias.view_as(bias)
    kind = type(head).__name__
    if not hasattr(head, "lora_A"):
        raise ValueError(f"calibkern cannot compute the logits of an lm_head wrapped by the PEFT adapter {kind}; "
                         "keep the lm_head out of the adapter's target_modules")
    weight, bias = base.weight, getattr(base, "bias", None)
    if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return weight.view_as(weight), None if bias is None else bias.view_as(bias)
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        dropout = head.lora_dropout[name]
        if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError("calibkern cannot train a LoRA adapter on the lm_head with lora_dropout > 0 (dropout "
                             "on the adapter's input is not a weight); set lora_dropout=0 or keep the lm_head out of "
                             "target_modules")
        if getattr(head, "use_dora", {}).get(name):
            raise ValueError("calibkern does not support DoRA on the lm_head; keep the lm_head out of target_modules")
        if getattr(head, "fan_in_fan_out", False):
            raise ValueError("calibkern does not support a fan_in_fan_out LoRA lm_head")
        delta = head.lora_B[name].weight @ head.lora_A[name].weight
        weight = weight + head.scaling[name] * delta.to(weight.dtype)
    return weight, None if bias is None else bias.view_as(bias)


def _refuse_prompt_learning(model: nn.Module) -> None:
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(f"calibkern refuses PEFT {kind} (virtual tokens change the positions the fused "
                         "loss reads; it does not account for them): use LoRA, or compute_loss_func with the "
                         "model's own logits")


@contextlib.contextmanager
def _decoder_as_forward(causal_lm: nn.Module):
    """Within the block, calling ``causal_lm`` runs only its decoder and returns a :class:`DecoderOutput`.

    The weight and bias leave the forward as views, so the lm_head's parameters are part of the forward's
    output graph: DDP (with ``find_unused_parameters``) then counts them as used instead of marking them
    ready before the backward pass reaches them.
    """
    decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    transform = logit_transform(causal_lm)

    def decoder_forward(**kwargs):
        return projection(head, transform, decoder_hidden(decoder, kwargs))

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


def decoder_hidden(decoder: nn.Module, inputs: dict) -> torch.Tensor:
    """The decoder's final (normed) hidden states ``[B, T, D]`` for the :data:`DECODER_ARGUMENTS` of ``inputs``."""
    arguments = {key: inputs[key] for key in DECODER_ARGUMENTS if inputs.get(key) is not None}
    return decoder(**arguments, use_cache=False, return_dict=True).last_hidden_state


def projection(head: nn.Module, transform: LogitTransform, hidden: torch.Tensor) -> DecoderOutput:
    """``hidden`` with the lm_head's effective weight and bias and ``transform`` folded in: the scale goes
    into the hidden states and the bias, ``s · (h Wᵀ + b) = (s h) Wᵀ + s b`` (no ``[V, D]`` copy)."""
    weight, bias = _head_projection(head)
    if transform.scale != 1.0:
        hidden = hidden * transform.scale
        bias = None if bias is None else bias * transform.scale
    return DecoderOutput(hidden, weight, bias, transform.softcap)


def decoder_forward(model: nn.Module, inputs: dict) -> DecoderOutput:
    """One decoder pass of ``model`` on ``inputs`` (no lm_head): final (normed) hidden states and the output
    projection to apply to them."""
    _refuse_prompt_learning(model)
    causal_lm = causal_lm_of(model)
    arguments = {key: inputs[key] for key in DECODER_ARGUMENTS if inputs.get(key) is not None}
    with _decoder_as_forward(causal_lm):
        return DecoderOutput(*model(**arguments))


def eval_decoder_passes(model: nn.Module, batches, *, autocast=contextlib.nullcontext, forward=decoder_forward):
    """For each input dict of ``batches``: ``(batch, forward(model, batch))`` with the model in eval mode and
    no gradient, its training mode restored afterwards — the one loop of every statistics and evaluation
    pass. ``autocast`` is a context factory wrapped around each pass; ``forward`` defaults to
    :func:`decoder_forward` (the trainer passes the fused forward's option-logits pass)."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.no_grad(), autocast():  # not across the yield: the caller's grad mode stays its own
                output = forward(model, batch)
            yield batch, output
    finally:
        model.train(was_training)


def option_logits_at(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, option_ids: Sequence[int] | torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Option logits ``softcap(h · W[option_ids]ᵀ + b[option_ids])`` in float32 for hidden rows ``[N, D]``."""
    index = torch.as_tensor(option_ids, dtype=torch.long, device=weight.device)
    logits = hidden.float() @ weight.index_select(0, index).float().t()
    if bias is not None:
        logits = logits + bias.index_select(0, index).float()
    return softcap_logits(logits, softcap)


@torch.no_grad()
def check_logit_parity(model: nn.Module, inputs: dict, *, tokens: int = 16) -> float:
    """Check that calibkern's path (decoder, then ``softcap(h · Wᵀ + b)``) gives ``model``'s own logits on the
    first row's first ``tokens`` positions of ``inputs``, both in eval mode; returns the largest difference,
    or raises ``ValueError`` naming the model class when they differ beyond float rounding. On a model patched
    by :func:`calibkern.hf.apply_fused_loss` the option columns of its fused forward are compared (the one
    path that gathers a sharded lm_head)."""
    _refuse_prompt_learning(model)
    causal_lm = causal_lm_of(model)
    probe = {key: inputs[key][:1, :tokens] for key in ("input_ids", "attention_mask")
             if isinstance(inputs.get(key), torch.Tensor)}
    fused = getattr(causal_lm, FUSED_LOSS_ATTRIBUTE, None)
    # patched and still calling the patched forward (a caller may have removed the instance forward since)
    patched = fused is not None and fused.option_ids is not None and "forward" in causal_lm.__dict__
    fused = fused if patched else None
    was_training = model.training
    model.eval()
    try:
        theirs = model(**probe).logits.float()
        if fused is None:
            hidden, weight, bias, softcap = decoder_forward(model, probe)
            exact = weight.dtype == torch.float32 and hidden.dtype == torch.float32
        else:  # the lm_head may be sharded: only the patched forward gathers it (calibkern.hf.patching)
            ours = model(**probe, labels=probe["input_ids"], option_logits_only=True).option_logits
            exact = causal_lm.get_output_embeddings().weight.dtype == torch.float32
    finally:
        model.train(was_training)
    if fused is None:
        ours = softcap_logits(hidden.float() @ weight.float().t() + (0.0 if bias is None else bias.float()),
                              softcap)
    else:
        theirs = theirs[:, :-1, fused.option_ids.to(theirs.device)].reshape(-1, fused.option_ids.numel())
    name = type(causal_lm).__name__
    if ours.shape != theirs.shape:
        raise ValueError(f"calibkern's fused path reads {tuple(ours.shape)} logits where {name} gives "
                         f"{tuple(theirs.shape)}; the model or a wrapper adds positions calibkern does not account for")
    difference = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    tolerance = (1e-4 if exact else 3e-2) * max(1.0, float(theirs.abs().max()) if theirs.numel() else 1.0)
    if not difference <= tolerance:
        transform = logit_transform(causal_lm)
        raise ValueError(f"calibkern's fused path does not reproduce {name}'s logits (largest difference "
                         f"{difference:.3g}; applied scale {transform.scale:g}, softcap {transform.softcap}): the "
                         "model transforms its logits in a way calibkern does not implement, so calibkern refuses it")
    return difference
