"""torchmetrics' calibration errors with calibkern's state and kernels (docs/integrations.md#torchmetrics).

``BinaryCalibrationError``, ``MulticlassCalibrationError`` and ``CalibrationError`` (the ``task=`` dispatcher) take
torchmetrics' constructor arguments, defaults (``n_bins=15``, ``norm="l1"``, ``ignore_index=None``), input rules
and return type (a float32 0-dim tensor), and are ``torchmetrics.Metric`` subclasses (``forward``, ``state_dict``,
``MetricCollection``, ``plot``). Their state is the per-bin sums ``n_k``, ``s_k = Σ c`` and ``a_k = Σ correct``
(O(M), summed across processes) instead of every prediction; a batch of logits is binned by calibkern's kernel.

Input rules (torchmetrics'): a floating batch whose kept values all lie in [0, 1] is probabilities, any other is
logits (softmax for multiclass ``[N, C, ...]``, sigmoid for binary). Multiclass: ``c = max_j p_j``, correct
``argmax_j p_j = y``; binary (any shape): ``c = p`` (the positive class's probability), correct ``y``.
``ECE_l1 = Σ_k |s_k − a_k| / N``, ``ECE_l2 = sqrt(Σ_k (s_k − a_k)² / n_k / N)``, ``MCE = max_k |s_k − a_k| / n_k``.

The one known difference: torchmetrics gives a confidence of exactly 1 a bin of its own (``bucketize`` against
the M + 1 edges, ``right=True``); calibkern's bins are ``min(floor(c·M), M − 1)``, so it joins the last bin.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from torchmetrics import Metric
except ImportError as error:  # torchmetrics is an optional dependency
    raise ImportError("calibkern.integrations.torchmetrics needs torchmetrics: pip install 'calibkern[torchmetrics]'"
                      ) from error

from .. import _validate as V
from ..metrics import NORMS, BinStats
from ..ops.binned_stats import binned_stats_tensors
from ..reference import bin_index

__all__ = ["BinaryCalibrationError", "CalibrationError", "MulticlassCalibrationError"]

TASKS = ("binary", "multiclass")
_NO_IGNORE = torch.iinfo(torch.int64).min  # the kernels' ignore_index when nothing is ignored (target ≥ 0 checked)


def _check_args(n_bins, norm, ignore_index) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int ≥ 1, got {n_bins!r}")
    V.check_choice(norm, "norm", NORMS)
    if ignore_index is not None:
        V.check_ignore_index(ignore_index)


def _is_probability(x: torch.Tensor) -> bool:
    """torchmetrics' rule: every value in [0, 1] (one read; a host sync, as in torchmetrics on CPU)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool((low >= 0) & (high <= 1))


class _BinnedCalibrationError(Metric):
    """The O(M) state and the compute shared by the binary and multiclass metrics."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, n_bins: int = 15, norm: str = "l1", ignore_index: int | None = None,
                 validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_args(n_bins, norm, ignore_index)
        self.n_bins, self.norm, self.ignore_index, self.validate_args = n_bins, norm, ignore_index, validate_args
        self.add_state("counts", torch.zeros(n_bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("sum_conf", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_correct", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, stats: BinStats) -> None:
        self.counts += stats.counts.to(self.counts.device)
        self.sum_conf += stats.sum_conf.to(self.sum_conf.device)
        self.sum_correct += stats.sum_correct.to(self.sum_correct.device)

    def _add_confidences(self, confidences: torch.Tensor, correct: torch.Tensor) -> None:
        bins = bin_index(confidences, self.n_bins)
        stats = BinStats.empty(self.n_bins, device=confidences.device)
        stats.counts.scatter_add_(0, bins, torch.ones_like(bins))
        stats.sum_conf.scatter_add_(0, bins, confidences.double())
        stats.sum_correct.scatter_add_(0, bins, correct.double())
        self._add(stats)

    def compute(self) -> torch.Tensor:
        """The calibration error of everything seen (float32 0-dim; 0 before any row)."""
        return BinStats(self.counts, self.sum_conf, self.sum_correct).ece(self.norm).float()

    def plot(self, val=None, ax=None):
        """torchmetrics' plot of one value or a sequence of values: ``(figure, axes)``."""
        return self._plot(val, ax)

    def _kept(self, preds: torch.Tensor, target: torch.Tensor):
        if self.ignore_index is None:
            return preds, target
        keep = target != self.ignore_index
        return preds[keep], target[keep]

    def _check_pair(self, preds, target, target_shape) -> None:
        V.check_tensor(preds, "preds")
        V.check_tensor(target, "target")
        if not preds.is_floating_point():
            raise ValueError(f"preds must be a floating tensor of probabilities or logits, got {preds.dtype}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must be an integer tensor, got {target.dtype}")
        if tuple(target.shape) != tuple(target_shape):
            raise ValueError(f"target must have shape {tuple(target_shape)}, got {tuple(target.shape)}")
        if target.device != preds.device:
            raise ValueError(f"target is on {target.device} but preds is on {preds.device}")


class BinaryCalibrationError(_BinnedCalibrationError):
    """Calibration error of the positive class's probability ``p`` (``preds`` of any shape, ``target`` 0/1 of the
    same shape): bins of ``p`` against ``y``. Logits (any value outside [0, 1]) go through a sigmoid first."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch to the per-bin sums."""
        self._check_pair(preds, target, preds.shape if isinstance(preds, torch.Tensor) else ())
        preds, target = self._kept(preds.reshape(-1), target.reshape(-1))
        if self.validate_args:
            V.require(((target == 0) | (target == 1)).all(),
                      f"target must hold 0 or 1{'' if self.ignore_index is None else ' or ignore_index'}")
        if not _is_probability(preds):
            preds = preds.sigmoid()
        self._add_confidences(preds, target)


class MulticlassCalibrationError(_BinnedCalibrationError):
    """Top-label calibration error of ``preds [N, C, ...]`` (probabilities or logits) against ``target [N, ...]``:
    bins of ``max_j p_j`` against ``argmax_j p_j = y``. A batch of logits is binned by calibkern's kernel (one read,
    the softmax inside); a batch of probabilities by its row maxima."""

    plot_legend_name = "Class"

    def __init__(self, num_classes: int, n_bins: int = 15, norm: str = "l1", ignore_index: int | None = None,
                 validate_args: bool = True, **kwargs: Any) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
        super().__init__(n_bins, norm, ignore_index, validate_args, **kwargs)
        self.num_classes = num_classes

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch to the per-bin sums."""
        V.check_tensor(preds, "preds")
        if preds.dim() < 2 or preds.shape[1] != self.num_classes:
            raise ValueError(f"preds must be [N, C, ...] with C = num_classes = {self.num_classes}, got shape "
                             f"{tuple(preds.shape)}")
        self._check_pair(preds, target, preds.shape[:1] + preds.shape[2:])
        preds = torch.movedim(preds, 1, -1).reshape(-1, self.num_classes)
        preds, target = self._kept(preds, target.reshape(-1).long())
        if target.numel():  # the kernels ignore nothing here (ignored rows are gone): the range is checked once
            low, high = torch.aminmax(target)
            V.require((low >= 0) & (high < self.num_classes), f"target must lie in [0, {self.num_classes})"
                      f"{'' if self.ignore_index is None else ' or equal ignore_index'}")
        if _is_probability(preds):
            confidences, predictions = preds.max(dim=1)
            self._add_confidences(confidences.float(), predictions == target)
        else:
            self._add(BinStats(*binned_stats_tensors(preds, target, self.n_bins, ignore_index=_NO_IGNORE)))


class CalibrationError:
    """torchmetrics' ``CalibrationError(task=...)``: a :class:`BinaryCalibrationError` for ``task="binary"``, a
    :class:`MulticlassCalibrationError` (``num_classes`` required) for ``"multiclass"``."""

    def __new__(cls, task: str, n_bins: int = 15, norm: str = "l1", num_classes: int | None = None,
                ignore_index: int | None = None, validate_args: bool = True, **kwargs: Any) -> Metric:
        V.check_choice(task, "task", TASKS)
        kwargs.update(n_bins=n_bins, norm=norm, ignore_index=ignore_index, validate_args=validate_args)
        if task == "binary":
            return BinaryCalibrationError(**kwargs)
        if not isinstance(num_classes, int):
            raise ValueError(f"num_classes must be an int with task='multiclass', got {num_classes!r}")
        return MulticlassCalibrationError(num_classes, **kwargs)
