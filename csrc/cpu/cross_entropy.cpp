// cross_entropy_: per-row cross-entropy for the fused linear loss, gradient written over the logits.
// loss = log s − (z_y − m) (exact for huge logits) with the online softmax of row_softmax.h; then z ← exp(z − m)/s − e_y.
// A kept row holding NaN or ±inf gets loss NaN and an all-NaN gradient (docs/backends.md, "Non-finite values").
#include "kernels.h"
#include "row_softmax.h"

#include <omp.h>

#include <cmath>
#include <limits>

namespace calibkern::cpu {

at::Tensor cross_entropy_(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "cross_entropy_: logits must be float32");
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({n}, logits.options());
  float* z_all = logits.data_ptr<float>();
  float* out = loss.data_ptr<float>();
  const int64_t* y = targets.const_data_ptr<int64_t>();
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
    out[i] = std::log(rs.sum) - (z[y[i]] - rs.max);
    const float inv_s = 1.0f / rs.sum;
    const vf m = splat<vf>(rs.max);
    int64_t j = 0;
    for (; j + kLanes <= V; j += kLanes) {
      const vf p = exp_(load_vector(z + j) - m) * inv_s;
      std::memcpy(z + j, &p, sizeof(p));
    }
    for (; j < V; ++j) z[j] = exp_(z[j] - rs.max) * inv_s;
    z[y[i]] -= 1.0f;
  }
  return loss;
}

}  // namespace calibkern::cpu
