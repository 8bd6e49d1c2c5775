"""Liger-style fused linear cross-entropy: ``FusedLinearCrossEntropyLoss`` and ``fused_linear_cross_entropy``
(docs/integrations.md#liger-kernel-and-cut-cross-entropy).

Liger-Kernel's call and conventions — ``loss_fn(lin_weight, _input, target, bias=None)``, targets already aligned
with the rows of ``_input`` (no shift), a scalar for ``reduction`` "mean" (over the non-ignored rows) or "sum",
per-row losses for "none" — on calibkern's fused kernels: per row, with ``z = x Wᵀ + b`` (soft-capped,
``z ← c tanh(z / c)``, with ``softcap=c``), ``lse = logsumexp(z)``,

    loss = lse − (1 − ε) z_y − (ε/V) Σ_j z_j + λ lse²          (ε = label_smoothing, λ = lse_square_scale)

i.e. ``F.cross_entropy(z, y, label_smoothing=ε)`` plus the z-loss, computed inside the cross-entropy kernel of each
backend, never holding the ``[N, V]`` logits. ``calibration=`` adds calibkern's calibration term
(:func:`calibkern.fused_linear_calibration_loss`, whose output — ``sft_loss``, ``cal_loss``, ``bin_stats``,
``token_stats`` — the module keeps as ``output`` after each call).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _validate as V
from .backends import resolve
from .losses import (CalibrationLossOutput, _check_ce_options, _check_chunk_size, _check_inputs,
                     fused_linear_calibration_loss)
from .ops import custom_ops
from .ops.fused_linear import chunk_logits, default_chunk_size

REDUCTIONS = ("mean", "sum", "none")


def fused_linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, lse_square_scale=0.0,
                               label_smoothing=0.0, reduction="mean", softcap=None, *, calibration=None,
                               option_ids=None, bin_accuracy=None, em_state=None, lam=1.0, n_bins=10,
                               token_stats=False, chunk_size=None, backend=None, return_output=False):
    """The loss of the module docstring from ``input [N, D]`` (or ``[B, T, D]``), ``weight [V, D]`` and aligned
    ``target`` (``input``'s leading shape). "mean" divides by the number of non-ignored rows (1 at least);
    ``calibration`` (None or ``"none"``, ``"hard_bin"``, ``"em"``, ``"token_hard_bin"``, with their ``option_ids``,
    ``bin_accuracy``, ``em_state``) adds ``lam`` times its term to "mean" or "sum". ``return_output=True`` returns the
    :class:`~calibkern.CalibrationLossOutput` instead of the loss ("mean" and "sum")."""
    V.check_choice(reduction, "reduction", REDUCTIONS)
    calibration = None if calibration == "none" else calibration
    if reduction == "none":
        if calibration is not None or token_stats or return_output:
            raise ValueError("reduction='none' gives per-row cross-entropies: no calibration, token_stats or output")
        return _row_losses(input, weight, target, bias, ignore_index, label_smoothing, lse_square_scale, softcap,
                           chunk_size, backend)
    output = fused_linear_calibration_loss(
        input, weight, target, option_ids=option_ids, bias=bias, calibration=calibration, bin_accuracy=bin_accuracy,
        em_state=em_state, lam=lam, n_bins=n_bins, ignore_index=ignore_index, shift=False,
        num_items_in_batch=1 if reduction == "sum" else None, chunk_size=chunk_size, logit_softcap=softcap,
        backend=backend, token_stats=token_stats, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale)
    return output if return_output else output.loss


class FusedLinearCrossEntropyLoss(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` on calibkern's kernels:
    ``forward(lin_weight, _input, target, bias=None)`` → the loss; ``self.output`` (a CalibrationLossOutput: the
    cross-entropy, the calibration term, the answer positions' ``bin_stats`` and, with ``token_stats=True``, the
    token statistics) after each "mean"/"sum" call."""

    def __init__(self, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                 *, calibration=None, option_ids=None, bin_accuracy=None, em_state=None, lam=1.0, n_bins=10,
                 token_stats=False, chunk_size=None, backend=None):
        super().__init__()
        V.check_choice(reduction, "reduction", REDUCTIONS)
        _check_ce_options(label_smoothing, lse_square_scale)
        self.ignore_index, self.lse_square_scale, self.label_smoothing = ignore_index, lse_square_scale, label_smoothing
        self.reduction, self.softcap, self.calibration = reduction, softcap, calibration
        self.register_buffer("option_ids", None if option_ids is None
                             else torch.as_tensor(option_ids, dtype=torch.long))
        self.register_buffer("bin_accuracy", None if bin_accuracy is None
                             else torch.as_tensor(bin_accuracy, dtype=torch.float32))
        self.em_state, self.lam, self.n_bins, self.token_stats = em_state, lam, n_bins, token_stats
        self.chunk_size, self.backend = chunk_size, backend
        self.output: CalibrationLossOutput | None = None

    def forward(self, lin_weight, _input, target, bias=None):
        result = fused_linear_cross_entropy(
            _input, lin_weight, target, bias, self.ignore_index, self.lse_square_scale, self.label_smoothing,
            self.reduction, self.softcap, calibration=self.calibration, option_ids=self.option_ids,
            bin_accuracy=self.bin_accuracy, em_state=self.em_state, lam=self.lam, n_bins=self.n_bins,
            token_stats=self.token_stats, chunk_size=self.chunk_size, backend=self.backend,
            return_output=self.reduction != "none")
        if self.reduction == "none":
            self.output = None
            return result
        self.output = result
        return result.loss


def _row_losses(input, weight, target, bias, ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size,
                backend):
    """Per-row losses in ``target``'s shape (0 for ignored rows), by :class:`_RowCrossEntropy`."""
    _check_inputs(input, weight, bias)  # the checks of the "mean" and "sum" path (which names input "hidden")
    V.check_tensor(target, "target")
    _check_chunk_size(chunk_size)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    options = _check_ce_options(label_smoothing, lse_square_scale)
    softcap = None if softcap is None else V.check_positive_float(softcap, "softcap")
    targets = target.reshape(-1).long()
    check = ((targets >= 0) & (targets < weight.shape[0])) | (targets == ignore_index)
    V.require(check.all(), V.label_range_message("target", weight.shape[0], ignore_index))
    rows = input.reshape(-1, input.shape[-1])
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.shape[0], rows.shape[1], weight.shape[0], input.element_size())
    backend_name, _ = resolve(backend, input.device, input.dtype)
    losses = _RowCrossEntropy.apply(rows, weight, bias, targets, ignore_index, options, softcap, chunk_size,
                                    backend_name)
    return losses.reshape(target.shape)


def _chunk_loss(h, weight, bias, targets, ignore_index, options, softcap, backend):
    """``(row losses, ∂loss_i/∂(h Wᵀ + b))`` of one chunk of rows, by the backend's cross-entropy kernel."""
    logits, cap_slope = chunk_logits(h, weight.t(), bias, torch.float32, softcap)
    loss = custom_ops.cross_entropy_(logits, targets, ignore_index, backend, *options)
    return loss, logits if cap_slope is None else logits.mul_(cap_slope)


class _RowCrossEntropy(torch.autograd.Function):
    """Per-row losses ``[N]`` for ``reduction="none"``, one chunk of logits alive at a time. With per-row weights
    ``w = ∂L/∂loss`` (known only in backward) the gradients are ``grad_x = (w ⊙ g) W``, ``grad_W = (w ⊙ g)ᵀ x``,
    ``grad_b = Σ w ⊙ g``. When only ``x`` needs a gradient (a frozen lm_head, as under LoRA), forward keeps
    ``g W`` per row and backward scales its rows by ``w`` (``(w ⊙ g) W = w ⊙ (g W)``): no second pass. Otherwise
    backward computes each chunk's logits again and accumulates only the gradients asked for."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, ignore_index, options, softcap, chunk_size, backend):
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        ctx.row_grads_only = need_rows and not need_weight and not need_bias
        grad_rows = torch.empty(rows.shape, dtype=torch.float32, device=rows.device) if ctx.row_grads_only else None
        losses = []
        with torch.no_grad():
            for s in range(0, rows.shape[0], chunk_size):
                loss, grad_z = _chunk_loss(rows[s:s + chunk_size], weight, bias, targets[s:s + chunk_size],
                                           ignore_index, options, softcap, backend)
                losses.append(loss)
                if grad_rows is not None:
                    grad_rows[s:s + chunk_size] = grad_z.to(weight.dtype) @ weight
        ctx.save_for_backward(*((grad_rows,) if ctx.row_grads_only else (rows, weight, bias, targets)))
        ctx.rows_dtype = rows.dtype
        ctx.args = (ignore_index, options, softcap, chunk_size, backend)
        return torch.cat(losses) if losses else rows.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_losses):
        if ctx.row_grads_only:
            (grad_rows,) = ctx.saved_tensors
            return ((grad_rows * grad_losses[:, None].float()).to(ctx.rows_dtype),
                    None, None, None, None, None, None, None, None)
        rows, weight, bias, targets = ctx.saved_tensors
        ignore_index, options, softcap, chunk_size, backend = ctx.args
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for s in range(0, rows.shape[0], chunk_size):
            h = rows[s:s + chunk_size]
            _, grad_z = _chunk_loss(h, weight, bias, targets[s:s + chunk_size], ignore_index, options, softcap,
                                    backend)
            grad_z.mul_(grad_losses[s:s + chunk_size, None].float())
            if grad_rows is not None:
                grad_rows[s:s + chunk_size] = grad_z.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.t(), h.float())
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        return (None if grad_rows is None else grad_rows.to(rows.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)
