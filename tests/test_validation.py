"""Bad input gets a clear error naming the argument (docs/reliability.md)."""

import pytest
import torch

import calibkern as ck

ACC = torch.linspace(0.1, 0.9, 10)


def _logits(n=8, k=4):
    return torch.randn(n, k)


def _labels(n=8, k=4):
    return torch.randint(0, k, (n,))


def _calls():
    state = ck.EMState(10)
    return {
        "ece": lambda z, y, **kw: ck.ece(z, y, **kw),
        "classwise_ece": lambda z, y, **kw: ck.classwise_ece(z, y, **kw),
        "adaptive_ece": lambda z, y, **kw: ck.adaptive_ece(z, y, **kw),
        "ece_confidence_interval": lambda z, y, **kw: ck.ece_confidence_interval(z, y, n_boot=5, **kw),
        "binned_stats": lambda z, y, **kw: ck.binned_stats(z, y, **kw),
        "nll": lambda z, y, **kw: ck.nll(z, y, **kw),
        "brier": lambda z, y, **kw: ck.brier(z, y, **kw),
        "calibration_loss": lambda z, y, **kw: ck.calibration_loss(z, y, ACC, **kw),
        "em_regularizer": lambda z, y, **kw: ck.em_regularizer(z, y, state, **kw),
        "em_estep": lambda z, y, **kw: state.estep(z, y, **kw),
        "meter": lambda z, y, **kw: ck.CalibrationMeter(**kw).update(z, y),
    }


CALLS = _calls()
BINARY_SCORES = ("ece", "classwise_ece", "adaptive_ece", "ece_confidence_interval", "binned_stats", "nll", "brier",
                 "meter")


@pytest.mark.parametrize("name", CALLS)
class TestEveryEntryPoint:
    def test_nan_logits(self, name):
        z = _logits()
        z[3, 1] = float("nan")
        with pytest.raises(ValueError, match="logits.*NaN"):
            CALLS[name](z, _labels())

    def test_inf_logits(self, name):
        z = _logits()
        z[0, 0] = float("inf")
        with pytest.raises(ValueError, match="logits.*infinite"):
            CALLS[name](z, _labels())

    def test_label_out_of_range(self, name):
        y = _labels()
        y[2] = 4
        with pytest.raises(ValueError, match="labels must lie in"):
            CALLS[name](_logits(), y)

    def test_float_labels(self, name):
        with pytest.raises(TypeError, match="labels must be an integer"):
            CALLS[name](_logits(), _labels().float())

    def test_one_class(self, name):
        with pytest.raises(ValueError, match="K ≥ 2"):
            CALLS[name](torch.randn(8, 1), torch.zeros(8, dtype=torch.long))

    def test_1d_logits(self, name):
        if name in BINARY_SCORES:  # 1-D scores are binary predictions there (docs/math.md#inputs)
            with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
                CALLS[name](torch.randn(8), _labels().clamp_min(2))
            with pytest.raises(ValueError, match="2-D"):
                CALLS[name](torch.randn(8, 4, 1), _labels())
        else:
            with pytest.raises(ValueError, match="2-D"):
                CALLS[name](torch.randn(8), _labels())

    def test_length_mismatch(self, name):
        with pytest.raises(ValueError, match="labels has 7 entries"):
            CALLS[name](_logits(), _labels(7))

    def test_not_a_tensor(self, name):
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            CALLS[name](_logits().tolist(), _labels())

    def test_integer_logits(self, name):
        with pytest.raises(TypeError, match="float32, bfloat16, float16 or float64"):
            CALLS[name](torch.ones(8, 4, dtype=torch.long), _labels())

    def test_skip_counts_nonfinite_rows(self, name):
        if name in ("adaptive_ece", "ece_confidence_interval", "nll", "brier", "em_estep", "meter"):
            z = _logits()
            z[1] = float("nan")
            CALLS[name](z, _labels(), nonfinite="skip")  # accepted, no error
            return
        z = _logits(20)
        y = _labels(20)
        z[[1, 5]] = float("nan")
        CALLS[name](z, y, nonfinite="skip")
        if name == "binned_stats":
            stats = ck.binned_stats(z, y, nonfinite="skip")
            assert stats.n_skipped.item() == 2 and stats.total().item() == 18
            clean = ck.binned_stats(z[[i for i in range(20) if i not in (1, 5)]], y[[i for i in range(20) if i not in (1, 5)]])
            assert torch.equal(stats.counts, clean.counts)


@pytest.mark.parametrize("n_bins", [0, -3])
def test_n_bins_below_one(n_bins):
    with pytest.raises(ValueError, match="n_bins must be ≥ 1"):
        ck.ece(_logits(), _labels(), n_bins=n_bins)
    with pytest.raises(ValueError, match="n_bins must be ≥ 1"):
        ck.CalibrationMeter(n_bins=n_bins)


def test_n_bins_not_an_int():
    with pytest.raises(TypeError, match="n_bins must be an int"):
        ck.ece(_logits(), _labels(), n_bins=2.5)


def test_empty_logits():
    with pytest.raises(ValueError, match="logits is empty"):
        ck.ece(torch.empty(0, 4), torch.empty(0, dtype=torch.long))
    loss = ck.calibration_loss(torch.empty(0, 4), torch.empty(0, dtype=torch.long), ACC)
    assert loss.item() == 0.0  # an empty batch adds nothing to training


def test_bad_norm_mode_and_temperature():
    with pytest.raises(ValueError, match="norm must be one of"):
        ck.ece(_logits(), _labels(), norm="l3")
    with pytest.raises(ValueError, match="mode must be one of"):
        ck.binned_stats(_logits(), _labels(), mode="top5")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ck.ece(_logits(), _labels(), temperature=0.0)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        ck.ece(_logits(), _labels(), nonfinite="ignore")


def test_bin_accuracy_checks():
    with pytest.raises(ValueError, match=r"bin_accuracy must have shape \(10,\)"):
        ck.calibration_loss(_logits(), _labels(), torch.rand(9))
    with pytest.raises(ValueError, match=r"bin_accuracy must hold finite values in \[0.0, 1.0\]"):
        ck.calibration_loss(_logits(), _labels(), torch.linspace(0, 1.5, 10))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ck.calibration_loss(_logits(), _labels(), ACC, reduction="avg")


def test_em_arguments():
    with pytest.raises(TypeError, match="state must be a calibkern.EMState"):
        ck.em_regularizer(_logits(), _labels(), {"pi": 1})
    with pytest.raises(ValueError, match="form must be one of"):
        ck.em_regularizer(_logits(), _labels(), ck.EMState(), form="kl")
    with pytest.raises(ValueError, match="refresh must be one of"):
        ck.EMState(refresh="batch")
    with pytest.raises(ValueError, match="momentum"):
        ck.EMState(momentum=1.5)
    with pytest.raises(ValueError, match="n_components must be ≥ 1"):
        ck.EMState(n_components=0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.ece(_logits(), _labels(), backend="jax")
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.set_backend("numpy")


def test_float64_only_on_the_reference():
    z = _logits().double()
    for name in ck.available_backends():
        if name == "torch":
            ck.ece(z, _labels(), backend=name)
        else:
            with pytest.raises(TypeError, match="only backend='torch'"):
                ck.ece(z, _labels(), backend=name)
