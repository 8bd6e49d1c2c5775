"""Dispatch of the EM kernels (docs/math.md#em-regulariser): the E-step statistics and both regulariser forms.

* ``target`` form: per row ``t = Σ_k r_k θ_k`` (r, θ detached) and the hard-bin target loss built from
  ``a = t``; loss and gradient in one kernel pass, which also returns the E-step statistics.
* ``ece`` form: ``L = Σ_k (S_k / N) ρ(C_k / S_k − θ_k)``. With r detached, ``∂L/∂C_k = ρ'(d_k) / N`` and
  ``∂C_k/∂c_i = r_ik``, so phase 1 computes the statistics (and L), phase 2 (backward) the per-row
  gradient ``(Σ_k r_ik ρ'(d_k)/N) · ∂c_i/∂z_i``.

Each runs the ``torch.ops.calibkern`` custom op (calibkern/ops/custom_ops.py) of the backend ``rows.backend``.
"""

from __future__ import annotations

from . import custom_ops
from .custom_ops import RHOS  # noqa: F401  (re-exported: the ρ choices of form="ece")


def em_target_rows(rows, log_pi, mu, sigma, theta, ignore_index, reduction):
    """Target-form loss over the kept rows, reduced (differentiable), and the batch's E-step statistics [4, M]."""
    loss, _, stats = custom_ops.em_target_loss(rows.logits, rows.labels, log_pi, mu, sigma, theta, ignore_index,
                                               reduction, rows.backend)
    return loss, stats


def em_ece_loss(rows, log_pi, mu, sigma, theta, ignore_index, rho_kind):
    """Scalar ``ece``-form loss (differentiable) and the batch's E-step statistics [4, M]."""
    loss, stats, _ = custom_ops.em_ece_loss(rows.logits, rows.labels, log_pi, mu, sigma, theta, ignore_index,
                                            rho_kind, rows.backend)
    return loss, stats


def em_stats(rows, log_pi, mu, sigma, ignore_index):
    """The E-step statistics [4, M] alone (no gradient)."""
    return custom_ops.em_stats(rows.logits, rows.labels, log_pi, mu, sigma, ignore_index, rows.backend)
