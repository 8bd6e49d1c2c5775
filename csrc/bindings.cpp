// pybind11 module calibkern._C: the cpp backend's kernels (docs/backends.md) for CPU tensors.
// The checks here are the contract's preconditions (the public ops validate user input before this).
#include <torch/extension.h>

#include <omp.h>

#include "cpu/kernels.h"
#include "row_grad.h"

namespace {

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "calibkern._C: tensors must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) >= 2,
              "calibkern._C: logits must be a contiguous [N, K] tensor with K >= 2");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "calibkern._C: labels must be a contiguous int64 [N] tensor");
}

void check_params(std::initializer_list<const at::Tensor*> params, int64_t M) {
  for (const at::Tensor* t : params)
    TORCH_CHECK(t->dim() == 1 && t->size(0) == M && M >= 1 && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->device().is_cpu(),
                "calibkern._C: parameter vectors must be contiguous float32 [M] CPU tensors, M >= 1");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = calibkern::cpu;
  m.doc() = "calibkern C++ CPU kernels (the cpp backend)";

  m.def("binned_stats", [](const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature,
                           int64_t ignore_index, bool classwise) {
    check_rows(logits, labels);
    TORCH_CHECK(n_bins >= 1 && temperature > 0, "calibkern._C: n_bins >= 1 and temperature > 0 required");
    return cpu::binned_stats(logits, labels, n_bins, temperature, ignore_index, classwise);
  }, py::arg("logits"), py::arg("labels"), py::arg("n_bins"), py::arg("temperature"), py::arg("ignore_index"),
     py::arg("classwise"));

  m.def("metric_sums", [](const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature,
                          int64_t ignore_index, bool classwise) {
    check_rows(logits, labels);
    TORCH_CHECK(n_bins >= 1 && temperature > 0, "calibkern._C: n_bins >= 1 and temperature > 0 required");
    return cpu::metric_sums(logits, labels, n_bins, temperature, ignore_index, classwise);
  }, py::arg("logits"), py::arg("labels"), py::arg("n_bins"), py::arg("temperature"), py::arg("ignore_index"),
     py::arg("classwise"));

  m.def("top1_rows", [](const at::Tensor& logits, const at::Tensor& labels, double temperature,
                        int64_t ignore_index) {
    check_rows(logits, labels);
    TORCH_CHECK(temperature > 0, "calibkern._C: temperature > 0 required");
    return cpu::top1_rows(logits, labels, temperature, ignore_index);
  }, py::arg("logits"), py::arg("labels"), py::arg("temperature"), py::arg("ignore_index"));

  m.def("bootstrap_stats", [](const at::Tensor& confidence, const at::Tensor& correct, const at::Tensor& thresholds,
                              int64_t n_bins, int64_t n_boot, int64_t seed) {
    TORCH_CHECK(confidence.device().is_cpu() && confidence.dim() == 1 && confidence.is_contiguous() &&
                    confidence.scalar_type() == at::kFloat,
                "calibkern._C: confidence must be a contiguous float32 [n] CPU tensor");
    TORCH_CHECK(correct.sizes() == confidence.sizes() && correct.scalar_type() == at::kBool && correct.is_contiguous(),
                "calibkern._C: correct must be a contiguous bool tensor shaped like confidence");
    TORCH_CHECK(thresholds.dim() == 1 && thresholds.scalar_type() == at::kLong && thresholds.is_contiguous(),
                "calibkern._C: thresholds must be a contiguous int64 [T] tensor");
    TORCH_CHECK(n_bins >= 1 && n_boot >= 1 && confidence.size(0) < (int64_t{1} << 31),
                "calibkern._C: n_bins >= 1, n_boot >= 1 and fewer than 2^31 rows required");
    return cpu::bootstrap_stats(confidence, correct, thresholds, n_bins, n_boot, seed);
  }, py::arg("confidence"), py::arg("correct"), py::arg("thresholds"), py::arg("n_bins"), py::arg("n_boot"),
     py::arg("seed"));

  m.def("grid_moments", [](const at::Tensor& confidence, const at::Tensor& correct, int64_t cells) {
    TORCH_CHECK(confidence.device().is_cpu() && confidence.dim() == 1 && confidence.is_contiguous() &&
                    confidence.scalar_type() == at::kFloat,
                "calibkern._C: confidence must be a contiguous float32 [n] CPU tensor");
    TORCH_CHECK(correct.sizes() == confidence.sizes() && correct.scalar_type() == at::kBool && correct.is_contiguous(),
                "calibkern._C: correct must be a contiguous bool tensor shaped like confidence");
    TORCH_CHECK(cells >= 1, "calibkern._C: cells >= 1 required");
    return cpu::grid_moments(confidence, correct, cells);
  }, py::arg("confidence"), py::arg("correct"), py::arg("cells"));

  m.def("hard_bin_loss", [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& bin_accuracy,
                            int64_t ignore_index, int64_t reduction) {
    check_rows(logits, labels);
    check_params({&bin_accuracy}, bin_accuracy.size(0));
    auto [loss, grad, faults] = cpu::hard_bin_loss(logits, labels, bin_accuracy, ignore_index, reduction);
    return std::make_tuple(loss, grad, faults.bad_labels, faults.nonfinite_rows);
  }, py::arg("logits"), py::arg("labels"), py::arg("bin_accuracy"), py::arg("ignore_index"), py::arg("reduction"),
     "(loss, grad, bad_labels, nonfinite_rows): the last two count what the kernel found wrong with its input.");

  m.def("em_target_loss", [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                             const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& theta,
                             int64_t ignore_index, int64_t reduction) {
    check_rows(logits, labels);
    check_params({&log_pi, &mu, &sigma, &theta}, mu.size(0));
    auto [loss, grad, stats, faults] =
        cpu::em_target_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index, reduction);
    return std::make_tuple(loss, grad, stats, faults.bad_labels, faults.nonfinite_rows);
  }, py::arg("logits"), py::arg("labels"), py::arg("log_pi"), py::arg("mu"), py::arg("sigma"), py::arg("theta"),
     py::arg("ignore_index"), py::arg("reduction"),
     "(loss, grad, stats, bad_labels, nonfinite_rows), as hard_bin_loss.");

  m.def("em_stats", [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                       const at::Tensor& mu, const at::Tensor& sigma, int64_t ignore_index) {
    check_rows(logits, labels);
    check_params({&log_pi, &mu, &sigma}, mu.size(0));
    return cpu::em_stats(logits, labels, log_pi, mu, sigma, ignore_index);
  }, py::arg("logits"), py::arg("labels"), py::arg("log_pi"), py::arg("mu"), py::arg("sigma"),
     py::arg("ignore_index"));

  m.def("em_ece_grad", [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                          const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& coef,
                          int64_t ignore_index) {
    check_rows(logits, labels);
    check_params({&log_pi, &mu, &sigma, &coef}, mu.size(0));
    return cpu::em_ece_grad(logits, labels, log_pi, mu, sigma, coef, ignore_index);
  }, py::arg("logits"), py::arg("labels"), py::arg("log_pi"), py::arg("mu"), py::arg("sigma"), py::arg("coef"),
     py::arg("ignore_index"));

  m.def("cross_entropy_", [](at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                             double label_smoothing, double lse_square_scale) {
    check_rows(logits, targets);
    return cpu::cross_entropy_(logits, targets, ignore_index, label_smoothing, lse_square_scale);
  }, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"), py::arg("label_smoothing") = 0.0,
     py::arg("lse_square_scale") = 0.0);

  m.def("finite_rows", [](const at::Tensor& logits) {
    TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
                "calibkern._C: logits must be a contiguous [N, K] CPU tensor");
    return cpu::finite_rows(logits);
  }, py::arg("logits"), "Which rows of float32/bf16/fp16 logits [N, K] hold only finite values (bool [N]).");

  m.def("all_finite", [](const at::Tensor& logits) {
    TORCH_CHECK(logits.device().is_cpu() && logits.is_contiguous(), "calibkern._C: logits must be a contiguous CPU tensor");
    return cpu::all_finite(logits);
  }, py::arg("logits"), "Whether every value of float32/bf16/fp16 logits is finite.");

  m.def("labels_in_range", [](const at::Tensor& labels, int64_t n_classes, int64_t ignore_index) {
    TORCH_CHECK(labels.device().is_cpu() && labels.is_contiguous() && labels.scalar_type() == at::kLong,
                "calibkern._C: labels must be a contiguous int64 CPU tensor");
    return cpu::labels_in_range(labels, n_classes, ignore_index);
  }, py::arg("labels"), py::arg("n_classes"), py::arg("ignore_index"),
     "Whether every label lies in [0, n_classes) or equals ignore_index.");

  m.def("attach_row_grad", [](const at::Tensor& logits, const at::Tensor& loss, const at::Tensor& grad) {
    TORCH_CHECK(grad.sizes() == logits.sizes() && grad.device() == logits.device(),
                "calibkern._C: grad must have the shape and device of logits");
    return calibkern::attach_row_grad(logits, loss, grad);
  }, py::arg("logits"), py::arg("loss"), py::arg("grad"),
     "A copy of loss whose gradient with respect to logits is grad · ∂L/∂loss (row_grad.h).");

  m.def("max_threads", []() { return omp_get_max_threads(); },
        "OpenMP threads the kernels use (follows torch.set_num_threads).");
}
