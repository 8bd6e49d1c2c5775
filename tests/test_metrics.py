"""Metrics against torchmetrics and against independent per-sample formulas."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

import calibkern as ck
from calibkern.reference import bin_index

from helpers import random_labels, random_logits


@pytest.mark.parametrize("n,k,m", [(1, 2, 10), (47, 2, 10), (1000, 4, 15), (5000, 10, 10), (123, 31, 7),
                                   (64, 32000, 10), (3000, 4, 1)])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_ece_matches_torchmetrics(n, k, m, norm):
    logits = random_logits(n, k, scale=2.0, seed=n + k)
    labels = random_labels(n, k, seed=m)
    ours = ck.ece(logits, labels, n_bins=m, norm=norm, backend="torch")
    theirs = multiclass_calibration_error(logits.softmax(dim=1), labels, num_classes=k, n_bins=m, norm=norm)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_ece_matches_torchmetrics_with_ignore_index():
    logits, labels = random_logits(2000, 5), random_labels(2000, 5, ignore_frac=0.3)
    keep = labels != -100
    ours = ck.ece(logits, labels, n_bins=10)
    theirs = multiclass_calibration_error(logits[keep].softmax(1), labels[keep], num_classes=5, n_bins=10)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def _ece_numpy(conf, correct, m):
    """Per-sample loop: the definition, independent of the vectorised code."""
    sums = np.zeros((m, 3))
    for c, a in zip(conf, correct):
        k = min(int(np.floor(np.float32(c) * np.float32(m))), m - 1)
        sums[k] += (1, c, a)
    return sum(abs(s - a) for _, s, a in sums) / len(conf)


def test_bin_edges_follow_spec():
    m = 10
    edges = torch.tensor([0.0, 0.1, 0.2, 0.25, 0.5, 0.7, 0.9, 0.99999, 1.0])
    bins = bin_index(edges, m)
    expected = [min(int(math.floor(float(np.float32(c) * np.float32(m)))), m - 1) for c in edges.tolist()]
    assert bins.tolist() == expected
    assert bins[0] == 0 and bins[-1] == m - 1 and bins[4] == 5
    for k in range(m):
        c = torch.tensor([k / m], dtype=torch.float32)
        assert bin_index(c, m).item() == min(int(math.floor(float(c * m))), m - 1)


def test_exact_confidences_from_logits_land_in_spec_bins():
    # Equal logits give c = 1/K exactly; a dominant logit gives c = 1.0 exactly.
    stats_2 = ck.binned_stats(torch.zeros(1, 2), torch.tensor([0]), 10)
    assert stats_2.counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # c = 0.5 → bin 5
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e4, 0.0, 0.0, 0.0]])
    stats_4 = ck.binned_stats(logits, torch.tensor([0, 0]), 4)
    assert stats_4.counts.tolist() == [0, 1, 0, 1]  # c = 0.25 → bin 1; c = 1 → last bin
    assert stats_4.sum_correct.tolist() == [0.0, 1.0, 0.0, 1.0]  # ties pick the lowest index


def test_binned_stats_match_per_sample_definition():
    logits, labels = random_logits(777, 6, seed=3), random_labels(777, 6, ignore_frac=0.2, seed=4)
    stats = ck.binned_stats(logits, labels, 8)
    keep = labels != -100
    p = logits[keep].double().softmax(1)
    conf, pred = p.max(1)
    correct = (pred == labels[keep]).double()
    assert stats.counts.sum().item() == keep.sum().item()
    assert stats.ece().item() == pytest.approx(_ece_numpy(conf.numpy(), correct.numpy(), 8), abs=1e-6)
    assert stats.accuracy().item() == pytest.approx(correct.mean().item(), abs=1e-12)
    assert stats.mean_confidence().item() == pytest.approx(conf.mean().item(), abs=1e-6)


def test_classwise_ece_matches_definition():
    n, k, m = 400, 4, 5
    logits, labels = random_logits(n, k, seed=5), random_labels(n, k, seed=6)
    p = logits.softmax(1).numpy()
    total = 0.0
    for j in range(k):
        sums = np.zeros((m, 2))
        for i in range(n):
            b = min(int(np.floor(np.float32(p[i, j]) * np.float32(m))), m - 1)
            sums[b] += (p[i, j], float(labels[i] == j))
        total += np.abs(sums[:, 0] - sums[:, 1]).sum() / n
    assert ck.classwise_ece(logits, labels, m).item() == pytest.approx(total / k, abs=1e-6)


def test_adaptive_ece_uses_equal_mass_bins():
    n, m = 1000, 10
    logits, labels = random_logits(n, 4, seed=7), random_labels(n, 4, seed=8)
    p = logits.double().softmax(1)
    conf, pred = p.max(1)
    correct = (pred == labels).double()
    order = torch.argsort(conf, stable=True)
    groups = np.array_split(order.numpy(), m)
    expected = sum(abs(conf[g].sum().item() - correct[g].sum().item()) for g in groups) / n
    assert ck.adaptive_ece(logits, labels, m).item() == pytest.approx(expected, abs=1e-6)


def test_temperature_scales_logits():
    logits, labels = random_logits(500, 4, seed=9), random_labels(500, 4, seed=10)
    assert ck.ece(logits, labels, temperature=2.0).item() == pytest.approx(ck.ece(logits / 2.0, labels).item(),
                                                                          abs=1e-6)


def test_nll_and_brier():
    logits, labels = random_logits(300, 5, seed=11), random_labels(300, 5, ignore_frac=0.1, seed=12)
    keep = labels != -100
    expected_nll = torch.nn.functional.cross_entropy(logits[keep].double(), labels[keep])
    onehot = torch.nn.functional.one_hot(labels[keep], 5).double()
    expected_brier = ((logits[keep].double().softmax(1) - onehot) ** 2).sum(1).mean()
    assert ck.nll(logits, labels).item() == pytest.approx(expected_nll.item(), abs=1e-5)
    assert ck.brier(logits, labels).item() == pytest.approx(expected_brier.item(), abs=1e-5)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    logits, labels = random_logits(800, 4, seed=13), random_labels(800, 4, seed=14)
    a = ck.ece_confidence_interval(logits, labels, n_boot=300, seed=3, method="percentile")
    b = ck.ece_confidence_interval(logits, labels, n_boot=300, seed=3, method="percentile")
    c = ck.ece_confidence_interval(logits, labels, n_boot=300, seed=4, method="percentile")
    assert a == b and a != c
    assert a.low <= a.estimate <= a.high
    assert a.estimate == pytest.approx(ck.ece(logits, labels).item(), abs=1e-12)


def test_binstats_merge_and_reliability():
    logits, labels = random_logits(1000, 4, seed=15), random_labels(1000, 4, seed=16)
    whole = ck.binned_stats(logits, labels, 10)
    merged = ck.binned_stats(logits[:333], labels[:333], 10) + ck.binned_stats(logits[333:], labels[333:], 10)
    assert torch.equal(whole.counts, merged.counts)
    torch.testing.assert_close(whole.sum_conf, merged.sum_conf)
    rel = whole.reliability()
    assert rel.edges.shape == (11,) and rel.counts.sum().item() == 1000
    filled = rel.counts > 0
    torch.testing.assert_close(rel.accuracy[filled], (whole.sum_correct / whole.counts)[filled])


def test_from_confidences_equals_logit_path():
    logits, labels = random_logits(600, 3, seed=17), random_labels(600, 3, seed=18)
    p = logits.softmax(1)
    conf, pred = p.max(1)
    direct = ck.BinStats.from_confidences(conf, pred == labels, 10)
    assert torch.equal(direct.counts, ck.binned_stats(logits, labels, 10).counts)


def test_meter_streams_to_the_one_shot_result():
    logits, labels = random_logits(2000, 4, seed=19), random_labels(2000, 4, ignore_frac=0.1, seed=20)
    meter = ck.CalibrationMeter(10, classwise=True)
    for chunk in range(0, 2000, 300):
        meter.update(logits[chunk:chunk + 300], labels[chunk:chunk + 300])
    out = meter.compute()
    assert out["ece"].item() == pytest.approx(ck.ece(logits, labels).item(), abs=1e-12)
    assert out["cw_ece"].item() == pytest.approx(ck.classwise_ece(logits, labels).item(), abs=1e-12)
    assert out["nll"].item() == pytest.approx(ck.nll(logits, labels).item(), abs=1e-9)
    assert out["n"].item() == (labels != -100).sum().item()
    meter.reset()
    with pytest.raises(ValueError, match="before any update"):
        meter.compute()


def test_all_ignored_rows_give_zero_not_nan():
    logits = random_logits(10, 4)
    labels = torch.full((10,), -100)
    stats = ck.binned_stats(logits, labels, 10)
    assert stats.total().item() == 0
    assert stats.ece().item() == 0.0 and stats.accuracy().item() == 0.0


def _meter_over(batches, **kwargs):
    meter = ck.CalibrationMeter(10, **kwargs)
    for logits, labels in batches:
        meter.update(logits, labels)
    return meter


def _batches(count, k=4, seed=30):
    return [(random_logits(150, k, seed=seed + i), random_labels(150, k, ignore_frac=0.1, seed=seed + 50 + i))
            for i in range(count)]


@pytest.mark.parametrize("classwise", [False, True])
def test_meter_state_dict_round_trips_through_torch_save(classwise, tmp_path):
    batches = _batches(4)
    meter = _meter_over(batches[:3], classwise=classwise)
    state = meter.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "meter.pt")
    restored = ck.CalibrationMeter(10, classwise=classwise)
    restored.load_state_dict(torch.load(tmp_path / "meter.pt", weights_only=True))
    _assert_same_metrics(restored.compute(), meter.compute())
    restored.update(*batches[3])  # it streams on: bitwise the meter that saw every batch
    _assert_same_metrics(restored.compute(), _meter_over(batches, classwise=classwise).compute())


def _assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_summed_meter_states_equal_one_meter_over_every_batch():
    """The key-wise sum (what all_reduce does across ranks) of two meters' states, loaded, reports the metrics of
    one meter that saw both meters' batches (counts exactly, float sums to rounding)."""
    batches = _batches(5)
    first, second = _meter_over(batches[:2], classwise=True), _meter_over(batches[2:], classwise=True)
    summed = {key: value + second.state_dict()[key] for key, value in first.state_dict().items()}
    meter = ck.CalibrationMeter(10, classwise=True, n_classes=4)
    meter.load_state_dict(summed)
    want, got = _meter_over(batches, classwise=True).compute(), meter.compute()
    assert got["n"] == want["n"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-15)


def test_meter_load_state_dict_checks_the_configuration():
    top1, classwise = _meter_over(_batches(1)), _meter_over(_batches(1), classwise=True)
    before = top1.state_dict()
    cases = [
        (ck.CalibrationMeter(15), before, "state\\['counts'\\] must be torch.int64 of shape \\(15,\\)"),
        (ck.CalibrationMeter(10), classwise.state_dict(), "unexpected keys \\['class_counts'"),
        (ck.CalibrationMeter(10, classwise=True, n_classes=4), before, "missing keys \\['class_counts'"),
        (ck.CalibrationMeter(10, classwise=True, n_classes=5), classwise.state_dict(), "class_counts.*\\(5, 10\\)"),
        (top1, {**before, "sum_conf": before["sum_conf"].float()}, "state\\['sum_conf'\\] must be torch.float64"),
        (top1, {**before, "sum_nll": 1.0}, "state\\['sum_nll'\\].*got float"),
    ]
    for meter, state, message in cases:
        with pytest.raises(ValueError, match=message):
            meter.load_state_dict(state)
    with pytest.raises(TypeError, match="dict of tensors"):
        top1.load_state_dict([before])
    after = top1.state_dict()  # refused loads left the meter as it was
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_classwise_meter_without_classes_round_trips_its_empty_state():
    empty = ck.CalibrationMeter(10, classwise=True)
    state = empty.state_dict()
    assert "class_counts" not in state
    restored = ck.CalibrationMeter(10, classwise=True)
    restored.load_state_dict(state)
    with pytest.raises(ValueError, match="before any update"):
        restored.compute()
    restored.update(*_batches(1)[0])  # the first batch then sets K
    assert restored.state_dict()["class_counts"].shape == (4, 10)
