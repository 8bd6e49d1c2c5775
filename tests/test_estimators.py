"""Calibration numbers that tell the truth: the debiased ECE against a simulated population, and the coverage
of the default interval for calibrated and miscalibrated predictors (docs/math.md#intervals).

Predictors are simulated with a known probability of being right, ``q``: "calibrated" draws each label from
the model's own softmax (``q = c``), "overconfident" from the softmax at temperature 2. The population's
binned calibration error is computed from a large sample with ``q`` itself (no Bernoulli noise).
"""

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

import calibkern as ck

# the simulated predictors of the documented tables (benchmarks/estimator_simulation.py)
_SPEC = importlib.util.spec_from_file_location(
    "estimator_simulation", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                         "estimator_simulation.py"))
simulation = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(simulation)
sample, population_ece = simulation.sample, simulation.population

M = 10
BACKENDS = ck.available_backends()


@pytest.mark.parametrize("kind", ["calibrated", "overconfident"])
def test_debiased_ece_is_closer_to_the_truth(kind):
    g = torch.Generator().manual_seed(1)
    plugin, debiased, squared = [], [], []
    for _ in range(150):
        logits, labels, _ = sample(1000, 4, kind, g)
        stats = ck.binned_stats(logits, labels, M, backend="torch")
        plugin.append(float(stats.ece("l1")))
        debiased.append(float(stats.ece("l1", "debiased")))
        squared.append(float(ck.metrics._debiased(stats.counts, stats.sum_conf, stats.sum_correct, "l2")))
    truth_l1, truth_l2 = population_ece(4, kind, "l1"), population_ece(4, kind, "l2")
    bias_plugin = sum(plugin) / len(plugin) - truth_l1
    bias_debiased = sum(debiased) / len(debiased) - truth_l1
    assert abs(bias_debiased) < abs(bias_plugin) or abs(bias_debiased) < 0.002
    # the squared l2 estimate is unbiased: its mean lies within 3 standard errors of the truth
    mean = sum(squared) / len(squared)
    se = math.sqrt(sum((x - mean) ** 2 for x in squared) / (len(squared) - 1) / len(squared))
    assert abs(mean - truth_l2 ** 2) < 3 * se + 1e-4


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("kind", ["calibrated", "overconfident"])
def test_default_interval_covers_the_population_ece(kind, norm):
    """Nominal 95 %; ≥ 90 % in the full simulation of the docs. 80 repetitions here, so the bound leaves
    room for the simulation's own noise (a standard error of about 0.025)."""
    truth = population_ece(4, kind, norm)
    g = torch.Generator().manual_seed(2)
    covered = 0
    repetitions = 80
    for rep in range(repetitions):
        logits, labels, _ = sample(2000, 4, kind, g)
        interval = ck.ece_confidence_interval(logits, labels, M, norm, n_boot=300, seed=rep)
        assert interval.method == "debiased" and interval.low <= interval.estimate <= interval.high
        covered += interval.low <= truth <= interval.high
    assert covered / repetitions >= 0.85


def test_percentile_interval_misses_a_calibrated_truth():
    """What the default replaces: around a calibrated predictor the plug-in's bias lifts the percentile
    interval above the truth (0)."""
    g = torch.Generator().manual_seed(3)
    misses = 0
    for rep in range(20):
        logits, labels, _ = sample(2000, 4, "calibrated", g)
        misses += ck.ece_confidence_interval(logits, labels, M, n_boot=200, seed=rep, method="percentile").low > 0
    assert misses >= 18


@pytest.mark.parametrize("backend", BACKENDS)
def test_debiased_estimates_agree_across_backends(backend):
    logits, labels, _ = sample(3000, 5, "overconfident", torch.Generator().manual_seed(4))
    for norm in ("l1", "l2"):
        got = ck.ece(logits, labels, M, norm, estimator="debiased", backend=backend)
        want = ck.ece(logits, labels, M, norm, estimator="debiased", backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    interval = ck.ece_confidence_interval(logits, labels, M, seed=7, backend=backend)
    reference = ck.ece_confidence_interval(logits, labels, M, seed=7, backend="torch")
    assert interval.estimate == pytest.approx(reference.estimate, rel=1e-5)
    assert interval.low == pytest.approx(reference.low, rel=1e-4, abs=1e-6)
    cw = ck.classwise_ece(logits, labels, M, estimator="debiased", backend=backend)
    assert 0 <= float(cw) < float(ck.classwise_ece(logits, labels, M, backend=backend))


def test_brier_decomposition_from_bins():
    logits, labels, _ = sample(5000, 4, "overconfident", torch.Generator().manual_seed(5))
    stats = ck.binned_stats(logits, labels, 100, backend="torch")
    parts = stats.brier_decomposition()
    p = torch.softmax(logits.double(), dim=1)
    c, correct = p.amax(1), (p.argmax(1) == labels).double()
    top1_brier = float(((c - correct) ** 2).mean())
    # exact up to the spread of the confidences inside their bins (small with 100 bins)
    recomposed = float(parts["reliability"] - parts["resolution"] + parts["uncertainty"])
    assert recomposed == pytest.approx(top1_brier, abs=2e-3)
    assert float(parts["uncertainty"]) == pytest.approx(float(correct.mean() * (1 - correct.mean())), abs=1e-12)


def test_estimator_arguments_are_checked():
    logits, labels = torch.randn(20, 4), torch.randint(0, 4, (20,))
    with pytest.raises(ValueError, match="estimator"):
        ck.ece(logits, labels, estimator="unbiased")
    with pytest.raises(ValueError, match="'max'"):
        ck.ece(logits, labels, norm="max", estimator="debiased")
    with pytest.raises(ValueError, match="method"):
        ck.ece_confidence_interval(logits, labels, method="bca")
    with pytest.raises(ValueError, match="every row is ignored"):
        ck.ece_confidence_interval(logits, torch.full((20,), -100))


def test_interval_from_streamed_statistics_equals_the_one_from_the_logits():
    """``BinStats.confidence_interval`` on a meter's statistics: the default interval without a second read."""
    logits, labels = torch.randn(3000, 5) * 2.5, torch.randint(0, 5, (3000,))
    labels[::7] = -100
    meter = ck.CalibrationMeter(M)
    for start in range(0, 3000, 700):
        meter.update(logits[start:start + 700], labels[start:start + 700])
    for norm in ("l1", "l2"):
        assert meter.stats.confidence_interval(norm, n_boot=300, seed=4) == ck.ece_confidence_interval(
            logits, labels, M, norm, n_boot=300, seed=4)
    with pytest.raises(ValueError, match="norm"):
        meter.stats.confidence_interval("max")
    with pytest.raises(ValueError, match="confidence"):
        meter.stats.confidence_interval(confidence=1.5)
    with pytest.raises(ValueError, match="top-1"):
        ck.binned_stats(logits, labels, M, mode="classwise").confidence_interval()


SEEDS_OUTSIDE_UINT32 = [-1, 2 ** 64 + 5, np.uint64(2 ** 63 + 1), np.int32(-7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["debiased", "percentile"])
def test_any_integer_seed_gives_the_interval_of_its_residue_mod_2_32(backend, method):
    """docs/math.md#intervals: only ``seed mod 2³²`` matters, on every backend, for Python and NumPy integers
    (negative and ≥ 2⁶³ ones included)."""
    g = torch.Generator().manual_seed(8)
    logits, labels = torch.randn(64, 4, generator=g) * 2, torch.randint(0, 4, (64,), generator=g)

    def interval(seed, on=backend):
        return ck.ece_confidence_interval(logits, labels, M, n_boot=12, seed=seed, method=method, backend=on)

    assert interval(-1) == interval(2 ** 32 - 1)
    for seed in SEEDS_OUTSIDE_UINT32:
        got, want = interval(seed), interval(int(seed) % 2 ** 32, "torch")
        assert got.estimate == pytest.approx(want.estimate, rel=1e-5)
        assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-4, abs=1e-6)
    with pytest.raises(TypeError, match="seed"):
        interval(1.0)


@pytest.mark.parametrize("method", ["debiased", "percentile"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_interval_bounds_are_python_floats(method, norm):
    logits, labels = torch.randn(200, 3) * 2, torch.randint(0, 3, (200,))
    interval = ck.ece_confidence_interval(logits, labels, M, norm, n_boot=50, method=method)
    assert [type(x) for x in interval[:3]] == [float, float, float]
    assert interval.low <= interval.estimate <= interval.high


@pytest.mark.parametrize("method", ["debiased", "percentile"])
def test_degenerate_intervals_are_refused(method):
    """One resample has no spread (the l2 interval's sd was NaN), nor has one row (a zero-width "95 %")."""
    logits, labels = torch.randn(200, 3) * 2, torch.randint(0, 3, (200,))
    with pytest.raises(ValueError, match="n_boot must be ≥ 2"):
        ck.ece_confidence_interval(logits, labels, M, "l2", n_boot=1, method=method)
    one_kept = torch.full((200,), -100)
    one_kept[17] = 1
    for rows, rows_labels in ((logits[:1], labels[:1]), (logits, one_kept)):
        with pytest.raises(ValueError, match="at least 2"):
            ck.ece_confidence_interval(rows, rows_labels, M, method=method)
    meter = ck.CalibrationMeter(M)
    meter.update(logits[:1], labels[:1])
    with pytest.raises(ValueError, match="at least 2"):
        meter.stats.confidence_interval()
    with pytest.raises(ValueError, match="n_boot"):
        ck.binned_stats(logits, labels, M).confidence_interval(n_boot=1)


def test_one_bin_of_all_correct_rows_gives_the_documented_point_interval():
    """docs/math.md#intervals: the parametric bootstrap cannot vary a single bin whose rows are all right, so the
    default interval is the point ``[d, d]``."""
    logits = torch.tensor([[4.0, 0.0, 0.0]]).repeat(50, 1)
    interval = ck.ece_confidence_interval(logits, torch.zeros(50, dtype=torch.long), M, n_boot=100)
    gap = 1 - float(torch.softmax(logits[0], 0)[0])
    assert interval.low == interval.estimate == interval.high == pytest.approx(gap)
