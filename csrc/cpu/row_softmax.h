// Softmax read-outs of one long row in a single pass over memory (online softmax).
//
// The row is walked in chunks that stay in L1: a chunk's maximum first, then, if it beats the running
// maximum m, the running sum is rescaled by exp(m_old − m_new), then Σ exp(z − m) over the chunk.
// Sums are carried per lane in float64, so s is accurate for any K up to 262144 and the result depends
// only on the row (never on the thread that computed it).
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
};

namespace detail {

constexpr int64_t kChunk = 2048;

template <class T> inline float chunk_max(const T* x, int64_t begin, int64_t end, float inv_t) {
  int64_t j = begin;
  float m = -std::numeric_limits<float>::infinity();
  if (end - j >= 4 * kLanes) {
    vf m0 = scaled16(x + j, inv_t), m1 = m0, m2 = m0, m3 = m0;
    for (; j + 4 * kLanes <= end; j += 4 * kLanes) {
      m0 = vmax(m0, scaled16(x + j, inv_t));
      m1 = vmax(m1, scaled16(x + j + kLanes, inv_t));
      m2 = vmax(m2, scaled16(x + j + 2 * kLanes, inv_t));
      m3 = vmax(m3, scaled16(x + j + 3 * kLanes, inv_t));
    }
    m = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
  }
  for (; j + kLanes <= end; j += kLanes) m = std::max(m, hmax(scaled16(x + j, inv_t)));
  for (; j < end; ++j) m = std::max(m, scaled1(x + j, inv_t));
  return m;
}

template <class T> inline int64_t first_index_of(const T* x, int64_t begin, int64_t end, float inv_t, float value) {
  for (int64_t j = begin; j < end; ++j)
    if (scaled1(x + j, inv_t) == value) return j;
  return begin;  // unreachable for finite input
}

/// Σ exp(z − m) over [begin, end), per lane (the scalar tail goes to lane 0).
template <class T> inline vf chunk_sum_exp(const T* x, int64_t begin, int64_t end, float inv_t, float m) {
  vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
  const vf mv = splat<vf>(m);
  int64_t j = begin;
  for (; j + 4 * kLanes <= end; j += 4 * kLanes) {
    s0 += exp_(scaled16(x + j, inv_t) - mv);
    s1 += exp_(scaled16(x + j + kLanes, inv_t) - mv);
    s2 += exp_(scaled16(x + j + 2 * kLanes, inv_t) - mv);
    s3 += exp_(scaled16(x + j + 3 * kLanes, inv_t) - mv);
  }
  for (; j + kLanes <= end; j += kLanes) s0 += exp_(scaled16(x + j, inv_t) - mv);
  float tail = 0.0f;
  for (; j < end; ++j) tail += exp_(scaled1(x + j, inv_t) - m);
  vf s = (s0 + s1) + (s2 + s3);
  s[0] += tail;
  return s;
}

}  // namespace detail

/// m, first argmax and Σ exp(z − m) of z = x · inv_t over one row of length K ≥ 1.
template <class T> inline RowSoftmax row_softmax(const T* x, int64_t K, float inv_t) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t argmax = 0;
  vd acc = {};
  for (int64_t begin = 0; begin < K; begin += detail::kChunk) {
    const int64_t end = std::min(K, begin + detail::kChunk);
    const float chunk_m = detail::chunk_max(x, begin, end, inv_t);
    if (chunk_m > m) {
      argmax = detail::first_index_of(x, begin, end, inv_t, chunk_m);
      if (begin > 0) acc *= std::exp((double)m - (double)chunk_m);
      m = chunk_m;
    }
    acc += to_double(detail::chunk_sum_exp(x, begin, end, inv_t, m));
  }
  return {m, argmax, (float)hsum(acc)};
}

}  // namespace calibkern::cpu
