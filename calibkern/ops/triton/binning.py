"""Triton kernels for ``binned_stats`` (top-1 and classwise reliability statistics).

Top-1: one program per block of rows reads each row once (online softmax over K-tiles), takes
``c = 1/s``, ``ŷ``, ``b(c)`` and writes its own partial ``(count, Σ c, Σ correct)`` per bin; the partials
are summed in a fixed order afterwards. Classwise: a row pass stores ``m`` and ``s``; then a grid of
(row chunk, class tile) programs bins ``p_j = exp(z_j − m) / s`` of every class, each program owning its
partial ``[BLOCK_K, M]`` block, summed the same way. A kept row whose z holds NaN or ±inf is found by
the softmax pass (``online_softmax``'s finiteness flag), left out and counted. No gradients.
"""
import torch
import triton
import triton.language as tl

from . import common
from .common import (bin_index, bins_block, label_softmax, load_tile, online_softmax, proper_scores, row_blocks,
                     sum_partials, warps)

PARTIAL_BUDGET = 1 << 22  # classwise partial cells (chunks × K × M) kept at once
# the classwise statistics' register cap (classwise and row-softmax kernels): ptxas held them to 32–64 and 128
# registers at some blocks and spilled 4–8 bytes on sm_90 (benchmarks/triton_compile.py); capped, no spills
CLASSWISE_MAXNREG = 255


@triton.jit
def _top1_kernel(logits_ptr, labels_ptr, counts_ptr, conf_ptr, correct_ptr, nonfinite_ptr,
                 N, K, M, inv_t, ignore_index,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """Partial top-1 bin statistics of rows [pid·BLOCK_N, (pid+1)·BLOCK_N) into row pid of [P, M]; the
    number of kept rows with non-finite z, left out of the bins, into nonfinite[pid]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.minimum(rows, N - 1)  # clamped rows are read but never counted
    labels = tl.load(labels_ptr + rows)
    keep = in_range & (labels != ignore_index)
    m, s, top, _, finite = online_softmax(logits_ptr, rows.to(tl.int64) * K, K, inv_t, BLOCK_N, BLOCK_K, False)
    tl.store(nonfinite_ptr + pid, tl.sum((keep & ~finite).to(tl.int64), axis=0))
    keep = keep & finite
    conf = 1.0 / s
    b = bin_index(conf, M)
    store_bin_partials(counts_ptr, conf_ptr, correct_ptr, pid.to(tl.int64) * M, b, conf, top == labels, keep, M,
                       BLOCK_M)


@triton.jit
def store_bin_partials(counts_ptr, conf_ptr, correct_ptr, out, b, conf, correct, keep, M, BLOCK_M: tl.constexpr):
    """Per bin k of [out, out + M): count, Σ conf and Σ correct (float64) of the kept rows with b = k."""
    for m0 in range(0, M, BLOCK_M):
        bins = m0 + tl.arange(0, BLOCK_M)
        n, sum_conf, sum_correct = bin_sums(b, conf, correct, keep, bins)
        tl.store(counts_ptr + out + bins, n, mask=bins < M)
        tl.store(conf_ptr + out + bins, sum_conf, mask=bins < M)
        tl.store(correct_ptr + out + bins, sum_correct, mask=bins < M)


@triton.jit
def bin_sums(b, conf, correct, keep, bins):
    """For each bin k of ``bins``: the count, Σ conf and Σ correct (float64) of the kept rows with b = k."""
    hit = (b[:, None] == bins[None, :]) & keep[:, None]
    return (tl.sum(hit.to(tl.int64), axis=0), tl.sum(tl.where(hit, conf.to(tl.float64)[:, None], 0.0), axis=0),
            tl.sum(tl.where(hit, correct.to(tl.float64)[:, None], 0.0), axis=0))


@triton.jit
def _row_softmax_kernel(logits_ptr, max_ptr, sum_ptr, N, K, inv_t,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """m_i = max_j z_ij and s_i = Σ_j exp(z_ij − m_i), one read of each row; s_i = NaN marks a row with
    non-finite z."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.minimum(rows, N - 1)
    m, s, _, _, finite = online_softmax(logits_ptr, rows.to(tl.int64) * K, K, inv_t, BLOCK_N, BLOCK_K, False)
    tl.store(max_ptr + rows, m, mask=in_range)
    tl.store(sum_ptr + rows, tl.where(finite, s, float("nan")), mask=in_range)


@triton.jit
def _classwise_kernel(logits_ptr, labels_ptr, max_ptr, sum_ptr, counts_ptr, conf_ptr, correct_ptr,
                      top1_counts_ptr, top1_conf_ptr, top1_correct_ptr, nonfinite_ptr, scores_ptr,
                      N, K, M, inv_t, ignore_index, rows_per_chunk,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      ROW_SOFTMAX: tl.constexpr, TOP1_SCORES: tl.constexpr):
    """Partial classwise statistics of one (row chunk, class tile): for every kept row i and class j,
    bin k = b(p_ij) gets count + 1, Σ p + p_ij, Σ correct + 1[y_i = j]; written to [chunk, j, k].

    Each row's m and s come from max_ptr and sum_ptr (s NaN: a non-finite row), or with ROW_SOFTMAX (one class
    tile spans K) from the row's own tile, just read: the chunk's kept non-finite rows go to nonfinite[chunk],
    and with TOP1_SCORES its top-1 bins to [chunk, M] and its Σ NLL, Σ Brier to scores[chunk, 0:2]."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, N)
    out = chunk.to(tl.int64) * K * M + cols.to(tl.int64)[:, None] * M
    n_nonfinite = tl.zeros([BLOCK_N], tl.int64)
    nll_sum = tl.zeros([BLOCK_N], tl.float64)
    brier_sum = tl.zeros([BLOCK_N], tl.float64)
    for m0 in range(0, M, BLOCK_M):
        first = m0 == 0  # the per-row sums are taken once, in the first bins block
        bins = m0 + tl.arange(0, BLOCK_M)
        counts = tl.zeros([BLOCK_K, BLOCK_M], tl.int64)
        conf = tl.zeros([BLOCK_K, BLOCK_M], tl.float64)
        correct = tl.zeros([BLOCK_K, BLOCK_M], tl.float64)
        top1_counts = tl.zeros([BLOCK_M], tl.int64)
        top1_conf = tl.zeros([BLOCK_M], tl.float64)
        top1_correct = tl.zeros([BLOCK_M], tl.float64)
        for r0 in range(start, end, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            in_range = rows < end
            rows = tl.minimum(rows, end - 1)
            labels = tl.load(labels_ptr + rows)
            keep = in_range & (labels != ignore_index)
            row_off = rows.to(tl.int64) * K
            if ROW_SOFTMAX:
                row_max, row_sum, top, _, finite, others, others_sq, z_label = label_softmax(
                    logits_ptr, row_off, K, inv_t, labels, BLOCK_N, BLOCK_K, False, TOP1_SCORES)
                n_nonfinite += tl.where(first & keep & ~finite, 1, 0).to(tl.int64)
                keep = keep & finite
                if TOP1_SCORES:
                    top_conf = 1.0 / row_sum
                    n, sum_conf, sum_correct = bin_sums(bin_index(top_conf, M), top_conf, top == labels, keep, bins)
                    top1_counts += n
                    top1_conf += sum_conf
                    top1_correct += sum_correct
                    nll, brier = proper_scores(row_max, row_sum, top, others, others_sq, z_label, labels)
                    nll_sum += tl.where(first & keep, nll, 0.0).to(tl.float64)
                    brier_sum += tl.where(first & keep, brier, 0.0).to(tl.float64)
            else:
                row_max = tl.load(max_ptr + rows)
                row_sum = tl.load(sum_ptr + rows)
                keep = keep & (row_sum == row_sum)  # NaN: non-finite row
            z = load_tile(logits_ptr, row_off, cols, K, inv_t)  # with ROW_SOFTMAX: the tile just read, from cache
            p = tl.exp(z - row_max[:, None]) / row_sum[:, None]
            b = bin_index(p, M)
            valid = keep[:, None] & col_ok[None, :]
            hit = (b[:, :, None] == bins[None, None, :]) & valid[:, :, None]
            is_label = (labels[:, None] == cols[None, :])[:, :, None]
            counts += tl.sum(hit.to(tl.int64), axis=0)
            conf += tl.sum(tl.where(hit, p.to(tl.float64)[:, :, None], 0.0), axis=0)
            correct += tl.sum(tl.where(hit & is_label, 1.0, 0.0).to(tl.float64), axis=0)
        mask = col_ok[:, None] & (bins < M)[None, :]
        tl.store(counts_ptr + out + bins[None, :], counts, mask=mask)
        tl.store(conf_ptr + out + bins[None, :], conf, mask=mask)
        tl.store(correct_ptr + out + bins[None, :], correct, mask=mask)
        if TOP1_SCORES:
            top1_out = chunk.to(tl.int64) * M + bins
            tl.store(top1_counts_ptr + top1_out, top1_counts, mask=bins < M)
            tl.store(top1_conf_ptr + top1_out, top1_conf, mask=bins < M)
            tl.store(top1_correct_ptr + top1_out, top1_correct, mask=bins < M)
    if ROW_SOFTMAX:
        tl.store(nonfinite_ptr + chunk, tl.sum(n_nonfinite, axis=0))
    if TOP1_SCORES:
        tl.store(scores_ptr + chunk * 2, tl.sum(nll_sum, axis=0))
        tl.store(scores_ptr + chunk * 2 + 1, tl.sum(brier_sum, axis=0))


def top1_blocks(N: int, K: int, M: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_M) of the top-1 kernel: its [BLOCK_N, BLOCK_M] bin one-hot within MAX_ROW_BINS, and
    a tile of at most MAX_BINNED_TILE elements (one bin too: 2048- and 4096-element tiles on 8 warps spilled 16–32
    bytes on sm_90)."""
    block_m = bins_block(M)
    return (*row_blocks(N, K, common.MAX_BINNED_TILE, max_rows=common.MAX_ROW_BINS // block_m), block_m)


def classwise_blocks(N: int, K: int, M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, chunks, rows_per_chunk, num_warps) of the classwise kernel: class tiles whose [BLOCK_K,
    BLOCK_M] accumulators and [BLOCK_N, BLOCK_K, BLOCK_M] one-hot stay in registers, row chunks bounded by the
    partials' memory, and 8 warps for a one-hot of MAX_ONEHOT cells (at 4 warps the sm_100 ptxas held 16 × 2 × 16
    and 8 × 4 × 16 one-hots to 48 registers and spilled 8 bytes, benchmarks/triton_compile.py)."""
    block_m = bins_block(M)
    class_block = min(triton.next_power_of_2(K), common.MAX_CLASS_BLOCK, common.MAX_BLOCK_K,
                      max(1, common.MAX_CLASS_CELLS // block_m))
    class_tiles = triton.cdiv(K, class_block)
    row_block = min(triton.next_power_of_2(N), max(1, common.MAX_ONEHOT // (class_block * block_m)))
    chunks = max(1, min(triton.cdiv(N, row_block), triton.cdiv(common.MIN_PROGRAMS, class_tiles),
                        PARTIAL_BUDGET // (K * M)))
    rows_per_chunk = triton.cdiv(N, chunks)
    num_warps = 8 if row_block * class_block * block_m >= common.MAX_ONEHOT else warps(row_block, class_block)
    return row_block, class_block, triton.cdiv(N, rows_per_chunk), rows_per_chunk, num_warps


def _partials(P: int, shape: tuple, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty((P, *shape), dtype=torch.int64, device=device),
            torch.empty((P, *shape), dtype=torch.float64, device=device),
            torch.empty((P, *shape), dtype=torch.float64, device=device))


def binned_stats(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, temperature: float,
                 ignore_index: int, classwise: bool):
    """(counts int64, Σ conf float64, Σ correct float64), shaped [M] (top-1) or [K, M] (classwise), and the
    number of kept rows with non-finite z (int64, 0-dim), which the softmax pass finds and leaves out."""
    N, K = logits.shape
    M = n_bins
    shape = (K, M) if classwise else (M,)
    if N == 0:
        return (torch.zeros(shape, dtype=torch.int64, device=logits.device),
                torch.zeros(shape, dtype=torch.float64, device=logits.device),
                torch.zeros(shape, dtype=torch.float64, device=logits.device),
                torch.zeros((), dtype=torch.int64, device=logits.device))
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    if not classwise:
        block_n, block_k, block_m = top1_blocks(N, K, M)
        P = triton.cdiv(N, block_n)
        parts = (*_partials(P, shape, logits.device), torch.empty(P, dtype=torch.int64, device=logits.device))
        _top1_kernel[(P,)](logits, labels, *parts, N, K, M, inv_t, ignore_index,
                           BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m,
                           num_warps=warps(block_n, block_k))
        return tuple(sum_partials(t) for t in parts)

    if classwise_in_one_read(N, K, M):
        class_stats, n_nonfinite, _, _ = classwise_sums(logits, labels, M, inv_t, ignore_index)
        return (*class_stats, n_nonfinite)
    row_max = torch.empty(N, dtype=torch.float32, device=logits.device)
    row_sum = torch.empty(N, dtype=torch.float32, device=logits.device)
    block_n, block_k = row_blocks(N, K)
    _row_softmax_kernel[(triton.cdiv(N, block_n),)](logits, row_max, row_sum, N, K, inv_t,
                                                   BLOCK_N=block_n, BLOCK_K=block_k,
                                                   num_warps=warps(block_n, block_k), maxnreg=CLASSWISE_MAXNREG)
    n_nonfinite = (torch.isnan(row_sum) & (labels != ignore_index)).sum()
    class_stats, _, _, _ = classwise_sums(logits, labels, M, inv_t, ignore_index, row_max, row_sum)
    return (*class_stats, n_nonfinite)


def classwise_in_one_read(N: int, K: int, M: int) -> bool:
    """Whether one class tile of the classwise kernel spans K, so that it takes each row's softmax from its own
    read of the row (its bins in one pass when M ≤ MAX_BLOCK_M)."""
    return classwise_blocks(N, K, M)[1] >= K


def classwise_sums(logits, labels, n_bins: int, inv_t: float, ignore_index: int, row_max=None, row_sum=None,
                   top1_scores: bool = False):
    """One launch of the classwise kernel: ((counts, Σ p, Σ correct) [K, M], number of kept non-finite rows, top-1
    (counts, Σ conf, Σ correct) [M], [Σ NLL, Σ Brier]). Given each row's ``m`` and ``s`` (``row_max``,
    ``row_sum``; NaN s: a non-finite row) it reads only the class tiles and returns the classwise statistics
    alone (None for the rest); without them one class tile must span K (``classwise_in_one_read``) and the
    kernel finds the non-finite rows, and with ``top1_scores`` the top-1 bins and score sums, in the same read."""
    N, K = logits.shape
    device = logits.device
    row_block, class_block, chunks, rows_per_chunk, num_warps = classwise_blocks(N, K, n_bins)
    one_read = row_max is None
    top1 = _partials(chunks if top1_scores else 1, (n_bins,), device)
    nonfinite = torch.empty(chunks if one_read else 1, dtype=torch.int64, device=device)
    scores = torch.empty((chunks if top1_scores else 1, 2), dtype=torch.float64, device=device)
    if one_read:
        row_max = row_sum = torch.empty(1, dtype=torch.float32, device=device)
    parts = _partials(chunks, (K, n_bins), device)
    grid = (chunks, triton.cdiv(K, class_block))
    _classwise_kernel[grid](logits, labels, row_max, row_sum, *parts, *top1, nonfinite, scores,
                            N, K, n_bins, inv_t, ignore_index, rows_per_chunk, BLOCK_N=row_block,
                            BLOCK_K=class_block, BLOCK_M=bins_block(n_bins), ROW_SOFTMAX=one_read,
                            TOP1_SCORES=top1_scores, num_warps=num_warps, maxnreg=CLASSWISE_MAXNREG)
    return (tuple(sum_partials(t) for t in parts), sum_partials(nonfinite) if one_read else None,
            tuple(sum_partials(t) for t in top1) if top1_scores else None,
            sum_partials(scores) if top1_scores else None)
