// bootstrap_stats: per-bin statistics of n_boot Poisson replicates of the rows (docs/math.md#intervals), with the
// weights of calibkern/reference/bootstrap.py: u = mix(r_i ^ q_b), w = #{k : u ≥ T_k}, all in uint32.
//
// The rows are first grouped by bin (a stable counting sort: each bin's rows in input order, with their
// confidence, correctness as a 0/−1 mask and row key r_i). Then each replicate is one thread's work: per bin,
// kLanes rows at a time, w from the hash, n and Σ w·correct in int32 lanes (exact) and Σ w·c in float64
// lanes, summed across lanes in lane order — the same result for any thread count.
#include "kernels.h"
#include "vec.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace calibkern::cpu {
namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr int64_t kCommon = 4;  // thresholds every lane compares against: w ≥ 4 has probability 1.9 %

template <class U> inline U mix(U x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bootstrap_stats(const at::Tensor& confidence, const at::Tensor& correct,
                                                               const at::Tensor& thresholds, int64_t n_bins,
                                                               int64_t n_boot, int64_t seed) {
  const int64_t n = confidence.size(0), M = n_bins, n_thresholds = thresholds.size(0);
  const float* c = confidence.data_ptr<float>();
  const bool* hit = correct.data_ptr<bool>();
  std::vector<uint32_t> t(n_thresholds);
  for (int64_t k = 0; k < n_thresholds; ++k) t[k] = (uint32_t)thresholds.data_ptr<int64_t>()[k];
  const uint32_t s = mix((uint32_t)((uint64_t)seed & 0xFFFFFFFFu));

  // rows grouped by bin, input order within a bin
  std::vector<int64_t> start(M + 1, 0);
  std::vector<int32_t> bin(n);
  for (int64_t i = 0; i < n; ++i) {
    bin[i] = bin_of(c[i], (float)M, (int32_t)M);
    ++start[bin[i] + 1];
  }
  for (int64_t k = 0; k < M; ++k) start[k + 1] += start[k];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<float> conf(n);
  std::vector<int32_t> is_correct(n);
  std::vector<uint32_t> key(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = fill[bin[i]]++;
    conf[at] = c[i];
    is_correct[at] = hit[i] ? -1 : 0;
    key[at] = mix((uint32_t)i + s);
  }

  const auto opts = confidence.options();
  at::Tensor counts = at::empty({n_boot, M}, opts.dtype(at::kLong));
  at::Tensor sum_conf = at::empty({n_boot, M}, opts.dtype(at::kDouble));
  at::Tensor sum_correct = at::empty({n_boot, M}, opts.dtype(at::kDouble));
  int64_t* out_n = counts.data_ptr<int64_t>();
  double* out_c = sum_conf.data_ptr<double>();
  double* out_a = sum_correct.data_ptr<double>();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_boot; ++b) {
    const uint32_t q = mix((uint32_t)b * kGolden + s);
    for (int64_t k = 0; k < M; ++k) {
      vi n_lanes = {}, a_lanes = {};
      vd c_lanes = {};
      int64_t i = start[k];
      for (; i + kLanes <= start[k + 1]; i += kLanes) {
        vu r;
        std::memcpy(&r, key.data() + i, sizeof(r));
        const vu u = mix(r ^ q);
        vi w = {};  // a true comparison is −1; past the first thresholds only when a lane reaches them
        for (int64_t j = 0; j < std::min(kCommon, n_thresholds); ++j) w -= (vi)(u >= t[j]);
        if (n_thresholds > kCommon && hsum_int((vi)(u >= t[kCommon])) != 0)
          for (int64_t j = kCommon; j < n_thresholds; ++j) w -= (vi)(u >= t[j]);
        vi a;  // −1 where correct
        std::memcpy(&a, is_correct.data() + i, sizeof(a));
        n_lanes += w;
        a_lanes += w & a;
        c_lanes += to_double(to_float(w)) * to_double(load_vector(conf.data() + i));
      }
      int64_t n_sum = hsum_int(n_lanes), a_sum = hsum_int(a_lanes);
      double c_sum = hsum(c_lanes);
      for (; i < start[k + 1]; ++i) {
        const uint32_t u = mix(key[i] ^ q);
        int32_t w = 0;
        for (int64_t j = 0; j < n_thresholds; ++j) w += u >= t[j];
        n_sum += w;
        a_sum += w & is_correct[i];
        c_sum += (double)w * (double)conf[i];
      }
      out_n[b * M + k] = n_sum;
      out_c[b * M + k] = c_sum;
      out_a[b * M + k] = (double)a_sum;
    }
  }
  return {counts, sum_conf, sum_correct};
}

}  // namespace calibkern::cpu
