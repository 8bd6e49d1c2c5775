"""Triton building blocks shared by the calibkern kernels (imported only by the backend's kernel modules).

* ``load_tile``: ``z = logits[rows, cols].float() * inv_t`` with padded columns at ``-inf``;
* ``label_softmax``: one read of each row in K-tiles, giving ``m = max z``, ``s = Σ exp(z − m)``, the
  first argmax ``ŷ``, (optionally) the largest logit other than at ``ŷ``, whether the row is finite and
  (optionally) the label sums of the proper scores; ``online_softmax``: the same without the label sums;
* ``proper_scores``: each row's NLL and Brier score from those sums;
* ``bin_index``: ``b(c) = min(floor(c · M), M − 1)`` with ``c · M`` a float32 product;
* ``sum_partials``: per-program partial sums reduced in a fixed order (deterministic).

Offsets are int64 (rows × K overflows int32 at real sizes); all math is float32 after loading.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_K = 4096  # widest K-tile; tests lower it to exercise many tiles at small K
MAX_TILE = 65536 if INTERPRETED else 4096  # elements per [BLOCK_N, BLOCK_K] tile (numpy likes them big)
MIN_PROGRAMS = 1 if INTERPRETED else 1024  # the interpreter runs programs one after another
MAX_BLOCK_M = 64  # bins (or mixture components) handled per step of a loop over M
# classwise binning: classes per program, cells of its [classes, bins] accumulators (an int64 and two float64
# sums each, held in registers on a GPU) and of its [rows, classes, bins] one-hot. The GPU bounds keep the
# kernel free of spills at every configuration (benchmarks/triton_compile.py: 32 × 64 accumulator cells
# spilled on sm_80 and sm_90, as did a 1024-cell one-hot).
MAX_CLASS_BLOCK = 1024 if INTERPRETED else 64
MAX_CLASS_CELLS = 1 << 20 if INTERPRETED else 512
MAX_ONEHOT = 262144 if INTERPRETED else 512
# row kernels on a GPU (benchmarks/triton_compile.py found spills beyond these): rows × bins of a [rows, bins]
# one-hot or responsibility tile, and the K-tile of a kernel that keeps several tile-sized temporaries alive
MAX_ROW_BINS = 1 << 30 if INTERPRETED else 512
MAX_LOSS_TILE = MAX_TILE if INTERPRETED else 2048
# the top-1 kernel's tile beside a [rows, bins] one-hot: a 2048-element tile on 8 warps spilled (ptxas held it to
# 128 registers), 1024 on 4 warps does not
MAX_BINNED_TILE = MAX_TILE if INTERPRETED else 1024


def row_blocks(n_rows: int, width: int, max_tile: int = MAX_TILE, max_rows: int | None = None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): a K-tile up to MAX_BLOCK_K wide and as many rows as fit ``max_tile`` elements (and
    ``max_rows``), fewer when that would leave fewer than MIN_PROGRAMS programs."""
    block_k = min(triton.next_power_of_2(width), MAX_BLOCK_K)
    rows_for_programs = triton.next_power_of_2(max(1, triton.cdiv(n_rows, MIN_PROGRAMS)))
    block_n = max(1, min(max_tile // block_k, rows_for_programs))
    return (block_n if max_rows is None else max(1, min(block_n, max_rows))), block_k


def bins_block(n_bins: int) -> int:
    return min(triton.next_power_of_2(n_bins), MAX_BLOCK_M)


def warps(*block: int) -> int:
    size = 1
    for b in block:
        size *= b
    return 8 if size >= 2048 else 4


@triton.jit
def load_tile(logits_ptr, row_off, cols, K, inv_t):
    """z = logits[rows, cols].float() * inv_t for a [BLOCK_N, BLOCK_K] tile; columns ≥ K are -inf."""
    z = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=(cols < K)[None, :], other=float("-inf"))
    return z.to(tl.float32) * inv_t


@triton.jit
def online_softmax(logits_ptr, row_off, K, inv_t,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SECOND_MAX: tl.constexpr):
    """``label_softmax`` without the label sums: (m, s, ŷ, m2, finite)."""
    m, s, top, m2, finite, _, _, _ = label_softmax(logits_ptr, row_off, K, inv_t, row_off, BLOCK_N, BLOCK_K,
                                                   SECOND_MAX, False)
    return m, s, top, m2, finite


@triton.jit
def label_softmax(logits_ptr, row_off, K, inv_t, labels,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SECOND_MAX: tl.constexpr, LABEL_SUMS: tl.constexpr):
    """One pass over K in tiles: (m, s, ŷ, m2, finite, O, Q, z_y) per row with m = max z, s = Σ exp(z − m)
    (rescaled by exp(m_old − m_new) when the max grows), ŷ the first index attaining m, m2 = max_{j≠ŷ} z_j,
    whether every z_j is finite (Σ z_j · 0 = 0; the other outputs are meaningless where it is not), and with
    LABEL_SUMS, for the row's label y, O = Σ_{j≠y} e_j and Q = Σ_{j≠y} e_j² (e_j = exp(z_j − m), rescaled
    like s: Q by the square) and z_y."""
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    others = tl.zeros([BLOCK_N], tl.float32)
    others_sq = tl.zeros([BLOCK_N], tl.float32)
    z_label = tl.zeros([BLOCK_N], tl.float32)
    poison = tl.zeros([BLOCK_N], tl.float32)
    top = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        z = load_tile(logits_ptr, row_off, cols, K, inv_t)
        poison += tl.sum(tl.where((cols < K)[None, :], z * 0.0, 0.0), axis=1)
        tile_max = tl.max(z, axis=1)
        # NaN read as −inf for the argmax alone (the row is flagged non-finite anyway): an all-NaN tile then
        # has an argmax, which the interpreter's NumPy argmax refuses to give
        tile_top = tl.argmax(tl.where(z == z, z, float("-inf")), axis=1, tie_break_left=True) + k0
        new_m = tl.maximum(m, tile_max)
        rescale = tl.exp(m - new_m)
        e = tl.exp(z - new_m[:, None])
        s = s * rescale + tl.sum(e, axis=1)
        if LABEL_SUMS:
            is_label = cols[None, :] == labels[:, None]
            other = tl.where(is_label, 0.0, e)
            others = others * rescale + tl.sum(other, axis=1)
            others_sq = others_sq * (rescale * rescale) + tl.sum(other * other, axis=1)
            z_label += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        if SECOND_MAX:
            tile_m2 = tl.max(tl.where(cols[None, :] == tile_top[:, None], float("-inf"), z), axis=1)
            m2 = tl.maximum(tl.maximum(m2, tile_m2), tl.minimum(m, tile_max))
        top = tl.where(tile_max > m, tile_top, top)  # ties keep the earlier (lower) index
        m = new_m
    return m, s, top, m2, poison == 0.0, others, others_sq, z_label


@triton.jit
def log1p(x):
    """log(1 + x) for x ≥ 0 to a few ulps: log(u) · x / (u − 1) with u = 1 + x rounded (Goldberg)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def proper_scores(m, s, top, others, others_sq, z_label, labels):
    """Per row, from ``label_softmax``'s sums (docs/math.md#proper-scores): NLL = log1p(O) when ŷ = y (e_y = 1),
    else log s + (m − z_y) with the gap in float64 (NLL float64: opposite float32 extremes give a gap beyond
    float32's range); Brier = (O/s)² + Q/s², free of the cancellation in (1 − p_y)²."""
    conf = 1.0 / s
    gap = m.to(tl.float64) - z_label.to(tl.float64)
    nll = tl.where(top == labels, log1p(others).to(tl.float64), tl.log(s).to(tl.float64) + gap)
    brier = (others * conf) * (others * conf) + others_sq * (conf * conf)
    return nll, brier


@triton.jit
def bin_index(c, M):
    """b(c) = min(floor(c · M), M − 1), c · M in float32."""
    return tl.minimum(tl.floor(c * M).to(tl.int32), M - 1)


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, P, L, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[l] = Σ_p partials[p, l]: BLOCK_P programs' partials at a time by a fixed tree, those tiles
    added in program order — the same order on every run."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_L], out_ptr.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        progs = p0 + tl.arange(0, BLOCK_P)
        mask = (progs < P)[:, None] & (cols < L)[None, :]
        acc += tl.sum(tl.load(partials_ptr + progs.to(tl.int64)[:, None] * L + cols[None, :], mask=mask, other=0),
                      axis=0)
    tl.store(out_ptr + cols, acc, mask=cols < L)


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """Sum a [P, ...] tensor of per-program partials over P in a fixed order (bitwise reproducible)."""
    P, shape = partials.shape[0], partials.shape[1:]
    out = torch.empty(shape, dtype=partials.dtype, device=partials.device)
    L = out.numel()
    block_p, block_l = sum_blocks(P, L)
    _sum_partials_kernel[(triton.cdiv(L, block_l),)](partials, out, P, L, BLOCK_P=block_p, BLOCK_L=block_l)
    return out


def sum_blocks(P: int, L: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_L) of :func:`sum_partials` for P partials of L values each."""
    block_l = min(triton.next_power_of_2(L), MAX_TILE // 16)
    return min(triton.next_power_of_2(P), MAX_TILE // block_l), block_l
