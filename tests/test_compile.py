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


# ------------------------------------------------------------------------------ the fused linear loss

FORMS = {None: {}, "hard_bin": {"bin_accuracy": torch.linspace(0.1, 0.9, 10)}, "em": {"em_state": None}}


def fused_inputs():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 48, 16, generator=g), torch.randn(101, 16, generator=g) * 0.3
    bias = torch.randn(101, generator=g) * 0.1
    labels = torch.randint(0, 101, (2, 48), generator=g)
    labels[:, ::3] = IGNORE
    labels[:, 5], labels[:, 20] = 7, 3  # answers among option_ids
    return hidden, weight, bias, labels


def fused_step(calibration, backend, labels):
    extra = {k: (calibkern.EMState() if k == "em_state" else v) for k, v in FORMS[calibration].items()}

    def step(hidden, weight, bias):
        return calibkern.fused_linear_calibration_loss(hidden, weight, labels, bias=bias, option_ids=[3, 5, 7, 9],
                                                       calibration=calibration, backend=backend, **extra).loss
    return step


def loss_and_grads(step, hidden, weight, bias):
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = step(*inputs)
    loss.backward()
    return (loss.detach(), *(x.grad for x in inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("calibration", list(FORMS), ids=str)
def test_fused_loss_has_no_graph_break(backend, calibration):
    hidden, weight, bias, labels = fused_inputs()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fused_step(calibration, backend, labels))(hidden, weight, bias)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("calibration", list(FORMS), ids=str)
def test_fused_loss_compiles_fullgraph_and_equals_eager(backend, calibration):
    """Under compile every position is a row (static shapes; the unsupervised ones are ignored by the kernel),
    so float32 sums run in another order: equal to eager to 1e-5."""
    hidden, weight, bias, labels = fused_inputs()
    torch._dynamo.reset()
    step = fused_step(calibration, backend, labels)
    got = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"), hidden, weight, bias)
    want = loss_and_grads(step, hidden, weight, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fused_loss_compiles_with_inductor():
    hidden, weight, bias, labels = fused_inputs()
    torch._dynamo.reset()
    step = fused_step("em", BACKENDS[-1], labels)
    got = loss_and_grads(torch.compile(step, fullgraph=True), hidden, weight, bias)
    want = loss_and_grads(step, hidden, weight, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["cft", "rcft"])
def test_trainer_with_torch_compile_equals_eager(method, tmp_path):
    """TrainingArguments(torch_compile=True): the decoder pass is compiled (the fused loss runs on its output)
    and the logged losses equal the eager trainer's."""
    pytest.importorskip("transformers")
    from torch._dynamo.utils import counters
    from transformers import TrainingArguments

    from calibkern.hf import CalibrationConfig, CalibrationTrainer, build_sft_dataset, detect_option_ids
    from hf_tiny import make_examples, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    dataset = build_sft_dataset(tokenizer, make_examples(16), option_ids,
                                supervise="completion" if method == "cft" else "full")
    config = CalibrationConfig(method=method, option_ids=option_ids,
                               **({"bin_accuracy": [0.4] * 10} if method == "cft" else {"em": {"refresh": "stream"}}))
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        args = TrainingArguments(output_dir=str(tmp_path / str(compiled)), per_device_train_batch_size=8,
                                 learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                                 seed=0, torch_compile=compiled, torch_compile_backend="aot_eager")
        trainer = CalibrationTrainer(make_model(tokenizer), args, dataset, calibration=config)
        trainer.train()
        losses[compiled] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if compiled:
            assert counters["stats"]["unique_graphs"] >= 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
