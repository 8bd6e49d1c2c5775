// finite_rows: which rows of logits [N, K] hold only finite values — the input check of every op, in one
// parallel read (an element is NaN or ±inf exactly when its float32 exponent bits are all ones).
#include "dispatch.h"
#include "kernels.h"
#include "vec.h"

#include <omp.h>

namespace calibkern::cpu {
namespace {

template <class T> bool row_is_finite(const T* x, int64_t K) {
  constexpr int32_t kExponent = 0x7f800000;
  vi bad = {};
  int64_t j = 0;
  for (; j + kLanes <= K; j += kLanes) bad |= (as_bits(load16(x + j)) & kExponent) == kExponent;
  bool tail_bad = false;
  for (; j < K; ++j) tail_bad |= (as_bits(load1(x + j)) & kExponent) == kExponent;
  for (int i = 0; i < kLanes; ++i) tail_bad |= bad[i] != 0;
  return !tail_bad;
}

}  // namespace

at::Tensor finite_rows(const at::Tensor& logits) {
  const int64_t N = logits.size(0), K = logits.size(1);
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kBool));
  bool* ok = out.data_ptr<bool>();
  with_float_type(logits, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* x = static_cast<const T*>(logits.const_data_ptr());
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) ok[i] = row_is_finite(x + i * K, K);
  });
  return out;
}

}  // namespace calibkern::cpu
