"""Row softmax read-outs shared by every reference op (docs/math.md#confidence).

``z = logits · float32(1/T)``, ``m = max z``, ``s = Σ exp(z − m)``, ``p = exp(z − m) / s``, confidence
``c = 1/s``, prediction ``ŷ`` = first argmax. Math in float32 (float64 for float64 input, so the
reference also serves gradcheck).
"""

from __future__ import annotations

import torch


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def scaled(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        z = z * torch.tensor(1.0 / temperature, dtype=torch.float32).to(z.dtype)
    return z


def softmax_parts(logits: torch.Tensor, temperature: float = 1.0):
    """Returns ``(p [N, K], conf [N], pred [N])``."""
    z = scaled(logits, temperature)
    pred = z.argmax(dim=1)
    e = (z - z.gather(1, pred[:, None])).exp()
    s = e.sum(dim=1)
    return e / s[:, None], 1.0 / s, pred


def bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``b(c) = min(floor(c · M), M − 1)`` from the float32 confidence (int64)."""
    return torch.floor(conf.float() * n_bins).long().clamp_(0, n_bins - 1)
