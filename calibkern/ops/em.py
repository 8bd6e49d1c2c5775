"""Dispatch of the EM kernels (SPEC §4.3): the E-step statistics and both regulariser forms.

* ``target`` form: per row ``t = Σ_k r_k θ_k`` (r, θ detached) and the target loss of §4.2 built from
  ``a = t``; loss and gradient in one kernel pass, which also returns the E-step statistics.
* ``ece`` form: ``L = Σ_k (S_k / N) ρ(C_k / S_k − θ_k)``. With r detached, ``∂L/∂C_k = ρ'(d_k) / N`` and
  ``∂C_k/∂c_i = r_ik``, so phase 1 computes the statistics (and L), phase 2 (backward) the per-row
  gradient ``(Σ_k r_ik ρ'(d_k)/N) · ∂c_i/∂z_i``.
"""

from __future__ import annotations

import torch

from .row_loss import KernelRowLoss

RHOS = ("square", "smooth_abs")
SMOOTH_ABS_EPS = 1e-3


def rho(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x²`` or the smoothed absolute value ``√(x² + ε²) − ε``."""
    if kind == "square":
        return x * x
    return torch.sqrt(x * x + SMOOTH_ABS_EPS ** 2) - SMOOTH_ABS_EPS


def rho_prime(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "square":
        return 2.0 * x
    return x / torch.sqrt(x * x + SMOOTH_ABS_EPS ** 2)


def em_target_rows(rows, log_pi, mu, sigma, theta, ignore_index):
    """Per-row target-form losses (differentiable) and the batch's E-step statistics [4, M]."""
    return KernelRowLoss.apply(rows.logits, rows.kernels.em_target_loss, rows.labels, log_pi, mu, sigma, theta,
                               ignore_index)


class EMEceLoss(torch.autograd.Function):
    """The ``ece`` form in two phases: statistics and loss forward, per-row gradient in backward."""

    @staticmethod
    def forward(ctx, logits, kernels, labels, log_pi, mu, sigma, theta, ignore_index, rho_kind):
        stats = kernels.em_stats(logits.detach(), labels, log_pi, mu, sigma, ignore_index)
        s, c = stats[0], stats[1]
        n = s.sum().clamp_min(1.0)
        filled = s > 0
        d = torch.where(filled, c / s.clamp_min(1e-300) - theta.double(), torch.zeros_like(s))
        loss = (s / n * rho(d, rho_kind)).sum()
        coef = torch.where(filled, rho_prime(d, rho_kind) / n, torch.zeros_like(s))
        ctx.save_for_backward(logits.detach(), labels, log_pi, mu, sigma, coef)
        ctx.kernels, ctx.ignore_index = kernels, ignore_index
        ctx.mark_non_differentiable(stats)
        return loss.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), stats

    @staticmethod
    def backward(ctx, grad_loss, _):
        logits, labels, log_pi, mu, sigma, coef = ctx.saved_tensors
        scaled = coef * grad_loss.double()
        scaled = scaled if logits.dtype == torch.float64 else scaled.float()
        grad = ctx.kernels.em_ece_grad(logits, labels, log_pi, mu, sigma, scaled, ctx.ignore_index)
        return (grad.to(logits.dtype),) + (None,) * 8


def em_ece_loss(rows, log_pi, mu, sigma, theta, ignore_index, rho_kind):
    """Scalar ``ece``-form loss (differentiable) and the batch's E-step statistics [4, M]."""
    return EMEceLoss.apply(rows.logits, rows.kernels, rows.labels, log_pi, mu, sigma, theta, ignore_index, rho_kind)


def em_stats(rows, log_pi, mu, sigma, ignore_index):
    with torch.no_grad():
        return rows.kernels.em_stats(rows.logits, rows.labels, log_pi, mu, sigma, ignore_index)
