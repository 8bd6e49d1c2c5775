"""The public differentiable ops under ``torch.compile(fullgraph=True)``: one training step that calls
``calibration_loss`` and ``em_regularizer`` (both forms) traces without graph breaks through the
``torch.ops.calibkern`` custom ops, and its loss, gradients and accumulated E-step statistics equal eager.

Backend ``aot_eager`` (the autograd graph without code generation) keeps this fast on CPU.
"""

import importlib

import pytest
import torch

import calibkern
from calibkern import backends
from helpers import random_labels, random_logits

# the CPU backends; the triton custom ops under torch.compile: tests/test_triton_backend.py
BACKENDS = [name for name in calibkern.available_backends() if name != "triton"]
IGNORE = -100
K, D, M = 4, 8, 5
ACC = torch.linspace(0.1, 0.9, M)


def batch(n, seed):
    hidden = random_logits(n, D, scale=1.0, seed=seed)
    labels = random_labels(n, K, ignore_frac=0.2, seed=seed + 1)
    return hidden, labels


def training_step(weight, hidden, labels, state, backend):
    """A linear head's option logits, the hard-bin term and both EM forms (the ``ece`` form accumulates)."""
    z = hidden @ weight
    hard = calibkern.calibration_loss(z, labels, ACC, n_bins=M, backend=backend)
    target = calibkern.em_regularizer(z, labels, state, backend=backend)
    ece = calibkern.em_regularizer(z, labels, state, form="ece", rho="smooth_abs", accumulate=True, backend=backend)
    return hard + target + ece


def run(step, weight, hidden, labels, backend):
    state = calibkern.EMState(M)
    w = weight.clone().requires_grad_()
    loss = step(w, hidden, labels, state, backend)
    loss.backward()
    return loss.detach(), w.grad, state.accum


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_compiles_without_graph_breaks_and_equals_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(training_step, fullgraph=True, backend="aot_eager")
    weight = random_logits(D, K, scale=0.5, seed=0)
    for n, seed in ((16, 1), (24, 3)):  # a second batch size: the recompiled (dynamic-shape) graph as well
        hidden, labels = batch(n, seed)
        got = run(compiled, weight, hidden, labels, backend)
        want = run(training_step, weight, hidden, labels, backend)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_compiled_value_checks_raise_from_the_assertion():
    """Compiled code checks values with ``torch._assert_async``: a RuntimeError naming the problem (here with
    the default backend, so the backend selection is traced as well)."""
    torch._dynamo.reset()
    compiled = torch.compile(training_step, fullgraph=True, backend="aot_eager")
    weight = random_logits(D, K, scale=0.5, seed=0)
    hidden, labels = batch(16, 1)
    run(compiled, weight, hidden, labels, None)
    hidden[2, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        run(compiled, weight, hidden, labels, None)
    with pytest.raises(ValueError, match="NaN or infinite"):  # eager keeps its ValueError
        run(training_step, weight, hidden, labels, None)


def test_importing_the_ops_loads_every_backend_module(monkeypatch):
    """torch.compile cannot trace the import of a backend module: a compiled step may be the first call only
    because importing calibkern.ops already loaded them all."""
    monkeypatch.setattr(backends, "_probe_cache", {})
    importlib.reload(calibkern.ops)
    assert set(backends._probe_cache) == set(backends.BACKENDS)
