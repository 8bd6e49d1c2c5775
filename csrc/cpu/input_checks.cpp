// The input checks of the public ops at memory speed: finite logits (an element is NaN or ±inf exactly when
// its float32 exponent bits are all ones) and labels in [0, K) or equal to ignore_index. Each is one
// parallel read with no [N, K] temporary; booleans, so the result never depends on the thread count.
#include "dispatch.h"
#include "kernels.h"
#include "vec.h"

#include <omp.h>

namespace calibkern::cpu {
namespace {

constexpr int32_t kExponent = 0x7f800000;
constexpr int64_t kScanChunk = 1 << 16;   // elements per parallel chunk of a flat scan
constexpr int64_t kLabelChunk = 1 << 13;  // labels per parallel chunk (int64: 64 KiB)

/// True when x[0..n) holds a NaN or ±inf.
template <class T> bool any_nonfinite(const T* x, int64_t n) {
  vi bad = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) bad |= (as_bits(load_vector(x + j)) & kExponent) == kExponent;
  bool found = false;
  for (; j < n; ++j) found |= (as_bits(load1(x + j)) & kExponent) == kExponent;
  for (int i = 0; i < kLanes; ++i) found |= bad[i] != 0;
  return found;
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
    for (int64_t i = 0; i < N; ++i) ok[i] = !any_nonfinite(x + i * K, K);
  });
  return out;
}

bool all_finite(const at::Tensor& logits) {
  const int64_t n = logits.numel(), n_chunks = (n + kScanChunk - 1) / kScanChunk;
  bool found = false;
  with_float_type(logits, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* x = static_cast<const T*>(logits.const_data_ptr());
#pragma omp parallel for schedule(static) reduction(|| : found)
    for (int64_t c = 0; c < n_chunks; ++c)
      found = found || any_nonfinite(x + c * kScanChunk, std::min(kScanChunk, n - c * kScanChunk));
  });
  return !found;
}

bool labels_in_range(const at::Tensor& labels, int64_t n_classes, int64_t ignore_index) {
  const int64_t n = labels.numel(), n_chunks = (n + kLabelChunk - 1) / kLabelChunk;
  const int64_t* y = labels.const_data_ptr<int64_t>();
  bool bad = false;
#pragma omp parallel for schedule(static) reduction(|| : bad)
  for (int64_t c = 0; c < n_chunks; ++c) {
    bool chunk_bad = false;
    for (int64_t i = c * kLabelChunk; i < std::min(n, (c + 1) * kLabelChunk); ++i)
      chunk_bad |= (y[i] < 0 || y[i] >= n_classes) && y[i] != ignore_index;
    bad = bad || chunk_bad;
  }
  return !bad;
}

}  // namespace calibkern::cpu
