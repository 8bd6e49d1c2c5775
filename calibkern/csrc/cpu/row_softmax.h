// Softmax read-outs of one long row in a single pass over memory (online softmax).
//
// The row is walked in chunks that stay in L1: a chunk's maximum first, then, if it beats the running
// maximum m, the running sum is rescaled by exp(m_old − m_new), then Σ exp(z − m) over the chunk.
// Sums are carried per lane in float64, so s is accurate for any K up to 262144 and the result depends
// only on the row (never on the thread that computed it). The max pass also accumulates Σ z·0, which is 0
// exactly when every z is finite (NaN or ±inf give NaN): the finiteness check costs no extra read.
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

/// Σ exp(z − m) over [begin, end), per lane (the scalar tail goes to lane 0). While it computes (from
/// L1), it prefetches the memory that follows the chunk — the next chunk or the next row — so the
/// stream from DRAM overlaps the exp work instead of waiting for the next max pass.
template <class T> inline vf chunk_sum_exp(const T* x, int64_t begin, int64_t end, float inv_t, float m) {
  vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
  const vf mv = splat<vf>(m);
  const char* ahead = reinterpret_cast<const char*>(x + end);
  constexpr int64_t kStepBytes = 4 * kLanes * sizeof(T);
  int64_t j = begin;
  for (; j + 4 * kLanes <= end; j += 4 * kLanes, ahead += kStepBytes) {
    for (int64_t b = 0; b < kStepBytes; b += 64) __builtin_prefetch(ahead + b);
    s0 += exp_(scaled_vector(x + j, inv_t) - mv);
    s1 += exp_(scaled_vector(x + j + kLanes, inv_t) - mv);
    s2 += exp_(scaled_vector(x + j + 2 * kLanes, inv_t) - mv);
    s3 += exp_(scaled_vector(x + j + 3 * kLanes, inv_t) - mv);
  }
  for (; j + kLanes <= end; j += kLanes) s0 += exp_(scaled_vector(x + j, inv_t) - mv);
  float tail = 0.0f;
  for (; j < end; ++j) tail += exp_(scaled1(x + j, inv_t) - m);
  vf s = (s0 + s1) + (s2 + s3);
  s[0] += tail;
  return s;
}

}  // namespace detail

/// m, first argmax, Σ exp(z − m) and finiteness of z = x · inv_t over one row of length K ≥ 1.
template <class T> inline RowSoftmax row_softmax(const T* x, int64_t K, float inv_t) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t argmax = 0;
  vd acc = {};
  vf poison = {};
  for (int64_t begin = 0; begin < K; begin += detail::kChunk) {
    const int64_t end = std::min(K, begin + detail::kChunk);
    const float chunk_m = detail::chunk_max(x, begin, end, inv_t, poison);
    if (chunk_m > m) {
      argmax = detail::first_index_of(x, begin, end, inv_t, chunk_m);
      if (begin > 0) acc *= std::exp((double)m - (double)chunk_m);
      m = chunk_m;
    }
    acc += to_double(detail::chunk_sum_exp(x, begin, end, inv_t, m));
  }
  return {m, argmax, (float)hsum(acc), hsum(poison) == 0.0f};
}

}  // namespace calibkern::cpu
