"""Triton kernel for ``cross_entropy_``: per-row cross-entropy, with label smoothing ε and the z-loss λ·lse², whose
gradient overwrites the logits (formulas: calibkern/reference/cross_entropy.py).

``loss_i = log s − (1 − ε)(z_{i,y_i} − m) − (ε/V) Σ_j (z_ij − m) + λ lse_i²`` and ``∂loss_i/∂z_i = (1 + 2λ lse_i)
softmax(z_i) − (1 − ε) e_{y_i} − ε/V`` (both 0 for rows whose target is ``ignore_index``; loss NaN and an all-NaN
gradient for a kept row holding NaN or ±inf). One pass over V for ``m`` and ``s`` (online softmax), a second that
reads each tile, adds its ``Σ (z − m)`` and writes its gradient in place. Used by the fused linear loss on [n, V]
logit chunks.
"""
import torch
import triton
import triton.language as tl

from .common import INTERPRETED, load_tile, online_softmax, row_blocks, warps

MAX_CE_ROWS = None if INTERPRETED else 32


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, loss_ptr, N, V, ignore_index, smoothing, z_scale,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [pid·BLOCK_N, (pid+1)·BLOCK_N): loss into loss_ptr, its gradient over the logits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.minimum(rows, N - 1)  # clamped rows are read but never written
    row_off = rows.to(tl.int64) * V
    targets = tl.load(targets_ptr + rows)
    keep = in_range & (targets != ignore_index)
    m, s, _, _, finite = online_softmax(logits_ptr, row_off, V, 1.0, BLOCK_N, BLOCK_K, False)
    target_logit = tl.load(logits_ptr + row_off + tl.where(keep, targets, 0)).to(tl.float32)
    log_s = tl.log(s)
    lse = m + log_s
    p_scale = (1.0 + 2.0 * z_scale * lse) / s
    uniform = smoothing / V
    per_column = 1.0 / V
    centred = tl.zeros([BLOCK_N], dtype=tl.float32)  # mean of z − max as Σ (z − max) / V: no overflow
    for k0 in range(0, V, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        d = load_tile(logits_ptr, row_off, cols, V, 1.0) - m[:, None]
        centred += tl.sum(tl.where((cols < V)[None, :], d * per_column, 0.0), axis=1)
        one_hot = tl.where(cols[None, :] == targets[:, None], 1.0 - smoothing, 0.0)
        grad = tl.where(finite[:, None], tl.exp(d) * p_scale[:, None] - uniform - one_hot, float("nan"))
        grad = tl.where(keep[:, None], grad, 0.0)
        tl.store(logits_ptr + row_off[:, None] + cols[None, :], grad, mask=in_range[:, None] & (cols < V)[None, :])
    # the smoothing term only when ε ≠ 0: 0 · (−inf) would be NaN where a row's mean underflows
    loss = log_s - (1.0 - smoothing) * (target_logit - m) - tl.where(smoothing != 0.0, smoothing * centred, 0.0) \
        + z_scale * lse * lse
    loss = tl.where(finite, loss, float("nan"))
    tl.store(loss_ptr + rows, tl.where(keep, loss, 0.0), mask=in_range)


def ce_blocks(N: int, V: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of ``_cross_entropy_kernel``: at most MAX_CE_ROWS rows (64 rows × 4 columns on 4 warps
    left an 8-byte stack frame on sm_80, benchmarks/triton_compile.py)."""
    return row_blocks(N, V, max_rows=MAX_CE_ROWS)


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0,
                   lse_square_scale: float = 0.0) -> torch.Tensor:
    """loss float32[n]; logits (float32 [n, V], contiguous) is overwritten with ∂loss_i/∂z_i."""
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        block_n, block_k = ce_blocks(N, V)
        _cross_entropy_kernel[(triton.cdiv(N, block_n),)](logits, targets, loss, N, V, ignore_index,
                                                        float(label_smoothing), float(lse_square_scale),
                                                        BLOCK_N=block_n, BLOCK_K=block_k,
                                                        num_warps=warps(block_n, block_k))
    return loss
