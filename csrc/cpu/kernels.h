// The cpp backend's kernel contract (docs/backends.md): one function per kernel, CPU tensors in and out.
// Callers (calibkern.ops) have validated shapes, dtypes, devices and label ranges — except that the row
// losses check their labels' range and their logits' finiteness themselves (RowInputFaults).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <tuple>

namespace calibkern::cpu {

/// Top-1: (counts int64[M], Σ conf float64[M], Σ correct float64[M], n_nonfinite int64[]); classwise: the
/// same per class [K, M]. Kept rows whose scaled logits hold NaN or ±inf are left out and counted.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> binned_stats(
    const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature, int64_t ignore_index,
    bool classwise);

/// binned_stats' top-1 statistics and, from the same read of each row, the float64 sums [Σ NLL, Σ Brier] over the
/// kept finite rows and (classwise) the [K, M] classwise statistics ([0, M] otherwise): (counts, Σ conf,
/// Σ correct, n_nonfinite, scores, class counts, class Σ p, class Σ correct).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> metric_sums(
    const at::Tensor& logits, const at::Tensor& labels, int64_t n_bins, double temperature, int64_t ignore_index,
    bool classwise);

/// Per row: (confidence float32[N], correct bool[N]); ignored rows 0 and false, kept rows with NaN or ±inf in
/// their scaled logits NaN and false.
std::tuple<at::Tensor, at::Tensor> top1_rows(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                             int64_t ignore_index);

/// n_boot Poisson replicates of the rows (confidence float32[n] in [0, 1], correct bool[n]), weights from the
/// counter-based hash of calibkern/reference/bootstrap.py with `thresholds` int64[T]: (counts int64[B, M],
/// Σ w·c float64[B, M], Σ w·correct float64[B, M]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bootstrap_stats(const at::Tensor& confidence, const at::Tensor& correct,
                                                               const at::Tensor& thresholds, int64_t n_bins,
                                                               int64_t n_boot, int64_t seed);

/// The smooth ECE's grid moments of rows (confidence float32[n] in [0, 1], correct bool[n]): per cell
/// j = min(⌊c·cells⌋, cells − 1) the sums of (1, c, r, c·r), r = c − correct, as float64[cells, 4].
at::Tensor grid_moments(const at::Tensor& confidence, const at::Tensor& correct, int64_t cells);

/// What a row-loss kernel finds wrong with its input in the passes it makes anyway: labels outside [0, K)
/// that are not ignore_index, and rows (kept or not) whose logits hold NaN or ±inf. Its outputs mean nothing
/// unless both are 0.
struct RowInputFaults {
  int64_t bad_labels = 0;
  int64_t nonfinite_rows = 0;
};

/// Hard-bin target loss: (loss float32, ∂loss/∂logits float32[N, K], faults); the loss is [N] for
/// reduction 0 (none), the sum over kept rows for 1, their mean for 2 (option_rows.h, RowLossOutputs).
std::tuple<at::Tensor, at::Tensor, RowInputFaults> hard_bin_loss(const at::Tensor& logits, const at::Tensor& labels,
                                                                 const at::Tensor& bin_accuracy, int64_t ignore_index,
                                                                 int64_t reduction);

/// EM target-form loss: (loss float32 reduced as hard_bin_loss's, grad float32[N, K], E-step statistics
/// float64[4, M], faults).
std::tuple<at::Tensor, at::Tensor, at::Tensor, RowInputFaults> em_target_loss(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi, const at::Tensor& mu,
    const at::Tensor& sigma, const at::Tensor& theta, int64_t ignore_index, int64_t reduction);

/// E-step statistics S, C, Q, R as float64[4, M].
at::Tensor em_stats(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                    const at::Tensor& mu, const at::Tensor& sigma, int64_t ignore_index);

/// EM ece-form gradient w · c · (e_ŷ − p), w = Σ_k r_k coef_k, as float32[N, K].
at::Tensor em_ece_grad(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& log_pi,
                       const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& coef, int64_t ignore_index);

/// Input checks of the public ops, one parallel read each: which rows hold only finite values (bool[N]);
/// whether every value is finite; whether every label lies in [0, K) or equals ignore_index.
at::Tensor finite_rows(const at::Tensor& logits);
bool all_finite(const at::Tensor& logits);
bool labels_in_range(const at::Tensor& labels, int64_t n_classes, int64_t ignore_index);

/// Cross-entropy per row; overwrites float32 logits [n, V] with softmax − one-hot (0 for ignored rows).
at::Tensor cross_entropy_(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                          double label_smoothing, double lse_square_scale);

}  // namespace calibkern::cpu
