// Rows processed lane-wise: a RowGroup<T, vf> holds 16 consecutive rows (lane i = row r0 + i), the form
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

namespace calibkern::cpu {

/// Rows of up to kGroupK elements are vectorised across 16 rows at a time, longer rows within the row.
constexpr int64_t kGroupK = 64;

template <class T, class V> struct RowGroup {
  using I = typename Lane<V>::I;
  static constexpr int L = Lane<V>::n;
  const T* row;         // L = 1: the row
  const float* tile;    // L = 16: the group's rows as row-major float32 (the input itself when it is fp32)
  I offset;             // L = 16: lane i reads tile[offset_i + j], offset_i = min(i, n_rows − 1) · K
  int64_t K;
  float inv_t;
  I label;              // the row's label, −1 for ignored rows and for lanes past the last row
  int n_rows;           // lanes that hold a row (≤ L)

  /// `scratch` (16 · K floats) receives the converted rows of bf16/fp16 input when L = 16.
  RowGroup(const T* x, const int64_t* labels, int64_t N, int64_t K_, int64_t r0, int64_t ignore_index,
           float inv_t_, float* scratch)
      : row(x + r0 * K_), tile(nullptr), K(K_), inv_t(inv_t_), n_rows((int)std::min<int64_t>(L, N - r0)) {
    if constexpr (L > 1) {
      if (n_rows == L) {  // a full group: labels as one vector
        typedef int64_t vl __attribute__((vector_size(8 * kLanes)));
        vl lab;
        std::memcpy(&lab, labels + r0, sizeof(lab));
        label = __builtin_convertvector(lab != ignore_index ? lab : vl{} - 1, vi);
        offset = lane_index() * (int32_t)K;
        load_tile(scratch);
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
      load_tile(scratch);
    }
  }

  /// L = 16: points tile at the group's rows as float32 (converting bf16/fp16 into scratch).
  void load_tile(float* scratch) {
    if constexpr (std::is_same_v<T, float>) {
      tile = row;
    } else {
      const int64_t n = n_rows * K;
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        const vf v = load16(row + j);
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
};

/// Lane-wise softmax of a row group: fills p[0..K) with the probabilities, and holds confidence c = 1/s, first argmax ŷ,
/// q2 = max_{j≠ŷ} p_j and whether the row's z are all finite (Σ z_j · 0 = 0; the other read-outs are
/// meaningless where it is false). Σ exp is accumulated in float64 for a long row, float32 for a row group;
/// p_j = exp(z_j − m) · c.
template <class T, class V> struct GroupSoftmax {
  using I = typename Lane<V>::I;
  V conf;
  I pred;
  V q2;
  I finite;

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
    typename Lane<V>::S s = {};
    for (int64_t j = 0; j < g.K; ++j) {
      p[j] = exp_(p[j] - m);
      s += row_sum_term(p[j]);
    }
    const V sf = narrow_lanes(s);
    conf = 1.0f / sf;
    q2 = V{};
    if (!probabilities) return;
    for (int64_t j = 0; j < g.K; ++j) {
      p[j] = p[j] * conf;
      q2 = (pred != (int32_t)j) & (p[j] > q2) ? p[j] : q2;
    }
  }
};

}  // namespace calibkern::cpu
