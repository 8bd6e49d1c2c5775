// The EM-estimated ECE regulariser (docs/math.md#em-regulariser): E-step statistics, the target form's loss and
// gradient
// (one pass), and the ece form's second-phase gradient, all through option_rows.h.
#include "dispatch.h"
#include "kernels.h"
#include "option_rows.h"

namespace calibkern::cpu {
namespace {

template <RowTask task>
void run_em(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi, const at::Tensor& mu,
            const at::Tensor& sigma, const at::Tensor* weight, int64_t ignore_index, RowTaskArgs args) {
  args.n_bins = mu.size(0);
  args.log_pi = log_pi.const_data_ptr<float>();
  args.mu = mu.const_data_ptr<float>();
  args.sigma = sigma.const_data_ptr<float>();
  args.weight = weight ? weight->const_data_ptr<float>() : nullptr;
  with_float_type(logits, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    option_rows<task>(static_cast<const T*>(logits.const_data_ptr()), labels.const_data_ptr<int64_t>(),
                      logits.size(0), logits.size(1), ignore_index, args);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, RowInputFaults> em_target_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi, const at::Tensor& mu,
    const at::Tensor& sigma, const at::Tensor& theta, int64_t ignore_index, int64_t reduction) {
  at::Tensor stats = at::empty({4, mu.size(0)}, logits.options().dtype(at::kDouble));
  RowTaskArgs args;
  RowLossOutputs out(logits, labels, ignore_index, reduction, args);
  args.stats = stats.data_ptr<double>();
  run_em<RowTask::kEMTarget>(logits, labels, log_pi, mu, sigma, &theta, ignore_index, args);
  return {out.loss(), out.grad(), stats, out.faults()};
}

at::Tensor em_stats(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                    const at::Tensor& mu, const at::Tensor& sigma, int64_t ignore_index) {
  at::Tensor stats = at::empty({4, mu.size(0)}, logits.options().dtype(at::kDouble));
  RowTaskArgs args;
  args.stats = stats.data_ptr<double>();
  run_em<RowTask::kEMStats>(logits, labels, log_pi, mu, sigma, nullptr, ignore_index, args);
  return stats;
}

at::Tensor em_ece_grad(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                       const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& coef, int64_t ignore_index) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  RowTaskArgs args;
  args.grad = grad.data_ptr<float>();
  run_em<RowTask::kEMEceGrad>(logits, labels, log_pi, mu, sigma, &coef, ignore_index, args);
  return grad;
}

}  // namespace calibkern::cpu
