"""Triton kernel for the calibration losses and the EM E-step on option logits (docs/math.md).

One kernel, specialised by constexpr flags, serves four backend functions:

| function         | EM    | LOSS  | STATS | ECE_GRAD |
|------------------|-------|-------|-------|----------|
| `hard_bin_loss`  | False | True  | False | False    |
| `em_target_loss` | True  | True  | True  | False    |
| `em_stats`       | True  | False | True  | False    |
| `em_ece_grad`    | True  | False | False | True     |

Per row (temperature 1): ``m, s, ŷ`` and the second-largest logit from one online-softmax pass, ``c = 1/s``.
The target accuracy is ``a = bin_accuracy[b(c)]`` (hard bins) or ``a = Σ_k r_k θ_k`` with the
responsibilities ``r = softmax_k(log π_k − log σ_k − (c − μ_k)² / (2σ_k²))`` (EM). Non-max targets:
``q2 = exp(m2 − m)/s``, ``d = 1 − a``, ``u_j = tanh(γ₀ (p_j/q2) / max(d, 1e-12))`` (ratio 0 when q2 = 0; the
ratio is a quotient ≤ 1 and the slope ``γ₀ / max(d, 1e-12)`` finite, so every finite row gives finite targets),
``t_j = d (1 + u_j) / ((K − 1) + U)`` with ``U = Σ_{j≠ŷ} u_j`` (0 when d ≤ 0), ``τ_ŷ = a``.

Gradients (τ, r and θ detached):
* target loss ``L = Σ_j (p_j − τ_j)²``: ``∂L/∂z = p ⊙ (g − ⟨g, p⟩)`` with ``g = 2 (p − τ)`` and
  ``⟨g, p⟩ = 2 (Σ_j p_j² − a c − (d / ((K − 1) + U)) Σ_{j≠ŷ} p_j (1 + u_j))``, so a second pass over K
  accumulates ``U``, ``Σ p (1 + u)`` and ``Σ p²`` and a third writes the gradient and the loss;
* ``em_ece_grad``: ``w · ∂c/∂z = w · c · (e_ŷ − p)`` with ``w = Σ_k r_k coef_k``.
E-step statistics per program (summed in a fixed order afterwards): ``S = Σ r``, ``C = Σ r c``,
``Q = Σ r c²``, ``R = Σ r · 1[ŷ = y]`` over kept rows, in float64. Ignored rows: loss 0, gradient 0.
"""
import math

import torch
import triton
import triton.language as tl

from ...reference.target_loss import reduced_row_loss
from . import common
from .common import bin_index, bins_block, load_tile, online_softmax, row_blocks, sum_partials, warps

# the E-step statistics run on 8 warps from a [rows, bins] tile of STATS_WARP_ROW_BINS cells or a [rows, K-tile]
# tile of STATS_WARP_TILE (at 4 warps ptxas capped those at 72-168 registers and spilled 8-40 bytes; a 512-cell
# K-tile spilled at 8 warps instead)
STATS_WARP_ROW_BINS = 512
STATS_WARP_TILE = 1024


@triton.jit
def _log_weights(conf, comps, M, log_pi_ptr, mu_ptr, sigma_ptr):
    """log π_k − log σ_k − (c − μ_k)² / (2σ_k²) for a [BLOCK_N, BLOCK_M] tile; components ≥ M are -inf."""
    ok = comps < M
    log_pi = tl.load(log_pi_ptr + comps, mask=ok, other=0.0)
    mu = tl.load(mu_ptr + comps, mask=ok, other=0.0)
    sigma = tl.load(sigma_ptr + comps, mask=ok, other=1.0)
    diff = conf[:, None] - mu[None, :]
    logw = (log_pi - tl.log(sigma))[None, :] - diff * diff / (2.0 * sigma * sigma)[None, :]
    return tl.where(ok[None, :], logw, float("-inf"))


@triton.jit
def _ratio(p, cols, top, q2_safe):
    """p_j / q₂ ∈ [0, 1] off the argmax, 0 at ŷ: divided, not multiplied by 1/q₂, which overflows for a
    subnormal q₂ (and meets p_j = 0 as inf · 0)."""
    return tl.where(cols[None, :] != top[:, None], p, 0.0) / q2_safe[:, None]


@triton.jit
def _calibration_rows_kernel(
        logits_ptr, labels_ptr, loss_ptr, grad_ptr, stats_ptr,
        acc_ptr, log_pi_ptr, mu_ptr, sigma_ptr, coef_ptr,
        N, K, M, ignore_index, gamma0,
        EM: tl.constexpr, LOSS: tl.constexpr, STATS: tl.constexpr, ECE_GRAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows [pid·BLOCK_N, (pid+1)·BLOCK_N): L = Σ_j (p_j − τ_j)² and ∂L/∂z = p ⊙ (g − ⟨g, p⟩), g = 2(p − τ)
    (LOSS); w · ∂c/∂z = w · c · (e_ŷ − p) (ECE_GRAD); partial E-step statistics into stats[pid, 4, M]
    (STATS). acc_ptr is the per-bin accuracy (hard bins) or θ (EM)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.minimum(rows, N - 1)  # clamped rows are read but never counted or written
    row_off = rows.to(tl.int64) * K
    labels = tl.load(labels_ptr + rows)
    keep = in_range & (labels != ignore_index)
    m, s, top, m2, _ = online_softmax(logits_ptr, row_off, K, 1.0, BLOCK_N, BLOCK_K, LOSS)
    conf = 1.0 / s

    target = tl.zeros([BLOCK_N], tl.float32)
    weight = tl.zeros([BLOCK_N], tl.float32)
    if EM:
        # responsibilities over the M components, in log space: max and normaliser, then r
        lmax = tl.full([BLOCK_N], float("-inf"), tl.float32)
        lsum = tl.zeros([BLOCK_N], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            logw = _log_weights(conf, m0 + tl.arange(0, BLOCK_M), M, log_pi_ptr, mu_ptr, sigma_ptr)
            new_max = tl.maximum(lmax, tl.max(logw, axis=1))
            lsum = lsum * tl.exp(lmax - new_max) + tl.sum(tl.exp(logw - new_max[:, None]), axis=1)
            lmax = new_max
        conf64 = conf.to(tl.float64)
        correct64 = (top == labels).to(tl.float64)
        out = pid.to(tl.int64) * 4 * M
        for m0 in range(0, M, BLOCK_M):
            comps = m0 + tl.arange(0, BLOCK_M)
            ok = comps < M
            logw = _log_weights(conf, comps, M, log_pi_ptr, mu_ptr, sigma_ptr)
            r = tl.exp(logw - lmax[:, None]) / lsum[:, None]
            if LOSS:
                target += tl.sum(r * tl.load(acc_ptr + comps, mask=ok, other=0.0)[None, :], axis=1)
            if ECE_GRAD:
                weight += tl.sum(r * tl.load(coef_ptr + comps, mask=ok, other=0.0)[None, :], axis=1)
            if STATS:
                r64 = tl.where(keep[:, None], r.to(tl.float64), 0.0)
                rc = r64 * conf64[:, None]
                tl.store(stats_ptr + out + comps, tl.sum(r64, axis=0), mask=ok)
                tl.store(stats_ptr + out + M + comps, tl.sum(rc, axis=0), mask=ok)
                tl.store(stats_ptr + out + 2 * M + comps, tl.sum(rc * conf64[:, None], axis=0), mask=ok)
                tl.store(stats_ptr + out + 3 * M + comps, tl.sum(r64 * correct64[:, None], axis=0), mask=ok)
    elif LOSS:
        target = tl.load(acc_ptr + bin_index(conf, M))

    if LOSS:
        d = 1.0 - target
        q2 = tl.exp(m2 - m) / s
        q2_safe = tl.where(q2 > 0, q2, 1.0)  # ratio 0 when q2 = 0 (every non-max p_j is 0 then)
        slope = gamma0 / tl.maximum(d, 1e-12)  # ≤ ln(K − 1) · 1e12: finite, and 0 · finite for K = 2
        u_sum = tl.zeros([BLOCK_N], tl.float32)
        pu_sum = tl.zeros([BLOCK_N], tl.float32)
        p2_sum = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            p = tl.exp(load_tile(logits_ptr, row_off, cols, K, 1.0) - m[:, None]) / s[:, None]
            e = tl.exp(-2.0 * slope[:, None] * _ratio(p, cols, top, q2_safe))
            u = tl.where((cols[None, :] != top[:, None]) & (cols < K)[None, :], (1.0 - e) / (1.0 + e), 0.0)
            u_sum += tl.sum(u, axis=1)
            pu_sum += tl.sum(tl.where(cols[None, :] != top[:, None], p * (1.0 + u), 0.0), axis=1)
            p2_sum += tl.sum(p * p, axis=1)
        scale = tl.where(d > 0, d / ((K - 1) + u_sum), 0.0)
        gp = 2.0 * (p2_sum - target * conf - scale * pu_sum)
        loss = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            p = tl.exp(load_tile(logits_ptr, row_off, cols, K, 1.0) - m[:, None]) / s[:, None]
            e = tl.exp(-2.0 * slope[:, None] * _ratio(p, cols, top, q2_safe))
            is_top = cols[None, :] == top[:, None]
            tau = tl.where(is_top, target[:, None], scale[:, None] * (2.0 / (1.0 + e)))  # 1 + u = 2/(1+e)
            diff = p - tau
            loss += tl.sum(tl.where(col_ok[None, :], diff * diff, 0.0), axis=1)
            grad = tl.where(keep[:, None], p * (2.0 * diff - gp[:, None]), 0.0)
            tl.store(grad_ptr + row_off[:, None] + cols[None, :], grad, mask=in_range[:, None] & col_ok[None, :])
        tl.store(loss_ptr + rows, tl.where(keep, loss, 0.0), mask=in_range)

    if ECE_GRAD:
        wc = tl.where(keep, weight * conf, 0.0)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            p = tl.exp(load_tile(logits_ptr, row_off, cols, K, 1.0) - m[:, None]) / s[:, None]
            grad = wc[:, None] * (tl.where(cols[None, :] == top[:, None], 1.0, 0.0) - p)
            tl.store(grad_ptr + row_off[:, None] + cols[None, :], grad,
                     mask=in_range[:, None] & (cols < K)[None, :])


# the hard-bin loss form runs on 8 warps from a tile of LOSS_WARP_TILE elements (on 4 warps ptxas held 256 × 2 and
# 16 × 64 tiles to 96 and 168 registers and spilled 8 bytes on sm_90; on 8 warps they take 48 and 116, no spills)
LOSS_WARP_TILE = 512


def rows_blocks(N: int, K: int, M: int, em: bool, loss: bool, stats: bool,
                ece_grad: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_M, num_warps) of the rows kernel: a smaller tile where the loss or the ECE gradient
    keep several tile-sized temporaries alive (the EM target form: its K-tile too), a [BLOCK_N, BLOCK_M]
    responsibility tile within MAX_ROW_BINS, and 8 warps where the E-step statistics' float64 tiles join a large
    tile or the hard-bin loss holds LOSS_WARP_TILE elements (benchmarks/triton_compile.py)."""
    block_m = bins_block(M)
    max_tile = common.MAX_LOSS_TILE if loss or ece_grad else common.MAX_TILE
    if em and loss:  # the target form keeps the responsibilities' statistics and the loss's temporaries
        max_tile //= 2
    block_n, block_k = row_blocks(N, K, max_tile, common.MAX_ROW_BINS // block_m if em else None)
    if em and loss:  # its K-tile too: one row of 2048 columns on 8 warps spilled 8 bytes on sm_90
        block_k = min(block_k, max_tile)
    num_warps = warps(block_n, block_k)
    if stats and (block_n * block_m >= STATS_WARP_ROW_BINS or block_n * block_k >= STATS_WARP_TILE):
        num_warps = 8
    if loss and not em and block_n * block_k >= LOSS_WARP_TILE:
        num_warps = 8
    return block_n, block_k, block_m, num_warps


def _run(logits, labels, ignore_index, accuracy, em_params, coef, loss, stats, grad):
    """Launch the rows kernel; the flags follow from which outputs and parameters are given."""
    N, K = logits.shape
    M = (accuracy if accuracy is not None else em_params[0]).numel()
    block_n, block_k, block_m, num_warps = rows_blocks(N, K, M, em_params is not None, loss is not None, stats,
                                                       coef is not None)
    P = triton.cdiv(N, block_n)
    partials = torch.empty((P, 4, M), dtype=torch.float64, device=logits.device) if stats else None
    log_pi, mu, sigma = em_params if em_params is not None else (None, None, None)
    _calibration_rows_kernel[(P,)](
        logits, labels, loss, grad, partials, accuracy, log_pi, mu, sigma, coef,
        N, K, M, ignore_index, math.log(K - 1),
        EM=em_params is not None, LOSS=loss is not None, STATS=stats, ECE_GRAD=coef is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=num_warps,
        **ROWS_OPTIONS)
    return sum_partials(partials) if stats else None


ROWS_OPTIONS = {"maxnreg": 255}
"""Launch options of the rows kernel beyond its blocks: a 255-register cap. ptxas' own choice held the EM target
form to 40–48 registers, the E-step statistics to 64 and the hard-bin loss to 80–168 at scattered blocks and spilled
8 bytes there on sm_90 (benchmarks/triton_compile.py); capped, they take 56–193 and spill nothing."""


def _outputs(logits, with_loss: bool, with_grad: bool):
    N, K = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device) if with_loss else None
    grad = torch.empty((N, K), dtype=torch.float32, device=logits.device) if with_grad else None
    return loss, grad


def hard_bin_loss(logits, labels, bin_accuracy, ignore_index: int, reduction: str):
    """(loss float32, grad float32[N, K]) of the hard-bin target loss, a = bin_accuracy[b(c)], reduced over kept
    rows as calibkern.reference.reduce_rows says."""
    loss, grad = _outputs(logits, True, True)
    if logits.shape[0]:
        _run(logits, labels, ignore_index, bin_accuracy, None, None, loss, False, grad)
    return reduced_row_loss(loss, grad, labels != ignore_index, reduction)


def em_target_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index: int, reduction: str):
    """(loss float32, grad float32[N, K], stats float64[4, M]) of the EM target regulariser, reduced as
    hard_bin_loss's."""
    loss, grad = _outputs(logits, True, True)
    if not logits.shape[0]:
        stats = torch.zeros((4, mu.numel()), dtype=torch.float64, device=logits.device)
    else:
        stats = _run(logits, labels, ignore_index, theta, (log_pi, mu, sigma), None, loss, True, grad)
    return (*reduced_row_loss(loss, grad, labels != ignore_index, reduction), stats)


def em_stats(logits, labels, log_pi, mu, sigma, ignore_index: int):
    """E-step statistics float64[4, M]: rows S = Σ r, C = Σ r c, Q = Σ r c², R = Σ r · correct."""
    if not logits.shape[0]:
        return torch.zeros((4, mu.numel()), dtype=torch.float64, device=logits.device)
    return _run(logits, labels, ignore_index, None, (log_pi, mu, sigma), None, None, True, None)


def em_ece_grad(logits, labels, log_pi, mu, sigma, coef, ignore_index: int):
    """grad float32[N, K] = w · c · (e_ŷ − p), w = Σ_k r_k coef_k (the `ece` form's second phase)."""
    _, grad = _outputs(logits, False, True)
    if logits.shape[0]:
        _run(logits, labels, ignore_index, None, (log_pi, mu, sigma), coef, None, False, grad)
    return grad
