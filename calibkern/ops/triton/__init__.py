"""The ``triton`` backend: the kernel contract of docs/backends.md as Triton kernels.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
The kernel modules (and triton itself) are imported on the first call, so importing calibkern never
imports triton.
"""


def binned_stats(logits, labels, n_bins: int, temperature: float, ignore_index: int, classwise: bool):
    from .binning import binned_stats as run
    return run(logits, labels, n_bins, temperature, ignore_index, classwise)


def bootstrap_stats(confidence, correct, n_bins: int, n_boot: int, seed: int):
    from .bootstrap import bootstrap_stats as run
    return run(confidence, correct, n_bins, n_boot, seed)


def grid_moments(confidence, correct, cells: int):
    """The smooth ECE's grid moments of per-row values (no logits read): the reference's ``index_add_`` on the
    device, O(n) with four float64 sums per row."""
    from ...reference.smooth_grid import grid_moments as run
    return run(confidence, correct, cells)


def metric_sums(logits, labels, n_bins: int, temperature: float, ignore_index: int, classwise: bool):
    from .row_metrics import metric_sums as run
    return run(logits, labels, n_bins, temperature, ignore_index, classwise)


def top1_rows(logits, labels, temperature: float, ignore_index: int):
    from .row_metrics import top1_rows as run
    return run(logits, labels, temperature, ignore_index)


def hard_bin_loss(logits, labels, bin_accuracy, ignore_index: int, reduction: str):
    from .calibration import hard_bin_loss as run
    return run(logits, labels, bin_accuracy, ignore_index, reduction)


def em_target_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index: int, reduction: str):
    from .calibration import em_target_loss as run
    return run(logits, labels, log_pi, mu, sigma, theta, ignore_index, reduction)


def em_stats(logits, labels, log_pi, mu, sigma, ignore_index: int):
    from .calibration import em_stats as run
    return run(logits, labels, log_pi, mu, sigma, ignore_index)


def em_ece_grad(logits, labels, log_pi, mu, sigma, coef, ignore_index: int):
    from .calibration import em_ece_grad as run
    return run(logits, labels, log_pi, mu, sigma, coef, ignore_index)


def cross_entropy_(logits, targets, ignore_index: int, label_smoothing: float = 0.0, lse_square_scale: float = 0.0):
    from .cross_entropy import cross_entropy_ as run
    return run(logits, targets, ignore_index, label_smoothing, lse_square_scale)
