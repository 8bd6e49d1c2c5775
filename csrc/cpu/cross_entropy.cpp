// cross_entropy_: per-row cross-entropy for the fused linear loss, gradient written over the logits, with label
// smoothing ε and the z-loss λ·lse² (calibkern/reference/cross_entropy.py has the formulas):
// loss = log s − (1 − ε)(z_y − m) − (ε/V) Σ_j (z_j − m) + λ lse²  (exact for huge logits), with the online softmax of
// row_softmax.h; then z ← (1 + 2λ lse) exp(z − m)/s − ε/V − (1 − ε) e_y, Σ_j (z_j − m) summed in that same pass.
// A kept row holding NaN or ±inf gets loss NaN and an all-NaN gradient (docs/backends.md, "Non-finite values").
#include "kernels.h"
#include "row_softmax.h"

#include <omp.h>

#include <cmath>
#include <limits>

namespace calibkern::cpu {

at::Tensor cross_entropy_(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, double label_smoothing,
                          double lse_square_scale) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "cross_entropy_: logits must be float32");
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({n}, logits.options());
  float* z_all = logits.data_ptr<float>();
  float* out = loss.data_ptr<float>();
  const int64_t* y = targets.const_data_ptr<int64_t>();
  const float eps = static_cast<float>(label_smoothing), lam = static_cast<float>(lse_square_scale);
  const float uniform = eps / static_cast<float>(V), inv_v = 1.0f / static_cast<float>(V);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* z = z_all + i * V;
    if (y[i] == ignore_index) {
      std::fill(z, z + V, 0.0f);
      out[i] = 0.0f;
      continue;
    }
    const RowSoftmax rs = row_softmax(z, V, 1.0f);
    if (!rs.finite) {
      std::fill(z, z + V, std::numeric_limits<float>::quiet_NaN());
      out[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float gap = z[y[i]] - rs.max;
    const float log_s = std::log(rs.sum);
    const float lse = rs.max + log_s;
    const float p_scale = (1.0f + 2.0f * lam * lse) / rs.sum;
    const vf m = splat<vf>(rs.max), scale = splat<vf>(p_scale), shift = splat<vf>(uniform);
    const vf per_column = splat<vf>(inv_v);
    vf centred_lanes = {};  // mean of z − max as a sum of (z − max) / V: no overflow at extreme logits
    int64_t j = 0;
    for (; j + kLanes <= V; j += kLanes) {
      const vf d = load_vector(z + j) - m;
      centred_lanes += d * per_column;
      const vf g = exp_(d) * scale - shift;
      std::memcpy(z + j, &g, sizeof(g));
    }
    float centred = 0.0f;
    for (int l = 0; l < kLanes; ++l) centred += lane(centred_lanes, l);
    for (; j < V; ++j) {
      const float d = z[j] - rs.max;
      centred += d * inv_v;
      z[j] = exp_(d) * p_scale - uniform;
    }
    z[y[i]] -= 1.0f - eps;
    // the smoothing term only when ε ≠ 0: 0 · (−inf) would be NaN where a row's mean underflows
    out[i] = log_s - (1.0f - eps) * gap - (eps != 0.0f ? eps * centred : 0.0f) + lam * lse * lse;
  }
  return loss;
}

}  // namespace calibkern::cpu
