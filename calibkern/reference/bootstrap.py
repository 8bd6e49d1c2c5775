"""The Poisson bootstrap of top-1 bin statistics (docs/math.md#intervals), plain PyTorch.

Replicate ``b`` gives row ``i`` (of the kept rows, in order) the multiplicity ``w_bi ~ Poisson(1)``, drawn from a
counter-based hash so that every backend draws the same weights without sharing a generator state: with
``mix`` the 32-bit integer finaliser below, ``s = mix(seed mod 2³²)``, ``r_i = mix(i + s)``,
``q_b = mix(b · 0x9E3779B9 + s)`` and ``u = mix(r_i ⊕ q_b)`` (all mod 2³²), ``w_bi`` is the number of
thresholds ``T_k = ⌊2³² · P(Poisson(1) ≤ k)⌋``, k = 0 … 10, that ``u`` reaches (``w ≤ 11``; the probability of
a larger draw, 1e-8, goes to 11). Per replicate and bin ``k = b(c_i)``: ``n = Σ w``, ``Σ w c`` and ``Σ w ·
correct``. Counts and correct sums are integers, identical on every backend; ``Σ w c`` differs by float64
rounding only.
"""

from __future__ import annotations

from fractions import Fraction
from math import factorial

import torch

from .softmax import bin_index

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)  # both < 2³¹: the int64 products of the reference cannot overflow
ROW_CHUNK = 1 << 22  # weights [replicates, rows] held at once


def _poisson_thresholds(last: int = 10) -> list[int]:
    """``⌊2³² · P(Poisson(1) ≤ k)⌋`` for k = 0 … last, exactly (rational arithmetic, e⁻¹ to 60 digits)."""
    e_inv = Fraction(sum(Fraction((-1) ** j, factorial(j)) for j in range(60)))
    cdf, out = Fraction(0), []
    for k in range(last + 1):
        cdf += e_inv / factorial(k)
        out.append(int(cdf * 2 ** 32))
    return out


POISSON_THRESHOLDS = _poisson_thresholds()


def mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser ``x ^= x >> 16; x *= A; x ^= x >> 15; x *= B; x ^= x >> 16`` (mod 2³²) on int64
    tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIERS[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MULTIPLIERS[1]) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    return int(mix(torch.tensor(seed & MASK32, dtype=torch.int64)))


def poisson_weights(n: int, replicates: torch.Tensor, seed: int, device) -> torch.Tensor:
    """``w_bi`` (int64 [len(replicates), n]) of the module docstring."""
    s = seed_key(seed)
    r = mix((torch.arange(n, dtype=torch.int64, device=device) + s) & MASK32)
    q = mix((replicates.to(device) * GOLDEN + s) & MASK32)
    u = mix(r[None, :] ^ q[:, None])
    thresholds = torch.tensor(POISSON_THRESHOLDS, dtype=torch.int64, device=device)
    return torch.bucketize(u, thresholds, right=True)  # the number of thresholds ≤ u


def bootstrap_stats(confidence, correct, n_bins: int, n_boot: int, seed: int):
    """(counts int64 [B, M], Σ w c float64 [B, M], Σ w · correct float64 [B, M]) of ``n_boot`` Poisson
    replicates of the rows (``confidence`` [n] in [0, 1], ``correct`` bool [n])."""
    n = confidence.shape[0]
    device = confidence.device
    bins = bin_index(confidence, n_bins)
    conf, hit = confidence.double(), correct.to(torch.int64)
    outputs = [], [], []
    chunk = max(1, min(n_boot, ROW_CHUNK // max(n, 1)))
    for start in range(0, n_boot, chunk):
        replicates = torch.arange(start, min(n_boot, start + chunk), dtype=torch.int64, device=device)
        w = poisson_weights(n, replicates, seed, device)
        b = replicates.shape[0]
        flat = (bins[None, :] + torch.arange(b, device=device)[:, None] * n_bins).reshape(-1)
        size = b * n_bins
        counts = torch.zeros(size, dtype=torch.int64, device=device).scatter_add_(0, flat, w.reshape(-1))
        correct_sum = torch.zeros(size, dtype=torch.int64, device=device).scatter_add_(0, flat, (w * hit).reshape(-1))
        conf_sum = torch.zeros(size, dtype=torch.float64, device=device).scatter_add_(
            0, flat, (w.double() * conf).reshape(-1))
        for out, t in zip(outputs, (counts, conf_sum, correct_sum.double())):
            out.append(t.view(b, n_bins))
    return tuple(torch.cat(out) for out in outputs)
