// Per-row losses, gradients and E-step statistics over option logits [N, K] (docs/backends.md):
// the hard-bin target loss, the EM target loss, the EM statistics alone and the EM `ece`-form gradient
// share one pass per row: softmax → target accuracy a (bin table or responsibilities) → loss and
// gradient. Rows go in fixed blocks of kBlockRows; the float64 statistics are summed per block and the
// blocks reduced in order, so results do not depend on the number of threads.
#pragma once

#include "kernels.h"
#include "row_group.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>

#include <cmath>
#include <vector>

namespace calibkern::cpu {

enum class RowTask { kHardBin, kEMTarget, kEMStats, kEMEceGrad };

struct RowTaskArgs {
  int64_t n_bins = 0;                    // M: bins (hard-bin) or mixture components (EM)
  float grad_scale = 1.0f;               // multiplies every gradient row
  const float* bin_accuracy = nullptr;   // hard-bin: a per bin [M]
  const float* log_pi = nullptr;         // EM mixture [M]
  const float* mu = nullptr;
  const float* sigma = nullptr;
  const float* weight = nullptr;         // EM: theta (target form) or coef (ece form) [M]
  float* loss = nullptr;                 // [N], or
  double* loss_total = nullptr;          // Σ over kept rows (summed per block, blocks in order)
  int64_t* nonfinite_rows = nullptr;     // row losses: rows whose logits hold NaN or ±inf
  float* grad = nullptr;                 // [N, K]
  double* stats = nullptr;               // [4, M]: S, C, Q, R
};

namespace detail {

constexpr int64_t kBlockRows = 256;

/// A per-bin table (bin accuracies, M ≤ 32 with AVX-512) read lane-wise by bin index with one two-source
/// permute from registers, where a gather would make 16 loads; a gather or a load otherwise.
class BinTable {
 public:
  BinTable(const float* table, int64_t n) : table_(table) {
#ifdef __AVX512F__
    in_registers_ = n <= 2 * kLanes;
    if (in_registers_) {
      lo_ = _mm512_maskz_loadu_ps((__mmask16)((1u << std::min<int64_t>(n, kLanes)) - 1u), table);
      hi_ = n > kLanes ? _mm512_maskz_loadu_ps((__mmask16)((1u << (n - kLanes)) - 1u), table + kLanes)
                       : _mm512_setzero_ps();
    }
#endif
  }

  template <class V> V operator()(typename Lane<V>::I index) const {
    if constexpr (Lane<V>::n == 1) {
      return table_[index];
    } else {
#ifdef __AVX512F__
      if (in_registers_) return (vf)_mm512_permutex2var_ps(lo_, (__m512i)index, hi_);
      return (vf)_mm512_i32gather_ps((__m512i)index, table_, 4);
#else
      alignas(64) float t[kLanes];
      for (int i = 0; i < kLanes; ++i) t[i] = table_[index[i]];
      return load_lanes<V>(t);
#endif
    }
  }

 private:
  const float* table_;
#ifdef __AVX512F__
  bool in_registers_ = false;
  __m512 lo_, hi_;
#endif
};

/// Writes lane i of v to base[(r0 + i) · stride + j] for the lanes that hold a row.
template <class V> inline void store_rows(float* base, int64_t stride, int64_t r0, int n_rows, int64_t j, V v) {
#ifdef __AVX512F__
  if constexpr (Lane<V>::n > 1) {
    const __mmask16 lanes = (__mmask16)((1u << n_rows) - 1u);
    if (stride == 1 && n_rows == kLanes) {
      _mm512_storeu_ps(base + r0 + j, (__m512)v);
    } else {
      const vi offset = lane_index() * (int32_t)stride;
      _mm512_mask_i32scatter_ps(base + r0 * stride + j, lanes, (__m512i)offset, (__m512)v, 4);
    }
    return;
  }
#endif
  for (int i = 0; i < n_rows; ++i) base[(r0 + i) * stride + j] = lane(v, i);
}

/// Writes the group's K column values to the rows base[(r0 + i) · K + j].
template <class V>
inline void store_group(float* base, int64_t K, int64_t r0, int n_rows, const V* cols, const Transpose16& transpose) {
  if constexpr (Lane<V>::n > 1) {
    if (transpose.enabled && n_rows == kLanes) {
      transpose.to_rows(cols, base + r0 * K);
      return;
    }
  }
  for (int64_t j = 0; j < K; ++j) store_rows(base, K, r0, n_rows, j, cols[j]);
}

/// The r-th of a row's K − 1 non-max probabilities in index order (the argmax ŷ left out): p_r for r < ŷ,
/// p_{r+1} from ŷ on.
template <class V> inline V non_max(const V* p, int64_t r, typename Lane<V>::I pred) {
  return pred > (int32_t)r ? p[r] : p[r + 1];
}

/// The target loss for target accuracy a: τ_ŷ = a and order-preserving non-max targets that sum to 1 − a,
/// L = Σ_j (p_j − τ_j)², and ∂L/∂z = s · p ⊙ (g − ⟨g, p⟩) with g = 2 (p − τ) and s = grad_scale per lane,
/// written to out[0..K). Returns L.
///
/// Over the K − 1 non-max probabilities q_r (non_max; q₂ = max_r q_r), the targets d (1 + u_r) / (K − 1 + Σ u),
/// d = 1 − a, u_r = tanh(x_r), x_r = (q_r / q₂) · γ₀ / d, are computed as t_r = d · w_r / Σ_s w_s with
/// w_r = 1 / (1 + 2^{−2 x_r log₂e}) (1 + tanh x = 2 / (1 + e^{−2x})): one exp2_ and one reciprocal each. The
/// exponent is a rounded product; its relative error ε moves w_r by at most w (1 − w) · 2x · ε ≤ 0.6 ε, so the
/// range reduction of exp_ would buy nothing. q_r / q₂ ≤ 1; q₂ below 2^−60 is scaled by 2^100 first so that
/// its reciprocal stays finite. out[r] holds q_r − t_r until the gradient pass maps it back to index j
/// (j < ŷ: r = j; j > ŷ: r = j − 1), walking j downwards so that out[j − 1] is still unread when j is written.
template <class V>
inline V target_loss(const V* p, int64_t K, typename Lane<V>::I pred, V conf, V a, float gamma0, V grad_scale,
                     V* q, V* out) {
  using S = typename Lane<V>::S;
  V q2 = q[0] = non_max(p, 0, pred);
  for (int64_t r = 1; r < K - 1; ++r) {
    q[r] = non_max(p, r, pred);
    q2 = vmax(q2, q[r]);
  }
  const V d = 1.0f - a;
  const V q2_safe = q2 > 0.0f ? q2 : splat<V>(1.0f);
  const V lift = q2_safe < 0x1p-60f ? splat<V>(0x1p100f) : splat<V>(1.0f);
  // y_r = (q_r · lift) · scale = −2 x_r log₂e
  const V scale = (-2.0f * kLog2e * gamma0) * recip(vmax(d, splat<V>(1e-12f)) * (q2_safe * lift));
  S w_sum = {};
  for (int64_t r = 0; r < K - 1; ++r) {
    // 2^{−30} already rounds 1 + e to 1; the clamp keeps e normal (a subnormal costs a microcode assist)
    out[r] = recip(1.0f + exp2_(vmax((q[r] * lift) * scale, splat<V>(-30.0f))));
    w_sum += row_sum_term(out[r]);
  }
  const V share = vmax(d, V{}) * recip(narrow_lanes(w_sum));
  const V diff_max = conf - a;
  S loss = row_sum_term(diff_max * diff_max), gp = row_sum_term(diff_max * conf);
  for (int64_t r = 0; r < K - 1; ++r) {
    const V diff = q[r] - share * out[r];
    out[r] = diff;
    loss += row_sum_term(diff * diff);
    gp += row_sum_term(diff * q[r]);
  }
  const V two_s = 2.0f * grad_scale;
  const V gp_s = narrow_lanes(gp) * two_s;  // s · ⟨g, p⟩
  for (int64_t j = K - 1; j > 0; --j) {
    const V diff = pred == (int32_t)j ? diff_max : (pred > (int32_t)j ? out[j] : out[j - 1]);
    out[j] = p[j] * (diff * two_s - gp_s);
  }
  out[0] = p[0] * ((pred == 0 ? diff_max : out[0]) * two_s - gp_s);
  return narrow_lanes(loss);
}

/// EM responsibilities r[k] = softmax_k(log π_k − log σ_k − (c − μ_k)² / (2σ_k²)), in log space; the
/// divisions are products with the precomputed 1/(2σ_k²) and the reciprocal of the row's sum, and a
/// component more than 80 log-units below the best gets e^{−80} instead of a smaller (subnormal) weight.
template <class V>
inline void responsibilities(V conf, const float* log_prior, const float* mu, const float* inv_two_var, int64_t M,
                             V* r) {
  V top = splat<V>(-INFINITY);
  for (int64_t k = 0; k < M; ++k) {
    const V dc = conf - mu[k];
    r[k] = log_prior[k] - dc * dc * inv_two_var[k];
    top = vmax(top, r[k]);
  }
  V sum = {};
  for (int64_t k = 0; k < M; ++k) {
    r[k] = exp_(vmax(r[k] - top, splat<V>(-80.0f)));  // e^{−80} / M stays a normal float (M < 1500): no assist
    sum += r[k];
  }
  const V inv_sum = recip(sum);
  for (int64_t k = 0; k < M; ++k) r[k] = r[k] * inv_sum;
}

template <RowTask task, class T, class V>
void option_rows_impl(const T* x, const int64_t* labels, int64_t N, int64_t K, int64_t ignore_index,
                      const RowTaskArgs& args) {
  using D = typename Lane<V>::D;
  constexpr int L = Lane<V>::n;
  constexpr bool has_loss = task == RowTask::kHardBin || task == RowTask::kEMTarget;
  constexpr bool has_stats = task == RowTask::kEMTarget || task == RowTask::kEMStats;
  constexpr bool has_grad = task != RowTask::kEMStats;
  const int64_t M = args.n_bins;
  const float gamma0 = (float)std::log((double)(K - 1));
  const int64_t n_blocks = (N + kBlockRows - 1) / kBlockRows;

  // EM per-component constants: log π − log σ and 1/(2σ²)
  std::vector<float> log_prior, inv_two_var;
  if constexpr (task != RowTask::kHardBin) {
    log_prior.resize(M);
    inv_two_var.resize(M);
    for (int64_t k = 0; k < M; ++k) {
      log_prior[k] = args.log_pi[k] - std::log(args.sigma[k]);
      inv_two_var[k] = (float)(0.5 / ((double)args.sigma[k] * (double)args.sigma[k]));
    }
  }
  std::vector<double> partials(has_stats ? n_blocks * 4 * M : 0);
  std::vector<double> loss_partials(has_loss && args.loss_total ? n_blocks : 0);
  int64_t nonfinite_rows = 0;

#pragma omp parallel
  {
    std::vector<V> p(K), q(has_loss ? K : 0), out(has_grad ? K : 0), r(task == RowTask::kHardBin ? 0 : M);
    std::vector<vf> scratch(L == 1 ? 0 : K);
    const Transpose16 transpose(K);  // enabled for row groups of K ≤ Transpose16::kMaxK (long rows: K > 64)
    const BinTable bin_accuracy(args.bin_accuracy, task == RowTask::kHardBin ? M : 0);
    std::vector<D> acc(has_stats ? 4 * M : 0);
#pragma omp for schedule(static) reduction(+ : nonfinite_rows)
    for (int64_t b = 0; b < n_blocks; ++b) {
      std::fill(acc.begin(), acc.end(), D{});
      D loss_acc = {};
      const int64_t end = std::min(N, (b + 1) * kBlockRows);
      for (int64_t r0 = b * kBlockRows; r0 < end; r0 += L) {
        const RowGroup<T, V> g(x, labels, N, K, r0, ignore_index, 1.0f, scratch.data(), transpose);
        const GroupSoftmax<T, V> sm(g, p.data());
        const auto keep = g.kept();
        const V grad_scale = keep ? splat<V>(args.grad_scale) : V{};
        V a = {};
        if constexpr (task == RowTask::kHardBin) {
          a = bin_accuracy.template operator()<V>(bin_of(sm.conf, (float)M, (int32_t)M));
        } else {
          responsibilities(sm.conf, log_prior.data(), args.mu, inv_two_var.data(), M, r.data());
          if constexpr (task != RowTask::kEMStats)
            for (int64_t k = 0; k < M; ++k) a += r[k] * args.weight[k];
        }
        if constexpr (has_stats) {
          const D c = to_double(sm.conf);
          const D correct = to_double(sm.pred == g.label ? splat<V>(1.0f) : V{});
          for (int64_t k = 0; k < M; ++k) {
            const D w = to_double(keep ? r[k] : V{});
            acc[k] += w;
            acc[M + k] += w * c;
            acc[2 * M + k] += w * c * c;
            acc[3 * M + k] += w * correct;
          }
        }
        if constexpr (has_loss) {
          nonfinite_rows += count_true(g.valid() & (sm.finite == 0));  // every row, kept or not (as prepare)
          const V loss = target_loss(p.data(), K, sm.pred, sm.conf, a, gamma0, grad_scale, q.data(), out.data());
          if (args.loss_total) loss_acc += to_double(keep ? loss : V{});
          else store_rows(args.loss, 1, r0, g.n_rows, 0, keep ? loss : V{});
        }
        if constexpr (task == RowTask::kEMEceGrad) {
          const V wc = a * sm.conf * grad_scale;  // a holds w = Σ r_k coef_k here
          for (int64_t j = 0; j < K; ++j)
            out[j] = wc * ((sm.pred == (int32_t)j ? splat<V>(1.0f) : V{}) - p[j]);
        }
        if constexpr (has_grad) {
          store_group(args.grad, K, r0, g.n_rows, out.data(), transpose);
        }
      }
      if constexpr (has_stats) {
        for (int64_t q = 0; q < 4 * M; ++q) partials[b * 4 * M + q] = hsum(acc[q]);
      }
      if (!loss_partials.empty()) loss_partials[b] = hsum(loss_acc);
    }
  }
  if (args.nonfinite_rows) *args.nonfinite_rows = nonfinite_rows;
  if (!loss_partials.empty()) {
    double s = 0.0;
    for (double v : loss_partials) s += v;
    *args.loss_total = s;
  }
  if constexpr (has_stats) {
    for (int64_t q = 0; q < 4 * M; ++q) {
      double s = 0.0;
      for (int64_t b = 0; b < n_blocks; ++b) s += partials[b * 4 * M + q];
      args.stats[q] = s;
    }
  }
}

}  // namespace detail

/// How a per-row loss leaves the kernel: "none" the vector [N]; "sum" Σ over kept rows; "mean" that sum
/// divided by max(n_kept, 1), every gradient row scaled by the same 1/max(n_kept, 1). Codes of calibkern._cpp.
enum class Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

/// The loss and gradient outputs of a per-row loss kernel under a reduction: allocates them, points `args`
/// at them (with the mean's gradient scale), and `loss()` gives the reduced value once the kernel ran.
/// One pass over the labels before the rows counts the kept ones and those outside [0, K) that are not
/// ignore_index; the row pass counts the rows (kept or not) with non-finite logits. `faults()` reports both: the
/// kernel's input checks, made in the passes it needs anyway (its outputs are meaningless when either is
/// not 0).
class RowLossOutputs {
 public:
  RowLossOutputs(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, int64_t reduction,
                 RowTaskArgs& args)
      : reduction_(static_cast<Reduction>(reduction)) {
    TORCH_CHECK(reduction >= 0 && reduction <= 2, "calibkern._C: reduction code must be 0, 1 or 2");
    const auto f32 = logits.options().dtype(at::kFloat);
    grad_ = at::empty(logits.sizes(), f32);
    args.grad = grad_.data_ptr<float>();
    args.nonfinite_rows = &faults_.nonfinite_rows;
    scan_labels(labels.const_data_ptr<int64_t>(), labels.size(0), logits.size(1), ignore_index);
    if (reduction_ == Reduction::kNone) {
      loss_ = at::empty({logits.size(0)}, f32);
      args.loss = loss_.data_ptr<float>();
      return;
    }
    loss_ = at::empty({}, f32);
    args.loss_total = &total_;
    if (reduction_ == Reduction::kMean) args.grad_scale = (float)(1.0 / (double)std::max<int64_t>(n_kept_, 1));
  }

  at::Tensor loss() {
    if (reduction_ != Reduction::kNone)
      *loss_.data_ptr<float>() =
          (float)(reduction_ == Reduction::kMean ? total_ / (double)std::max<int64_t>(n_kept_, 1) : total_);
    return loss_;
  }
  const at::Tensor& grad() const { return grad_; }
  const RowInputFaults& faults() const { return faults_; }

 private:
  void scan_labels(const int64_t* labels, int64_t N, int64_t K, int64_t ignore_index) {
    int64_t kept = 0, bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : kept, bad)
    for (int64_t i = 0; i < N; ++i) {
      const bool ignored = labels[i] == ignore_index;
      kept += !ignored;
      bad += !ignored && (labels[i] < 0 || labels[i] >= K);
    }
    n_kept_ = kept;
    faults_.bad_labels = bad;
  }

  Reduction reduction_;
  at::Tensor loss_, grad_;
  double total_ = 0.0;
  int64_t n_kept_ = 0;
  RowInputFaults faults_;
};

template <RowTask task, class T>
void option_rows(const T* x, const int64_t* labels, int64_t N, int64_t K, int64_t ignore_index,
                 const RowTaskArgs& args) {
  if (K <= kGroupK) detail::option_rows_impl<task, T, vf>(x, labels, N, K, ignore_index, args);
  else detail::option_rows_impl<task, T, float>(x, labels, N, K, ignore_index, args);
}

}  // namespace calibkern::cpu
