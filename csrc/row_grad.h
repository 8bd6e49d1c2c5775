// The autograd node of a per-row loss whose kernel wrote ∂loss/∂logits in the forward pass (any backend,
// any device): backward is ∂L/∂z = grad · ∂L/∂loss (per row for reduction "none"). The same formula as
// calibkern/ops/custom_ops.py's _row_loss_backward, without Python in the backward pass.
//
// When the graph is freed by this backward (no retain_graph) and ∂L/∂loss is a CPU scalar exactly 1, the
// saved gradient is handed back as it is: nothing else can read it afterwards. With retain_graph the node
// always returns a new tensor, so a caller that edits the returned gradient in place leaves the saved one
// intact for the next backward, as PyTorch's own ops do.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <string>
#include <type_traits>

namespace calibkern {

struct RowGradBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable grad;
  at::ScalarType logits_dtype = at::kFloat;
  bool releasing = false;  // the engine frees this node's saved tensor right after apply

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return {at::Tensor()};
    at::Tensor g = grad.unpack();
    if (grad_loss.dim() > 0) {
      g = g * grad_loss.to(g.scalar_type()).unsqueeze(1);
    } else if (!(releasing && grad_loss.is_cpu() && grad_loss.item<double>() == 1.0)) {
      g = g * grad_loss.to(g.scalar_type());
    }
    return {g.to(logits_dtype)};
  }
  void will_release_variables() override { releasing = true; }
  void release_variables() override { grad.reset_data(); }
  std::string name() const override { return "calibkern::RowGradBackward"; }
};

/// A copy of `loss` whose gradient with respect to `logits` is `grad` (float32 or float64 [N, K]) · ∂L/∂loss.
inline at::Tensor attach_row_grad(const at::Tensor& logits, const at::Tensor& loss, const at::Tensor& grad) {
  at::Tensor out = loss.detach().clone();
  // torch::autograd holds nodes by std::shared_ptr in older releases and by c10::intrusive_ptr in newer ones.
  using NodePtr = decltype(torch::autograd::Edge::function);
  auto node = [] {
    if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
      return std::make_shared<RowGradBackward>();
    } else {
      return c10::make_intrusive<RowGradBackward>();
    }
  }();
  node->set_next_edges(torch::autograd::collect_next_edges(logits));
  node->grad = torch::autograd::SavedVariable(grad, /*is_output=*/false);
  node->logits_dtype = logits.scalar_type();
  torch::autograd::set_history(out, NodePtr(node));
  return out;
}

}  // namespace calibkern
