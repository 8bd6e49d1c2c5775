"""Calibration metrics (docs/math.md#ece): BinStats, the ECE family, proper scores and a streaming meter.

Equal-width bins ``b(c) = min(floor(c·M), M−1)``; per bin ``n_k`` (int64), ``s_k = Σ c`` and
``a_k = Σ correct`` (float64) — additive across batches and ranks. From them:
``ECE = Σ_k |s_k − a_k| / N``, ``ECE-l2 = sqrt(Σ_k n_k (s_k/n_k − a_k/n_k)² / N)``,
``MCE = max_{n_k>0} |s_k − a_k| / n_k``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch

from . import _validate as V
from . import backends
from .ops import custom_ops
from .ops.binned_stats import binned_stats_tensors
from .ops.row_metrics import kept_top1, metric_sums_tensors
from .reference import bin_index
from .scores import as_logits

NORMS = ("l1", "l2", "max")


class Reliability(NamedTuple):
    """Reliability-diagram data: per equal-width bin, its edges, accuracy, confidence and count.

    Empty bins have count 0 and accuracy/confidence 0; use ``counts > 0`` to mask them.
    """

    edges: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor
    counts: torch.Tensor


class ConfidenceInterval(NamedTuple):
    """An ECE estimate and its interval; ``method`` says how they were computed."""

    estimate: float
    low: float
    high: float
    method: str = "percentile"


ESTIMATORS = ("plugin", "debiased")
INTERVAL_METHODS = ("debiased", "percentile")


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """``Σ`` over the last dimension in index order (a sequential scan), so the same bits at every thread count:
    ``torch.sum`` splits one long reduction (≥ 32768 bins or classes) between threads."""
    return x.cumsum(dim=-1)[..., -1]


def _ece_from_sums(counts, sum_conf, sum_correct, norm: str, estimator: str = "plugin") -> torch.Tensor:
    """ECE over the last dimension (bins); leading dimensions (classes, bootstrap replicates) are kept.

    ``estimator="debiased"`` (docs/math.md#debiased-ece): l2 subtracts each bin's binomial variance
    ``ā(1 − ā)/(n − 1)`` from its squared gap (unbiased for the squared error, clipped at 0 before the root);
    l1 is ``2 · plug-in − Σ_k w_k E|N(gap_k, ā_k(1 − ā_k)/n_k)|``, the plug-in minus its bias under the normal
    approximation, in closed form (the mean of a folded normal).
    """
    if estimator == "plugin" or norm == "max":
        if estimator != "plugin":
            raise ValueError("estimator='debiased' is defined for norm 'l1' and 'l2', not 'max'")
        n_total = counts.sum(dim=-1).clamp_min(1).double()
        gap = (sum_conf - sum_correct).abs()
        if norm == "l1":
            return _ordered_sum(gap) / n_total
        if norm == "l2":
            return torch.sqrt(_ordered_sum(gap * gap / counts.clamp_min(1).double()) / n_total)
        return (gap / counts.clamp_min(1).double()).amax(dim=-1)
    squared_or_l1 = _debiased(counts, sum_conf, sum_correct, norm)
    return squared_or_l1 if norm == "l1" else squared_or_l1.clamp_min(0).sqrt()


def _debiased(counts, sum_conf, sum_correct, norm: str) -> torch.Tensor:
    """The debiased l1 ECE, or the debiased *squared* l2 ECE (may be negative), over the last dimension."""
    n = counts.double()
    weight = n / n.sum(dim=-1, keepdim=True).clamp_min(1)
    accuracy = sum_correct / n.clamp_min(1)
    gap = (sum_correct - sum_conf) / n.clamp_min(1)
    bernoulli = accuracy * (1 - accuracy)
    if norm == "l2":
        return _ordered_sum(weight * (gap * gap - bernoulli / (n - 1).clamp_min(1)))
    sd = torch.sqrt(bernoulli / n.clamp_min(1))
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    folded = sd * math.sqrt(2 / math.pi) * torch.exp(-gap * gap / (2 * safe * safe)) \
        + gap * (1 - 2 * torch.special.ndtr(-gap / safe))
    folded = torch.where(sd > 0, folded, gap.abs())
    return 2 * _ordered_sum(weight * gap.abs()) - _ordered_sum(weight * folded)


@dataclass
class BinStats:
    """Per-bin sufficient statistics: ``counts`` (int64), ``sum_conf`` and ``sum_correct`` (float64).

    Top-1 statistics are [M]; classwise statistics are [K, M] (row j bins ``p_j`` against ``1[y = j]``).
    ``n_skipped`` counts rows skipped for non-finite logits (``nonfinite="skip"``).
    """

    counts: torch.Tensor
    sum_conf: torch.Tensor
    sum_correct: torch.Tensor
    n_skipped: torch.Tensor | None = None

    def __post_init__(self):
        if self.n_skipped is None:
            self.n_skipped = torch.zeros((), dtype=torch.int64, device=self.counts.device)

    @classmethod
    def empty(cls, n_bins: int = 10, n_classes: int | None = None, device=None) -> "BinStats":
        shape = (n_bins,) if n_classes is None else (n_classes, n_bins)
        return cls(torch.zeros(shape, dtype=torch.int64, device=device),
                   torch.zeros(shape, dtype=torch.float64, device=device),
                   torch.zeros(shape, dtype=torch.float64, device=device))

    @classmethod
    def from_confidences(cls, confidences, correct, n_bins: int = 10) -> "BinStats":
        """Top-1 statistics from per-sample confidences in [0, 1] and correctness (bool or 0/1)."""
        n_bins = V.check_n_bins(n_bins)
        V.check_tensor(confidences, "confidences")
        V.check_tensor(correct, "correct")
        if confidences.dim() != 1 or correct.shape != confidences.shape:
            raise ValueError(f"confidences and correct must be 1-D of one length, got {tuple(confidences.shape)} "
                             f"and {tuple(correct.shape)}")
        V.require(((confidences >= 0) & (confidences <= 1)).all(), "confidences must lie in [0, 1]")
        return cls.from_bins(bin_index(confidences, n_bins), confidences, correct, n_bins)

    @classmethod
    def from_bins(cls, bins, confidences, correct, n_bins: int) -> "BinStats":
        """Top-1 statistics from an explicit bin index per sample (integers in [0, M)), e.g. equal-mass bins;
        ``correct`` is bool or 0/1."""
        n_bins = V.check_n_bins(n_bins)
        for x, name in ((bins, "bins"), (confidences, "confidences"), (correct, "correct")):
            V.check_tensor(x, name)
            if x.shape != confidences.shape or x.dim() != 1:
                raise ValueError(f"bins, confidences and correct must be 1-D of one length, got "
                                 f"{tuple(bins.shape)}, {tuple(confidences.shape)} and {tuple(correct.shape)}")
            V.check_same_device(confidences.device, x, name)
        if bins.dtype.is_floating_point or bins.dtype.is_complex or bins.dtype == torch.bool:
            raise TypeError(f"bins must be an integer tensor, got {bins.dtype}")
        bins = bins.long()
        V.require(((bins >= 0) & (bins < n_bins)).all(), f"bins must lie in [0, {n_bins})")
        V.require(((correct == 0) | (correct == 1)).all(), "correct must be bool or 0/1")
        stats = cls.empty(n_bins, device=confidences.device)
        stats.counts.scatter_add_(0, bins, torch.ones_like(bins))
        stats.sum_conf.scatter_add_(0, bins, confidences.double())
        stats.sum_correct.scatter_add_(0, bins, correct.double())
        return stats

    @property
    def n_bins(self) -> int:
        return self.counts.shape[-1]

    @property
    def classwise(self) -> bool:
        return self.counts.dim() == 2

    def total(self) -> torch.Tensor:
        """Number of binned samples N (int64, 0-dim)."""
        return self.counts.sum(dim=-1)[..., 0] if self.classwise else self.counts.sum()

    def ece(self, norm: str = "l1", estimator: str = "plugin") -> torch.Tensor:
        """ECE with ``norm`` l1/l2/max and ``estimator`` plugin/debiased (docs/math.md#debiased-ece); for
        classwise statistics the mean over classes (cwECE), summed in class order."""
        V.check_choice(norm, "norm", NORMS)
        V.check_choice(estimator, "estimator", ESTIMATORS)
        value = _ece_from_sums(self.counts, self.sum_conf, self.sum_correct, norm, estimator)
        return _ordered_sum(value) / value.shape[-1] if self.classwise else value

    def brier_decomposition(self) -> dict:
        """Murphy's decomposition of the top-1 Brier score ``(1/N) Σ (c_i − correct_i)²`` over the bins:
        ``reliability = Σ_k w_k (c̄_k − ā_k)²``, ``resolution = Σ_k w_k (ā_k − ā)²``, ``uncertainty = ā(1 − ā)``
        (float64 0-dim tensors; the score is ``reliability − resolution + uncertainty`` plus the spread of the
        confidences within their bins, which binned statistics do not hold)."""
        self._top1_only("brier_decomposition()")
        n = self.counts.double()
        weight = n / n.sum().clamp_min(1)
        accuracy, confidence = self.sum_correct / n.clamp_min(1), self.sum_conf / n.clamp_min(1)
        overall = self.accuracy()
        return {"reliability": _ordered_sum(weight * (confidence - accuracy) ** 2),
                "resolution": _ordered_sum(weight * (accuracy - overall) ** 2),
                "uncertainty": overall * (1 - overall)}

    def confidence_interval(self, norm: str = "l1", *, n_boot: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> "ConfidenceInterval":
        """``ece_confidence_interval``'s default (``method="debiased"``) from these top-1 statistics alone — a
        streaming ``CalibrationMeter``'s ``stats`` included: the logits are not read again (docs/math.md#intervals)."""
        self._top1_only("confidence_interval()")
        V.check_choice(norm, "norm", ("l1", "l2"))
        n_boot, tail, seed = _interval_args(n_boot, confidence, seed, self.n_bins)
        return _debiased_interval(self, norm, n_boot, tail, seed)

    def mce(self) -> torch.Tensor:
        return self.ece("max")

    def _top1_only(self, what: str) -> None:
        if self.classwise:
            raise ValueError(f"{what} is defined for top-1 statistics; these are classwise [K, M]")

    def accuracy(self) -> torch.Tensor:
        self._top1_only("accuracy()")
        return self.sum_correct.sum() / self.counts.sum().clamp_min(1).double()

    def mean_confidence(self) -> torch.Tensor:
        self._top1_only("mean_confidence()")
        return _ordered_sum(self.sum_conf) / self.counts.sum().clamp_min(1).double()

    def bin_accuracy(self, prior: float = 0.0) -> torch.Tensor:
        """Per-bin accuracy for the hard-bin term (docs/math.md#cft-term), float32 [M]:
        ``A_k = (a_k + prior · Ā) / (n_k + prior)`` with ``Ā`` the overall accuracy. An empty bin takes ``Ā``
        (not 0/0 → 0, which would tell every row whose confidence moves into it that it is always wrong), and
        ``prior > 0`` shrinks a bin with few rows towards it."""
        self._top1_only("bin_accuracy()")
        prior = float(prior)
        if not (prior >= 0 and prior < float("inf")):
            raise ValueError(f"prior must be a finite number ≥ 0, got {prior!r}")
        counts = self.counts.double()
        overall = self.sum_correct.sum() / counts.sum().clamp_min(1)
        shrunk = (self.sum_correct + prior * overall) / (counts + prior).clamp_min(1e-12)
        return torch.where(counts > 0, shrunk, overall).float()

    def reliability(self) -> Reliability:
        self._top1_only("reliability()")
        n = self.counts.clamp_min(1).double()
        edges = torch.linspace(0.0, 1.0, self.n_bins + 1, dtype=torch.float64, device=self.counts.device)
        return Reliability(edges, self.sum_correct / n, self.sum_conf / n, self.counts)

    def __add__(self, other: "BinStats") -> "BinStats":
        if not isinstance(other, BinStats):
            return NotImplemented
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge BinStats of shapes {tuple(self.counts.shape)} and "
                             f"{tuple(other.counts.shape)}")
        return BinStats(self.counts + other.counts, self.sum_conf + other.sum_conf,
                        self.sum_correct + other.sum_correct, self.n_skipped + other.n_skipped)

    def all_reduce(self, group=None) -> "BinStats":
        """Sum the statistics over the ranks of ``group`` in place (no-op without a process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in (self.counts, self.sum_conf, self.sum_correct, self.n_skipped):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return self

    def to(self, device) -> "BinStats":
        return BinStats(self.counts.to(device), self.sum_conf.to(device), self.sum_correct.to(device),
                        self.n_skipped.to(device))


def binned_stats(logits, labels, n_bins=10, *, mode="top1", temperature=1.0, ignore_index=-100,
                 nonfinite="error", backend=None, input="logits") -> BinStats:
    """Per-bin statistics of the top-1 confidence (``mode="top1"``) or of every class (``"classwise"``).

    ``input``: what ``logits`` holds — ``"logits"`` (default), ``"probs"`` or ``"log_probs"``, ``[N, K]``, or
    ``[N]`` binary scores of the positive class (calibkern.scores, docs/math.md#inputs); so for every metric."""
    logits = as_logits(logits, input)
    return BinStats(*binned_stats_tensors(logits, labels, n_bins, mode=mode, temperature=temperature,
                                          ignore_index=ignore_index, nonfinite=nonfinite, backend=backend))


def _stats(logits, labels, n_bins, mode, input, **kwargs) -> BinStats:
    logits = V.check_logits(as_logits(logits, input))
    return BinStats(*binned_stats_tensors(logits, labels, n_bins, mode=mode, **kwargs))


def ece(logits, labels, n_bins=10, norm="l1", *, estimator="plugin", temperature=1.0, ignore_index=-100,
        nonfinite="error", backend=None, input="logits") -> torch.Tensor:
    """Expected calibration error of the top-1 confidence (0-dim float64 tensor); ``estimator="debiased"``
    removes the plug-in's upward bias (docs/math.md#debiased-ece)."""
    V.check_choice(norm, "norm", NORMS)
    V.check_choice(estimator, "estimator", ESTIMATORS)
    return _stats(logits, labels, n_bins, "top1", input, temperature=temperature, ignore_index=ignore_index,
                  nonfinite=nonfinite, backend=backend).ece(norm, estimator)


def classwise_ece(logits, labels, n_bins=10, norm="l1", *, estimator="plugin", temperature=1.0, ignore_index=-100,
                  nonfinite="error", backend=None, input="logits") -> torch.Tensor:
    """Classwise ECE (Kull et al.): ``(1/K) Σ_j Σ_k |Σ p_ij − Σ 1[y_i = j]| / N`` over bins of ``p_ij``."""
    V.check_choice(norm, "norm", NORMS)
    V.check_choice(estimator, "estimator", ESTIMATORS)
    return _stats(logits, labels, n_bins, "classwise", input, temperature=temperature, ignore_index=ignore_index,
                  nonfinite=nonfinite, backend=backend).ece(norm, estimator)


def adaptive_ece(logits, labels, n_bins=10, norm="l1", *, temperature=1.0, ignore_index=-100,
                 nonfinite="error", backend=None, input="logits") -> torch.Tensor:
    """ECE over equal-mass bins: samples sorted by confidence, bin of the j-th of N is ``floor(j·M/N)``.

    Ties at a bin edge are split by sort position (a stable sort keeps input order among equals).
    """
    n_bins = V.check_n_bins(n_bins)
    V.check_choice(norm, "norm", NORMS)
    conf, correct = kept_top1(as_logits(logits, input), labels, temperature, ignore_index, nonfinite, backend)
    order = torch.sort(conf, stable=True).indices
    n = conf.shape[0]
    bins = torch.div(torch.arange(n, device=conf.device) * n_bins, max(n, 1), rounding_mode="floor")
    return BinStats.from_bins(bins, conf[order], correct[order], n_bins).ece(norm)


def ece_confidence_interval(logits, labels, n_bins=10, norm="l1", *, method="debiased", n_boot=1000,
                            confidence=0.95, seed=0, temperature=1.0, ignore_index=-100, nonfinite="error",
                            backend=None, input="logits") -> ConfidenceInterval:
    """An interval for the population's binned calibration error ``Σ_k P(b = k) |E[correct | k] − E[c | k]|``
    (docs/math.md#intervals), from ``n_boot`` seeded resamples.

    ``method="debiased"`` (default): the debiased estimate and, from a parametric bootstrap of the bin
    statistics (bin counts multinomial, each bin's correct count binomial at its accuracy), the basic
    bootstrap interval ``[2d − q_hi, 2d − q_lo]`` for l1 (``[0, the l2 interval's upper end]`` at least,
    wherever the l2 interval reaches 0) and the normal interval ``d² ± z·sd`` on the squared error for l2,
    clipped at 0. It covers the truth in at least 90 % of simulated repetitions at 95 % for calibrated and
    miscalibrated predictors alike (docs/math.md#intervals has the table). One pass over the
    logits (the binning kernel of ``backend``); the resampling runs on the M bin statistics.

    ``method="percentile"``: the plug-in ECE and the percentile interval of the ECEs of ``n_boot`` Poisson
    resamples of the rows (each row's multiplicity Poisson(1), from a counter-based hash of ``seed``, replicate
    and row: the same replicates on every backend), accumulated by the backend's ``bootstrap_stats`` kernel on
    the rows' confidences and correctness, computed once by ``top1_rows``. It covers the truth where the
    predictor is clearly miscalibrated, and almost never where it is nearly calibrated: the plug-in's upward
    bias then moves the whole interval above the truth.

    ``seed``: any Python or NumPy integer; only ``seed mod 2³²`` matters. ``n_boot ≥ 2`` and at least two kept
    rows are required (docs/math.md#intervals); estimate and bounds are Python floats.
    """
    n_bins = V.check_n_bins(n_bins)
    V.check_choice(norm, "norm", NORMS)
    V.check_choice(method, "method", INTERVAL_METHODS)
    n_boot, tail, seed = _interval_args(n_boot, confidence, seed, n_bins)
    if method == "debiased":
        if norm == "max":
            raise ValueError("method='debiased' is defined for norm 'l1' and 'l2'; use method='percentile' for 'max'")
        stats = _stats(logits, labels, n_bins, "top1", input, temperature=temperature, ignore_index=ignore_index,
                       nonfinite=nonfinite, backend=backend)
        return _debiased_interval(stats, norm, n_boot, tail, seed)
    conf, correct = kept_top1(as_logits(logits, input), labels, temperature, ignore_index, nonfinite, backend)
    _check_interval_rows(conf.shape[0])
    estimate = float(BinStats.from_confidences(conf, correct, n_bins).ece(norm))
    name = backends.resolve(backend, conf.device, conf.dtype)[0]
    values = _ece_from_sums(*custom_ops.bootstrap_stats(conf, correct, n_bins, n_boot, seed, name), norm)
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64, device=values.device))
    return ConfidenceInterval(estimate, float(low), float(high), "percentile")


SEED_MODULUS = 2 ** 32


def _interval_args(n_boot, confidence, seed, n_bins: int) -> tuple[int, float, int]:
    """Checked ``n_boot`` (≥ 2: an interval is a spread of resamples), the tail probability
    ``(1 − confidence) / 2``, and ``seed mod 2³²`` (any integer, Python or NumPy; every backend and NumPy's
    generator get the same value in [0, 2³²))."""
    n_boot = V.check_n_boot(n_boot, n_bins)
    if n_boot < 2:
        raise ValueError(f"n_boot must be ≥ 2: an interval needs the spread of at least two resamples, got {n_boot}")
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return n_boot, (1.0 - float(confidence)) / 2.0, V.check_int(seed, "seed") % SEED_MODULUS


def _check_interval_rows(n_rows: int) -> None:
    """An interval needs two kept rows: one row has no sampling spread to resample."""
    if n_rows == 0:
        raise ValueError("labels: every row is ignored, so the ECE has no confidence interval")
    if n_rows == 1:
        raise ValueError("labels: one row is kept, and an ECE confidence interval needs at least 2 (a single row "
                         "has no sampling spread)")


def _debiased_interval(stats: BinStats, norm: str, n_boot: int, tail: float, seed: int) -> ConfidenceInterval:
    counts = stats.counts.cpu().double()
    total = int(counts.sum())
    _check_interval_rows(total)
    accuracy = (stats.sum_correct.cpu() / counts.clamp_min(1)).numpy()
    confidence = (stats.sum_conf.cpu() / counts.clamp_min(1)).double()
    rng = np.random.default_rng(seed)
    boot_counts = rng.multinomial(total, (counts / total).numpy(), size=n_boot)
    boot_correct = torch.from_numpy(rng.binomial(boot_counts, accuracy).astype(np.float64))
    boot_counts = torch.from_numpy(boot_counts)
    sums = (stats.sum_conf.cpu().double(), stats.sum_correct.cpu().double())

    def squared_interval():  # the l2 error's square: its debiased estimate is unbiased and close to normal
        point = float(_debiased(counts, *sums, "l2"))
        spread = float(_debiased(boot_counts, boot_counts * confidence, boot_correct, "l2").std())
        z = NormalDist().inv_cdf(1.0 - tail)
        return point, max(0.0, point - z * spread), max(0.0, point + z * spread)

    squared, squared_low, squared_high = squared_interval()
    if norm == "l2":
        estimate, low, high = (math.sqrt(max(x, 0.0)) for x in (squared, squared_low, squared_high))
    else:  # the basic bootstrap interval of the debiased l1 estimate
        point = float(_debiased(counts, *sums, "l1"))
        replicates = _debiased(boot_counts, boot_counts * confidence, boot_correct, "l1").numpy()
        q_low, q_high = (float(q) for q in np.quantile(replicates, [tail, 1.0 - tail]))
        estimate, low, high = max(point, 0.0), max(0.0, 2 * point - q_high), max(0.0, 2 * point - q_low)
        if squared_low == 0.0:  # data consistent with an l2 error of 0: since ECE_l1 ≤ ECE_l2, the l1 error
            low, high = 0.0, max(high, math.sqrt(squared_high))  # lies in [0, the l2 interval's upper end]
    return ConfidenceInterval(estimate, min(low, estimate), max(high, estimate), "debiased")


def _proper_score(logits, labels, which: int, temperature, ignore_index, nonfinite, backend, input) -> torch.Tensor:
    """Σ over the kept finite rows of NLL (``which`` 0) or Brier (1), from the one-pass kernel, over their count."""
    logits = V.check_logits(as_logits(logits, input))
    out = metric_sums_tensors(logits, labels, 1, temperature=temperature, ignore_index=ignore_index,
                              nonfinite=nonfinite, backend=backend)
    return out[4][which] / out[0].sum().clamp_min(1).double()


def nll(logits, labels, *, temperature=1.0, ignore_index=-100, nonfinite="error", backend=None,
        input="logits") -> torch.Tensor:
    """Mean negative log-likelihood of the labels (docs/math.md#proper-scores)."""
    return _proper_score(logits, labels, 0, temperature, ignore_index, nonfinite, backend, input)


def brier(logits, labels, *, temperature=1.0, ignore_index=-100, nonfinite="error", backend=None,
          input="logits") -> torch.Tensor:
    """Mean multi-class Brier score ``Σ_j (p_j − 1[y = j])²`` (range [0, 2]; docs/math.md#proper-scores)."""
    return _proper_score(logits, labels, 1, temperature, ignore_index, nonfinite, backend, input)


class CalibrationMeter:
    """Streaming calibration metrics with O(M) state (O(K·M) with ``classwise=True``).

    ``update(logits, labels)`` adds a batch's bin statistics and NLL/Brier sums; ``compute()`` returns a
    dict of 0-dim tensors (ece, ece_debiased, ece_l2, mce, accuracy, mean_confidence, nll, brier, n, and
    cw_ece when classwise); ``all_reduce()`` sums the state over torch.distributed ranks; ``state_dict()`` /
    ``load_state_dict()`` save and restore it (plain tensors, the ones ``all_reduce`` sums). No host synchronisation.
    The state starts empty on ``device`` (and moves to the first batch's device), so a rank that saw no
    data still joins ``all_reduce``; with ``classwise=True`` that needs ``n_classes``. ``input``: what every
    batch holds (as for :func:`binned_stats`); the probability-lookalike warning checks the first batch only.
    """

    def __init__(self, n_bins=10, classwise=False, *, n_classes=None, temperature=1.0, ignore_index=-100,
                 nonfinite="error", backend=None, device=None, input="logits"):
        self.n_bins = V.check_n_bins(n_bins)
        self.input = V.check_choice(input, "input", ("logits", "probs", "log_probs"))
        self.classwise = bool(classwise)
        self.n_classes = None if n_classes is None else V.check_n_bins(n_classes, "n_classes")
        self.temperature = V.check_positive_float(temperature, "temperature")
        self.ignore_index = ignore_index
        self.nonfinite = V.check_choice(nonfinite, "nonfinite", V.NONFINITE_MODES)
        self.backend = backend
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.updated = False
        self.stats = BinStats.empty(self.n_bins, device=self.device)
        self.class_stats = None if not (self.classwise and self.n_classes) else BinStats.empty(
            self.n_bins, self.n_classes, device=self.device)
        self.sum_nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sum_brier = torch.zeros((), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, logits, labels) -> None:
        """Add one batch: validated once, then one kernel (``metric_sums``) reads each row once for its bin
        statistics, NLL and Brier sums and (classwise) class statistics. Every check runs and every batch
        statistic is computed before the state changes, so a rejected batch leaves the meter as it was."""
        logits = V.check_logits(as_logits(logits, self.input, warn=not self.updated), allow_empty=True)
        n_classes = logits.shape[1]
        expected = self.n_classes if self.class_stats is None else self.class_stats.counts.shape[0]
        if self.classwise and expected is not None and n_classes != expected:
            raise ValueError(f"logits has K = {n_classes} classes but this classwise meter holds {expected} "
                             "(n_classes, or the first batch's K)")
        counts, sum_conf, sum_correct, n_skipped, scores, *per_class = metric_sums_tensors(
            logits, labels, self.n_bins, classwise=self.classwise, temperature=self.temperature,
            ignore_index=self.ignore_index, nonfinite=self.nonfinite, backend=self.backend)
        device = counts.device
        self.stats = self.stats.to(device) + BinStats(counts, sum_conf, sum_correct, n_skipped)
        if self.classwise:
            batch_cw = BinStats(*per_class)
            self.class_stats = batch_cw if self.class_stats is None else self.class_stats.to(device) + batch_cw
        self.sum_nll = self.sum_nll.to(device) + scores[0]
        self.sum_brier = self.sum_brier.to(device) + scores[1]
        self.updated = True

    def compute(self) -> dict:
        if not self.updated:
            raise ValueError("CalibrationMeter.compute() called before any update() or all_reduce()")
        n = self.stats.counts.sum()
        denom = n.clamp_min(1).double()
        out = {
            "ece": self.stats.ece("l1"),
            "ece_debiased": self.stats.ece("l1", "debiased"),
            "ece_l2": self.stats.ece("l2"),
            "mce": self.stats.mce(),
            "accuracy": self.stats.accuracy(),
            "mean_confidence": self.stats.mean_confidence(),
            "nll": self.sum_nll / denom,
            "brier": self.sum_brier / denom,
            "n": n,
            "n_skipped": self.stats.n_skipped,
        }
        if self.classwise:
            out["cw_ece"] = self.class_stats.ece("l1")
        return out

    def _state_tensors(self) -> dict:
        tensors = {"counts": self.stats.counts, "sum_conf": self.stats.sum_conf, "sum_correct": self.stats.sum_correct,
                   "n_skipped": self.stats.n_skipped, "sum_nll": self.sum_nll, "sum_brier": self.sum_brier}
        if self.class_stats is not None:
            tensors.update({"class_counts": self.class_stats.counts, "class_sum_conf": self.class_stats.sum_conf,
                            "class_sum_correct": self.class_stats.sum_correct,
                            "class_n_skipped": self.class_stats.n_skipped})
        return tensors

    def _state_spec(self, n_classes: int | None) -> dict:
        """key → (dtype, shape) of the state, with class statistics of ``n_classes`` classes (None: none)."""
        bins = (self.n_bins,)
        spec = {"counts": (torch.int64, bins), "sum_conf": (torch.float64, bins), "sum_correct": (torch.float64, bins),
                "n_skipped": (torch.int64, ()), "sum_nll": (torch.float64, ()), "sum_brier": (torch.float64, ())}
        if n_classes is not None:
            cells = (n_classes, self.n_bins)
            spec.update({"class_counts": (torch.int64, cells), "class_sum_conf": (torch.float64, cells),
                         "class_sum_correct": (torch.float64, cells), "class_n_skipped": (torch.int64, ())})
        return spec

    def state_dict(self) -> dict:
        """The meter's state as plain tensors (copies), the ones ``all_reduce`` sums: ``counts`` (int64 [M]),
        ``sum_conf``, ``sum_correct`` (float64 [M]), ``n_skipped`` (int64), ``sum_nll``, ``sum_brier`` (float64),
        and, once a classwise meter holds class statistics (``n_classes`` given or a batch seen),
        ``class_counts``, ``class_sum_conf``, ``class_sum_correct`` ([K, M]) and ``class_n_skipped``. Additive:
        the key-wise sum of two meters' states is the state of one meter that saw the batches of both.
        ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it. The constructor's arguments
        (temperature, ignore_index, nonfinite, backend) are not state: a meter is rebuilt with them."""
        return {key: tensor.detach().clone() for key, tensor in self._state_tensors().items()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state by ``state`` (a ``state_dict()``, possibly summed over meters or ranks), copied onto
        this meter's device; ``compute()`` then reports it (a classwise one once it holds class statistics). Its
        keys, dtypes and shapes must be those of this meter's ``n_bins``, ``classwise`` and class count
        (``n_classes``, or that of the batches seen), else a ``ValueError`` names the key and the meter is
        unchanged."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors (a state_dict()), got {type(state).__name__}")
        n_classes = None
        if self.classwise:
            n_classes = self.n_classes if self.class_stats is None else self.class_stats.counts.shape[0]
            loaded = state.get("class_counts")
            if n_classes is None and isinstance(loaded, torch.Tensor) and loaded.dim() == 2:
                n_classes = loaded.shape[0]
        spec = self._state_spec(n_classes)
        missing, unexpected = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
        if missing or unexpected:
            raise ValueError(f"state does not fit this meter (n_bins={self.n_bins}, classwise={self.classwise}, "
                             f"classes={n_classes}): missing keys {missing}, unexpected keys {unexpected}")
        for key, (dtype, shape) in spec.items():
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or (tensor.dtype, tuple(tensor.shape)) != (dtype, shape):
                got = (f"{tensor.dtype} of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                       else type(tensor).__name__)
                raise ValueError(f"state[{key!r}] must be {dtype} of shape {shape} for this meter (n_bins="
                                 f"{self.n_bins}, classes={n_classes}), got {got}")
        value = {key: state[key].detach().to(self.stats.counts.device, copy=True) for key in spec}
        self.stats = BinStats(value["counts"], value["sum_conf"], value["sum_correct"], value["n_skipped"])
        self.sum_nll, self.sum_brier = value["sum_nll"], value["sum_brier"]
        self.class_stats = None if n_classes is None else BinStats(
            value["class_counts"], value["class_sum_conf"], value["class_sum_correct"], value["class_n_skipped"])
        self.updated = not self.classwise or self.class_stats is not None  # cw_ece needs class statistics

    def all_reduce(self, group=None) -> "CalibrationMeter":
        import torch.distributed as dist

        if self.classwise and self.class_stats is None:
            raise ValueError("CalibrationMeter.all_reduce(): a classwise meter that saw no data needs n_classes "
                             "at construction to take part in the all-reduce")
        if dist.is_available() and dist.is_initialized():
            for tensor in self._state_tensors().values():  # the state_dict() tensors
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.updated = True
        return self
