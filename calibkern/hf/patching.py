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
    check_logit_parity,
    decoder_pass,
    is_fused_forward,
    logit_transform,
    option_logits_at,
    probe_numbers,
    projection,
    refuse_unconsumed,
    router_loss,
    vocabulary_replicas,
)

__all__ = ["FusedCausalLMOutput", "FusedForward", "FusedLoss", "answer_option_labels", "apply_fused_loss",
           "fused_loss_of", "option_logits_pass", "patch_causal_lm", "remove_fused_loss", "token_statistics_pass"]

GATHERED_METHOD = "calibkern_gathered_call"  # the lm_head method registered with FSDP2


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` and the fused loss's parts: ``loss = sft_weight ·
    sft_loss + lam′ · cal_loss``; ``bin_stats`` over the answer positions (``cal_loss`` and ``bin_stats`` are
    None for plain CE); ``token_stats`` / ``full_stats`` over the supervised tokens when the calibration's
    ``token_stats`` / ``full_stats`` are on (plain CE: token statistics on, Full-ECE off;
    docs/math.md#token-level-calibration). The option-logits pass (``option_logits_only=True``) sets only
    ``option_logits`` ``[B·(T-1), K]`` (float32) and ``option_labels`` ``[B·(T-1)]``; the token-statistics pass
    (``token_stats_only=True``) only ``token_stats``. A mixture-of-experts model with router logits on adds
    ``router_aux_loss_coef · aux_loss`` to ``loss``, as its own forward does; ``aux_loss`` is the unweighted
    router loss. The equivalence check's pass (``equivalence_probe=True``) sets ``loss`` (CE + the router term)
    and the full float32 ``logits`` of its slice."""

    aux_loss: torch.Tensor | None = None
    sft_loss: torch.Tensor | None = None
    cal_loss: torch.Tensor | None = None
    bin_stats: BinStats | None = None
    token_stats: BinStats | None = None
    full_stats: BinStats | None = None
    option_logits: torch.Tensor | None = None
    option_labels: torch.Tensor | None = None


class FusedLoss(LossPolicy):
    """What a patched causal LM's forward computes (held as its ``calibkern_fused_loss`` attribute): the
    :class:`calibkern.hf.loss_policy.LossPolicy` of the run, applied where the lm_head weight is whole. Also
    held: ``original_forward`` (the forward the model had, as a function of the module), ``instance_forward``
    (the instance ``forward`` the patch replaced, e.g. Accelerate's wrapper; None for the class's) and
    ``check_pending`` (the equivalence check still to run at the next call with labels)."""

    original_forward = None
    instance_forward = None
    check_pending = False

    def probe(self, head: nn.Module, transform, hidden, labels, aux_loss, router):
        """The equivalence check's numbers (:func:`calibkern.hf.modeling.probe_numbers`); runs where ``head``'s
        parameters are gathered."""
        backend = None if self.calibration is None else self.calibration.backend
        return probe_numbers(projection(head, transform, hidden), labels, aux_loss, router, backend)

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
        """A ``[tokens, K]`` product, cheap next to the decoder, with static shapes (from the shards that hold the
        options under tensor parallelism, :func:`calibkern.hf.modeling.option_logits_at`)."""
        self.vocabulary_replicas = vocabulary_replicas(weight)
        if self.vocabulary_replicas > 1 and self.calibration.official_compat:
            raise ValueError("official_compat's term needs the option logits' gradient, which a vocabulary-parallel "
                             "lm_head (a DTensor weight) does not give; use official_compat=False")
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


def fused_forward(self, *args, labels=None, answer_mask=None, num_items_in_batch=None, option_logits_only=False,
                  token_stats_only=False, equivalence_probe=False, **kwargs):
    """The patched ``forward`` of a causal LM (module docstring). The statistics passes (need ``labels``):
    ``option_logits_only=True`` returns only the option logits and labels at every predicting position,
    ``token_stats_only=True`` only the supervised tokens' binned statistics. The first call with labels runs the
    equivalence check (:func:`calibkern.hf.modeling.check_logit_parity`) on a slice of its batch, unless it was
    switched off or already ran. ``return_dict=False`` returns ``output.to_tuple()``."""
    state: FusedLoss = getattr(self, FUSED_LOSS_ATTRIBUTE)
    if labels is None and not (option_logits_only or token_stats_only or equivalence_probe):
        if num_items_in_batch is not None:
            raise ValueError(_LABELS_REMOVED)
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
    refuse_unconsumed(self, kwargs)
    if state.check_pending and not equivalence_probe:
        state.check_pending = False  # the check calls this forward for calibkern's numbers
        try:
            check_logit_parity(self, {**kwargs, "labels": labels},
                               backend=None if state.calibration is None else state.calibration.backend)
        except BaseException:
            state.check_pending = True
            raise
    router = None if option_logits_only or token_stats_only else router_loss(self, kwargs.get("output_router_logits"))
    head, transform = self.get_output_embeddings(), logit_transform(self)
    hidden, aux_loss = decoder_pass(self, kwargs, router)
    if equivalence_probe:
        loss, logits = _gathered_call(head, functools.partial(_head_first, state.probe, transform), hidden, labels,
                                      aux_loss, router)
        return FusedCausalLMOutput(loss=loss, logits=logits, aux_loss=aux_loss)
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
    if aux_loss is not None:  # as the model's own forward adds it
        loss = loss + router.coef * aux_loss.to(loss.device)
        if training:
            state.window.add_aux(aux_loss)
    output = FusedCausalLMOutput(loss=loss, logits=None, aux_loss=aux_loss, sft_loss=sft_loss, cal_loss=cal_loss,
                                 bin_stats=bin_stats, token_stats=token_stats, full_stats=full_stats)
    return output.to_tuple() if kwargs.get("return_dict") is False else output


fused_forward.calibkern_fused_forward = True  # what calibkern.hf.modeling.is_fused_forward looks for

_LABELS_REMOVED = (
    "the patched model was called with num_items_in_batch but without labels: a Trainer removed the labels "
    "(TrainingArguments.label_smoothing_factor > 0, or a compute_loss_func) and would train on a loss of its "
    "own from the model's logits, without calibkern's loss; set label_smoothing_factor=0 (CalibrationTrainer "
    "serves it inside the fused loss) and pass no compute_loss_func with a model patched by "
    "calibkern.hf.apply_fused_loss"
)


class FusedForward:
    """:func:`fused_forward` as a causal LM's instance ``forward``: bound like a method (``__self__``, and
    ``__func__`` for Accelerate's autocast wrapper), with the original forward's signature plus the fused
    arguments, and — unlike a bound local function — carried by ``copy.deepcopy``, ``pickle`` and ``torch.save``
    with its module."""

    calibkern_fused_forward = True

    def __init__(self, module: nn.Module):
        self.__self__ = module

    @property
    def __func__(self):
        return fused_forward

    @property
    def __signature__(self) -> inspect.Signature:
        signature = _fused_signature(getattr(self.__self__, FUSED_LOSS_ATTRIBUTE).original_forward)
        return signature.replace(parameters=list(signature.parameters.values())[1:])  # bound: no ``self``

    def __call__(self, *args, **kwargs):
        return fused_forward(self.__self__, *args, **kwargs)


def _head_first(method, transform, head, *args):
    return method(head, transform, *args)


def _fused_signature(original) -> inspect.Signature:
    """``original``'s signature with ``answer_mask``, ``num_items_in_batch``, ``option_logits_only``,
    ``token_stats_only`` and ``equivalence_probe`` added (the Trainer keeps the dataset columns the forward names)."""
    signature = inspect.signature(original)
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in parameters}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in (("answer_mask", None), ("num_items_in_batch", None), ("option_logits_only", False),
                                   ("token_stats_only", False), ("equivalence_probe", False))
             if name not in names]
    keywords = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    positional = [p for p in parameters if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword_only = [p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]
    return signature.replace(parameters=positional + keyword_only + extra + keywords)


def patch_causal_lm(model: nn.Module, state: FusedLoss, *, check: bool = True) -> nn.Module:
    """Give the causal LM inside ``model`` the fused forward computing ``state``; patching a patched model again
    replaces the state only, and a model that carries a state but whose forward is no longer calibkern's (a
    removed instance ``forward``) is patched afresh. ``check``: run the equivalence check at the first call with
    labels. Returns ``model``."""
    causal_lm = causal_lm_of(model)
    previous: FusedLoss | None = getattr(causal_lm, FUSED_LOSS_ATTRIBUTE, None)
    if previous is not None and is_fused_forward(causal_lm):
        state.original_forward, state.instance_forward = previous.original_forward, previous.instance_forward
    else:
        own = causal_lm.__dict__.get("forward")  # e.g. Accelerate's autocast wrapper
        state.original_forward = type(causal_lm).forward if own is None else _unbound(own)
        state.instance_forward = own
        setattr(causal_lm, FUSED_LOSS_ATTRIBUTE, state)  # the signature reads it
        causal_lm.forward = FusedForward(causal_lm)
    state.check_pending = check
    setattr(causal_lm, FUSED_LOSS_ATTRIBUTE, state)
    return model


def remove_fused_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fused_loss`: the causal LM inside ``model`` gets back the forward it had and loses its
    ``calibkern_fused_loss`` state (a model that is not patched is returned as it is). Returns ``model``."""
    causal_lm = causal_lm_of(model)
    state: FusedLoss | None = causal_lm.__dict__.get(FUSED_LOSS_ATTRIBUTE)
    if is_fused_forward(causal_lm):
        if state is not None and state.instance_forward is not None:
            causal_lm.forward = state.instance_forward
        else:
            del causal_lm.forward
    if state is not None:
        delattr(causal_lm, FUSED_LOSS_ATTRIBUTE)
    return model


def _unbound(method):
    """An instance ``forward`` as a function of the module (so a deep copy calls its own copy)."""
    function = getattr(method, "__func__", None)
    return function if function is not None else (lambda self, *a, **k: method(*a, **k))


def apply_fused_loss(model: nn.Module, calibration: CalibrationConfig | None = None, *, em_state=None,
                     gradient_accumulation_steps: int = 1, check: bool | None = None) -> nn.Module:
    """Patch ``model`` (a causal LM, possibly PEFT-, DDP- or FSDP-wrapped) in place so that a call with
    ``labels`` computes :func:`calibkern.fused_linear_calibration_loss` inside its forward and returns a
    :class:`FusedCausalLMOutput` (module docstring); returns ``model``.

    ``calibration=None``: plain fused cross-entropy. A :class:`CalibrationConfig` adds the CFT or token_cft term
    (needs ``bin_accuracy``) or the RCFT term (``em_state``, default a new one from ``calibration.em``; with
    ``refresh="stream"`` each training call runs the E-step and every ``gradient_accumulation_steps`` calls the
    M-step, all-reduced across processes). ``official_compat`` is refused (CalibrationTrainer estimates the
    counts it needs). Every training call's statistics go into ``fused_loss_of(model).window``
    (:class:`calibkern.hf.TokenTelemetryCallback` logs them). ``check`` (default ``calibration.check_logits``, on
    without a calibration): the first call with labels compares calibkern's loss and logits with the model's own on
    a slice of its batch and refuses the model on a difference (docs/hf.md#the-equivalence-check).
    Patching a model that looks patched but whose forward is no longer calibkern's patches it again;
    :func:`remove_fused_loss` undoes the patch.
    """
    _refuse_prompt_learning(model)
    state = FusedLoss(calibration, em_state=em_state, gradient_accumulation_steps=gradient_accumulation_steps)
    if check is None:
        check = calibration is None or calibration.check_logits
    if calibration is not None and calibration.official_compat:
        raise ValueError("apply_fused_loss does not support official_compat; use CalibrationTrainer")
    if state.needs_bin_accuracy:
        raise ValueError(f"apply_fused_loss with method={calibration.method!r} needs calibration.bin_accuracy")
    return patch_causal_lm(model, state, check=bool(check))


def fused_loss_of(model: nn.Module) -> FusedLoss:
    """The :class:`FusedLoss` of a model patched by :func:`apply_fused_loss` (its state: ``em_state``,
    ``bin_accuracy``, ``gradient_accumulation_steps``, the telemetry ``window``)."""
    causal_lm = causal_lm_of(model)
    state = getattr(causal_lm, FUSED_LOSS_ATTRIBUTE, None)
    if state is None or not is_fused_forward(causal_lm):
        raise ValueError("model is not patched" + ("" if state is None else " (it carries calibkern's state, but its "
                         "forward is no longer calibkern's)") + ": call calibkern.hf.apply_fused_loss(model, ...)")
    return state


def option_logits_pass(model: nn.Module, batch: dict) -> FusedCausalLMOutput:
    """One option-logits pass of a patched ``model`` on ``batch`` (``labels`` and optionally ``answer_mask``)."""
    return model(**batch, option_logits_only=True)


def token_statistics_pass(model: nn.Module, batch: dict) -> FusedCausalLMOutput:
    """One token-statistics pass of a patched ``model`` on ``batch`` (``labels``): ``.token_stats``."""
    return model(**batch, token_stats_only=True)
