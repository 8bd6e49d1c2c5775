"""``apply_fused_loss``: the fused calibration loss inside a causal LM's own forward (docs/distributed.md).

After ``apply_fused_loss(model, calibration)``, ``model(input_ids=..., attention_mask=..., labels=...,
answer_mask=None, num_items_in_batch=None)`` runs the decoder, then — where the lm_head's sharding framework
has gathered its weight — :func:`calibkern.fused_linear_calibration_loss` on the final hidden states,
``loss = sft_weight · CE + lam′ · L_cal`` with the weights, scaling and streaming M-step of the run's
:class:`calibkern.hf.loss_policy.LossPolicy` (the one policy of every calibkern loss path). The output is a
:class:`FusedCausalLMOutput` with ``logits=None``; without ``labels`` the model runs its own forward (logits,
generation).

Where the weight is used: under FSDP2 (the lm_head a ``fully_shard`` unit) in a method registered with
``register_fsdp_forward_method``, under FSDP1 inside the wrapped lm_head's forward, under DeepSpeed ZeRO-3
inside the lm_head's own forward (its module hooks gather the partitions), otherwise (the lm_head in the root's
unit, DDP, one process) directly. The gradient lands in the parameter the framework reduces; no ``[tokens, V]``
tensor exists.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import calibkern

from ..metrics import BinStats
from .config import CalibrationConfig
from .loss_policy import LossPolicy, answer_option_labels
from .modeling import (
    FUSED_LOSS_ATTRIBUTE,
    _refuse_prompt_learning,
    causal_lm_of,
    decoder_hidden,
    logit_transform,
    option_logits_at,
    projection,
)

__all__ = ["FusedCausalLMOutput", "FusedLoss", "answer_option_labels", "apply_fused_loss", "fused_loss_of",
           "option_logits_pass", "patch_causal_lm", "token_statistics_pass"]

GATHERED_METHOD = "calibkern_gathered_call"  # the lm_head method registered with FSDP2


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` and the fused loss's parts: ``loss = sft_weight ·
    sft_loss + lam′ · cal_loss``; ``bin_stats`` over the answer positions (``cal_loss`` and ``bin_stats`` are
    None for plain CE); ``token_stats`` / ``full_stats`` over the supervised tokens when the calibration's
    ``token_stats`` / ``full_stats`` are on (plain CE: token statistics on, Full-ECE off;
    docs/math.md#token-level-calibration). The option-logits pass (``option_logits_only=True``) sets only
    ``option_logits`` ``[B·(T-1), K]`` (float32) and ``option_labels`` ``[B·(T-1)]``; the token-statistics pass
    (``token_stats_only=True``) only ``token_stats``."""

    sft_loss: torch.Tensor | None = None
    cal_loss: torch.Tensor | None = None
    bin_stats: BinStats | None = None
    token_stats: BinStats | None = None
    full_stats: BinStats | None = None
    option_logits: torch.Tensor | None = None
    option_labels: torch.Tensor | None = None


class FusedLoss(LossPolicy):
    """What a patched causal LM's forward computes (held as its ``calibkern_fused_loss`` attribute): the
    :class:`calibkern.hf.loss_policy.LossPolicy` of the run, applied where the lm_head weight is whole."""

    def loss(self, head: nn.Module, transform, hidden, labels, answer_mask, num_items_in_batch, training: bool):
        """``(loss, sft_loss, cal_loss, bin_stats, token_stats, full_stats)`` from the final hidden states; runs
        where ``head``'s parameters are gathered. A training call adds its statistics to :attr:`window` and, for
        streaming rcft, its answers to the E-step."""
        hidden, weight, bias, softcap = projection(head, transform, hidden)
        fused = calibkern.fused_linear_calibration_loss(
            hidden, weight, labels, bias=bias, logit_softcap=softcap,
            **self.fused_arguments(hidden.device, training, num_items_in_batch, answer_mask))
        loss, cal_loss, bin_stats = fused.loss, fused.cal_loss, fused.bin_stats
        if self.calibration is None:  # plain CE: no answers, no term
            cal_loss = bin_stats = None
        if self.needs_option_logits and (training or self.calibration.official_compat):
            option_logits, option_labels = self._option_logits(hidden, weight, bias, softcap, labels, answer_mask)
            if self.calibration.official_compat:
                cal_loss = self.official_term(option_logits, option_labels)
                loss = loss + self.loss_weights(training, num_items_in_batch)[1] * cal_loss
            if self.streaming and training:
                self.stream_estep(option_logits, option_labels)
        if training:
            self.window.add(bin_stats, cal_loss, fused.token_stats, fused.full_stats)
        return loss, fused.sft_loss, cal_loss, bin_stats, fused.token_stats, fused.full_stats

    def option_logits(self, head: nn.Module, transform, hidden, labels, answer_mask):
        """``(option_logits [B·(T-1), K], option_labels [B·(T-1)])`` at every predicting position, non-answers
        labelled ``-100``; runs where ``head``'s parameters are gathered."""
        return self._option_logits(*projection(head, transform, hidden), labels, answer_mask)

    def token_statistics(self, head: nn.Module, transform, hidden, labels) -> BinStats:
        """The supervised tokens' binned statistics (the fused loss with no calibration term, ``n_bins`` bins);
        runs where ``head``'s parameters are gathered."""
        hidden, weight, bias, softcap = projection(head, transform, hidden)
        calibration = self.calibration
        return calibkern.fused_linear_calibration_loss(
            hidden, weight, labels, option_ids=None, bias=bias, calibration=None,
            n_bins=10 if calibration is None else calibration.n_bins,
            chunk_size=None if calibration is None else calibration.chunk_size, logit_softcap=softcap,
            backend=None if calibration is None else calibration.backend, token_stats=True).token_stats

    def _option_logits(self, hidden, weight, bias, softcap, labels, answer_mask):
        """A ``[tokens, K]`` product, cheap next to the decoder, with static shapes."""
        option_ids = self.option_ids.to(hidden.device)
        option_labels = answer_option_labels(labels, option_ids, answer_mask)
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return option_logits_at(rows, weight, bias, option_ids, softcap), option_labels


def _gathered_call(head: nn.Module, function, *args):
    """``function(module, *args)`` where ``head``'s parameters are whole: ``module`` is ``head`` (or the module
    an FSDP1 wrapper holds); the sharding framework's hooks run around the call (module docstring)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, register_fsdp_forward_method

    if isinstance(head, FSDPModule):
        if GATHERED_METHOD not in head.__dict__:
            setattr(head, GATHERED_METHOD, types.MethodType(lambda module, f, *a: f(module, *a), head))
            register_fsdp_forward_method(head, GATHERED_METHOD)
        return getattr(head, GATHERED_METHOD)(function, *args)
    if isinstance(head, FullyShardedDataParallel):  # FSDP1 unshards inside its own forward
        return _as_forward(head.module, head, function, *args)
    if any(hasattr(parameter, "ds_id") for parameter in head.parameters()):
        # DeepSpeed ZeRO-3: the module's hooks fetch its partitions before forward and again before backward,
        # where the whole gradient meets the whole parameter and is reduce-scattered into the partitions
        return _as_forward(head, head, function, *args)
    # otherwise the weight is whole, or a DTensor split over the vocabulary (tensor parallelism), which the fused
    # loss computes in vocabulary-parallel form (and refuses with any other placement)
    return function(head, *args)


def _as_forward(module: nn.Module, wrapper: nn.Module, function, *args):
    """``wrapper(*args)`` with ``module``'s forward (``module`` is ``wrapper`` or the module it holds) swapped for
    ``function(module, *args)``: the framework's module hooks run around the call."""
    module.forward = functools.partial(function, module)
    try:
        return wrapper(*args)
    finally:
        del module.forward


def _fused_forward(self, *args, labels=None, answer_mask=None, num_items_in_batch=None, option_logits_only=False,
                   token_stats_only=False, **kwargs):
    """The patched ``forward`` of a causal LM (module docstring). The statistics passes (need ``labels``):
    ``option_logits_only=True`` returns only the option logits and labels at every predicting position,
    ``token_stats_only=True`` only the supervised tokens' binned statistics."""
    state: FusedLoss = getattr(self, FUSED_LOSS_ATTRIBUTE)
    if labels is None and not (option_logits_only or token_stats_only):
        return state.original_forward(self, *args, **kwargs)
    if option_logits_only and (labels is None or state.option_ids is None):
        raise ValueError("option_logits_only=True needs labels and a CalibrationConfig (its option_ids)")
    if token_stats_only and labels is None:
        raise ValueError("token_stats_only=True needs labels")
    if len(args) > 1:
        raise TypeError("the fused forward takes input_ids as its one positional argument; pass the rest by name")
    if args:
        kwargs["input_ids"] = args[0]
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise ValueError("the fused loss computes the whole sequence: pass no past_key_values / cache with labels")
    head, transform = self.get_output_embeddings(), logit_transform(self)
    hidden = decoder_hidden(self.get_decoder(), kwargs)
    if option_logits_only:
        option_logits, option_labels = _gathered_call(
            head, functools.partial(_head_first, state.option_logits, transform), hidden, labels, answer_mask)
        return FusedCausalLMOutput(option_logits=option_logits, option_labels=option_labels)
    if token_stats_only:
        return FusedCausalLMOutput(token_stats=_gathered_call(
            head, functools.partial(_head_first, state.token_statistics, transform), hidden, labels))
    training = self.training and torch.is_grad_enabled()
    loss, sft_loss, cal_loss, bin_stats, token_stats, full_stats = _gathered_call(
        head, functools.partial(_head_first, state.loss, transform), hidden, labels, answer_mask, num_items_in_batch,
        training)
    return FusedCausalLMOutput(loss=loss, logits=None, sft_loss=sft_loss, cal_loss=cal_loss, bin_stats=bin_stats,
                               token_stats=token_stats, full_stats=full_stats)


def _head_first(method, transform, head, *args):
    return method(head, transform, *args)


def _fused_signature(original) -> inspect.Signature:
    """``original``'s signature with ``answer_mask``, ``num_items_in_batch``, ``option_logits_only`` and
    ``token_stats_only`` added (the Trainer keeps the dataset columns the forward names)."""
    signature = inspect.signature(original)
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in parameters}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in (("answer_mask", None), ("num_items_in_batch", None), ("option_logits_only", False),
                                   ("token_stats_only", False))
             if name not in names]
    keywords = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    positional = [p for p in parameters if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword_only = [p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]
    return signature.replace(parameters=positional + keyword_only + extra + keywords)


def patch_causal_lm(model: nn.Module, state: FusedLoss) -> nn.Module:
    """Give the causal LM inside ``model`` the fused forward computing ``state``; patching again replaces the
    state only. Returns ``model``."""
    causal_lm = causal_lm_of(model)
    previous: FusedLoss | None = getattr(causal_lm, FUSED_LOSS_ATTRIBUTE, None)
    if previous is not None:
        state.original_forward = previous.original_forward
    else:
        own = causal_lm.__dict__.get("forward")  # e.g. Accelerate's autocast wrapper
        state.original_forward = type(causal_lm).forward if own is None else _unbound(own)

        def forward(self, *args, **kwargs):
            return _fused_forward(self, *args, **kwargs)

        forward.__signature__ = _fused_signature(state.original_forward)
        causal_lm.forward = types.MethodType(forward, causal_lm)  # bound: a deep copy rebinds it to the copy
    setattr(causal_lm, FUSED_LOSS_ATTRIBUTE, state)
    return model


def _unbound(method):
    """An instance ``forward`` as a function of the module (so a deep copy calls its own copy)."""
    function = getattr(method, "__func__", None)
    return function if function is not None else (lambda self, *a, **k: method(*a, **k))


def apply_fused_loss(model: nn.Module, calibration: CalibrationConfig | None = None, *, em_state=None,
                     gradient_accumulation_steps: int = 1) -> nn.Module:
    """Patch ``model`` (a causal LM, possibly PEFT-, DDP- or FSDP-wrapped) in place so that a call with
    ``labels`` computes :func:`calibkern.fused_linear_calibration_loss` inside its forward and returns a
    :class:`FusedCausalLMOutput` (module docstring); returns ``model``.

    ``calibration=None``: plain fused cross-entropy. A :class:`CalibrationConfig` adds the CFT or token_cft term
    (needs ``bin_accuracy``) or the RCFT term (``em_state``, default a new one from ``calibration.em``; with
    ``refresh="stream"`` each training call runs the E-step and every ``gradient_accumulation_steps`` calls the
    M-step, all-reduced across processes). ``official_compat`` is refused (CalibrationTrainer estimates the
    counts it needs). Every training call's statistics go into ``fused_loss_of(model).window``
    (:class:`calibkern.hf.TokenTelemetryCallback` logs them).
    """
    _refuse_prompt_learning(model)
    state = FusedLoss(calibration, em_state=em_state, gradient_accumulation_steps=gradient_accumulation_steps)
    if calibration is not None and calibration.official_compat:
        raise ValueError("apply_fused_loss does not support official_compat; use CalibrationTrainer")
    if state.needs_bin_accuracy:
        raise ValueError(f"apply_fused_loss with method={calibration.method!r} needs calibration.bin_accuracy")
    return patch_causal_lm(model, state)


def fused_loss_of(model: nn.Module) -> FusedLoss:
    """The :class:`FusedLoss` of a model patched by :func:`apply_fused_loss` (its state: ``em_state``,
    ``bin_accuracy``, ``gradient_accumulation_steps``, the telemetry ``window``)."""
    state = getattr(causal_lm_of(model), FUSED_LOSS_ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched: call calibkern.hf.apply_fused_loss(model, ...) first")
    return state


def option_logits_pass(model: nn.Module, batch: dict) -> FusedCausalLMOutput:
    """One option-logits pass of a patched ``model`` on ``batch`` (``labels`` and optionally ``answer_mask``)."""
    return model(**batch, option_logits_only=True)


def token_statistics_pass(model: nn.Module, batch: dict) -> FusedCausalLMOutput:
    """One token-statistics pass of a patched ``model`` on ``batch`` (``labels``): ``.token_stats``."""
    return model(**batch, token_stats_only=True)
