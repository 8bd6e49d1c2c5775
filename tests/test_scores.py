"""The ``input=`` argument of the metrics (calibkern.scores): probabilities, log-probabilities and 1-D binary
scores give the numbers of the equivalent logits; logits that look like probabilities are warned about."""

import warnings

import pytest
import torch

import calibkern as ck
from calibkern.scores import ProbabilitiesAsLogitsWarning, as_logits, looks_like_probabilities

METRICS = [ck.ece, ck.classwise_ece, ck.adaptive_ece, ck.nll, ck.brier,
           lambda z, y, **kw: ck.ece_confidence_interval(z, y, n_boot=50, **kw).estimate,
           ck.smooth_ece, lambda z, y, **kw: ck.smooth_reliability(z, y, sigma=0.1, **kw).accuracy[60]]


def _data(n=123, k=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator) * 3
    labels = torch.randint(0, k, (n,), generator=generator)
    labels[::11] = -100
    return logits, labels


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probs_and_log_probs_equal_logits(metric, dtype):
    logits, labels = _data()
    logits = logits.to(dtype)
    expected = float(metric(logits, labels))
    for scores, kind in ((logits.softmax(1), "probs"), (logits.log_softmax(1), "log_probs")):
        assert abs(float(metric(scores, labels, input=kind)) - expected) <= 1e-6


def test_zero_probabilities_and_half_precision():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 2, 1])
    expected = ck.BinStats.from_confidences(torch.tensor([1.0, 0.5, 0.5]), torch.tensor([1, 0, 0]), 10).ece()
    assert abs(float(ck.ece(probs, labels, input="probs")) - float(expected)) <= 1e-6
    assert abs(float(ck.ece(probs.half(), labels, input="probs")) - float(expected)) <= 1e-6
    assert torch.isfinite(ck.nll(probs, torch.tensor([0, 1, 1]), input="probs"))


@pytest.mark.parametrize("kind", ["logits", "probs", "log_probs"])
def test_binary_scores_are_two_classes(kind):
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(47, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, (47,), generator=generator)
    two_columns = torch.stack([torch.zeros_like(z), z], dim=1)
    scores = {"logits": z, "probs": z.sigmoid(), "log_probs": torch.nn.functional.logsigmoid(z)}[kind]
    for metric in (ck.ece, ck.classwise_ece, ck.nll, ck.brier):
        assert abs(float(metric(scores, labels, input=kind)) - float(metric(two_columns, labels))) <= 1e-9
    # the NLL of binary logits is the binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, labels.double())
    assert abs(float(ck.nll(scores, labels, input=kind)) - float(bce)) <= 1e-9
    meter = ck.CalibrationMeter(input=kind)
    meter.update(scores, labels)
    assert abs(float(meter.compute()["ece"]) - float(ck.ece(two_columns, labels))) <= 1e-9


def test_probabilities_passed_as_logits_warn_naming_input():
    logits, labels = _data()
    with pytest.warns(ProbabilitiesAsLogitsWarning, match="input='probs'") as record:
        ck.ece(logits.softmax(1), labels)
    assert record[0].filename == __file__  # points at the caller's line
    with pytest.warns(ProbabilitiesAsLogitsWarning, match="every score lies in"):
        ck.nll(torch.rand(10), torch.randint(0, 2, (10,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.ece(logits, labels)
        ck.ece(logits.softmax(1), labels, input="probs")
        meter = ck.CalibrationMeter()
        meter.update(logits, labels)
        meter.update(logits.softmax(1), labels)  # the meter checks its first batch only


@pytest.mark.parametrize("shape", [(40, 5), (5000,)])
def test_the_probability_look_reads_the_whole_batch_only_when_its_head_passes(shape):
    """A batch whose first rows (scores) look like probabilities but whose later ones do not is not all
    probabilities: no warning; one whose every row does warns, however long."""
    probabilities = torch.rand(shape)
    probabilities = probabilities if len(shape) == 1 else probabilities / probabilities.sum(1, keepdim=True)
    assert looks_like_probabilities(probabilities)
    mixed = probabilities.clone()
    mixed[-1] = -0.5  # a logit, past the rows read first
    assert not looks_like_probabilities(mixed)
    assert not looks_like_probabilities(torch.randn(shape))


def test_bad_scores_raise_naming_the_argument():
    logits, labels = _data()
    with pytest.raises(ValueError, match=r"logits must lie in \[0, 1\] with input='probs'"):
        ck.ece(logits, labels, input="probs")
    with pytest.raises(ValueError, match="with input='log_probs'"):
        ck.brier(logits.softmax(1), labels, input="log_probs")
    with pytest.raises(ValueError, match="input must be one of"):
        ck.ece(logits, labels, input="probabilities")
    with pytest.raises(TypeError, match="float32, bfloat16"):
        as_logits(torch.ones(3, 2, dtype=torch.long), "probs")
    probs = logits.softmax(1)
    probs[3, 1] = float("nan")  # NaN goes to the nonfinite policy, not the range check
    with pytest.raises(ValueError, match="NaN"):
        ck.ece(probs, labels, input="probs")
    assert torch.isfinite(ck.ece(probs, labels, input="probs", nonfinite="skip"))


@pytest.mark.parametrize("n", [1, 47, 2000])
def test_smooth_ece_of_any_scores_equals_relplot(n):
    """relplot's smECE(f, y) on a binary model's positive-class probabilities (not top-1 confidences)."""
    relplot = pytest.importorskip("relplot")
    generator = torch.Generator().manual_seed(n)
    f = torch.rand(n, generator=generator, dtype=torch.float64).float()
    y = (torch.rand(n, generator=generator) < f.double() ** 1.5).long()
    value, sigma = ck.smooth_ece_from_confidences(f, y, return_sigma=True)
    want, want_sigma = relplot.smECE(f.double().numpy(), y.double().numpy(), return_width=True)
    assert abs(float(value) - float(want)) <= 1e-6 and abs(sigma - want_sigma) <= 1e-9
    with pytest.raises(ValueError, match="confidences must lie in"):
        ck.smooth_ece_from_confidences(f + 1, y)
