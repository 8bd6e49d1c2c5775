"""The ``torch`` backend: plain PyTorch, always available, the oracle for every other backend.

It implements the kernel contract of docs/backends.md, vectorised (no Python loop over rows or bins).
"""

from .binned_stats import binned_stats
from .bootstrap import bootstrap_stats
from .cross_entropy import cross_entropy_
from .em import em_ece_grad, em_stats, em_target_loss, responsibilities
from .row_metrics import metric_sums, proper_scores, top1_rows
from .smooth_grid import grid_moments
from .softmax import bin_index, softmax_parts
from .target_loss import (REDUCTIONS, hard_bin_loss, hard_bin_loss_autograd, loss_to_fixed_targets, non_max_targets,
                          reduce_rows, reduced_row_loss)

__all__ = [
    "REDUCTIONS",
    "bin_index",
    "binned_stats",
    "bootstrap_stats",
    "cross_entropy_",
    "em_ece_grad",
    "em_stats",
    "em_target_loss",
    "grid_moments",
    "hard_bin_loss",
    "hard_bin_loss_autograd",
    "loss_to_fixed_targets",
    "metric_sums",
    "non_max_targets",
    "proper_scores",
    "reduce_rows",
    "reduced_row_loss",
    "responsibilities",
    "softmax_parts",
    "top1_rows",
]
