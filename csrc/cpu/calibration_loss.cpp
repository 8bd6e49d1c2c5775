// hard_bin_loss: the hard-bin calibration term's per-row loss and gradient (docs/math.md#cft-term, default variant):
// a = bin_accuracy[b(c)], then the target loss of option_rows.h, in one pass per row, reduced as asked.
#include "dispatch.h"
#include "kernels.h"
#include "option_rows.h"

namespace calibkern::cpu {

std::tuple<at::Tensor, at::Tensor, RowInputFaults> hard_bin_loss(const at::Tensor& logits, const at::Tensor& labels,
                                                                 const at::Tensor& bin_accuracy, int64_t ignore_index,
                                                                 int64_t reduction) {
  const int64_t N = logits.size(0), K = logits.size(1);
  RowTaskArgs args;
  RowLossOutputs out(logits, labels, ignore_index, reduction, args);
  args.n_bins = bin_accuracy.size(0);
  args.bin_accuracy = bin_accuracy.const_data_ptr<float>();
  with_float_type(logits, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    option_rows<RowTask::kHardBin>(static_cast<const T*>(logits.const_data_ptr()), labels.const_data_ptr<int64_t>(),
                                   N, K, ignore_index, args);
  });
  return {out.loss(), out.grad(), out.faults()};
}

}  // namespace calibkern::cpu
