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
PEFT's ``get_base_model()``; its decoder is ``get_decoder()`` (:func:`decoder_of`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

import calibkern

from ..losses import _vocabulary_split
from ..ops.fused_linear import softcap_logits
from ..ops.vocab_parallel import option_bias, option_weight

__all__ = ["DecoderOutput", "LogitTransform", "RouterLoss", "causal_lm_of", "check_logit_parity", "decoder_forward",
           "decoder_of", "logit_transform", "option_logits_at", "refuse_unconsumed", "router_loss",
           "vocabulary_replicas", "whole_logits"]

# Arguments the decoder takes from a causal-LM call.
DECODER_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")
# Arguments of a call with labels that the fused path reads itself (the loss's inputs, its passes' switches) or
# that carry no data; any other argument with a value is refused (refuse_unconsumed), never dropped.
FUSED_ARGUMENTS = ("labels", "answer_mask", "num_items_in_batch", "option_logits_only", "token_stats_only",
                   "equivalence_probe", "use_cache", "return_dict", "output_router_logits", "cache_position")
# Output switches that are fine while off: the fused path returns no attentions, hidden states or logits.
OFF_ARGUMENTS = {"output_attentions": (None, False), "output_hidden_states": (None, False),
                 "logits_to_keep": (None, 0)}
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
    name = type(seen).__name__
    if seen.get_output_embeddings() is None:
        raise TypeError(f"{name} has no output embeddings (lm_head)")
    if getattr(seen.config, "is_encoder_decoder", False):
        raise TypeError(f"calibkern refuses {name}: it is an encoder-decoder model (config.is_encoder_decoder), and "
                        "the fused path runs a decoder-only causal LM's decoder — the encoder would get no input and "
                        "no gradient; use compute_loss_func, which takes the model's own logits")
    decoder_of(seen)
    return seen


def decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder of a causal LM: ``get_decoder()``, or its ``base_model`` where ``get_decoder()`` names the lm_head
    (a BERT-style ``decoder`` attribute, as in ModernBERT's decoder LM; the equivalence check then confirms the
    path). Refuses, naming the class, a model whose decoder cannot be run without the lm_head."""
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    heads = (head, getattr(head, "base_layer", None))
    if any(decoder is module for module in heads):
        decoder = getattr(causal_lm, "base_model", None)
    if decoder is None or decoder is causal_lm or any(decoder is module for module in heads):
        raise TypeError(f"calibkern refuses {type(causal_lm).__name__}: its get_decoder() returns the model itself "
                        "or its lm_head, so calibkern cannot run its decoder without the lm_head; use "
                        "compute_loss_func, which takes the model's own logits")
    return decoder


def refuse_unconsumed(causal_lm: nn.Module, inputs: dict) -> None:
    """Raise ``ValueError`` naming every argument of ``inputs`` with a value that the fused path would not pass on
    (``pixel_values``, ``output_hidden_states=True``, …): the model's own forward would use it, calibkern's would
    drop it."""
    dropped = sorted(key for key, value in inputs.items()
                     if value is not None and key not in DECODER_ARGUMENTS + FUSED_ARGUMENTS
                     and not (key in OFF_ARGUMENTS and _is_off(value, OFF_ARGUMENTS[key])))
    if dropped:
        raise ValueError(f"calibkern's fused path for {type(causal_lm).__name__} does not consume "
                         f"{', '.join(dropped)}: it runs the text decoder on {', '.join(DECODER_ARGUMENTS)} only and "
                         "returns no logits, attentions or hidden states; remove these arguments, or use "
                         "compute_loss_func with the model's own forward")


def _is_off(value, off_values) -> bool:
    return not isinstance(value, torch.Tensor) and any(value is off or value == off for off in off_values)


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
    """What a causal LM does to ``lm_head(h)``: ``softcap(scale · lm_head(h))[..., :vocab_rows]`` (``vocab_rows``
    None: every row of the lm_head)."""

    scale: float = 1.0
    softcap: float | None = None
    vocab_rows: int | None = None


def _text_config(causal_lm: nn.Module):
    config = causal_lm.config
    return getattr(config, "text_config", None) or config


def logit_transform(causal_lm: nn.Module) -> LogitTransform:
    """The transform ``causal_lm``'s forward applies after its lm_head, from its class and config:
    ``final_logit_softcapping`` (Gemma 2/3/4 and others) or ``logits_soft_cap`` (RecurrentGemma), ``logit_scale``
    (Cohere), ``logits_scaling`` (Granite divides, HyperCLOVA X multiplies, MiniCPM3 divides the hidden states),
    ``lm_head_multiplier`` (Falcon-H1), ``logits_mup_width_multiplier`` (Inkling divides the hidden states) and
    ``unpadded_vocab_size`` (Inkling keeps that many logits: the lm_head's first rows). :func:`check_logit_parity`
    verifies the result against the model's own logits."""
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
    width_multiplier = getattr(config, "logits_mup_width_multiplier", None)
    if width_multiplier:  # Inkling divides the hidden states
        scale /= float(width_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
    rows = getattr(config, "unpadded_vocab_size", None)
    return LogitTransform(scale, float(softcap) if softcap else None, int(rows) if rows else None)


def _adapter_kind(layer: nn.Module) -> str:
    """The PEFT method of an adapter layer, from its module path (``peft.tuners.<method>.layer``)."""
    parts = type(layer).__module__.split(".")
    kind = parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else type(layer).__module__
    return {"lora": "LoRA", "adalora": "AdaLoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr",
            "boft": "BOFT"}.get(kind, kind)


def _head_projection(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's effective ``(weight, bias)``. A PEFT LoRA adapter on the lm_head takes part as
    ``W + s · B A`` and, with ``lora_bias``, ``b + s · b_B`` (its gradients flow); one that cannot be written as a
    weight (dropout while training, a LoRA variant: DoRA, aLoRA, …) and every other adapter type (AdaLoRA, IA3,
    LoHa, LoKr, BOFT, …) are refused by name."""
    base = getattr(head, "base_layer", None)
    if base is None:
        bias = getattr(head, "bias", None)
        return head.weight.view_as(head.weight), None if bias is None else bias.view_as(bias)
    kind = _adapter_kind(head)
    if kind != "LoRA" or not hasattr(head, "lora_A"):
        raise ValueError(f"calibkern cannot compute the logits of an lm_head wrapped by a PEFT {kind} adapter "
                         f"({type(head).__name__}): only plain LoRA is written as a weight there; keep the lm_head "
                         "out of the adapter's target_modules")
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
        variant = getattr(head, "lora_variant", {}).get(name)
        if variant is not None or getattr(head, "use_dora", {}).get(name):
            variant_name = type(variant).__name__.removesuffix("LinearVariant") if variant is not None else "Dora"
            variant_name = {"Dora": "DoRA", "ALora": "aLoRA"}.get(variant_name, variant_name)
            raise ValueError(f"calibkern does not support the LoRA variant {variant_name} on the lm_head (its output "
                             "is not h · (W + s·BA)ᵀ); keep the lm_head out of target_modules")
        if getattr(head, "fan_in_fan_out", False):
            raise ValueError("calibkern does not support a fan_in_fan_out LoRA lm_head")
        lora_b = head.lora_B[name]
        delta = lora_b.weight @ head.lora_A[name].weight
        weight = weight + head.scaling[name] * delta.to(weight.dtype)
        if getattr(lora_b, "bias", None) is not None:  # lora_bias=True: s · b_B joins the base bias
            extra = head.scaling[name] * lora_b.bias.to(weight.dtype)
            bias = extra if bias is None else bias + extra
    return weight, None if bias is None else bias.view_as(bias)


def _refuse_prompt_learning(model: nn.Module) -> None:
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(f"calibkern refuses PEFT {kind} (virtual tokens change the positions the fused "
                         "loss reads; it does not account for them): use LoRA, or compute_loss_func with the "
                         "model's own logits")


class RouterLoss(NamedTuple):
    """The router load-balancing loss a mixture-of-experts causal LM adds to its loss when it outputs router
    logits: ``coef · function(router_logits, experts, top_k, attention_mask)``, with the model module's own
    ``load_balancing_loss_func`` and the model's ``num_experts``, ``num_experts_per_tok`` and
    ``router_aux_loss_coef``."""

    function: object
    experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits, attention_mask) -> torch.Tensor:
        """The unweighted auxiliary loss (the model's ``aux_loss``)."""
        return self.function(router_logits, self.experts, self.top_k, attention_mask)


def router_loss(causal_lm: nn.Module, requested: bool | None = None) -> RouterLoss | None:
    """The :class:`RouterLoss` ``causal_lm`` adds to its loss, or None: on when ``requested`` (the call's
    ``output_router_logits``) or, when that is None, ``config.output_router_logits``. A model that outputs
    router logits but does not compute its loss in that form is refused by name (the equivalence check catches
    one that does something else under the same names)."""
    on = requested if requested is not None else getattr(causal_lm.config, "output_router_logits", False)
    if not on:
        return None
    function = getattr(sys.modules.get(type(causal_lm).__module__), "load_balancing_loss_func", None)
    experts, top_k, coef = (getattr(causal_lm, name, None)
                            for name in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef"))
    if function is None or None in (experts, top_k, coef):
        raise ValueError(f"calibkern refuses {type(causal_lm).__name__} with output_router_logits=True: it adds a "
                         "router auxiliary loss calibkern does not know how to compute; set "
                         "config.output_router_logits=False or use compute_loss_func")
    return RouterLoss(function, experts, top_k, float(coef))


@contextlib.contextmanager
def _decoder_as_forward(causal_lm: nn.Module):
    """Within the block, calling ``causal_lm`` runs only its decoder and returns a :class:`DecoderOutput` and the
    router's auxiliary loss (None without one).

    The weight and bias leave the forward as views, so the lm_head's parameters are part of the forward's
    output graph: DDP (with ``find_unused_parameters``) then counts them as used instead of marking them
    ready before the backward pass reaches them.
    """
    head = causal_lm.get_output_embeddings()
    transform = logit_transform(causal_lm)

    def decoder_forward(**kwargs):
        hidden, aux_loss = decoder_pass(causal_lm, kwargs, router_loss(causal_lm, kwargs.get("output_router_logits")))
        return projection(head, transform, hidden), aux_loss

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


def decoder_pass(causal_lm: nn.Module, inputs: dict, router: RouterLoss | None = None):
    """``(hidden, aux_loss)``: the final (normed) hidden states ``[B, T, D]`` of ``causal_lm``'s decoder
    (:func:`decoder_of`) for the :data:`DECODER_ARGUMENTS` of ``inputs`` and, with a ``router``, its unweighted
    auxiliary loss (else None). Hidden states whose width is not the lm_head's input width (a model that transforms
    them in between: ELECTRA's generator head, RemBERT's output projection) are refused, naming the class."""
    arguments = {key: inputs[key] for key in DECODER_ARGUMENTS if inputs.get(key) is not None}
    decoder = decoder_of(causal_lm)
    if router is None:
        hidden, aux_loss = decoder(**arguments, use_cache=False, return_dict=True).last_hidden_state, None
    else:
        output = decoder(**arguments, use_cache=False, return_dict=True, output_router_logits=True)
        hidden, aux_loss = output.last_hidden_state, router(output.router_logits, arguments.get("attention_mask"))
    # in_features, not the weight's shape: a ZeRO-3 or FSDP-sharded weight has none outside its gather
    width = getattr(causal_lm.get_output_embeddings(), "in_features", hidden.shape[-1])
    if hidden.shape[-1] != width:
        raise ValueError(f"calibkern refuses {type(causal_lm).__name__}: its decoder's hidden states have width "
                         f"{hidden.shape[-1]} but its lm_head takes {width} — the model transforms them in between, "
                         "which calibkern's fused path does not run; use compute_loss_func, which takes the model's "
                         "own logits")
    return hidden, aux_loss


def projection(head: nn.Module, transform: LogitTransform, hidden: torch.Tensor) -> DecoderOutput:
    """``hidden`` with the lm_head's effective weight and bias and ``transform`` folded in: the scale goes
    into the hidden states and the bias, ``s · (h Wᵀ + b) = (s h) Wᵀ + s b`` (no ``[V, D]`` copy); an unpadded
    vocabulary keeps the weight's and bias's first rows (views)."""
    weight, bias = _head_projection(head)
    if transform.vocab_rows is not None and transform.vocab_rows < weight.shape[0]:
        weight = weight[: transform.vocab_rows]
        bias = None if bias is None else bias[: transform.vocab_rows]
    if transform.scale != 1.0:
        hidden = hidden * transform.scale
        bias = None if bias is None else bias * transform.scale
    return DecoderOutput(hidden, weight, bias, transform.softcap)


def _decoder_call(model: nn.Module, inputs: dict, router_requested=None):
    """``(DecoderOutput, aux_loss)`` of one decoder pass through ``model``'s wrappers."""
    _refuse_prompt_learning(model)
    causal_lm = causal_lm_of(model)
    arguments = {key: inputs[key] for key in DECODER_ARGUMENTS if inputs.get(key) is not None}
    with _decoder_as_forward(causal_lm):
        return model(**arguments, output_router_logits=router_requested)


def decoder_forward(model: nn.Module, inputs: dict) -> DecoderOutput:
    """One decoder pass of ``model`` on ``inputs`` (no lm_head): final (normed) hidden states and the output
    projection to apply to them (no router auxiliary loss: the passes that read only logits skip it)."""
    return _decoder_call(model, inputs, router_requested=False)[0]


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
    """Option logits ``softcap(h · W[option_ids]ᵀ + b[option_ids])`` in float32 for hidden rows ``[N, D]``. A
    ``weight`` (and ``bias``) that is a ``DTensor`` split over the vocabulary (tensor parallelism) gives each rank's
    columns of the options it holds (zeros for the others), summed over its group — ``N · K`` numbers, the same on
    every rank, without gradient (the E-step and statistics passes read them detached)."""
    weight, bias, shard = _vocabulary_split(weight, bias, None)
    index = torch.as_tensor(option_ids, dtype=torch.long, device=weight.device)
    logits = hidden.float() @ option_weight(weight, index, shard).float().t()
    if bias is not None:
        logits = logits + option_bias(bias, index, shard).float()
    if shard is not None:
        logits = shard.all_reduce_(logits.detach())
    return softcap_logits(logits, softcap)


def vocabulary_replicas(weight: torch.Tensor) -> int:
    """The processes of ``weight``'s vocabulary split (its ``DTensor`` mesh dimension), each holding the same
    hidden rows; 1 for a whole weight."""
    import torch.distributed as dist

    shard = _vocabulary_split(weight, None, None)[2]
    return 1 if shard is None else dist.get_world_size(shard.group)


def whole_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h · Wᵀ + b`` in float32 over every vocabulary row; a ``DTensor`` weight split over the vocabulary gives
    each rank's columns, placed and summed over its group (for the equivalence check's slice, ``[rows, V]``)."""
    local, local_bias, shard = _vocabulary_split(weight, bias, None)
    logits = hidden.float() @ local.float().t() + (0.0 if local_bias is None else local_bias.float())
    if shard is None:
        return logits
    whole = logits.new_zeros(*logits.shape[:-1], weight.shape[0])
    whole.index_copy_(-1, shard.start + torch.arange(shard.size, device=logits.device), logits)
    return shard.all_reduce_(whole)


class ProbeResult(NamedTuple):
    """What calibkern computes on the check's slice: the loss the model would return (``CE + coef · aux_loss``)
    and the full logits ``[B, T, V]`` (float32)."""

    loss: torch.Tensor
    logits: torch.Tensor


def probe_numbers(output: DecoderOutput, labels: torch.Tensor, aux_loss: torch.Tensor | None,
                  router: RouterLoss | None, backend: str | None = None) -> ProbeResult:
    """calibkern's model loss on a small slice — its fused cross-entropy (shifted labels), plus the router's
    ``coef · aux_loss`` — and the slice's full logits ``softcap(h · Wᵀ + b)``, for :func:`check_logit_parity`."""
    hidden, weight, bias, softcap = output
    loss = calibkern.fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, bias=bias, calibration=None,
                                                   logit_softcap=softcap, shift=True, backend=backend).loss.float()
    if aux_loss is not None:
        loss = loss + router.coef * aux_loss.float()
    return ProbeResult(loss, softcap_logits(whole_logits(hidden, weight, bias), softcap))


@contextlib.contextmanager
def own_forward(causal_lm: nn.Module):
    """Within the block, ``causal_lm`` runs the forward it had before :func:`calibkern.hf.apply_fused_loss`
    (no change on an unpatched model)."""
    fused = getattr(causal_lm, FUSED_LOSS_ATTRIBUTE, None)
    previous = causal_lm.__dict__.get("forward")
    if fused is None or previous is None:
        yield
        return
    causal_lm.forward = fused.original_forward.__get__(causal_lm)
    try:
        yield
    finally:
        causal_lm.forward = previous


def check_slice(inputs: dict, tokens: int = 16) -> dict:
    """The check's slice of a batch: the first row's first ``tokens`` positions of every ``[B, T, …]`` tensor,
    labelled with the row's own tokens (padding ignored) so that every position is scored — the batch's labels
    may supervise none of the first positions (completion-only); given ``labels`` are kept only without
    ``input_ids``."""
    probe = {key: value[:1, :tokens] for key, value in inputs.items()
             if isinstance(value, torch.Tensor) and value.dim() >= 2 and key != "num_items_in_batch"}
    if "input_ids" in probe:
        mask = probe.get("attention_mask")
        probe["labels"] = probe["input_ids"] if mask is None else probe["input_ids"].masked_fill(mask == 0, -100)
    return probe


@torch.no_grad()
def check_logit_parity(model: nn.Module, inputs: dict, *, tokens: int = 16, backend: str | None = None) -> float:
    """The equivalence check: on one small slice of ``inputs`` (:func:`check_slice`), calibkern's path gives
    ``model``'s own forward — the same logits shape, the same logits (hence logsumexp and option columns) and the
    same loss, auxiliary losses included — both in eval mode; returns the largest logit difference, or raises
    ``ValueError`` naming the model class and the first thing that differs. Arguments the fused path would drop
    are refused first (:func:`refuse_unconsumed`). On a model patched by :func:`calibkern.hf.apply_fused_loss`
    calibkern's numbers come from its fused forward (``equivalence_probe=True``, the one path that gathers a
    sharded lm_head); the model's own come from its forward before the patch."""
    _refuse_prompt_learning(model)
    causal_lm = causal_lm_of(model)
    refuse_unconsumed(causal_lm, inputs)
    probe = check_slice(inputs, tokens)
    if "labels" not in probe:
        raise ValueError("the equivalence check needs input_ids or labels of shape [batch, positions]")
    labels = probe.pop("labels")
    probe.pop("answer_mask", None)
    router_requested = inputs.get("output_router_logits")
    patched = is_fused_forward(causal_lm)
    was_training = model.training
    model.eval()
    try:
        with own_forward(causal_lm):
            theirs = model(**probe, labels=labels, use_cache=False,
                           **({} if router_requested is None else {"output_router_logits": router_requested}))
        if patched:  # the lm_head may be sharded: only the patched forward gathers it (calibkern.hf.patching)
            ours = model(**probe, labels=labels, equivalence_probe=True, output_router_logits=router_requested)
            ours = ProbeResult(ours.loss, ours.logits)
        else:
            output, aux_loss = _decoder_call(model, probe, router_requested)
            ours = probe_numbers(output, labels, aux_loss, router_loss(causal_lm, router_requested), backend)
    finally:
        model.train(was_training)
    # float32 throughout: rounding-level tolerances; half-precision weights or an autocast around the call: half's
    exact = theirs.logits.dtype == torch.float32 and causal_lm.get_output_embeddings().weight.dtype == torch.float32 \
        and not torch.is_autocast_enabled(theirs.logits.device.type)
    return _compare(causal_lm, ours, theirs, labels, exact)


def is_fused_forward(causal_lm: nn.Module) -> bool:
    """Whether ``causal_lm``'s instance ``forward`` is calibkern's fused forward (possibly inside wrappers that
    set ``__wrapped__`` / ``__func__``, as Accelerate's autocast does)."""
    function = causal_lm.__dict__.get("forward")
    for _ in range(16):
        if function is None:
            return False
        if getattr(function, "calibkern_fused_forward", False):
            return getattr(function, "__self__", causal_lm) is causal_lm
        function = getattr(function, "__wrapped__", None) or getattr(function, "__func__", None)
    return False


def _compare(causal_lm: nn.Module, ours: ProbeResult, theirs, labels: torch.Tensor, exact: bool) -> float:
    """The first difference between ``ours`` and the model's output ``theirs``, as a ``ValueError``."""
    name = type(causal_lm).__name__
    their_logits = theirs.logits
    if hasattr(their_logits, "full_tensor"):  # a tensor-parallel lm_head's DTensor output
        their_logits = their_logits.full_tensor()
    their_logits = their_logits.float()
    if ours.logits.shape != their_logits.shape:
        raise ValueError(f"calibkern refuses {name}: its logits have shape {tuple(their_logits.shape)} where "
                         f"calibkern's fused path computes {tuple(ours.logits.shape)} (h · Wᵀ over the whole "
                         "lm_head); the model adds, drops or slices positions or vocabulary rows")
    scale = max(1.0, float(their_logits.abs().max()) if their_logits.numel() else 1.0)
    difference = float((ours.logits - their_logits).abs().max()) if their_logits.numel() else 0.0
    if not difference <= (1e-4 if exact else 3e-2) * scale:
        transform = logit_transform(causal_lm)
        lse = float((ours.logits.logsumexp(-1) - their_logits.logsumexp(-1)).abs().max())
        raise ValueError(f"calibkern refuses {name}: calibkern's fused path does not reproduce its logits (largest "
                         f"difference {difference:.3g}, logsumexp {lse:.3g}; applied scale {transform.scale:g}, "
                         f"softcap {transform.softcap}): the model transforms its hidden states or logits in a way "
                         "calibkern does not implement")
    their_loss = getattr(theirs, "loss", None)
    if their_loss is None:
        raise ValueError(f"calibkern refuses {name}: its forward returned no loss for labels")
    their_loss, our_loss = float(their_loss), float(ours.loss)
    if not abs(our_loss - their_loss) <= (1e-4 if exact else 3e-2) * max(1.0, abs(their_loss)):
        raise ValueError(f"calibkern refuses {name}: its own loss is {their_loss:.6g} where calibkern computes "
                         f"{our_loss:.6g} from the same logits{_loss_hint(theirs, ours, labels)}")
    return difference


def _loss_hint(theirs, ours: ProbeResult, labels: torch.Tensor) -> str:
    """Why the losses may differ: labels the model does not shift, an auxiliary loss calibkern did not add."""
    import torch.nn.functional as F

    logits, valid = ours.logits.reshape(-1, ours.logits.shape[-1]), labels.reshape(-1)
    unshifted = F.cross_entropy(logits, valid, ignore_index=-100)
    if abs(float(unshifted) - float(theirs.loss)) <= 1e-4 * max(1.0, abs(float(theirs.loss))):
        return (" — the model does not shift its labels (position t predicts labels[t]) while calibkern's loss "
                "shifts them (position t predicts labels[t + 1])")
    if getattr(theirs, "aux_loss", None) is not None:
        return f" — the model adds an auxiliary loss (aux_loss {float(theirs.aux_loss):.6g}) calibkern does not"
    return " — the model computes a loss other than shifted cross-entropy over its logits"
