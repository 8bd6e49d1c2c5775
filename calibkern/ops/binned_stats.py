"""Dispatch of the ``binned_stats`` kernel (no gradient): per-bin counts, Σ confidence, Σ correct."""

from __future__ import annotations

import torch

from .. import _validate as V
from . import custom_ops
from ._dispatch import prepare

MODES = ("top1", "classwise")


@torch.no_grad()
def binned_stats_tensors(logits, labels, n_bins=10, *, mode="top1", temperature=1.0, ignore_index=-100,
                         nonfinite="error", backend=None):
    """Returns ``(counts, sum_conf, sum_correct, n_skipped)``; [M] tensors for top-1, [K, M] for classwise.

    The kernel itself leaves out and counts the kept rows with non-finite values (no separate read of the
    logits), so the ``nonfinite`` policy is applied to its count: ``"error"`` raises when it is not 0,
    ``"skip"`` reports it as ``n_skipped``. Rows with ``ignore_index`` are never read.
    """
    n_bins = V.check_n_bins(n_bins)
    V.check_choice(mode, "mode", MODES)
    V.check_choice(nonfinite, "nonfinite", V.NONFINITE_MODES)
    temperature = V.check_positive_float(temperature, "temperature")
    rows = prepare(logits, labels, ignore_index=ignore_index, nonfinite=None, backend=backend)
    counts, sum_conf, sum_correct, n_nonfinite = custom_ops.binned_stats(
        rows.logits, rows.labels, n_bins, temperature, ignore_index, mode == "classwise", rows.backend)
    return counts, sum_conf, sum_correct, skipped_rows(n_nonfinite, nonfinite, temperature)


def skipped_rows(n_nonfinite: torch.Tensor, nonfinite: str, temperature: float) -> torch.Tensor:
    """The ``nonfinite`` policy on a kernel's count of kept rows with non-finite scaled logits: ``"error"``
    raises when it is not 0 (one host read), ``"skip"`` returns it as the number of rows skipped."""
    if nonfinite == "error":
        V.require(n_nonfinite == 0, V.nonfinite_message("logits", scaled=temperature != 1.0))
        return torch.zeros_like(n_nonfinite)
    return n_nonfinite
