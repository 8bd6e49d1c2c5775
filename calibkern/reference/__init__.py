"""The ``torch`` backend: plain PyTorch, always available, the oracle for every other backend.

It implements the kernel contract of docs/backends.md, vectorised (no Python loop over rows or bins).
"""

from .binned_stats import binned_stats
from .cross_entropy import cross_entropy_
from .em import em_ece_grad, em_stats, em_target_loss, responsibilities
from .softmax import bin_index, softmax_parts
from .target_loss import hard_bin_loss, hard_bin_loss_autograd, loss_to_fixed_targets, non_max_targets

__all__ = [
    "bin_index",
    "binned_stats",
    "cross_entropy_",
    "em_ece_grad",
    "em_stats",
    "em_target_loss",
    "hard_bin_loss",
    "hard_bin_loss_autograd",
    "loss_to_fixed_targets",
    "non_max_targets",
    "responsibilities",
    "softmax_parts",
]
