"""Per-bin sufficient statistics (SPEC §3): counts, Σ confidence, Σ correct."""

from __future__ import annotations

import torch

from .softmax import bin_index, scaled, softmax_parts


def _scatter(index: torch.Tensor, weight: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(size, dtype=dtype, device=index.device).scatter_add_(0, index, weight.to(dtype))


def drop_nonfinite_rows(logits, labels, temperature: float, ignore_index: int):
    """Rows whose scaled logits ``z`` hold NaN or ±inf become ignored rows with zero logits.

    Returns ``(logits, labels, n_nonfinite)`` with the number of such rows that were kept (label ≠
    ``ignore_index``) as an int64 0-dim tensor (no host sync).
    """
    bad = ~torch.isfinite(scaled(logits, temperature)).all(dim=1)
    n_nonfinite = (bad & (labels != ignore_index)).sum()
    logits = torch.where(bad[:, None], torch.zeros((), dtype=logits.dtype, device=logits.device), logits)
    labels = torch.where(bad, torch.full_like(labels, ignore_index), labels)
    return logits, labels, n_nonfinite


def binned_stats(logits, labels, n_bins: int, temperature: float, ignore_index: int, classwise: bool):
    """(counts, Σ conf, Σ correct, n_nonfinite): kept rows with non-finite ``z`` are left out and counted."""
    logits, labels, n_nonfinite = drop_nonfinite_rows(logits, labels, temperature, ignore_index)
    return (*_binned_sums(logits, labels, n_bins, temperature, ignore_index, classwise), n_nonfinite)


def _binned_sums(logits, labels, n_bins: int, temperature: float, ignore_index: int, classwise: bool):
    keep = labels != ignore_index
    if not classwise:
        z = scaled(logits, temperature)
        pred = z.argmax(dim=1)
        conf = 1.0 / (z - z.gather(1, pred[:, None])).exp().sum(dim=1)
        bins = bin_index(conf, n_bins)
        correct = (pred == labels) & keep
        return (_scatter(bins, keep, n_bins, torch.int64),
                _scatter(bins, conf.double() * keep, n_bins, torch.float64),
                _scatter(bins, correct, n_bins, torch.float64))
    p, _, _ = softmax_parts(logits, temperature)
    n_classes = p.shape[1]
    flat = (torch.arange(n_classes, device=p.device) * n_bins + bin_index(p, n_bins)).reshape(-1)
    is_label = torch.nn.functional.one_hot(labels.clamp(0, n_classes - 1), n_classes) & keep[:, None]
    weight = keep[:, None].expand_as(p)
    shape = (n_classes, n_bins)
    size = n_classes * n_bins
    return (_scatter(flat, weight.reshape(-1), size, torch.int64).view(shape),
            _scatter(flat, (p.double() * weight).reshape(-1), size, torch.float64).view(shape),
            _scatter(flat, is_label.reshape(-1), size, torch.float64).view(shape))
