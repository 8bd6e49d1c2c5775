"""Triton kernel for ``bootstrap_stats``: per-bin statistics of Poisson replicates of the rows, with the
counter-based weights of calibkern/reference/bootstrap.py (uint32 arithmetic, so every backend draws the same
``w``). One program per replicate walks the rows in tiles and keeps its ``[BLOCK_M]`` sums (int64 counts and
correct sums, float64 ``Σ w c``) over its bins; no partials to reduce, the same order on every run.
"""
import torch
import triton
import triton.language as tl

from ...reference.bootstrap import GOLDEN, POISSON_THRESHOLDS, seed_key
from .common import MAX_ROW_BINS, bin_index, bins_block


@triton.jit
def _mix(x):
    """The 32-bit finaliser of calibkern/reference/bootstrap.py (uint32, wrapping)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _bootstrap_kernel(conf_ptr, correct_ptr, thresholds_ptr, counts_ptr, sum_conf_ptr, sum_correct_ptr,
                      n, M, n_thresholds, seed_key, golden,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Replicate b = program_id(0): for each bin k, n = Σ w, Σ w c, Σ w · correct over the rows with b(c) = k."""
    b = tl.program_id(0)
    s = seed_key.to(tl.uint32)
    q = _mix(b.to(tl.uint32) * golden.to(tl.uint32) + s)
    t_index = tl.arange(0, BLOCK_T)
    thresholds = tl.load(thresholds_ptr + t_index, mask=t_index < n_thresholds, other=0).to(tl.uint32)
    t_valid = t_index < n_thresholds
    for m0 in range(0, M, BLOCK_M):
        bins = m0 + tl.arange(0, BLOCK_M)
        counts = tl.zeros([BLOCK_M], tl.int64)
        hits = tl.zeros([BLOCK_M], tl.int64)
        sums = tl.zeros([BLOCK_M], tl.float64)
        for r0 in range(0, n, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            valid = rows < n
            conf = tl.load(conf_ptr + rows, mask=valid, other=0.0)
            correct = tl.load(correct_ptr + rows, mask=valid, other=0).to(tl.int64)
            u = _mix(_mix(rows.to(tl.uint32) + s) ^ q)
            w = tl.sum(((u[:, None] >= thresholds[None, :]) & t_valid[None, :]).to(tl.int64), axis=1)
            w = tl.where(valid, w, 0)
            hit = bin_index(conf, M)[:, None] == bins[None, :]
            weight = tl.where(hit, w[:, None], 0)
            counts += tl.sum(weight, axis=0)
            hits += tl.sum(weight * correct[:, None], axis=0)
            sums += tl.sum(weight.to(tl.float64) * conf.to(tl.float64)[:, None], axis=0)
        out = b.to(tl.int64) * M + bins
        tl.store(counts_ptr + out, counts, mask=bins < M)
        tl.store(sum_conf_ptr + out, sums, mask=bins < M)
        tl.store(sum_correct_ptr + out, hits.to(tl.float64), mask=bins < M)


def bootstrap_stats(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int, n_boot: int, seed: int):
    """(counts int64, Σ w c float64, Σ w · correct float64), each [n_boot, M]."""
    n, M = confidence.shape[0], n_bins
    device = confidence.device
    outputs = (torch.empty((n_boot, M), dtype=torch.int64, device=device),
               torch.empty((n_boot, M), dtype=torch.float64, device=device),
               torch.empty((n_boot, M), dtype=torch.float64, device=device))
    thresholds = torch.tensor(POISSON_THRESHOLDS, dtype=torch.int64, device=device)
    block_n, block_m, block_t = bootstrap_blocks(n, M)
    _bootstrap_kernel[(n_boot,)](confidence, correct.view(torch.int8), thresholds, *outputs, n, M,
                                 len(POISSON_THRESHOLDS), seed_key(seed), GOLDEN, BLOCK_N=block_n, BLOCK_M=block_m,
                                 BLOCK_T=block_t)
    return outputs


def bootstrap_blocks(n: int, M: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_T): a [rows, bins] weight tile within MAX_ROW_BINS cells, the thresholds in one
    vector."""
    block_m = bins_block(M)
    block_n = max(1, min(triton.next_power_of_2(max(n, 1)), 1024, MAX_ROW_BINS // block_m))
    return block_n, block_m, triton.next_power_of_2(len(POISSON_THRESHOLDS))
