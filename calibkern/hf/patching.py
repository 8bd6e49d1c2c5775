"""``apply_fused_loss``: the fused calibration loss inside a causal LM's own forward (docs/distributed.md).

After ``apply_fused_loss(model, calibration)``, ``model(input_ids=..., attention_mask=..., labels=...,
answer_mask=None, num_items_in_batch=None)`` runs the decoder, then — where the lm_head's sharding framework
has gathered its weight — :func:`calibkern.fused_linear_calibration_loss` on the final hidden states:

    loss = sft_weight · CE + lam′ · L_cal,   lam′ = lam / (G · P) with num_items_in_batch in training,
                                             lam / P with it in evaluation, lam without it,

with ``G`` the ``gradient_accumulation_steps`` and ``P`` the number of processes (the Hugging Face convention:
the Trainer sums the micro-batches and multiplies the loss by ``P``, so CE = Σ / num_items_in_batch is the
global mean and the calibration term the mean of the micro-batches' means). The output is a
:class:`FusedCausalLMOutput` with ``logits=None``; without ``labels`` the model runs its own forward (logits,
generation).

Where the weight is used: under FSDP2 (the lm_head a ``fully_shard`` unit) in a method registered with
``register_fsdp_forward_method``, under FSDP1 inside the wrapped lm_head's forward, under DeepSpeed ZeRO-3
inside ``deepspeed.zero.GatheredParameters``, otherwise (the lm_head in the root's unit, DDP, one process)
directly. The gradient lands in the parameter the framework reduces; no ``[tokens, V]`` tensor exists.
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

from ..losses import option_labels as option_labels_of
from ..metrics import BinStats
from .config import CalibrationConfig
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
           "option_logits_pass"]

IGNORE_INDEX = -100
GATHERED_METHOD = "calibkern_gathered_call"  # the lm_head method registered with FSDP2
CALIBRATION_FORM = {"cft": "hard_bin", "rcft": "em"}


def answer_option_labels(
    labels: torch.Tensor, option_ids: torch.Tensor, answer_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B·(T-1)]`` option label per *predicting* position (position t predicts ``labels[t+1]``):
    :func:`calibkern.losses.option_labels` of the shifted labels, with ``answer_mask[:, 1:]`` when given."""
    answers = None if answer_mask is None else answer_mask[:, 1:].bool()
    return option_labels_of(labels[:, 1:], option_ids, answers, IGNORE_INDEX).reshape(-1)


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` and the fused loss's parts: ``loss = sft_weight ·
    sft_loss + lam′ · cal_loss``; ``bin_stats`` over the answer positions (``cal_loss`` and ``bin_stats`` are
    None for plain CE); ``token_stats`` / ``full_stats`` over the supervised tokens when the calibration's
    ``token_stats`` / ``full_stats`` are on (plain CE: token statistics on, Full-ECE off;
    docs/math.md#token-level-calibration). The option-logits pass (``option_logits_only=True``) sets only
    ``option_logits`` ``[B·(T-1), K]`` (float32) and ``option_labels`` ``[B·(T-1)]``."""

    sft_loss: torch.Tensor | None = None
    cal_loss: torch.Tensor | None = None
    bin_stats: BinStats | None = None
    token_stats: BinStats | None = None
    full_stats: BinStats | None = None
    option_logits: torch.Tensor | None = None
    option_labels: torch.Tensor | None = None


class FusedLoss:
    """What a patched causal LM's forward computes (held as its ``calibkern_fused_loss`` attribute).

    ``calibration``: a :class:`CalibrationConfig` or None (plain CE). ``bin_accuracy`` (cft) starts as
    ``calibration.bin_accuracy``; ``em_state`` (rcft) as the one given or a new one. With
    ``em.refresh="stream"`` every training call adds its answers to the E-step and, when ``stream_mstep``,
    the M-step runs after every ``gradient_accumulation_steps`` training calls (CalibrationTrainer turns this
    off and runs it at each optimizer step).
    """

    def __init__(self, calibration: CalibrationConfig | None, *, em_state=None, gradient_accumulation_steps: int = 1):
        if calibration is not None and not isinstance(calibration, CalibrationConfig):
            raise TypeError(f"calibration must be a CalibrationConfig or None, got {type(calibration).__name__}")
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
                or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be a positive int, got {gradient_accumulation_steps!r}")
        method = None if calibration is None else calibration.method
        if method not in (None, *CALIBRATION_FORM):
            raise ValueError(f"the fused forward computes method 'cft' or 'rcft', got {method!r}")
        if em_state is not None and method != "rcft":
            raise ValueError("em_state applies to a CalibrationConfig with method='rcft' only")
        self.calibration = calibration
        self.option_ids = None if calibration is None else torch.tensor(calibration.option_ids)
        self.bin_accuracy = None
        if calibration is not None and calibration.bin_accuracy is not None:
            self.bin_accuracy = torch.as_tensor(calibration.bin_accuracy, dtype=torch.float32)
        self.bin_counts = None
        self.token_stats = True if calibration is None else calibration.token_stats
        self.full_stats = False if calibration is None else calibration.full_stats
        self.em_state = em_state if em_state is not None or method != "rcft" else calibration.new_em_state()
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.stream_mstep = True
        self._micro_batches = 0  # streaming training calls since the last M-step

    @property
    def streaming(self) -> bool:
        return self.em_state is not None and self.calibration.refresh == "stream"

    def loss_weights(self, training: bool, num_items_in_batch) -> tuple[float, float]:
        """``(sft_weight, lam′)`` (module docstring)."""
        if self.calibration is None:
            return 1.0, 0.0
        sft_weight, lam = self.calibration.loss_weights
        if num_items_in_batch is None:
            return sft_weight, lam
        return sft_weight, lam / ((self.gradient_accumulation_steps if training else 1) * _world_size())

    def loss(self, head: nn.Module, transform, hidden, labels, answer_mask, num_items_in_batch, training: bool):
        """``(loss, sft_loss, cal_loss, bin_stats, token_stats, full_stats)`` from the final hidden states; runs
        where ``head``'s parameters are gathered."""
        hidden, weight, bias, softcap = projection(head, transform, hidden)
        calibration = self.calibration
        option_ids = None if self.option_ids is None else self.option_ids.to(hidden.device)
        sft_weight, lam = self.loss_weights(training, num_items_in_batch)
        form = None if calibration is None or calibration.official_compat else CALIBRATION_FORM[calibration.method]
        if form == "hard_bin" and self.bin_accuracy is None:
            raise ValueError("method='cft' needs the per-bin accuracies: set CalibrationConfig.bin_accuracy (or use "
                             "CalibrationTrainer, which estimates them before the first step)")
        fused = calibkern.fused_linear_calibration_loss(
            hidden, weight, labels, option_ids=option_ids, bias=bias, calibration=form,
            bin_accuracy=self.bin_accuracy.to(hidden.device) if form == "hard_bin" else None,
            em_state=self.em_state if form == "em" else None, lam=lam, sft_weight=sft_weight,
            n_bins=10 if calibration is None else calibration.n_bins, shift=True,
            answer_mask=None if calibration is None else answer_mask,  # plain CE has no answers
            num_items_in_batch=num_items_in_batch, chunk_size=None if calibration is None else calibration.chunk_size,
            logit_softcap=softcap, backend=None if calibration is None else calibration.backend,
            token_stats=self.token_stats, full_stats=self.full_stats)
        if calibration is None:
            return fused.loss, fused.sft_loss, None, None, fused.token_stats, fused.full_stats
        loss, cal_loss = fused.loss, fused.cal_loss
        if calibration.official_compat or (self.streaming and training):
            option_logits, option_labels = self._option_logits(hidden, weight, bias, softcap, labels, answer_mask)
        if calibration.official_compat:
            cal_loss = calibkern.calibration_loss(
                option_logits, option_labels, self.bin_accuracy, n_bins=calibration.n_bins,
                bin_counts=self.bin_counts.double(), official_compat=True, backend="torch")
            loss = loss + lam * cal_loss
        if self.streaming and training:
            self._stream_estep(option_logits.detach(), option_labels)
        return loss, fused.sft_loss, cal_loss, fused.bin_stats, fused.token_stats, fused.full_stats

    def option_logits(self, head: nn.Module, transform, hidden, labels, answer_mask):
        """``(option_logits [B·(T-1), K], option_labels [B·(T-1)])`` at every predicting position, non-answers
        labelled ``-100``; runs where ``head``'s parameters are gathered."""
        return self._option_logits(*projection(head, transform, hidden), labels, answer_mask)

    def _option_logits(self, hidden, weight, bias, softcap, labels, answer_mask):
        """A ``[tokens, K]`` product, cheap next to the decoder, with static shapes."""
        option_ids = self.option_ids.to(hidden.device)
        option_labels = answer_option_labels(labels, option_ids, answer_mask)
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return option_logits_at(rows, weight, bias, option_ids, softcap), option_labels

    @torch.no_grad()
    def _stream_estep(self, option_logits, option_labels):
        self.em_state.estep(option_logits, option_labels)
        self._micro_batches += 1
        if self.stream_mstep and self._micro_batches >= self.gradient_accumulation_steps:
            self.em_state.mstep()
            self._micro_batches = 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
        inner = head.module
        inner.forward = functools.partial(function, inner)
        try:
            return head(*args)
        finally:
            del inner.forward
    if any(hasattr(parameter, "ds_id") for parameter in head.parameters()):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
            return function(head, *args)
    from torch.distributed.tensor import DTensor

    if isinstance(getattr(head, "weight", None), DTensor):
        raise RuntimeError(f"the lm_head ({type(head).__name__}) weight is sharded outside any unit calibkern "
                           "can gather: apply fully_shard to the lm_head or to the root model")
    return function(head, *args)


def _fused_forward(self, *args, labels=None, answer_mask=None, num_items_in_batch=None, option_logits_only=False,
                   **kwargs):
    """The patched ``forward`` of a causal LM (module docstring). ``option_logits_only=True`` returns only the
    option logits and labels at every predicting position (the statistics passes; needs ``labels``)."""
    state: FusedLoss = getattr(self, FUSED_LOSS_ATTRIBUTE)
    if labels is None and not option_logits_only:
        return state.original_forward(self, *args, **kwargs)
    if option_logits_only and (labels is None or state.option_ids is None):
        raise ValueError("option_logits_only=True needs labels and a CalibrationConfig (its option_ids)")
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
    training = self.training and torch.is_grad_enabled()
    loss, sft_loss, cal_loss, bin_stats, token_stats, full_stats = _gathered_call(
        head, functools.partial(_head_first, state.loss, transform), hidden, labels, answer_mask, num_items_in_batch,
        training)
    return FusedCausalLMOutput(loss=loss, logits=None, sft_loss=sft_loss, cal_loss=cal_loss, bin_stats=bin_stats,
                               token_stats=token_stats, full_stats=full_stats)


def _head_first(method, transform, head, *args):
    return method(head, transform, *args)


def _fused_signature(original) -> inspect.Signature:
    """``original``'s signature with ``answer_mask``, ``num_items_in_batch`` and ``option_logits_only`` added
    (the Trainer keeps the dataset columns the forward names)."""
    signature = inspect.signature(original)
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in parameters}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in (("answer_mask", None), ("num_items_in_batch", None), ("option_logits_only", False))
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

    ``calibration=None``: plain fused cross-entropy. A :class:`CalibrationConfig` adds the CFT term (needs
    ``bin_accuracy``) or the RCFT term (``em_state``, default a new one from ``calibration.em``; with
    ``refresh="stream"`` each training call runs the E-step and every ``gradient_accumulation_steps`` calls the
    M-step, all-reduced across processes). ``official_compat`` is refused (use CalibrationTrainer).
    """
    _refuse_prompt_learning(model)
    state = FusedLoss(calibration, em_state=em_state, gradient_accumulation_steps=gradient_accumulation_steps)
    if calibration is not None and calibration.official_compat:
        raise ValueError("apply_fused_loss does not support official_compat; use CalibrationTrainer")
    if calibration is not None and calibration.method == "cft" and calibration.bin_accuracy is None:
        raise ValueError("apply_fused_loss with method='cft' needs calibration.bin_accuracy")
    return patch_causal_lm(model, state)


def fused_loss_of(model: nn.Module) -> FusedLoss:
    """The :class:`FusedLoss` of a model patched by :func:`apply_fused_loss` (its state: ``em_state``,
    ``bin_accuracy``, ``gradient_accumulation_steps``)."""
    state = getattr(causal_lm_of(model), FUSED_LOSS_ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched: call calibkern.hf.apply_fused_loss(model, ...) first")
    return state


def option_logits_pass(model: nn.Module, batch: dict) -> FusedCausalLMOutput:
    """One option-logits pass of a patched ``model`` on ``batch`` (``labels`` and optionally ``answer_mask``)."""
    return model(**batch, option_logits_only=True)
