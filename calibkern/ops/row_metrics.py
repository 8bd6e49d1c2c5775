"""Dispatch of the per-row ``top1_rows`` and the one-pass ``metric_sums`` kernels (no gradient)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate as V
from . import custom_ops
from ._dispatch import prepare
from .binned_stats import skipped_rows


class Top1Rows(NamedTuple):
    """Per row of ``logits [N, K]``: ``confidence`` ``c = 1/s`` (float32; float64 for float64 logits on the
    torch backend), ``correct`` (bool, ``ŷ = y``) and ``kept`` (bool: not ``ignore_index`` and, under
    ``nonfinite="skip"``, finite). Rows that are not kept hold confidence 0 (ignored) or NaN (skipped) and
    correct False; ``n_skipped`` (int64, 0-dim) counts the skipped ones."""

    confidence: torch.Tensor
    correct: torch.Tensor
    kept: torch.Tensor
    n_skipped: torch.Tensor


@torch.no_grad()
def top1_rows(logits, labels, *, temperature=1.0, ignore_index=-100, nonfinite="error", backend=None) -> Top1Rows:
    """Each row's top-1 confidence and correctness from one read of the row (docs/backends.md#functions).

    The kernel marks kept rows whose scaled logits hold NaN or ±inf (confidence NaN), so the ``nonfinite``
    policy costs no read of the logits of its own: ``"error"`` raises, ``"skip"`` leaves them out of ``kept``.
    """
    V.check_choice(nonfinite, "nonfinite", V.NONFINITE_MODES)
    temperature = V.check_positive_float(temperature, "temperature")
    rows = prepare(logits, labels, ignore_index=ignore_index, nonfinite=None, backend=backend)
    confidence, correct = custom_ops.top1_rows(rows.logits, rows.labels, temperature, ignore_index, rows.backend)
    bad = torch.isnan(confidence)
    return Top1Rows(confidence, correct, (rows.labels != ignore_index) & ~bad,
                    skipped_rows(bad.sum(), nonfinite, temperature))


def kept_top1(logits, labels, temperature, ignore_index, nonfinite, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and correctness of the kept rows only, from the backend's ``top1_rows`` kernel (the boolean
    selection syncs the host: for evaluation metrics)."""
    V.check_logits(logits)
    rows = top1_rows(logits, labels, temperature=temperature, ignore_index=ignore_index, nonfinite=nonfinite,
                     backend=backend)
    return rows.confidence[rows.kept], rows.correct[rows.kept]


@torch.no_grad()
def metric_sums_tensors(logits, labels, n_bins=10, *, classwise=False, temperature=1.0, ignore_index=-100,
                        nonfinite="error", backend=None):
    """``custom_ops.metric_sums`` after validation, with the ``nonfinite`` policy applied to its count (as
    ``binned_stats_tensors`` does): (counts, Σ conf, Σ correct, n_skipped, [Σ NLL, Σ Brier], class counts,
    class Σ p, class Σ correct)."""
    n_bins = V.check_n_bins(n_bins)
    V.check_choice(nonfinite, "nonfinite", V.NONFINITE_MODES)
    temperature = V.check_positive_float(temperature, "temperature")
    rows = prepare(logits, labels, ignore_index=ignore_index, nonfinite=None, backend=backend)
    out = custom_ops.metric_sums(rows.logits, rows.labels, n_bins, temperature, ignore_index, bool(classwise),
                                 rows.backend)
    return (*out[:3], skipped_rows(out[3], nonfinite, temperature), *out[4:])
