"""The per-row target loss of the hard-bin term and of the EM ``target`` form (docs/math.md#cft-term).

For a row with probabilities ``p``, prediction ``ŷ`` and target accuracy ``a``, the target vector is
``τ_ŷ = a`` and, for the other options, order-preserving targets that sum to ``1 − a``:
``u_j = tanh(γ p_j)`` with ``γ = ln(K−1) / (q₂ (1 − a))`` (``q₂`` the largest non-max probability),
``t_j = (1 − a)(1 + u_j) / ((K − 1) + Σ_s u_s)``. The loss is ``L = Σ_j (p_j − τ_j)²`` and, with τ held
fixed, ``∂L/∂z = p ⊙ (g − ⟨g, p⟩)`` where ``g = 2 (p − τ)``. The loss kernels return it reduced over the
kept rows as :func:`reduce_rows` says, with the gradient of the reduced value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .softmax import bin_index, softmax_parts

_TINY = 1e-12
REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(loss: torch.Tensor, keep: torch.Tensor, reduction: str):
    """(reduced loss, ∂reduced/∂loss_i of a kept row) for per-row losses that are 0 on ignored rows:
    ``"none"`` the vector (factor 1), ``"sum"`` Σ_i loss_i (1), ``"mean"`` Σ_i loss_i / max(n_kept, 1)
    (factor 1 / max(n_kept, 1); the mean is 0 when no row is kept)."""
    if reduction == "none":
        return loss, 1.0
    total = loss.sum()
    if reduction == "sum":
        return total, 1.0
    n_kept = torch.count_nonzero(keep).clamp_min(1).to(loss.dtype)
    return total / n_kept, 1.0 / n_kept


def reduced_row_loss(loss: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, reduction: str):
    """(loss, grad) of per-row losses and their fresh gradient rows after :func:`reduce_rows` (the mean's
    factor scales ``grad`` in place)."""
    loss, factor = reduce_rows(loss, keep, reduction)
    return loss, grad.mul_(factor) if reduction == "mean" else grad


def non_max_targets(p: torch.Tensor, pred: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The full target vector τ [N, K]; differentiable in ``p`` and ``a`` (detach for the default)."""
    n_classes = p.shape[1]
    is_max = F.one_hot(pred, n_classes).bool()
    q = p.masked_fill(is_max, 0.0)
    q2 = q.amax(dim=1, keepdim=True)
    ratio = q / torch.where(q2 > 0, q2, torch.ones_like(q2))
    d = (1.0 - a)[:, None]
    u = torch.tanh(math.log(n_classes - 1) * ratio / d.clamp_min(_TINY)).masked_fill(is_max, 0.0)
    t = d.clamp_min(0.0) * (1.0 + u) / ((n_classes - 1) + u.sum(dim=1, keepdim=True))
    return torch.where(is_max, a[:, None].to(p.dtype), t)


def target_loss(p: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, keep: torch.Tensor):
    """Per-row ``L`` and ``∂L/∂z`` with detached targets; rows outside ``keep`` give 0 and 0."""
    return loss_to_fixed_targets(p, non_max_targets(p, pred, a), keep)


def loss_to_fixed_targets(p: torch.Tensor, tau: torch.Tensor, keep: torch.Tensor):
    """``L = Σ_j (p_j − τ_j)²`` and ``∂L/∂z = p ⊙ (g − ⟨g, p⟩)``, ``g = 2 (p − τ)``, for a fixed τ."""
    diff = p - tau
    g = 2.0 * diff
    grad = p * (g - (g * p).sum(dim=1, keepdim=True))
    keep_f = keep.to(p.dtype)
    return (diff * diff).sum(dim=1) * keep_f, grad * keep_f[:, None]


def hard_bin_loss(logits, labels, bin_accuracy, ignore_index: int, reduction: str):
    p, conf, pred = softmax_parts(logits)
    a = bin_accuracy.to(p.dtype)[bin_index(conf, bin_accuracy.shape[0])]
    keep = labels != ignore_index
    return reduced_row_loss(*target_loss(p, pred, a, keep), keep, reduction)


def hard_bin_loss_autograd(logits, labels, bin_accuracy, ignore_index: int, detach_targets: bool) -> torch.Tensor:
    """Per-row hard-bin loss built with autograd in float64, τ detached or not.

    Gradients through the targets are the published reference code's form (``official_compat``).
    """
    p, conf, pred = softmax_parts(logits.double())
    a = bin_accuracy.double()[bin_index(conf, bin_accuracy.shape[0])]
    tau = non_max_targets(p, pred, a)
    if detach_targets:
        tau = tau.detach()
    return ((p - tau) ** 2).sum(dim=1) * (labels != ignore_index)
