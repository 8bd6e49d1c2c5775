"""Per-row top-1 read-outs and the one-pass metric sums (docs/math.md#proper-scores), plain PyTorch.

Per row, with ``e_j = exp(z_j − m)``, ``s = Σ_j e_j``, ``O = Σ_{j≠y} e_j`` and ``Q = Σ_{j≠y} e_j²``:
``NLL = −log p_y = log1p(O)`` when ``y = ŷ`` (then ``e_y = 1``), else ``log s + (m − z_y)`` (float64: the gap of
opposite float32 extremes exceeds float32's range);
``Brier = Σ_j (p_j − 1[j = y])² = (O/s)² + Q/s²`` — sums of non-negative terms, so a confident row keeps its
relative precision (the expanded ``Σ p² − 2 p_y + 1`` cancels to 0 once ``p_y`` rounds to 1).
"""

from __future__ import annotations

import torch

from .binned_stats import binned_stats
from .softmax import scaled


def _rows(logits, labels, temperature, ignore_index):
    """z, m, whether each row is finite and whether it is kept."""
    z = scaled(logits, temperature)
    high = z.amax(dim=1)
    finite = torch.isfinite(z.amin(dim=1)) & torch.isfinite(high)
    return z, high, finite, labels != ignore_index


def top1_rows(logits, labels, temperature: float, ignore_index: int):
    """(confidence [N], correct bool [N]): ``c = 1/s`` and ``ŷ = y``; ignored rows 0 and False, kept rows whose
    ``z`` holds NaN or ±inf NaN and False. The confidence is float32 (float64 for float64 logits)."""
    z, high, finite, keep = _rows(logits, labels, temperature, ignore_index)
    conf = 1.0 / (z - high[:, None]).exp().sum(dim=1)
    conf = torch.where(keep, torch.where(finite, conf, torch.full_like(conf, float("nan"))), torch.zeros_like(conf))
    return conf, (z.argmax(dim=1) == labels) & keep & finite


def proper_scores(logits, labels, temperature: float, ignore_index: int):
    """Per-row NLL (float64) and Brier (the compute dtype) of the module docstring, 0 for ignored and non-finite
    rows."""
    z, high, finite, keep = _rows(logits, labels, temperature, ignore_index)
    keep = keep & finite
    safe = torch.where(keep, labels, torch.zeros_like(labels))[:, None]
    # m − z_y in float64: opposite float32 extremes give a gap beyond float32's range
    gap = torch.where(keep, high.double() - z.gather(1, safe).squeeze(1).double(), 0.0)
    z = torch.where(keep[:, None], z - high[:, None], torch.zeros_like(z))
    e = z.exp()
    s = e.sum(dim=1)
    others = e.scatter(1, safe, 0.0)
    o, q = others.sum(dim=1), others.square().sum(dim=1)
    nll = torch.where(z.argmax(dim=1) == safe.squeeze(1), torch.log1p(o).double(), torch.log(s).double() + gap)
    brier = (o / s).square() + q / s.square()
    return torch.where(keep, nll, 0.0), torch.where(keep, brier, 0.0)


def metric_sums(logits, labels, n_bins: int, temperature: float, ignore_index: int, classwise: bool):
    """(counts, Σ conf, Σ correct, n_nonfinite) of the top-1 bins, ``[Σ NLL, Σ Brier]`` float64 over the kept
    finite rows, and the classwise (counts, Σ p, Σ correct) [K, M] (``classwise``) or [0, M]."""
    top1 = binned_stats(logits, labels, n_bins, temperature, ignore_index, False)
    nll, brier = proper_scores(logits, labels, temperature, ignore_index)
    # row sums in index order (a sequential scan; torch.sum splits a long reduction between threads)
    scores = torch.stack([torch.cat([x.new_zeros(1), x]).cumsum(0)[-1] for x in (nll.double(), brier.double())])
    if classwise:
        per_class = binned_stats(logits, labels, n_bins, temperature, ignore_index, True)[:3]
    else:
        per_class = (torch.zeros((0, n_bins), dtype=torch.int64, device=logits.device),
                     *(torch.zeros((0, n_bins), dtype=torch.float64, device=logits.device) for _ in range(2)))
    return (*top1, scores, *per_class)
