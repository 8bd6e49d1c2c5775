// Softmax read-outs of one long row in a single pass over memory (online softmax).
//
// The row is walked in chunks that stay in L1: a chunk's maximum first, then, if it beats the running
// maximum m, the running sum is rescaled by exp(m_old − m_new), then Σ exp(z − m) over the chunk.
// Sums are carried per lane in float64, so s is accurate for any K up to 262144 and the result depends
// only on the row (never on the thread that computed it). The max pass also accumulates Σ z·0, which is 0
// exactly when every z is finite (NaN or ±inf give NaN): the finiteness check costs no extra read.
// With a label y (row_softmax<true>), the sum pass also accumulates Σ_{j≠y} e_j and Σ_{j≠y} e_j² of
// e_j = exp(z_j − m): the proper scores' sums of non-negative terms (docs/math.md#proper-scores).
#pragma once

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace calibkern::cpu {

struct RowSoftmax {
  float max;        // m = max_j z_j
  int64_t argmax;   // first j with z_j = m
  float sum;        // s = Σ_j exp(z_j − m)
  bool finite;      // every z_j is finite (max, argmax and sum are meaningless otherwise)
};

/// What row_softmax<true> adds for the row's label y, in float64.
struct RowLabelSums {
  double sum;        // s = Σ_j e_j (RowSoftmax::sum before rounding to float32)
  double others;     // Σ_{j≠y} e_j
  double others_sq;  // Σ_{j≠y} e_j²
  double gap;        // z_y − m, in float64: logits of opposite float32 extremes give a gap beyond float32's range
};

namespace detail {

constexpr int64_t kChunk = 2048;

/// max_j z_j over [begin, end); adds Σ z_j · 0 (NaN unless every z_j is finite) to `poison`.
template <class T> inline float chunk_max(const T* x, int64_t begin, int64_t end, float inv_t, vf& poison) {
  int64_t j = begin;
  float m = -std::numeric_limits<float>::infinity();
  if (end - j >= 4 * kLanes) {
    vf m0 = scaled_vector(x + j, inv_t), m1 = m0, m2 = m0, m3 = m0;
    vf q0 = {}, q1 = {}, q2 = {}, q3 = {};
    for (; j + 4 * kLanes <= end; j += 4 * kLanes) {
      const vf z0 = scaled_vector(x + j, inv_t), z1 = scaled_vector(x + j + kLanes, inv_t);
      const vf z2 = scaled_vector(x + j + 2 * kLanes, inv_t), z3 = scaled_vector(x + j + 3 * kLanes, inv_t);
      m0 = vmax(m0, z0);
      m1 = vmax(m1, z1);
      m2 = vmax(m2, z2);
      m3 = vmax(m3, z3);
      q0 += z0 * 0.0f;
      q1 += z1 * 0.0f;
      q2 += z2 * 0.0f;
      q3 += z3 * 0.0f;
    }
    m = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
    poison += (q0 + q1) + (q2 + q3);
  }
  for (; j + kLanes <= end; j += kLanes) {
    const vf z = scaled_vector(x + j, inv_t);
    m = std::max(m, hmax(z));
    poison += z * 0.0f;
  }
  for (; j < end; ++j) {
    const float z = scaled1(x + j, inv_t);
    m = std::max(m, z);
    poison[0] += z * 0.0f;
  }
  return m;
}

template <class T> inline int64_t first_index_of(const T* x, int64_t begin, int64_t end, float inv_t, float value) {
  for (int64_t j = begin; j < end; ++j)
    if (scaled1(x + j, inv_t) == value) return j;
  return begin;  // unreachable for finite input
}

/// Σ_{j≠label} e and Σ_{j≠label} e² per lane (chunk_sum_exp<true>).
struct OtherSums {
  vf sum = {}, sum_sq = {};

  /// Adds e_j for j = at, at + 1, … (one vector), leaving out j = label.
  void add(vf e, int64_t at, int64_t label) {
    const vf kept = (lane_index() + (int32_t)(at - label)) == 0 ? vf{} : e;
    sum += kept;
    sum_sq += kept * kept;
  }
};

/// Σ exp(z − m) over [begin, end), per lane (the scalar tail goes to lane 0); with kLabel also the sums of
/// `others` (the label's term left out). While it computes (from L1), it prefetches the memory that follows
/// the chunk — the next chunk or the next row — so the stream from DRAM overlaps the exp work instead of
/// waiting for the next max pass.
template <bool kLabel, class T>
inline vf chunk_sum_exp(const T* x, int64_t begin, int64_t end, float inv_t, float m, int64_t label, OtherSums& others) {
  vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
  const vf mv = splat<vf>(m);
  const char* ahead = reinterpret_cast<const char*>(x + end);
  constexpr int64_t kStepBytes = 4 * kLanes * sizeof(T);
  int64_t j = begin;
  for (; j + 4 * kLanes <= end; j += 4 * kLanes, ahead += kStepBytes) {
    for (int64_t b = 0; b < kStepBytes; b += 64) __builtin_prefetch(ahead + b);
    const vf e0 = exp_(scaled_vector(x + j, inv_t) - mv), e1 = exp_(scaled_vector(x + j + kLanes, inv_t) - mv);
    const vf e2 = exp_(scaled_vector(x + j + 2 * kLanes, inv_t) - mv);
    const vf e3 = exp_(scaled_vector(x + j + 3 * kLanes, inv_t) - mv);
    s0 += e0;
    s1 += e1;
    s2 += e2;
    s3 += e3;
    if constexpr (kLabel) {
      others.add(e0, j, label);
      others.add(e1, j + kLanes, label);
      others.add(e2, j + 2 * kLanes, label);
      others.add(e3, j + 3 * kLanes, label);
    }
  }
  for (; j + kLanes <= end; j += kLanes) {
    const vf e = exp_(scaled_vector(x + j, inv_t) - mv);
    s0 += e;
    if constexpr (kLabel) others.add(e, j, label);
  }
  float tail = 0.0f;
  for (; j < end; ++j) {
    const float e = exp_(scaled1(x + j, inv_t) - m);
    tail += e;
    if (kLabel && j != label) {
      others.sum[0] += e;
      others.sum_sq[0] += e * e;
    }
  }
  vf s = (s0 + s1) + (s2 + s3);
  s[0] += tail;
  return s;
}

}  // namespace detail

/// m, first argmax, Σ exp(z − m) and finiteness of z = x · inv_t over one row of length K ≥ 1; with kLabel,
/// also the label's sums (`label` in [0, K)) into *label_sums, in the same read.
template <bool kLabel = false, class T>
inline RowSoftmax row_softmax(const T* x, int64_t K, float inv_t, int64_t label = 0,
                              RowLabelSums* label_sums = nullptr) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t argmax = 0;
  vd acc = {}, others = {}, others_sq = {};
  vf poison = {};
  for (int64_t begin = 0; begin < K; begin += detail::kChunk) {
    const int64_t end = std::min(K, begin + detail::kChunk);
    const float chunk_m = detail::chunk_max(x, begin, end, inv_t, poison);
    if (chunk_m > m) {
      argmax = detail::first_index_of(x, begin, end, inv_t, chunk_m);
      if (begin > 0) {
        const double rescale = std::exp((double)m - (double)chunk_m);
        acc *= rescale;
        if constexpr (kLabel) {
          others *= rescale;
          others_sq *= rescale * rescale;
        }
      }
      m = chunk_m;
    }
    detail::OtherSums chunk_others;
    acc += to_double(detail::chunk_sum_exp<kLabel>(x, begin, end, inv_t, m, label, chunk_others));
    if constexpr (kLabel) {
      others += to_double(chunk_others.sum);
      others_sq += to_double(chunk_others.sum_sq);
    }
  }
  if constexpr (kLabel) *label_sums = {hsum(acc), hsum(others), hsum(others_sq),
                                     (double)scaled1(x + label, inv_t) - (double)m};
  return {m, argmax, (float)hsum(acc), hsum(poison) == 0.0f};
}

}  // namespace calibkern::cpu
