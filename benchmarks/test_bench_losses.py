"""pytest-benchmark microbenchmarks of the losses, forward + backward (`pytest benchmarks/ --benchmark-only`),
at sizes smaller than benchmarks/run_benchmarks.py's; plus the check that the reference-style baseline
computes the same value as ``calibration_loss(official_compat=True)`` (run by `pytest benchmarks/`)."""

from __future__ import annotations

import pytest
import torch

import calibkern
from reference_style import reference_style_calibration_loss

N, K, M = 8192, 4, 10
CPU_BACKENDS = [name for name in calibkern.available_backends() if name != "triton"]


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, generator=generator) * 2.0
    labels = torch.randint(K, (N,), generator=generator)
    bin_accuracy = torch.linspace(0.2, 0.95, M)
    bin_counts = torch.randint(1, 1000, (M,), generator=generator).double()
    return logits, labels, bin_accuracy, bin_counts


def _forward_backward(loss_fn, logits):
    leaf = logits.clone().requires_grad_()
    loss_fn(leaf).backward()
    return leaf.grad


def test_reference_style_matches_official_compat():
    logits, labels, bin_accuracy, bin_counts = _inputs()
    expected = _forward_backward(lambda z: calibkern.calibration_loss(
        z, labels, bin_accuracy, n_bins=M, bin_counts=bin_counts, official_compat=True), logits)
    got = _forward_backward(lambda z: reference_style_calibration_loss(z, bin_accuracy, bin_counts, M), logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        reference_style_calibration_loss(logits, bin_accuracy, bin_counts, M),
        calibkern.calibration_loss(logits, labels, bin_accuracy, n_bins=M, bin_counts=bin_counts,
                                   official_compat=True), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_calibration_loss_calibkern(benchmark, backend):
    benchmark.group = f"calibration_loss fwd+bwd {N}x{K}"
    logits, labels, bin_accuracy, _ = _inputs()
    benchmark(_forward_backward, lambda z: calibkern.calibration_loss(z, labels, bin_accuracy, n_bins=M,
                                                                      backend=backend), logits)


def test_calibration_loss_reference_style(benchmark):
    benchmark.group = f"calibration_loss fwd+bwd {N}x{K}"
    logits, _, bin_accuracy, bin_counts = _inputs()
    benchmark(_forward_backward, lambda z: reference_style_calibration_loss(z, bin_accuracy, bin_counts, M), logits)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_em_regularizer(benchmark, backend):
    benchmark.group = f"em_regularizer fwd+bwd {N}x{K}"
    logits, labels, _, _ = _inputs()
    state = calibkern.EMState(n_components=M)
    benchmark(_forward_backward, lambda z: calibkern.em_regularizer(z, labels, state, backend=backend), logits)


@pytest.mark.parametrize("step", ["fused", "eager"])
def test_fused_linear_loss(benchmark, step):
    bench_fused_linear = pytest.importorskip("bench_fused_linear")
    benchmark.group = "fused linear loss fwd+bwd, N_tok=256 D=128 V=8000"
    hidden, weight, labels = bench_fused_linear.make_inputs(256, 128, 8000, supervised_every=1)

    def run():
        hidden.grad = weight.grad = None
        bench_fused_linear.STEPS[step](hidden, weight, labels)

    benchmark(run)
