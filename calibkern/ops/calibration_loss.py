"""The hard-bin calibration term (docs/math.md#cft-term), differentiable with respect to the option logits.

Per sample, with ``a = A_{b(c)}`` the starting model's accuracy in the sample's confidence bin and the
order-preserving non-max targets of docs/backends.md: ``L_i = (c_i − a)² + Σ_r (q_(r) − t_(r))²``.

* default: targets detached, mean over the batch's kept samples (``reduction="mean"``), every bin, any
  backend; the kernel reduces the rows and writes ``∂L/∂z_i``, ``∂L_i/∂z_i = p ⊙ (g − ⟨g, p⟩)``,
  ``g = 2 (p − τ)``, in the forward pass (the custom op ``torch.ops.calibkern.hard_bin_loss``, so it traces
  under ``torch.compile``).
* ``official_compat=True``: the published reference code — per-bin sums divided by ``N⁰_k``
  (``bin_counts``), the top bin skipped, gradients through the targets, float64; reference backend only.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ..reference.target_loss import REDUCTIONS, reduce_rows
from . import custom_ops
from ._dispatch import prepare


def calibration_loss(option_logits, labels, bin_accuracy, *, n_bins=10, bin_counts=None, detach_targets=None,
                     official_compat=False, reduction="mean", ignore_index=-100, nonfinite="error",
                     backend=None):
    """Hard-bin calibration loss (docs/math.md#cft-term).

    ``detach_targets=None`` means the variant's own choice: detached for the default, through the targets
    for ``official_compat``. Gradients through the targets are computed by autograd on the reference
    backend only, which ``backend=None`` then selects (asking for another backend is an error).
    """
    n_bins = V.check_n_bins(n_bins)
    V.check_choice(reduction, "reduction", REDUCTIONS)
    if detach_targets is None:
        detach_targets = not official_compat
    if (official_compat or not detach_targets) and backend in (None, "auto"):
        backend = "torch"
    rows = prepare(option_logits, labels, ignore_index=ignore_index, nonfinite=nonfinite, backend=backend,
                   logits_name="option_logits", row_loss=detach_targets and not official_compat)
    device = rows.logits.device
    bin_accuracy = V.check_vector(bin_accuracy, "bin_accuracy", n_bins, device, low=0.0, high=1.0)

    if official_compat:
        if bin_counts is None:
            raise ValueError("bin_counts (the starting model's per-bin counts N⁰_k) is required with "
                             "official_compat=True")
        if reduction == "none":
            raise ValueError("reduction='none' is not defined with official_compat=True (it normalises per bin)")
    elif bin_counts is not None:
        raise ValueError("bin_counts is only used with official_compat=True")
    if (official_compat or not detach_targets) and rows.backend != "torch":
        raise ValueError(f"official_compat / detach_targets=False run on backend='torch' only, not "
                         f"{rows.backend!r}")

    if official_compat or not detach_targets:
        from ..reference import bin_index, hard_bin_loss_autograd, softmax_parts

        loss = hard_bin_loss_autograd(rows.logits, rows.labels, bin_accuracy, ignore_index, detach_targets)
        keep = rows.labels != ignore_index
        if not official_compat:
            return reduce_rows(loss, keep, reduction)[0]
        bin_counts = V.check_vector(bin_counts, "bin_counts", n_bins, device, low=0.0)
        with torch.no_grad():
            bins = bin_index(softmax_parts(rows.logits)[1], n_bins)
            # 1/N⁰_k exactly as published: a sample in a bin with N⁰_k = 0 makes the loss infinite.
            weight = torch.where(keep & (bins < n_bins - 1), bin_counts.double()[bins].reciprocal(),
                                 torch.zeros((), dtype=torch.float64, device=device))
        return (loss * weight).sum()

    loss, _ = custom_ops.hard_bin_loss(rows.logits, rows.labels, bin_accuracy.float(), ignore_index, reduction,
                                       rows.backend)
    return loss
