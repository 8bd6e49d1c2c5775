"""Regression tests for inputs that once gave a wrong number without a word, or a raw error where a clear one
belongs: non-finite logits in the fused loss, EM priors and loaded states, a rejected meter update, Brier on
confident rows, ``num_items_in_batch`` tensors, gradients edited in place, data files and small API edges."""

import math

import numpy as np
import pytest
import torch

import calibkern as ck
from calibkern import backends, hf

BACKENDS = ck.available_backends()


def diverged_head(seed=0):
    """The fused loss's inputs with one NaN in a weight row that is neither a label nor an option."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (2, 5), generator=g)
    labels[:, -1] = 5
    weight[0, 0] = float("nan")
    return hidden, weight, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weight_row_gives_a_nan_loss_on_every_backend(backend):
    hidden, weight, labels = diverged_head()
    out = ck.fused_linear_calibration_loss(hidden, weight, labels, option_ids=[3, 5, 7, 9], calibration=None,
                                           backend=backend)
    assert math.isnan(out.sft_loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_kernel_at_the_largest_finite_logits(backend, smoothing):
    """A row of ±(float32 max)/2: Σ (z − max) overflows float32, which once made the label-smoothing term
    0 · (−inf) = NaN even with no smoothing; the kernels sum (z − max)/V instead."""
    big = torch.finfo(torch.float32).max / 2
    logits = torch.full((2, 40), -big)
    logits[:, 39] = big
    targets = torch.tensor([39, 0])
    want = backends.get_module("torch").cross_entropy_(logits.double(), targets, -100, smoothing)
    loss = backends.get_module(backend).cross_entropy_(logits, targets, -100, smoothing)
    assert torch.isfinite(loss).all() and torch.isfinite(logits).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cross_entropy_kernel_contract_for_nonfinite_rows(backend, bad):
    module = backends.get_module(backend)
    logits = torch.tensor([[0.0, bad, 1.0], [0.0, 2.0, 1.0], [bad, 0.0, 0.0]])
    loss = module.cross_entropy_(logits, torch.tensor([0, 1, -100]), -100)
    assert math.isnan(loss[0]) and torch.isnan(logits[0]).all()
    assert math.isfinite(loss[1]) and torch.isfinite(logits[1]).all()
    assert loss[2] == 0 and (logits[2] == 0).all()  # ignored rows: 0, whatever they hold


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_an_option_row_makes_the_calibration_term_nan(backend):
    hidden, weight, labels = diverged_head()
    weight[0, 0] = 0.0
    weight[5, 0] = float("nan")  # an option row: the answer positions' option logits are NaN
    out = ck.fused_linear_calibration_loss(hidden, weight, labels, option_ids=[3, 5, 7, 9], calibration="em",
                                           em_state=ck.EMState(), backend=backend)
    assert math.isnan(out.cal_loss.item()) and math.isnan(out.loss.item())
    answers = torch.isin(labels[:, 1:], torch.tensor([3, 5, 7, 9])).sum()
    assert out.bin_stats.n_skipped == answers and out.bin_stats.counts.sum() == 0


@pytest.mark.parametrize("prior", [(0, 0), (float("nan"), 1), (1, float("inf")), (-1, 2)])
def test_em_prior_must_define_theta(prior):
    with pytest.raises(ValueError, match="prior"):
        ck.EMState(prior=prior)
    with pytest.raises(ValueError, match="prior"):
        hf.CalibrationConfig(method="rcft", option_ids=[1, 2], em={"prior": prior})


@pytest.mark.parametrize("prior", ["ab", 3, (1, "x")])
def test_em_prior_of_the_wrong_kind(prior):
    with pytest.raises(TypeError, match="prior"):
        ck.EMState(prior=prior)


def test_em_config_names_unknown_options():
    with pytest.raises(ValueError, match="unknown option"):
        hf.CalibrationConfig(method="rcft", option_ids=[1, 2], em={"priors": (1, 1)})


@pytest.mark.parametrize("name, value", [("sigma", 0.0), ("pi", float("nan")), ("theta", 1.5), ("mu", -0.1),
                                         ("running", float("inf"))])
def test_em_load_state_dict_checks_values_before_setting_any(name, value):
    state = ck.EMState(n_components=4)
    before = state.state_dict()
    entries = state.state_dict()
    entries[name] = torch.full_like(entries[name], value)
    with pytest.raises(ValueError, match=repr(name)):
        state.load_state_dict(entries)
    for key, tensor in state.state_dict().items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_meter_update_leaves_the_meter_unchanged(backend):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=g) * 3, torch.randint(0, 4, (50,), generator=g)
    meter = ck.CalibrationMeter(10, classwise=True, backend=backend)
    meter.update(logits, labels)
    before = {k: v.clone() for k, v in meter.compute().items()}
    with pytest.raises(ValueError, match="classes"):
        meter.update(torch.randn(50, 5, generator=g), torch.randint(0, 5, (50,), generator=g))
    after = meter.compute()
    assert after["n"].item() == 50
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert torch.allclose(after["ece"], ck.ece(logits, labels, backend=backend))


@pytest.mark.parametrize("gap", [10.0, 8.0, 20.0, 3.0])
def test_brier_keeps_relative_precision_on_confident_rows(gap):
    logits = torch.tensor([[gap, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), dim=1)[0]
    truth = float((1 - p[0]) ** 2 + (p[1:] ** 2).sum())
    assert ck.brier(logits, torch.tensor([0])).item() == pytest.approx(truth, rel=1e-5)
    meter = ck.CalibrationMeter(10)
    meter.update(logits, torch.tensor([0]))
    assert meter.compute()["brier"].item() == pytest.approx(truth, rel=1e-5)


@pytest.mark.parametrize("value", [torch.tensor(0), torch.tensor(-3), torch.tensor(float("nan")), 0, -3,
                                   float("inf")])
def test_num_items_in_batch_must_be_positive(value):
    hidden, weight, labels = diverged_head()
    weight[0, 0] = 0.0
    with pytest.raises(ValueError, match="num_items_in_batch"):
        ck.fused_linear_calibration_loss(hidden, weight, labels, option_ids=[3, 5, 7, 9], calibration=None,
                                         num_items_in_batch=value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["calibration_loss", "em_target", "em_ece"])
def test_returned_gradient_can_be_edited_in_place(backend, op):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(16, 4, generator=g) * 2).requires_grad_()
    y = torch.randint(0, 4, (16,), generator=g)
    if op == "calibration_loss":
        loss = ck.calibration_loss(z, y, torch.rand(10, generator=g), backend=backend)
    else:
        loss = ck.em_regularizer(z, y, ck.EMState(), form=op.removeprefix("em_"), backend=backend)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    expected = first.clone()
    first.mul_(5)
    (second,) = torch.autograd.grad(loss, z)
    assert torch.equal(second, expected)


def test_rho_belongs_to_the_ece_form():
    z, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match="rho"):
        ck.em_regularizer(z, y, ck.EMState(), rho="smooth_abs")
    ck.em_regularizer(z, y, ck.EMState(), form="ece", rho="smooth_abs")


def test_bootstrap_arguments_take_integers_and_refuse_floats():
    z, y = torch.randn(64, 4), torch.randint(0, 4, (64,))
    interval = ck.ece_confidence_interval(z, y, n_boot=np.int64(10), seed=np.int32(3))
    assert interval == ck.ece_confidence_interval(z, y, n_boot=10, seed=3)
    with pytest.raises(TypeError, match="seed"):
        ck.ece_confidence_interval(z, y, n_boot=10, seed=1.7)
    with pytest.raises(TypeError, match="n_boot"):
        ck.ece_confidence_interval(z, y, n_boot=10.0)


def test_bin_statistics_constructors_check_their_inputs():
    conf = torch.tensor([0.2, 0.9])
    with pytest.raises(ValueError, match="bins must lie in"):
        ck.BinStats.from_bins(torch.tensor([0, 10]), conf, torch.tensor([1, 0]), 10)
    with pytest.raises(TypeError, match="bins must be an integer"):
        ck.BinStats.from_bins(torch.tensor([0.0, 1.0]), conf, torch.tensor([1, 0]), 10)
    with pytest.raises(ValueError, match="correct must be bool or 0/1"):
        ck.BinStats.from_confidences(conf, torch.tensor([2, 0]))


def test_triton_unavailable_says_why(monkeypatch):
    import importlib.util

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    installed = importlib.util.find_spec("triton") is not None
    message = backends._why_triton_cannot_run()
    assert message == ("triton is installed, but torch sees no CUDA device and TRITON_INTERPRET is not 1"
                       if installed else "triton is not installed")


def test_data_files_name_file_and_line(tmp_path):
    from calibkern.hf import MCQDataError, load_mcq

    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffquestion,A,B,answer\nWhich?,x,y,B\n".encode())
    assert load_mcq(bom)[0].answer == 1
    superscript = tmp_path / "sup.csv"
    superscript.write_text("question,A,B,answer\nWhich?,x,y,²\n", encoding="utf-8")
    with pytest.raises(MCQDataError, match=r"sup\.csv:2: answer"):
        load_mcq(superscript)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "ok", "choices": ["a", "b"], "answer": 0}\n{"question": "caf\xe9"}\n')
    with pytest.raises(MCQDataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_mcq(latin1)


# ------------------------------------------------------------------ option logits with large gaps (non-max targets)

# (row, bin accuracy, the loss in float64 from docs/math.md#cft-term): K = 2 has γ₀ = ln 1 = 0; the K = 3 row's
# last probability is 0 in float32 beside an accuracy of 1 (d = 0); the K = 4 row's non-max probabilities are
# subnormal, so 1/q₂ overflows float32
GAP_ROWS = [([50.0, -50.0], 0.632307, 0.270397), ([0.0, -70.0, -200.0], 1.0, 0.0),
            ([-88.05, 2.11, -87.78, -94.44], 0.0, 1.35185)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row, accuracy, expected", GAP_ROWS)
def test_large_option_gaps_give_finite_targets_on_every_backend(backend, row, accuracy, expected):
    def run(name, form):
        z = torch.tensor([row, row[::-1]], requires_grad=True)
        y = torch.tensor([0, 1])
        if form == "hard_bin":
            loss = ck.calibration_loss(z, y, torch.full((10,), accuracy), reduction="sum", backend=name)
        else:  # every component's θ = a, so the target accuracy is a whatever the responsibilities
            state = ck.EMState(10)
            state.theta = torch.full((10,), accuracy, dtype=torch.float64)
            loss = ck.em_regularizer(z, y, state, reduction="sum", backend=name)
        loss.backward()
        return loss.detach(), z.grad

    for form in ("hard_bin", "em_target"):
        (loss, grad), (want, want_grad) = run(backend, form), run("torch", form)
        assert loss.item() == pytest.approx(2 * expected, rel=1e-5, abs=1e-6), form
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("calibration", ["hard_bin", "em"])
def test_fused_loss_on_answer_rows_with_large_option_gaps(backend, calibration):
    """Option logits [0, −70, −200] (the identity rows of the weight pick them out of the hidden states)."""
    hidden = torch.tensor([[0.0, -70.0, -200.0, 0.0], [-200.0, 0.0, -70.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    weight = torch.cat([torch.eye(4), torch.randn(4, 4, generator=torch.Generator().manual_seed(0))])
    labels = torch.tensor([0, 1, 6])

    def run(name):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        state = {"bin_accuracy": torch.ones(10)} if calibration == "hard_bin" else {"em_state": ck.EMState(10)}
        if calibration == "em":
            state["em_state"].theta = torch.ones(10, dtype=torch.float64)
        out = ck.fused_linear_calibration_loss(h, w, labels, option_ids=[0, 1, 2], shift=False,
                                               calibration=calibration, backend=name, **state)
        out.loss.backward()
        return out.cal_loss.detach(), out.loss.detach(), h.grad, w.grad

    for got, want in zip(run(backend), run("torch")):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- token correctness near ties

@pytest.mark.parametrize("backend", BACKENDS)
def test_token_correctness_applies_the_tie_rule_to_logits(backend):
    """A label logit 1…8 float32 ulps (7e-9…6e-8) above the best other one is correct (``argmax z = y``), though
    their probabilities differ by less than the 2⁻²⁵ of ``(p_y − 1) + 1``; an exact tie goes to the lower index."""
    base, up = torch.tensor(0.1), torch.tensor(1.0)
    rows = []
    for k in range(9):  # k ulps above base (k = 0: an exact tie, label 1 is the higher index)
        z1 = base.clone()
        for _ in range(k):
            z1 = torch.nextafter(z1, up)
        rows.append(torch.stack([base, z1, torch.tensor(-1.0)]))
    z = torch.stack(rows + [rows[0]])
    labels = torch.tensor([1] * len(rows) + [0])  # the last row: the tie at its lower index
    hidden, weight = torch.eye(len(z)), z.t().contiguous()  # hidden row i picks logits row i exactly
    out = ck.fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, calibration=None, shift=False,
                                           backend=backend, token_stats=True)
    assert (z.argmax(1) == labels).tolist() == [False] + [True] * 8 + [True]
    assert int(out.token_stats.sum_correct.sum()) == 9
    assert int(out.token_stats.counts.sum()) == len(z)
