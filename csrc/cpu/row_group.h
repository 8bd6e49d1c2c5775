// Rows processed lane-wise: a RowGroup<T, vf> holds kLanes consecutive rows (lane i = row r0 + i), the form
// for small K where vectorising across rows beats vectorising within a row; RowGroup<T, float> is one row.
// The softmax read-outs are written once here and used by every per-row kernel.
#pragma once

#include "vec.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace calibkern::cpu {

/// Rows of up to kGroupK elements are vectorised across kLanes rows at a time, longer rows within the row.
constexpr int64_t kGroupK = 64;

/// Between 16 rows of K ≤ kMaxK values stored row-major (K registers: flat index e = 16 q + l = row · K + col)
/// and K column vectors (lane i = row i), with two-source permutes: each column (or each output register)
/// takes ⌈K/2⌉ permutes and as many masked moves, where a gather or a scatter would take 16 memory accesses.
/// Only with AVX-512; elsewhere `enabled` is false and the row groups gather and scatter lane by lane.
struct Transpose16 {
  static constexpr int kMaxK = 8;
  bool enabled = false;
  int K = 0;
#ifdef __AVX512F__
  __m512i col_index[kMaxK][kMaxK / 2], row_index[kMaxK][kMaxK / 2];
  __mmask16 col_mask[kMaxK][kMaxK / 2], row_mask[kMaxK][kMaxK / 2];

  explicit Transpose16(int64_t K_) : enabled(K_ <= kMaxK), K((int)K_) {
    if (!enabled) return;
    for (int v = 0; v < K; ++v) {  // v: the column (gathering) or the output register (scattering)
      for (int m = 0; m < (K + 1) / 2; ++m) {
        alignas(64) int32_t ci[kLanes], ri[kLanes];
        __mmask16 cm = 0, rm = 0;
        for (int l = 0; l < kLanes; ++l) {
          const int e = l * K + v;                  // column v, lane l = row l: flat index e
          ci[l] = e - 32 * m;
          if (e / 32 == m) cm |= (__mmask16)(1u << l);
          const int row = (16 * v + l) / K, col = (16 * v + l) % K;  // output register v, lane l
          ri[l] = row + 16 * (col - 2 * m);
          if (col / 2 == m) rm |= (__mmask16)(1u << l);
        }
        col_index[v][m] = _mm512_load_si512(ci);
        row_index[v][m] = _mm512_load_si512(ri);
        col_mask[v][m] = cm;
        row_mask[v][m] = rm;
      }
    }
  }

  /// cols[j] (lane i) = rows[i · K + j] for 16 rows of T, converted to float32.
  template <class T> void to_columns(const T* rows, vf* cols) const { dispatch([&](auto k) { columns<k()>(rows, cols); }); }

  /// out[i · K + j] = cols[j] (lane i): 16 rows of K float32.
  void to_rows(const vf* cols, float* out) const { dispatch([&](auto k) { rows<k()>(cols, out); }); }

 private:
  /// f(std::integral_constant<int, K>): the loops below unroll and their registers stay in registers.
  template <class F> void dispatch(F&& f) const {
    switch (K) {
      case 2: return f(std::integral_constant<int, 2>{});
      case 3: return f(std::integral_constant<int, 3>{});
      case 4: return f(std::integral_constant<int, 4>{});
      case 5: return f(std::integral_constant<int, 5>{});
      case 6: return f(std::integral_constant<int, 6>{});
      case 7: return f(std::integral_constant<int, 7>{});
      default: return f(std::integral_constant<int, 8>{});
    }
  }

  template <int NK, class T> void columns(const T* rows, vf* cols) const {
    __m512 r[NK];
    for (int q = 0; q < NK; ++q) r[q] = (__m512)load_vector(rows + 16 * q);
    for (int j = 0; j < NK; ++j) cols[j] = permute<NK>(r, col_index[j], col_mask[j]);
  }

  template <int NK> void rows(const vf* cols, float* out) const {
    __m512 c[NK];
    for (int j = 0; j < NK; ++j) c[j] = (__m512)cols[j];
    for (int q = 0; q < NK; ++q) _mm512_storeu_ps(out + 16 * q, (__m512)permute<NK>(c, row_index[q], row_mask[q]));
  }

  template <int NK> static vf permute(const __m512* src, const __m512i* index, const __mmask16* mask) {
    __m512 v = _mm512_permutex2var_ps(src[0], index[0], src[std::min(1, NK - 1)]);
    for (int m = 1; m < (NK + 1) / 2; ++m)
      v = _mm512_mask_mov_ps(v, mask[m], _mm512_permutex2var_ps(src[2 * m], index[m], src[std::min(2 * m + 1, NK - 1)]));
    return (vf)v;
  }
#else
  explicit Transpose16(int64_t K_) : K((int)K_) {}
  template <class T> void to_columns(const T*, vf*) const {}
  void to_rows(const vf*, float*) const {}
#endif
};

template <class T, class V> struct RowGroup {
  using I = typename Lane<V>::I;
  static constexpr int L = Lane<V>::n;
  const T* row;         // L = 1: the row
  const float* tile;    // L > 1, gathered: the group's rows as row-major float32 (the input itself for fp32)
  const vf* cols;       // L > 1, transposed: the group's columns (lane i = row r0 + i), else nullptr
  I offset;             // L > 1, gathered: lane i reads tile[offset_i + j], offset_i = min(i, n_rows − 1) · K
  int64_t K;
  float inv_t;
  I label;              // the row's label, −1 for ignored rows and for lanes past the last row
  int n_rows;           // lanes that hold a row (≤ L)

  /// `scratch` (K vectors) receives the group's columns (a full group and K ≤ Transpose16::kMaxK with
  /// AVX-512), else the converted rows of bf16/fp16 input; unused when L = 1.
  RowGroup(const T* x, const int64_t* labels, int64_t N, int64_t K_, int64_t r0, int64_t ignore_index,
           float inv_t_, vf* scratch, const Transpose16& transpose)
      : row(x + r0 * K_), tile(nullptr), cols(nullptr), K(K_), inv_t(inv_t_),
        n_rows((int)std::min<int64_t>(L, N - r0)) {
    if constexpr (L > 1) {
      if (n_rows == L) {  // a full group: labels as one vector
        typedef int64_t vl __attribute__((vector_size(8 * kLanes)));
        vl lab;
        std::memcpy(&lab, labels + r0, sizeof(lab));
        label = __builtin_convertvector(lab != ignore_index ? lab : vl{} - 1, vi);
        if (transpose.enabled) {
          transpose.to_columns(row, scratch);
          cols = scratch;
          return;
        }
        offset = lane_index() * (int32_t)K;
        load_tile(reinterpret_cast<float*>(scratch));
        return;
      }
    }
    int32_t lab[L], off[L];
    for (int i = 0; i < L; ++i) {
      const int64_t r = r0 + std::min(i, n_rows - 1);
      off[i] = (int32_t)((r - r0) * K);
      lab[i] = (i < n_rows && labels[r] != ignore_index) ? (int32_t)labels[r] : -1;
    }
    if constexpr (L == 1) {
      label = lab[0];
    } else {
      label = load_lanes<V>(lab);
      offset = load_lanes<V>(off);
      load_tile(reinterpret_cast<float*>(scratch));
    }
  }

  /// L > 1: points tile at the group's rows as float32 (converting bf16/fp16 into scratch).
  void load_tile(float* scratch) {
    if constexpr (std::is_same_v<T, float>) {
      tile = row;
    } else {
      const int64_t n = n_rows * K;
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        const vf v = load_vector(row + j);
        std::memcpy(scratch + j, &v, sizeof(v));
      }
      for (; j < n; ++j) scratch[j] = load1(row + j);
      tile = scratch;
    }
  }

  /// z_j = float(x_j) · inv_t for every lane
  V z(int64_t j) const {
    if constexpr (L == 1) {
      return scaled1(row + j, inv_t);
    } else {
      if (cols) return rounded(cols[j] * inv_t);
#ifdef __AVX512F__
      const vf v = (vf)_mm512_i32gather_ps((__m512i)offset, tile + j, 4);
#else
      vf v;
      for (int i = 0; i < L; ++i) v[i] = tile[offset[i] + j];
#endif
      return rounded(v * inv_t);
    }
  }

  auto kept() const { return label >= 0; }
  /// The lanes that hold a row (a partial group's other lanes repeat its last row).
  I valid() const {
    if constexpr (L == 1) return 1;
    else return lane_index() < n_rows;
  }
};

/// Lane-wise softmax of a row group: fills p[0..K) with the probabilities, and holds confidence c = 1/s, first
/// argmax ŷ and whether the row's z are all finite (Σ z_j · 0 = 0; the other read-outs are meaningless where it
/// is false). Σ exp is accumulated in float64 for a long row, float32 for a row group; p_j = exp(z_j − m) · c.
/// With kLabel it also holds, for each lane's label y (−1: none), Σ_{j≠y} e_j, Σ_{j≠y} e_j² of
/// e_j = exp(z_j − m), z_y and m, from the same pass (the proper scores, docs/math.md#proper-scores).
template <class T, class V, bool kLabel = false> struct GroupSoftmax {
  using I = typename Lane<V>::I;
  V conf;
  V sum;            // s = Σ_j e_j
  I pred;
  I finite;
  V others{}, others_sq{}, z_label{}, z_max{};  // kLabel only

  /// With probabilities=false only conf and pred are computed (p then holds exp(z − m)).
  GroupSoftmax(const RowGroup<T, V>& g, V* p, bool probabilities = true) {
    V m = p[0] = g.z(0);
    V poison = p[0] * 0.0f;
    pred = splat_int<V>(0);
    for (int64_t j = 1; j < g.K; ++j) {
      p[j] = g.z(j);
      poison += p[j] * 0.0f;
      const auto gt = p[j] > m;
      m = gt ? p[j] : m;
      pred = gt ? splat_int<V>((int32_t)j) : pred;
    }
    finite = poison == 0.0f;
    if constexpr (kLabel) z_max = m;
    typename Lane<V>::S s = {};
    for (int64_t j = 0; j < g.K; ++j) {
      if constexpr (kLabel) {
        const auto is_label = g.label == (int32_t)j;
        z_label = is_label ? p[j] : z_label;
        p[j] = exp_(p[j] - m);
        const V other = is_label ? V{} : p[j];
        others += other;
        others_sq += other * other;
      } else {
        p[j] = exp_(p[j] - m);
      }
      s += row_sum_term(p[j]);
    }
    sum = narrow_lanes(s);
    conf = 1.0f / sum;
    if (!probabilities) return;
    for (int64_t j = 0; j < g.K; ++j) p[j] = p[j] * conf;
  }
};

}  // namespace calibkern::cpu
