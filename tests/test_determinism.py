"""Deterministic mode (docs/backends.md): with ``calibkern.set_deterministic(True)`` or
``torch.use_deterministic_algorithms(True)``, statistics, losses and gradients are bitwise identical across
runs and across thread counts (1 and 2), on every backend that runs on CPU tensors here (``cpp`` once its
extension is built; ``triton`` under ``TRITON_INTERPRET=1``).
"""

import contextlib

import numpy as np
import pytest
import torch

import calibkern as ck

from helpers import random_labels, random_logits
from helpers import M, outputs

# Large enough that the CPU kernels split rows (and the reference's reductions) over threads; the Triton
# interpreter runs every program in Python, so it gets small shapes.
SHAPES = {"triton": [(200, 4), (16, 300)]}
DEFAULT_SHAPES = [(8192, 4), (64, 1000)]


def cpu_backends():
    return [name for name in ck.available_backends()
            if name != "triton" or not torch.cuda.is_available()]


@contextlib.contextmanager
def deterministic(switch: str):
    if switch == "calibkern":
        ck.set_deterministic(True)
    else:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        ck.set_deterministic(False)
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("switch", ["calibkern", "torch"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_bitwise_identical_across_runs_and_thread_counts(backend, switch):
    shapes = SHAPES.get(backend, DEFAULT_SHAPES)
    if switch == "torch":  # the same code path as set_deterministic: one shape shows the switch is honoured
        shapes = shapes[:1]
    for n, k in shapes:
        logits = random_logits(n, k, scale=3.0, seed=n + k)
        labels = random_labels(n, k, ignore_frac=0.1, seed=k)
        runs = []
        with deterministic(switch):
            assert ck.is_deterministic()
            for threads in (1, 2, 2):
                with num_threads(threads):
                    runs.append(outputs(logits, labels, backend))
        first = runs[0]
        assert all(torch.isfinite(t.double()).all() for t in first.values())
        for run in runs[1:]:
            for name, value in first.items():
                assert value.dtype == run[name].dtype and torch.equal(value, run[name]), \
                    f"{name} differs (N={n}, K={k})"


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_linear_loss_is_bitwise_reproducible(backend):
    """The fused linear loss (chunked matrix products + the backend's cross-entropy) repeats exactly."""
    n_tokens, d, vocab = (24, 16, 64) if backend == "triton" else (512, 32, 500)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n_tokens, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.2
    labels = torch.randint(0, vocab, (n_tokens,), generator=g)
    option_ids = torch.tensor([7, 8, 9, 10])
    labels[::3] = option_ids[torch.randint(0, 4, (len(labels[::3]),), generator=g)]
    labels[1::5] = -100

    def run():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = ck.fused_linear_calibration_loss(h, w, labels, option_ids=option_ids,
                                               bin_accuracy=torch.linspace(0.05, 0.95, M), chunk_size=64,
                                               backend=backend)
        out.loss.backward()
        return [out.loss.detach(), out.sft_loss.detach(), out.cal_loss.detach(), h.grad, w.grad,
                out.bin_stats.counts, out.bin_stats.sum_conf]

    with deterministic("calibkern"):
        first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"output {i} differs between runs"


# The ECE family's last reductions run in Python on the bin statistics: torch.sum splits one reduction of
# ≥ 32768 elements (bins, or classes of classwise_ece) between threads. (N, K, M) per backend.
METRIC_SHAPES = {"triton": [(64, 5, M)]}
DEFAULT_METRIC_SHAPES = [(8, 40000, M), (512, 3, 40000)]
NORMS_AND_ESTIMATORS = (("l1", "plugin"), ("l2", "plugin"), ("max", "plugin"), ("l1", "debiased"), ("l2", "debiased"))


def metric_values(logits, labels, n_bins, backend):
    """The ECE family (``ece``, ``classwise_ece``: ``binned_stats`` then ``BinStats.ece``) in every norm and
    estimator, the mean confidence, the Brier decomposition, NLL and Brier."""
    values = {"nll": ck.nll(logits, labels, backend=backend), "brier": ck.brier(logits, labels, backend=backend)}
    for mode, norms_and_estimators in (("classwise", NORMS_AND_ESTIMATORS[:4]), ("top1", NORMS_AND_ESTIMATORS)):
        stats = ck.binned_stats(logits, labels, n_bins, mode=mode, backend=backend)
        values.update({f"{mode}.{norm}.{estimator}": stats.ece(norm, estimator)
                       for norm, estimator in norms_and_estimators})
    values["mean_confidence"] = stats.mean_confidence()
    values.update({f"brier_decomposition.{part}": v for part, v in stats.brier_decomposition().items()})
    return values


@pytest.mark.parametrize("backend", cpu_backends())
def test_metric_values_are_bitwise_identical_at_1_and_2_threads(backend):
    """docs/reliability.md#determinism: every ECE-family value, the classwise mean over classes included."""
    for n, k, n_bins in METRIC_SHAPES.get(backend, DEFAULT_METRIC_SHAPES):
        logits, labels = random_logits(n, k, seed=n + k), random_labels(n, k, ignore_frac=0.1, seed=k)
        runs = []
        for threads in (1, 2):
            with num_threads(threads):
                runs.append(metric_values(logits, labels, n_bins, backend))
        for name, value in runs[0].items():
            assert torch.equal(value, runs[1][name]), f"{name} differs (N={n}, K={k}, M={n_bins})"


def test_classwise_mean_is_summed_in_class_order():
    """The mean over classes is a sequential float64 sum in class order, not a threaded reduction."""
    k = 40000
    stats = ck.binned_stats(random_logits(8, k, seed=3), random_labels(8, k, seed=4), M, mode="classwise",
                            backend="torch")
    gaps = (stats.sum_conf - stats.sum_correct).abs().numpy()
    per_class = np.cumsum(gaps, axis=1)[:, -1] / np.maximum(stats.counts.sum(1).numpy(), 1)
    total = 0.0
    for value in per_class.tolist():
        total += value
    assert float(stats.ece()) == total / k


def test_reference_row_scores_are_summed_in_row_order():
    """The reference's Σ NLL and Σ Brier are sequential float64 sums in row order (over a million rows torch.sum
    splits the reduction between threads, which moved Brier's last bit between 1 and 2 threads)."""
    from calibkern.reference.row_metrics import proper_scores

    logits, labels = random_logits(1_000_003, 4, seed=3), random_labels(1_000_003, 4, ignore_frac=0.1, seed=4)
    nll, brier = proper_scores(logits, labels, 1.0, -100)
    n_kept = int(labels.ne(-100).sum())
    for metric, rows in ((ck.nll, nll), (ck.brier, brier)):
        value = metric(logits, labels, backend="torch")
        assert float(value) == float(np.cumsum(rows.double().numpy())[-1]) / n_kept
