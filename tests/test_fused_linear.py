"""fused_linear_calibration_loss against an eager float64 reference that holds the full logits."""

import pytest
import torch
import torch.nn.functional as F

import calibkern
from calibkern import CalibrationLossOutput, FusedLinearCalibrationLoss, fused_linear_calibration_loss
from helpers import skip_unsupported_dtype

BACKENDS = calibkern.available_backends()
CALIBRATIONS = [None, "hard_bin", "em"]
B, T, D, V = 2, 9, 12, 40
OPTIONS = [7, 3, 21, 30]
IGNORE = -100


def make_batch(seed=0, with_answers=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    non_options = torch.tensor([v for v in range(V) if v not in OPTIONS])
    labels = non_options[torch.randint(0, len(non_options), (B, T), generator=g)]
    labels[0, :3] = IGNORE  # a prompt
    labels[1, :2] = IGNORE
    if with_answers:
        labels[0, 4], labels[0, 8], labels[1, 5], labels[1, 6] = OPTIONS[2], OPTIONS[0], OPTIONS[3], OPTIONS[2]
    return hidden, weight, bias, labels


def calibration_args(calibration):
    if calibration == "hard_bin":
        return {"bin_accuracy": torch.linspace(0.05, 0.95, 10)}
    if calibration == "em":
        state = calibkern.EMState(n_components=10)
        state.theta = torch.linspace(0.2, 0.9, 10, dtype=torch.float64)
        return {"em_state": state}
    return {}


def eager(hidden, weight, bias, labels, *, calibration, lam=1.0, sft_weight=1.0, shift=True, answer_mask=None,
          num_items_in_batch=None, **cal):
    """Full logits in float64, F.cross_entropy and the reference calibration term."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE)
        answer_mask = None if answer_mask is None else F.pad(answer_mask[..., 1:], (0, 1), value=False)
    logits, labels = logits.reshape(-1, V), labels.reshape(-1)
    supervised = labels != IGNORE
    sft = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    sft = sft / (num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp_min(1))
    options = torch.tensor(OPTIONS)
    is_answer = (labels[:, None] == options).any(1) if answer_mask is None else answer_mask.reshape(-1)
    option_logits = logits[is_answer][:, options]
    option_labels = (labels[is_answer][:, None] == options).long().argmax(1)
    if calibration == "hard_bin":
        cal_loss = calibkern.calibration_loss(option_logits, option_labels, cal["bin_accuracy"], backend="torch")
    elif calibration == "em":
        cal_loss = calibkern.em_regularizer(option_logits, option_labels, cal["em_state"], backend="torch")
    else:
        cal_loss = torch.zeros((), dtype=torch.float64)
    return sft_weight * sft + lam * cal_loss, sft, cal_loss, option_logits, option_labels


def grads_of(loss, inputs, grad_output):
    return torch.autograd.grad(loss, inputs, grad_outputs=torch.as_tensor(grad_output, dtype=loss.dtype))


def check_against_eager(backend, hidden, weight, bias, labels, *, calibration, grad_output=1.7, atol=2e-5,
                        rtol=2e-5, **kwargs):
    cal = calibration_args(calibration)
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    h, w, b = inputs if bias is not None else (*inputs, None)
    rh, rw, rb = ref_inputs if bias is not None else (*ref_inputs, None)
    out = fused_linear_calibration_loss(h, w, labels, option_ids=OPTIONS, bias=b, calibration=calibration,
                                        backend=backend, **cal, **kwargs)
    ref_loss, ref_sft, ref_cal, ref_option_logits, ref_option_labels = eager(
        rh, rw, rb, labels, calibration=calibration, **cal, **kwargs)
    assert isinstance(out, CalibrationLossOutput)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.sft_loss.double(), ref_sft.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.cal_loss.double(), ref_cal.detach().double(), atol=atol, rtol=rtol)
    for got, want in zip(grads_of(out.loss, inputs, grad_output), grads_of(ref_loss, ref_inputs, grad_output)):
        assert got.dtype == hidden.dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    stats = calibkern.binned_stats(ref_option_logits.detach().float(), ref_option_labels, n_bins=10, backend="torch")
    torch.testing.assert_close(out.bin_stats.counts, stats.counts)
    torch.testing.assert_close(out.bin_stats.sum_correct, stats.sum_correct)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("shift", [True, False])
def test_matches_eager_float64(backend, calibration, shift):
    hidden, weight, bias, labels = make_batch()
    out = check_against_eager(backend, hidden, weight, bias, labels, calibration=calibration, shift=shift,
                              lam=0.7, sft_weight=1.3, chunk_size=5)
    assert int(out.bin_stats.counts.sum()) == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_no_answer_positions(backend, calibration):
    hidden, weight, bias, labels = make_batch(with_answers=False)
    out = check_against_eager(backend, hidden, weight, bias, labels, calibration=calibration, chunk_size=4)
    assert out.cal_loss.item() == 0.0 and int(out.bin_stats.counts.sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [40, torch.tensor(23)])
def test_num_items_in_batch_2d_without_bias(backend, num_items):
    hidden, weight, _, labels = make_batch(seed=1)
    check_against_eager(backend, hidden.reshape(-1, D), weight, None, labels.reshape(-1), calibration="hard_bin",
                        num_items_in_batch=num_items, chunk_size=7, grad_output=0.3)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
def test_chunk_sizes(chunk_size):
    hidden, weight, bias, labels = make_batch(seed=2)
    check_against_eager("torch", hidden, weight, bias, labels, calibration="em", chunk_size=chunk_size)


@pytest.mark.parametrize("shift", [True, False])
def test_answer_mask_overrides_default(shift):
    hidden, weight, bias, labels = make_batch(seed=3)
    answer_mask = torch.zeros(B, T, dtype=torch.bool)
    answer_mask[0, 8] = answer_mask[1, 6] = True  # two of the four option-token positions
    out = check_against_eager("torch", hidden, weight, bias, labels, calibration="hard_bin", shift=shift,
                              answer_mask=answer_mask, chunk_size=5)
    assert int(out.bin_stats.counts.sum()) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_all_ignored_batch_is_zero(backend, calibration):
    hidden, weight, bias, _ = make_batch()
    labels = torch.full((B, T), IGNORE)
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = fused_linear_calibration_loss(inputs[0], inputs[1], labels, option_ids=OPTIONS, bias=inputs[2],
                                        calibration=calibration, backend=backend, **calibration_args(calibration))
    assert out.loss.item() == 0.0 and out.sft_loss.item() == 0.0 and out.cal_loss.item() == 0.0
    out.loss.backward()
    for x in inputs:
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    skip_unsupported_dtype(backend, dtype)
    hidden, weight, bias, labels = make_batch(seed=4, dtype=dtype)
    check_against_eager(backend, hidden, weight, bias, labels, calibration="hard_bin", chunk_size=6,
                        atol=3e-2, rtol=3e-2)


def test_frozen_weight_only_hidden_gets_a_gradient():
    hidden, weight, bias, labels = make_batch()
    h = hidden.clone().requires_grad_()
    out = fused_linear_calibration_loss(h, weight, labels, option_ids=OPTIONS, bias=bias, calibration="hard_bin",
                                        **calibration_args("hard_bin"))
    (grad,) = torch.autograd.grad(out.loss, [h])
    rh = hidden.double().requires_grad_()
    (want,) = torch.autograd.grad(eager(rh, weight, bias, labels, calibration="hard_bin",
                                        **calibration_args("hard_bin"))[0], [rh])
    torch.testing.assert_close(grad.double(), want, atol=2e-5, rtol=2e-5)


def test_no_grad_gives_the_same_values():
    hidden, weight, bias, labels = make_batch()
    args = dict(option_ids=OPTIONS, bias=bias, calibration="em", **calibration_args("em"))
    want = fused_linear_calibration_loss(hidden, weight, labels, **args)
    with torch.no_grad():
        got = fused_linear_calibration_loss(hidden.requires_grad_(), weight, labels, **args)
    assert got.loss.grad_fn is None
    torch.testing.assert_close(got.loss, want.loss)


def test_autocast_runs_the_products_in_bfloat16():
    hidden, weight, bias, labels = make_batch()
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_calibration_loss(inputs[0], inputs[1], labels, option_ids=OPTIONS, bias=inputs[2],
                                            calibration=None)
    out.loss.backward()
    want = eager(hidden.double(), weight.double(), bias.double(), labels, calibration=None)[0]
    torch.testing.assert_close(out.loss.double(), want, atol=5e-2, rtol=5e-2)
    assert all(x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() for x in inputs)


def _tensors_of(out: CalibrationLossOutput, inputs) -> dict:
    stats = {f"{name}.{field}": getattr(getattr(out, name), field)
             for name in ("bin_stats", "token_stats", "full_stats")
             for field in ("counts", "sum_conf", "sum_correct", "n_skipped")}
    grads = dict(zip(("hidden.grad", "weight.grad", "bias.grad"), torch.autograd.grad(out.loss, inputs)))
    return {"loss": out.loss, "sft_loss": out.sft_loss, "cal_loss": out.cal_loss, **stats, **grads}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_meta_tensors_give_the_shapes_and_dtypes_of_real_ones(calibration, dtype):
    """On ``meta`` (no data, no autocast) the loss, every statistic and every gradient has the shape and dtype
    of a CPU call."""
    results = {}
    for device in ("cpu", "meta"):
        hidden, weight, bias, labels = (x.to(device) for x in make_batch(dtype=dtype))
        inputs = [x.requires_grad_() for x in (hidden, weight, bias)]
        cal = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in calibration_args(calibration).items()}
        out = fused_linear_calibration_loss(*inputs[:2], labels, option_ids=OPTIONS, bias=inputs[2],
                                            calibration=calibration, token_stats=True, full_stats=True, **cal)
        results[device] = _tensors_of(out, inputs)
    for name, real in results["cpu"].items():
        meta = results["meta"][name]
        assert meta.device.type == "meta", name
        assert (meta.shape, meta.dtype) == (real.shape, real.dtype), name


def test_module_matches_function():
    hidden, weight, bias, labels = make_batch()
    cal = calibration_args("hard_bin")
    module = FusedLinearCalibrationLoss(OPTIONS, calibration="hard_bin", lam=0.5, chunk_size=4, **cal)
    got = module(hidden, weight, labels, bias=bias)
    want = fused_linear_calibration_loss(hidden, weight, labels, option_ids=OPTIONS, bias=bias, lam=0.5, **cal)
    torch.testing.assert_close(got.loss, want.loss)


def test_second_backward_is_refused():
    hidden, weight, bias, labels = make_batch()
    h = hidden.clone().requires_grad_()
    out = fused_linear_calibration_loss(h, weight, labels, option_ids=OPTIONS, calibration=None)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        out.loss.backward()


def bad_call(**changes):
    hidden, weight, bias, labels = make_batch()
    args = {"hidden": hidden, "weight": weight, "labels": labels, "option_ids": OPTIONS, "bias": bias,
            "calibration": "hard_bin", "bin_accuracy": torch.full((10,), 0.5)}
    args.update(changes)
    return lambda: fused_linear_calibration_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("changes, error, name", [
    ({"hidden": torch.zeros(B, T, D, dtype=torch.float64)}, TypeError, "hidden"),
    ({"hidden": torch.zeros(D)}, ValueError, "hidden"),
    ({"weight": torch.zeros(V, D + 1)}, ValueError, "weight"),
    ({"weight": torch.zeros(V, D, dtype=torch.float16)}, TypeError, "weight"),
    ({"bias": torch.zeros(V + 1)}, ValueError, "bias"),
    ({"labels": torch.zeros(B, T + 1, dtype=torch.long)}, ValueError, "labels"),
    ({"labels": torch.zeros(B, T)}, TypeError, "labels"),
    ({"labels": torch.full((B, T), V)}, ValueError, "labels"),
    ({"option_ids": [3]}, ValueError, "option_ids"),
    ({"option_ids": [3, 3, 5]}, ValueError, "option_ids"),
    ({"option_ids": [3, V]}, ValueError, "option_ids"),
    ({"option_ids": [0.5, 1.5]}, TypeError, "option_ids"),
    ({"calibration": "ece"}, ValueError, "calibration"),
    ({"bin_accuracy": None}, ValueError, "bin_accuracy"),
    ({"bin_accuracy": torch.full((5,), 0.5)}, ValueError, "bin_accuracy"),
    ({"calibration": None}, ValueError, "bin_accuracy"),
    ({"calibration": "em", "bin_accuracy": None}, ValueError, "em_state"),
    ({"answer_mask": torch.ones(B, T)}, TypeError, "answer_mask"),
    ({"answer_mask": torch.ones(B, T, dtype=torch.bool)}, ValueError, "answer_mask"),
    ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"lam": "1"}, TypeError, "lam"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_bad_input_names_the_argument(changes, error, name):
    with pytest.raises(error, match=name):
        bad_call(**changes)()
