// grid_moments: the smooth ECE's per-cell sums of (1, c, r, c·r), r = c − correct (docs/math.md#smooth-ece),
// cell j = min(⌊c · cells⌋, cells − 1) in double. Rows are summed in fixed blocks (their size depends on n
// only) into per-block partials, which are then added in block order: the result does not depend on the
// thread count.
#include "kernels.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace calibkern::cpu {

at::Tensor grid_moments(const at::Tensor& confidence, const at::Tensor& correct, int64_t cells) {
  constexpr int64_t kMinBlock = int64_t{1} << 16, kMaxBlocks = 64;
  const int64_t n = confidence.size(0);
  const int64_t block = std::max(kMinBlock, (n + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t n_blocks = std::max<int64_t>(1, (n + block - 1) / block), width = 4 * cells;
  const float* c = confidence.data_ptr<float>();
  const bool* a = correct.data_ptr<bool>();
  std::vector<double> partial(n_blocks * width, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    double* sums = partial.data() + b * width;
    for (int64_t i = b * block, end = std::min(n, (b + 1) * block); i < end; ++i) {
      const double ci = c[i], ri = ci - (a[i] ? 1.0 : 0.0);
      double* cell = sums + 4 * std::min(static_cast<int64_t>(ci * cells), cells - 1);
      cell[0] += 1.0;
      cell[1] += ci;
      cell[2] += ri;
      cell[3] += ci * ri;
    }
  }
  at::Tensor out = at::empty({cells, 4}, confidence.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < width; ++k) {
    double total = 0.0;
    for (int64_t b = 0; b < n_blocks; ++b) total += partial[b * width + k];
    o[k] = total;
  }
  return out;
}

}  // namespace calibkern::cpu
