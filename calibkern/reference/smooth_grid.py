"""The smooth ECE's grid moments (docs/math.md#smooth-ece), plain PyTorch.

For rows with top-1 confidence ``c`` and correctness ``a`` (residual ``r = c − a``) and ``cells`` equal cells of
[0, 1], cell ``j = min(⌊c · cells⌋, cells − 1)`` (in float64) sums ``(1, c, r, c · r)``: float64 [cells, 4].
"""

from __future__ import annotations

import torch


def grid_moments(confidence: torch.Tensor, correct: torch.Tensor, cells: int) -> torch.Tensor:
    c = confidence.double()
    r = c - correct.double()
    left = (c * cells).long().clamp_(max=cells - 1)
    moments = torch.stack([torch.ones_like(c), c, r, c * r], 1)
    return torch.zeros(cells, 4, dtype=torch.float64, device=c.device).index_add_(0, left, moments)
