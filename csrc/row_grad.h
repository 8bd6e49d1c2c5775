// The autograd node of a per-row loss whose kernel wrote ∂loss/∂logits in the forward pass (any backend,
// any device): backward is ∂L/∂z = grad · ∂L/∂loss (per row for reduction "none"), and a scalar ∂L/∂loss
// that is exactly 1 on the CPU hands the saved gradient back as it is (autograd copies it if the graph is
// retained). The same formula as calibkern/ops/custom_ops.py's _row_loss_backward, without Python in the
// backward pass.
#pragma once

#include <torch/csrc/autograd/custom_function.h>

namespace calibkern {

class SavedRowGrad : public torch::autograd::Function<SavedRowGrad> {
 public:
  /// Returns a copy of `loss` whose gradient with respect to `logits` is `grad` (float32 or float64 [N, K]).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& loss,
                            const at::Tensor& grad) {
    ctx->save_for_backward({grad});
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    ctx->set_materialize_grads(false);
    return loss.clone();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor grad = ctx->get_saved_variables()[0];
    if (grad_loss.dim() > 0) {
      grad = grad * grad_loss.to(grad.scalar_type()).unsqueeze(1);
    } else if (!(grad_loss.is_cpu() && grad_loss.item<double>() == 1.0)) {
      grad = grad * grad_loss.to(grad.scalar_type());
    }
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad.to(dtype), at::Tensor(), at::Tensor()};
  }
};

}  // namespace calibkern
