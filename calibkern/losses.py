"""The drop-in fused linear calibration loss: SFT cross-entropy plus a calibration term, from hidden states.

``loss = sft_weight · CE + lam · L_cal`` (docs/math.md, docs/backends.md) where, with ``z_t = h_t Wᵀ + b`` and the
target
``y_t`` of position t (Hugging Face shift: position t predicts label t+1),

* ``CE = Σ_{t supervised} (logsumexp(z_t) − z_{t, y_t}) / n`` with ``n`` the number of supervised
  positions, or ``num_items_in_batch`` when given (gradient accumulation);
* ``L_cal`` is the hard-bin term or the EM regulariser (docs/math.md) on the option logits
  ``z_t[option_ids]`` of the answer positions, whose option label is the index of ``y_t`` in ``option_ids``;
  or the token term ``token_hard_bin``, ``Σ_t (c_t − A_{b(c_t)})² / n`` over every supervised position with
  ``c_t`` the top-1 probability over the vocabulary (docs/math.md#token-level-calibration).

``token_stats=True`` / ``full_stats=True`` add the token-level and Full-ECE bin statistics of the supervised
positions, read from the chunks the loss already forms (calibkern.ops.token_stats).

The ``[tokens, V]`` logits are never held: unsupervised rows are dropped before any matrix product and the
rest run in chunks (calibkern.ops.fused_linear). On CUDA the one wait on the device is reading the number
of supervised rows, which sizes the work; value checks are asynchronous device assertions.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate as V
from .backends import resolve
from .em import em_regularizer
from .metrics import BinStats
from .ops._dispatch import check_label_values
from .ops.binned_stats import binned_stats_tensors
from .ops.calibration_loss import calibration_loss
from .ops.fused_linear import FusedLinearCrossEntropy, default_chunk_size, softcap_logits
from .ops.token_stats import TokenStatistics
from .ops.vocab_parallel import shard_of_dtensor, shard_of_group

CALIBRATIONS = ("hard_bin", "em", "token_hard_bin", None)
OPTION_FREE = (None, "token_hard_bin")  # calibrations that need no option_ids
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class CalibrationLossOutput:
    """``loss = sft_weight · sft_loss + lam · cal_loss``; ``bin_stats`` over the answer positions (empty without
    ``option_ids``); ``token_stats`` / ``full_stats`` over the supervised positions when asked for (else None).
    With ``calibration="token_hard_bin"`` only ``loss`` carries the gradient (``sft_loss`` and ``cal_loss`` are
    its detached parts)."""

    loss: torch.Tensor
    sft_loss: torch.Tensor
    cal_loss: torch.Tensor
    bin_stats: BinStats
    token_stats: BinStats | None = None
    full_stats: BinStats | None = None


def fused_linear_calibration_loss(hidden, weight, labels, *, option_ids, bias=None, calibration="hard_bin",
                                  bin_accuracy=None, em_state=None, lam=1.0, sft_weight=1.0, n_bins=10,
                                  ignore_index=-100, shift=True, answer_mask=None, num_items_in_batch=None,
                                  chunk_size=None, logit_softcap=None, backend=None, token_stats=False,
                                  full_stats=False, vocab_parallel_group=None, label_smoothing=0.0,
                                  lse_square_scale=0.0) -> CalibrationLossOutput:
    """SFT cross-entropy plus calibration term from ``hidden [N, D] | [B, T, D]`` and ``weight [V, D]``.

    ``labels`` has ``hidden``'s leading shape; with ``shift=True`` a 2-D ``hidden`` is one sequence.
    ``answer_mask`` (bool, ``labels``' shape, aligned with the labels and shifted with them) overrides the
    default answer positions: the supervised positions whose target is one of ``option_ids``. The
    calibration term is the mean over the batch's answer positions (0 when there is none). One backward
    pass per call.

    ``option_ids=None`` is allowed with ``calibration`` None or ``"token_hard_bin"`` (no answer positions).
    ``token_stats=True`` adds ``output.token_stats``: the top-1 confidence ``c_t = max_v softmax(z_t)_v`` and
    correctness ``1[argmax_v z_t = y_t]`` of every supervised position, binned; ``full_stats=True`` adds
    ``output.full_stats``: every ``p_tv`` binned with ``Σ 1[v = y_t]`` (Full-ECE). Both are device tensors
    summed inside the chunk loop (docs/math.md#token-level-calibration). ``calibration="token_hard_bin"``
    needs ``bin_accuracy`` (per-bin token accuracy of the starting model) and adds
    ``lam · Σ_t (c_t − A_{b(c_t)})² / n`` (``n`` as for the cross-entropy), its gradient folded into the
    cross-entropy's.

    ``logit_softcap=c`` soft-caps every logit, ``z ← c · tanh(z / c)`` (Gemma 2/3), in the cross-entropy and
    the option logits alike (docs/math.md#the-fused-linear-loss).

    ``label_smoothing=ε`` and ``lse_square_scale=λ`` change each supervised row's cross-entropy to
    ``lse − (1 − ε) z_y − (ε/V) Σ_j z_j + λ lse²`` (PyTorch's label smoothing over the whole vocabulary, and the
    z-loss), inside the cross-entropy kernel (docs/math.md#the-fused-linear-loss); the token statistics and the
    token term read the softmax back from that gradient, and a vocabulary split applies both in its all-reduced
    cross-entropy.

    Vocabulary parallel (docs/distributed.md#vocabulary-parallel-loss): ``weight`` (and ``bias``) may be a
    ``DTensor`` sharded on dim 0 over one mesh dimension, or this rank's rows of a vocabulary split over the
    process group ``vocab_parallel_group`` (ranks in order, contiguous rows). Every rank of the group passes the
    same ``hidden`` and ``labels`` (global vocabulary ids) and gets the same loss, statistics and hidden gradient;
    each shard gets its rows' gradient. No rank holds a ``[rows, V]`` tensor.

    Non-finite values never raise here: a supervised position whose logits hold NaN or ±inf (from NaN or
    inf in ``hidden``, ``weight`` or ``bias``) makes ``sft_loss`` NaN, and ``cal_loss`` too when it is an
    answer position (``bin_stats.n_skipped`` counts those), so a diverging run shows NaN in its logged loss.
    """
    weight, bias, shard = _vocabulary_split(weight, bias, vocab_parallel_group)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    _check_inputs(hidden, weight, bias, shard)
    vocab_size, device = weight.shape[0] if shard is None else shard.vocab_size, hidden.device
    V.check_ignore_index(ignore_index)
    V.check_choice(calibration, "calibration", CALIBRATIONS)
    _check_calibration_state(calibration, bin_accuracy, em_state)
    n_bins = V.check_n_bins(n_bins)
    lam, sft_weight = _check_real(lam, "lam"), _check_real(sft_weight, "sft_weight")
    for flag, name in ((token_stats, "token_stats"), (full_stats, "full_stats")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    has_options = option_ids is not None
    if not has_options and calibration not in OPTION_FREE:
        raise ValueError(f"option_ids is required with calibration={calibration!r} (None is allowed only with "
                         f"calibration None or 'token_hard_bin')")
    option_ids = (_check_option_ids(option_ids, vocab_size, device) if has_options
                  else torch.zeros(0, dtype=torch.long, device=device))
    ce_options = _check_ce_options(label_smoothing, lse_square_scale)
    token = None
    if token_stats or full_stats or calibration == "token_hard_bin":
        token = TokenStatistics(n_bins, device, token=token_stats, full=full_stats, lam=lam, sft_weight=sft_weight,
                                ce_options=ce_options,
                                bin_accuracy=None if calibration != "token_hard_bin" else V.check_vector(
                                    bin_accuracy, "bin_accuracy", n_bins, device, low=0.0, high=1.0).float())
    targets = _targets(labels, hidden, ignore_index, shift, vocab_size)
    answers = None if answer_mask is None else _shifted_answer_mask(answer_mask, labels, shift)
    _check_chunk_size(chunk_size)
    backend_name, _ = resolve(backend, device, hidden.dtype)

    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if torch.compiler.is_compiling() or device.type == "meta":
        # static shapes for the compiler (and meta tensors, which hold no labels to count): every position is a
        # row, unsupervised ones ignored by the kernel
        rows = torch.arange(targets.shape[0], device=device)
        n_supervised = (targets != ignore_index).sum()
    else:
        rows = (targets != ignore_index).nonzero().squeeze(1)  # the one host read: how many rows to compute
        n_supervised = rows.shape[0]
    row_targets = targets.index_select(0, rows)
    if answers is not None:
        V.require(~(answers & ~(targets[:, None] == option_ids[None, :]).any(1)).any(),
                  "answer_mask marks a position whose (shifted) label is not one of option_ids")
    row_option_labels = (option_labels(targets, option_ids, answers, ignore_index) if has_options
                         else torch.full_like(targets, ignore_index)).index_select(0, rows)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden_2d.shape[0], hidden_2d.shape[1], vocab_size, hidden.element_size())

    if logit_softcap is not None:
        logit_softcap = V.check_positive_float(logit_softcap, "logit_softcap")
    loss_sum, option_logits, *extras = FusedLinearCrossEntropy.apply(
        hidden_2d, weight, bias, rows, row_targets, option_ids, chunk_size, backend_name, ignore_index,
        torch.is_grad_enabled(), logit_softcap, token, shard, ce_options)
    option_logits = softcap_logits(option_logits, logit_softcap)
    denominator = _denominator(num_items_in_batch, n_supervised, device)
    # the kernel's statistics, without the metrics' probability-lookalike check (a host read in a training step)
    bin_stats = (BinStats(*binned_stats_tensors(option_logits.detach(), row_option_labels, n_bins,
                                                ignore_index=ignore_index, nonfinite="skip", backend=backend))
                 if has_options else BinStats.empty(n_bins, device=device))
    token_out = {}
    if token is not None:
        ce_sum, cal_sum, *stats = extras
        token_out = {"token_stats": BinStats(*stats[:4]) if token_stats else None,
                     "full_stats": BinStats(*stats[4:]) if full_stats else None}
        if token.term:  # loss_sum is sft_weight · Σ CE + lam · Σ (c − A)²: one gradient for both
            return CalibrationLossOutput(loss_sum / denominator, ce_sum / denominator, cal_sum / denominator,
                                         bin_stats, **token_out)
    sft_loss = loss_sum / denominator
    # Non-finite option logits (diverged parameters) give a NaN loss, as the cross-entropy does: the
    # calibration term runs on the finite rows and NaN is added when an answer row is not finite.
    finite = torch.isfinite(option_logits).all(dim=1)
    poisoned = (~finite & (row_option_labels != ignore_index)).any()
    cal_loss = _calibration_term(calibration, torch.where(finite[:, None], option_logits, 0.0),
                                 torch.where(finite, row_option_labels, ignore_index), bin_accuracy, em_state,
                                 n_bins, ignore_index, backend)
    cal_loss = cal_loss + torch.where(poisoned, float("nan"), 0.0)
    return CalibrationLossOutput(sft_weight * sft_loss + lam * cal_loss, sft_loss, cal_loss, bin_stats, **token_out)


class FusedLinearCalibrationLoss(nn.Module):
    """:func:`fused_linear_calibration_loss` as a module; ``option_ids`` and ``bin_accuracy`` are buffers."""

    def __init__(self, option_ids, *, calibration="hard_bin", bin_accuracy=None, em_state=None, lam=1.0,
                 sft_weight=1.0, n_bins=10, ignore_index=-100, shift=True, chunk_size=None, logit_softcap=None,
                 backend=None, token_stats=False, full_stats=False, vocab_parallel_group=None):
        super().__init__()
        V.check_choice(calibration, "calibration", CALIBRATIONS)
        _check_calibration_state(calibration, bin_accuracy, em_state)
        self.register_buffer("option_ids", None if option_ids is None
                             else torch.as_tensor(option_ids, dtype=torch.long))
        self.register_buffer("bin_accuracy", None if bin_accuracy is None
                             else torch.as_tensor(bin_accuracy, dtype=torch.float32))
        self.calibration, self.em_state = calibration, em_state
        self.lam, self.sft_weight, self.n_bins = lam, sft_weight, n_bins
        self.ignore_index, self.shift, self.chunk_size, self.backend = ignore_index, shift, chunk_size, backend
        self.logit_softcap, self.token_stats, self.full_stats = logit_softcap, token_stats, full_stats
        self.vocab_parallel_group = vocab_parallel_group

    def forward(self, hidden, weight, labels, bias=None, answer_mask=None, num_items_in_batch=None):
        return fused_linear_calibration_loss(
            hidden, weight, labels, option_ids=self.option_ids, bias=bias, calibration=self.calibration,
            bin_accuracy=self.bin_accuracy, em_state=self.em_state, lam=self.lam, sft_weight=self.sft_weight,
            n_bins=self.n_bins, ignore_index=self.ignore_index, shift=self.shift, answer_mask=answer_mask,
            num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size, logit_softcap=self.logit_softcap,
            backend=self.backend, token_stats=self.token_stats, full_stats=self.full_stats,
            vocab_parallel_group=self.vocab_parallel_group)


def _autocast(hidden, weight, bias):
    """Under autocast, run the products in the autocast dtype, as ``nn.Linear`` would (``meta`` and other devices
    without autocast run as given)."""
    if not isinstance(hidden, torch.Tensor) or not torch.amp.is_autocast_available(hidden.device.type) \
            or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    cast = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in (hidden, weight, bias)]
    return tuple(cast)


def _vocabulary_split(weight, bias, group):
    """``(weight, bias, shard)``: a ``DTensor`` weight and bias as their local rows, or the local rows of a split
    over ``group``, with their :class:`~calibkern.ops.vocab_parallel.VocabShard`; ``shard`` None for a whole
    weight."""
    import torch.distributed as dist

    dtensor = None
    if dist.is_available():
        from torch.distributed.tensor import DTensor as dtensor
    if dtensor is not None and isinstance(weight, dtensor):
        if group is not None:
            raise ValueError("vocab_parallel_group is for a local weight shard; a DTensor weight's mesh names its "
                             "group already")
        placements = weight.placements
        weight, shard = shard_of_dtensor(weight)
        if bias is not None:
            if not isinstance(bias, dtensor) or tuple(bias.placements) != tuple(placements):
                raise ValueError(f"bias must be a DTensor with the weight's placements {tuple(placements)}")
            bias = bias.to_local()
        return weight, bias, shard
    if dtensor is not None and isinstance(bias, dtensor):
        raise TypeError("bias is a DTensor but weight is not")
    if group is None:
        return weight, bias, None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group needs an initialised torch.distributed process group")
    V.check_tensor(weight, "weight")
    return weight, bias, shard_of_group(weight, group)


def _check_inputs(hidden, weight, bias, shard=None):
    V.check_tensor(hidden, "hidden")
    V.check_tensor(weight, "weight")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = {hidden.shape[-1]} (hidden's last dimension), got "
                         f"shape {tuple(weight.shape)}")
    if weight.shape[0] < (2 if shard is None else 1):
        raise ValueError(f"weight must have V ≥ 2 rows (vocabulary entries; a vocabulary shard at least 1), got "
                         f"{weight.shape[0]}")
    for x, name in ((weight, "weight"), (bias, "bias")):
        if x is None:
            continue
        V.check_tensor(x, name)
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but hidden has {hidden.dtype}; they must match")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_calibration_state(calibration, bin_accuracy, em_state):
    if calibration in ("hard_bin", "token_hard_bin") and bin_accuracy is None:
        raise ValueError(f"bin_accuracy (per-bin accuracy of the starting model) is required with "
                         f"calibration={calibration!r}")
    if calibration == "em" and em_state is None:
        raise ValueError("em_state (a calibkern.EMState) is required with calibration='em'")
    if calibration not in ("hard_bin", "token_hard_bin") and bin_accuracy is not None:
        raise ValueError(f"bin_accuracy is only used with calibration 'hard_bin' or 'token_hard_bin', not "
                         f"{calibration!r}")
    if calibration != "em" and em_state is not None:
        raise ValueError(f"em_state is only used with calibration='em', not {calibration!r}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_ce_options(label_smoothing, lse_square_scale) -> tuple[float, float]:
    """``(ε, λ)`` checked: ε in [0, 1], λ ≥ 0."""
    smoothing, z_scale = _check_real(label_smoothing, "label_smoothing"), _check_real(lse_square_scale,
                                                                                       "lse_square_scale")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if z_scale < 0.0:
        raise ValueError(f"lse_square_scale must be ≥ 0, got {lse_square_scale!r}")
    return smoothing, z_scale


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_option_ids(option_ids, vocab_size: int, device) -> torch.Tensor:
    """``[K]`` distinct token ids in ``[0, V)``, ``K ≥ 2``, as int64 on ``device``."""
    if not isinstance(option_ids, torch.Tensor):
        try:
            option_ids = torch.as_tensor(option_ids)
        except (TypeError, ValueError) as exc:
            raise TypeError("option_ids must be a 1-D tensor or sequence of token ids") from exc
    if option_ids.dtype.is_floating_point or option_ids.dtype.is_complex or option_ids.dtype == torch.bool:
        raise TypeError(f"option_ids must hold integer token ids, got {option_ids.dtype}")
    if option_ids.dim() != 1 or option_ids.shape[0] < 2:
        raise ValueError(f"option_ids must be 1-D with K ≥ 2 token ids, got shape {tuple(option_ids.shape)}")
    option_ids = option_ids.to(device=device, dtype=torch.long)
    in_range = ((option_ids >= 0) & (option_ids < vocab_size)).all()
    V.require(in_range, f"option_ids must lie in [0, {_text(vocab_size)}) (the vocabulary of weight)")
    sorted_ids = option_ids.sort().values
    V.require((sorted_ids[1:] != sorted_ids[:-1]).all(), "option_ids must not repeat a token id")
    return option_ids


def _shift(x: torch.Tensor, fill, shift: bool) -> torch.Tensor:
    """Position t gets entry t+1 of its sequence (the last gets ``fill``), flattened to 1-D."""
    if shift:
        x = F.pad(x[..., 1:], (0, 1), value=fill)
    return x.reshape(-1)


def _targets(labels, hidden, ignore_index: int, shift: bool, vocab_size: int) -> torch.Tensor:
    """Flat int64 targets ``[N]`` aligned with the rows of ``hidden``; values checked against V."""
    V.check_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    targets = _shift(labels.long(), ignore_index, shift)
    if isinstance(vocab_size, torch.Tensor):  # a split vocabulary's size, on the device
        V.require((((targets >= 0) & (targets < vocab_size)) | (targets == ignore_index)).all(),
                  V.label_range_message("labels", "V (all shards)", ignore_index))
    else:
        check_label_values(targets, vocab_size, ignore_index)
    return targets


def _text(vocab_size) -> str:
    return "V (all shards)" if isinstance(vocab_size, torch.Tensor) else str(vocab_size)


def _shifted_answer_mask(answer_mask, labels, shift: bool) -> torch.Tensor:
    V.check_tensor(answer_mask, "answer_mask")
    if answer_mask.dtype != torch.bool:
        raise TypeError(f"answer_mask must be a bool tensor, got {answer_mask.dtype}")
    if answer_mask.shape != labels.shape:
        raise ValueError(f"answer_mask must have labels' shape {tuple(labels.shape)}, got "
                         f"{tuple(answer_mask.shape)}")
    if answer_mask.device != labels.device:
        raise ValueError(f"answer_mask is on {answer_mask.device} but labels is on {labels.device}")
    return _shift(answer_mask, False, shift)


def option_labels(targets: torch.Tensor, option_ids: torch.Tensor, answers: torch.Tensor | None = None,
                  ignore_index: int = -100) -> torch.Tensor:
    """Per position of ``targets`` (any shape): the index of its target in ``option_ids`` at answer positions,
    ``ignore_index`` elsewhere. Answer positions are the targets that are option ids, restricted to the bool
    ``answers`` when given. Static shapes, no host synchronisation."""
    match = targets.unsqueeze(-1) == option_ids
    is_answer = match.any(-1) if answers is None else match.any(-1) & answers
    return torch.where(is_answer, match.long().argmax(-1), ignore_index)


def _denominator(num_items_in_batch, n_supervised, device) -> torch.Tensor | float:
    """``num_items_in_batch`` when given (a number or one-element tensor > 0), else the number of supervised
    rows (at least 1; an int, or a 0-dim tensor under ``torch.compile``). A tensor's value is checked by
    :func:`calibkern._validate.require` (asynchronously on a GPU)."""
    if num_items_in_batch is None:
        if isinstance(n_supervised, torch.Tensor):
            return n_supervised.clamp_min(1).to(torch.float32)
        return float(max(n_supervised, 1))
    message = f"num_items_in_batch must be a positive number, got {num_items_in_batch!r}"
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool \
                or num_items_in_batch.is_complex():
            raise ValueError("num_items_in_batch must be a number or a one-element real tensor")
        value = num_items_in_batch.to(device=device, dtype=torch.float32).reshape(())
        V.require(value > 0, message)
        return value
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real) \
            or not num_items_in_batch > 0 or not math.isfinite(num_items_in_batch):
        raise ValueError(message)
    return float(num_items_in_batch)


def _calibration_term(calibration, option_logits, labels, bin_accuracy, em_state, n_bins, ignore_index,
                      backend) -> torch.Tensor:
    if calibration == "hard_bin":
        return calibration_loss(option_logits, labels, bin_accuracy, n_bins=n_bins,
                                ignore_index=ignore_index, backend=backend)
    if calibration == "em":
        return em_regularizer(option_logits, labels, em_state, ignore_index=ignore_index, backend=backend)
    return option_logits.new_zeros(())
