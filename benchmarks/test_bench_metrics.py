"""pytest-benchmark microbenchmarks of the metrics (`pytest benchmarks/ --benchmark-only`), at sizes smaller
than benchmarks/run_benchmarks.py's: each calibkern CPU backend against torchmetrics (softmax included)."""

from __future__ import annotations

import pytest
import torch

import calibkern

torchmetrics_classification = pytest.importorskip("torchmetrics.classification")

N_BINS = 10
CPU_BACKENDS = [name for name in calibkern.available_backends() if name != "triton"]
SHAPES = {"vocab": (256, 32000), "options": (100_000, 4)}


def _inputs(n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=generator) * 3.0, torch.randint(k, (n,), generator=generator)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ece_calibkern(benchmark, shape, backend):
    benchmark.group = f"ece {shape} {SHAPES[shape]}"
    logits, labels = _inputs(*SHAPES[shape])
    benchmark(lambda: calibkern.ece(logits, labels, n_bins=N_BINS, backend=backend))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_ece_torchmetrics(benchmark, shape):
    benchmark.group = f"ece {shape} {SHAPES[shape]}"
    n, k = SHAPES[shape]
    logits, labels = _inputs(n, k)
    metric = torchmetrics_classification.MulticlassCalibrationError(num_classes=k, n_bins=N_BINS, norm="l1")

    def run():
        metric.reset()
        metric.update(logits, labels)
        return metric.compute()

    benchmark(run)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meter_update_calibkern(benchmark, backend):
    benchmark.group = "streaming update, 100000 x 4"
    logits, labels = _inputs(*SHAPES["options"])
    meter = calibkern.CalibrationMeter(n_bins=N_BINS, backend=backend)
    benchmark(meter.update, logits, labels)


def test_meter_update_torchmetrics(benchmark):
    benchmark.group = "streaming update, 100000 x 4"
    logits, labels = _inputs(*SHAPES["options"])
    metric = torchmetrics_classification.MulticlassCalibrationError(num_classes=4, n_bins=N_BINS, norm="l1")
    benchmark(metric.update, logits, labels)
