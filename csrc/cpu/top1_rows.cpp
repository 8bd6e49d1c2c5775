// top1_rows: each row's top-1 confidence c = 1/s and correctness 1[ŷ = y] (docs/backends.md), one read of
// each row — short rows (K ≤ 64) sixteen at a time across SIMD lanes, long rows with the online softmax.
// Ignored rows get c = 0 and false; a kept row whose scaled logits hold NaN or ±inf gets c = NaN and false.
// Every row's outputs depend on that row alone, so they do not depend on the thread count.
#include "dispatch.h"
#include "kernels.h"
#include "row_group.h"
#include "row_softmax.h"

#include <omp.h>

#include <limits>
#include <vector>

namespace calibkern::cpu {

std::tuple<at::Tensor, at::Tensor> top1_rows(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                             int64_t ignore_index) {
  const int64_t N = logits.size(0), K = logits.size(1);
  const float inv_t = (float)(1.0 / temperature), nan = std::numeric_limits<float>::quiet_NaN();
  at::Tensor confidence = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor correct = at::empty({N}, logits.options().dtype(at::kBool));
  float* c = confidence.data_ptr<float>();
  bool* ok = correct.data_ptr<bool>();
  const int64_t* y = labels.data_ptr<int64_t>();
  with_float_type(logits, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* x = static_cast<const T*>(logits.const_data_ptr());
    if (K > kGroupK) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        const bool kept = y[i] != ignore_index;
        const RowSoftmax rs = kept ? row_softmax(x + i * K, K, inv_t) : RowSoftmax{0.0f, -1, 1.0f, true};
        c[i] = !kept ? 0.0f : rs.finite ? 1.0f / rs.sum : nan;
        ok[i] = kept && rs.finite && rs.argmax == y[i];
      }
      return;
    }
    const int64_t n_groups = (N + kLanes - 1) / kLanes;
#pragma omp parallel
    {
      std::vector<vf> p(K), scratch(K);
      const Transpose16 transpose(K);
#pragma omp for schedule(static)
      for (int64_t group = 0; group < n_groups; ++group) {
        const int64_t r0 = group * kLanes;
        const RowGroup<T, vf> g(x, y, N, K, r0, ignore_index, inv_t, scratch.data(), transpose);
        const GroupSoftmax<T, vf> sm(g, p.data(), /*probabilities=*/false);
        for (int i = 0; i < g.n_rows; ++i) {
          const bool kept = g.label[i] >= 0, finite = sm.finite[i] != 0;
          c[r0 + i] = !kept ? 0.0f : finite ? sm.conf[i] : nan;
          ok[r0 + i] = kept && finite && sm.pred[i] == g.label[i];
        }
      }
    }
  });
  return {confidence, correct};
}

}  // namespace calibkern::cpu
