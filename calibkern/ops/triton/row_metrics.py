"""Triton kernels for ``top1_rows`` (per-row confidence and correctness) and ``metric_sums`` (top-1 bin
statistics with the NLL and Brier sums, docs/math.md#proper-scores).

``metric_sums``: one program per block of rows reads each row once in K-tiles, carrying, besides the online
softmax's ``m`` and ``s``, ``O = Σ_{j≠y} e_j`` and ``Q = Σ_{j≠y} e_j²`` (rescaled with ``s`` when the max
grows) and ``z_y``; ``NLL = log1p(O)`` when ``y = ŷ``, else ``log s − (z_y − m)``, and
``Brier = (O/s)² + Q/s²``. Each program writes its partial bins and score sums (float64), summed in a fixed
order afterwards. With the classwise statistics, where one class tile spans K, the classwise kernel computes all
of it from one read of each row instead; wider rows store their ``m`` and ``s`` here and the classwise kernel bins
every class from them (a second read of the logits).
"""
import torch
import triton
import triton.language as tl

from .binning import binned_stats, classwise_in_one_read, classwise_sums, store_bin_partials
from .common import (MAX_LOSS_TILE, MAX_ROW_BINS, bin_index, bins_block, label_softmax, online_softmax,
                     proper_scores, row_blocks, sum_partials, warps)


@triton.jit
def _top1_rows_kernel(logits_ptr, labels_ptr, conf_ptr, correct_ptr, N, K, inv_t, ignore_index,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """conf_i = 1/s_i (0 ignored, NaN non-finite) and correct_i = (ŷ_i = y_i) for one block of rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.minimum(rows, N - 1)
    labels = tl.load(labels_ptr + rows)
    keep = labels != ignore_index
    _, s, top, _, finite = online_softmax(logits_ptr, rows.to(tl.int64) * K, K, inv_t, BLOCK_N, BLOCK_K, False)
    conf = tl.where(keep, tl.where(finite, 1.0 / s, float("nan")), 0.0)
    tl.store(conf_ptr + rows, conf, mask=in_range)
    tl.store(correct_ptr + rows, (keep & finite & (top == labels)).to(tl.int8), mask=in_range)


@triton.jit
def _metric_sums_kernel(logits_ptr, labels_ptr, counts_ptr, conf_ptr, correct_ptr, nonfinite_ptr, scores_ptr,
                        max_ptr, sum_ptr, N, K, M, inv_t, ignore_index,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        STORE_ROWS: tl.constexpr):
    """Partial top-1 bins of one block of rows into row pid of [P, M], its kept non-finite rows into
    nonfinite[pid], its Σ NLL and Σ Brier into scores[pid, 0:2]; with STORE_ROWS each row's m and s (NaN for a
    non-finite row) for the classwise kernel."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.minimum(rows, N - 1)
    labels = tl.load(labels_ptr + rows)
    keep = in_range & (labels != ignore_index)
    m, s, top, _, finite, others, others_sq, z_label = label_softmax(logits_ptr, rows.to(tl.int64) * K, K, inv_t,
                                                                     labels, BLOCK_N, BLOCK_K, False, True)
    if STORE_ROWS:
        tl.store(max_ptr + rows, m, mask=in_range)
        tl.store(sum_ptr + rows, tl.where(finite, s, float("nan")), mask=in_range)
    tl.store(nonfinite_ptr + pid, tl.sum((keep & ~finite).to(tl.int64), axis=0))
    keep = keep & finite
    conf = 1.0 / s
    store_bin_partials(counts_ptr, conf_ptr, correct_ptr, pid.to(tl.int64) * M, bin_index(conf, M), conf,
                       top == labels, keep, M, BLOCK_M)
    nll, brier = proper_scores(m, s, top, others, others_sq, z_label, labels)
    tl.store(scores_ptr + pid * 2, tl.sum(tl.where(keep, nll, 0.0).to(tl.float64), axis=0))
    tl.store(scores_ptr + pid * 2 + 1, tl.sum(tl.where(keep, brier, 0.0).to(tl.float64), axis=0))


METRIC_MAXNREG = 255
"""The metric-sums kernel's register cap: ptxas held 8 × 128 and 16 × 32 tiles on 4 warps to 168 and 72 registers
and spilled 8–16 bytes on sm_80 (benchmarks/triton_compile.py); capped, 173–177, no spills."""


def metric_blocks(N: int, K: int, M: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_M, num_warps) of the metric-sums kernel: top1_blocks' bounds with the loss kernels'
    K-tile (MAX_LOSS_TILE), since it keeps several tile-sized temporaries (e, the label mask, e without the label),
    and 8 warps beside a [rows, bins] one-hot of MAX_ROW_BINS cells (at 4 warps ptxas held the kernel with 8 × 64
    and 32 × 16 one-hots to 40 and 80 registers and spilled 8 bytes on sm_90, benchmarks/triton_compile.py)."""
    block_m = bins_block(M)
    block_n, block_k = row_blocks(N, K, max_tile=MAX_LOSS_TILE, max_rows=MAX_ROW_BINS // block_m)
    num_warps = 8 if block_n * block_m >= MAX_ROW_BINS else warps(block_n, block_k)
    return block_n, block_k, block_m, num_warps


def _inv_t(temperature: float) -> float:
    return float(torch.tensor(1.0 / temperature, dtype=torch.float32))


def top1_rows(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """(confidence float32 [N], correct bool [N]); ignored rows 0 and False, non-finite kept rows NaN and False."""
    N, K = logits.shape
    conf = torch.empty(N, dtype=torch.float32, device=logits.device)
    correct = torch.empty(N, dtype=torch.bool, device=logits.device)
    if N:
        block_n, block_k = row_blocks(N, K)
        _top1_rows_kernel[(triton.cdiv(N, block_n),)](logits, labels, conf, correct.view(torch.int8), N, K,
                                                      _inv_t(temperature), ignore_index, BLOCK_N=block_n,
                                                      BLOCK_K=block_k, num_warps=warps(block_n, block_k))
    return conf, correct


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, temperature: float, ignore_index: int,
                classwise: bool):
    """binned_stats' top-1 outputs, ``[Σ NLL, Σ Brier]`` float64, and the classwise statistics [K, M] (or
    [0, M])."""
    N, K = logits.shape
    M = n_bins
    if N == 0:
        class_shape = (K if classwise else 0, M)
        return (*binned_stats(logits, labels, M, temperature, ignore_index, False),
                torch.zeros(2, dtype=torch.float64, device=logits.device),
                torch.zeros(class_shape, dtype=torch.int64, device=logits.device),
                *(torch.zeros(class_shape, dtype=torch.float64, device=logits.device) for _ in range(2)))
    inv_t = _inv_t(temperature)
    if classwise and classwise_in_one_read(N, K, M):  # the classwise kernel takes everything from one read
        per_class, n_nonfinite, top1, scores = classwise_sums(logits, labels, M, inv_t, ignore_index,
                                                              top1_scores=True)
        return (*top1, n_nonfinite, scores, *per_class)
    block_n, block_k, block_m, num_warps = metric_blocks(N, K, M)
    P = triton.cdiv(N, block_n)
    parts = (torch.empty((P, M), dtype=torch.int64, device=logits.device),
             torch.empty((P, M), dtype=torch.float64, device=logits.device),
             torch.empty((P, M), dtype=torch.float64, device=logits.device),
             torch.empty(P, dtype=torch.int64, device=logits.device),
             torch.empty((P, 2), dtype=torch.float64, device=logits.device))
    rows = torch.empty((2, N if classwise else 1), dtype=torch.float32, device=logits.device)  # m, s
    _metric_sums_kernel[(P,)](logits, labels, *parts, rows[0], rows[1], N, K, M, inv_t, ignore_index,
                              BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, STORE_ROWS=classwise,
                              num_warps=num_warps, maxnreg=METRIC_MAXNREG)
    if classwise:  # a second read: one program cannot hold a row wider than its class tile
        per_class, _, _, _ = classwise_sums(logits, labels, M, inv_t, ignore_index, rows[0], rows[1])
    else:
        per_class = (torch.zeros((0, M), dtype=torch.int64, device=logits.device),
                     *(torch.zeros((0, M), dtype=torch.float64, device=logits.device) for _ in range(2)))
    return (*(sum_partials(t) for t in parts), *per_class)
