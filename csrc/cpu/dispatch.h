// Calls fn with a typed null pointer for the storage type of a float32 / bfloat16 / float16 tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace calibkern::cpu {

template <class Fn> decltype(auto) with_float_type(const at::Tensor& t, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return fn(static_cast<const float*>(nullptr));
    case at::kBFloat16: return fn(static_cast<const c10::BFloat16*>(nullptr));
    case at::kHalf: return fn(static_cast<const c10::Half*>(nullptr));
    default: TORCH_CHECK(false, "calibkern cpp backend: logits must be float32, bfloat16 or float16, got ",
                         t.scalar_type());
  }
}

}  // namespace calibkern::cpu
