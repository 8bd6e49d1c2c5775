// Rows processed lane-wise: a RowGroup<T, vf> holds 16 consecutive rows (lane i = row r0 + i), the form
// for small K where vectorising across rows beats vectorising within a row; RowGroup<T, float> is one row.
// The softmax read-outs are written once here and used by every per-row kernel.
#pragma once

#include "vec.h"

#include <algorithm>
#include <cstdint>

namespace calibkern::cpu {

/// Rows of up to kGroupK elements are vectorised across 16 rows at a time, longer rows within the row.
constexpr int64_t kGroupK = 64;

template <class T, class V> struct RowGroup {
  using I = typename Lane<V>::I;
  static constexpr int L = Lane<V>::n;
  const T* row[L];
  int64_t K;
  float inv_t;
  I label;  // the row's label, −1 for ignored rows and for lanes past the last row
  int n_rows;  // lanes that hold a row (≤ L)

  RowGroup(const T* x, const int64_t* labels, int64_t N, int64_t K_, int64_t r0, int64_t ignore_index, float inv_t_)
      : K(K_), inv_t(inv_t_), n_rows((int)std::min<int64_t>(L, N - r0)) {
    int32_t lab[L];
    for (int i = 0; i < L; ++i) {
      const int64_t r = std::min(r0 + i, N - 1);
      row[i] = x + r * K;
      lab[i] = (i < n_rows && labels[r] != ignore_index) ? (int32_t)labels[r] : -1;
    }
    if constexpr (L == 1) label = lab[0];
    else label = load_lanes<V>(lab);
  }

  /// z_j = float(x_j) · inv_t for every lane
  V z(int64_t j) const {
    if constexpr (L == 1) {
      return load1(row[0] + j) * inv_t;
    } else {
      alignas(64) float t[L];
      for (int i = 0; i < L; ++i) t[i] = load1(row[i] + j);
      return load_lanes<V>(t) * inv_t;
    }
  }

  auto kept() const { return label >= 0; }
};

/// Lane-wise softmax of a row group: fills p[0..K) with the probabilities, and holds confidence c = 1/s, first argmax ŷ and
/// q2 = max_{j≠ŷ} p_j. Σ exp is accumulated in float64.
template <class T, class V> struct GroupSoftmax {
  using I = typename Lane<V>::I;
  V conf;
  I pred;
  V q2;

  /// With probabilities=false only conf and pred are computed (p then holds exp(z − m)).
  GroupSoftmax(const RowGroup<T, V>& g, V* p, bool probabilities = true) {
    using D = typename Lane<V>::D;
    V m = p[0] = g.z(0);
    pred = splat_int<V>(0);
    for (int64_t j = 1; j < g.K; ++j) {
      p[j] = g.z(j);
      const auto gt = p[j] > m;
      m = gt ? p[j] : m;
      pred = gt ? splat_int<V>((int32_t)j) : pred;
    }
    D s = {};
    for (int64_t j = 0; j < g.K; ++j) {
      p[j] = exp_(p[j] - m);
      s += to_double(p[j]);
    }
    const V sf = narrow_lanes(s);
    conf = 1.0f / sf;
    q2 = V{};
    if (!probabilities) return;
    for (int64_t j = 0; j < g.K; ++j) {
      p[j] = p[j] / sf;
      q2 = (pred != (int32_t)j) & (p[j] > q2) ? p[j] : q2;
    }
  }
};

}  // namespace calibkern::cpu
