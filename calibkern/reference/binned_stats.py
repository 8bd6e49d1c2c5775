"""Per-bin sufficient statistics (docs/math.md#ece): counts, Σ confidence, Σ correct."""

from __future__ import annotations

import torch

from .softmax import bin_index, scaled, softmax_parts


def _scatter(index: torch.Tensor, weight: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(size, dtype=dtype, device=index.device).scatter_add_(0, index, weight.to(dtype))


def binned_stats(logits, labels, n_bins: int, temperature: float, ignore_index: int, classwise: bool):
    """(counts, Σ conf, Σ correct, n_nonfinite): kept rows whose ``z`` holds NaN or ±inf are left out and
    counted. A row's min and max find them (both propagate NaN; the max is also the softmax's m); their NaN
    read-outs land in a valid bin with weight 0, so the logits are never copied."""
    z = scaled(logits, temperature)
    high = z.amax(dim=1)
    finite = torch.isfinite(z.amin(dim=1)) & torch.isfinite(high)
    keep = labels != ignore_index
    n_nonfinite = (keep & ~finite).sum()
    keep = keep & finite
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    if not classwise:
        pred = z.argmax(dim=1)
        conf = 1.0 / (z - high[:, None]).exp().sum(dim=1)
        bins = bin_index(conf, n_bins)
        correct = (pred == labels) & keep
        return (_scatter(bins, keep, n_bins, torch.int64),
                _scatter(bins, torch.where(keep, conf.double(), zero), n_bins, torch.float64),
                _scatter(bins, correct, n_bins, torch.float64), n_nonfinite)
    p, _, _ = softmax_parts(z)
    n_classes = p.shape[1]
    flat = (torch.arange(n_classes, device=p.device) * n_bins + bin_index(p, n_bins)).reshape(-1)
    is_label = torch.nn.functional.one_hot(labels.clamp(0, n_classes - 1), n_classes) & keep[:, None]
    weight = keep[:, None].expand_as(p)
    shape = (n_classes, n_bins)
    size = n_classes * n_bins
    return (_scatter(flat, weight.reshape(-1), size, torch.int64).view(shape),
            _scatter(flat, torch.where(weight, p.double(), zero).reshape(-1), size, torch.float64).view(shape),
            _scatter(flat, is_label.reshape(-1), size, torch.float64).view(shape), n_nonfinite)
