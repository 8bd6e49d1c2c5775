"""calibkern.integrations.torchmetrics against the real torchmetrics: the same numbers for logits, probabilities,
ignore_index and binary scores, in a MetricCollection, through forward and across a state_dict round trip."""

import pytest
import torch

tm = pytest.importorskip("torchmetrics")
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics import classification as tmc  # noqa: E402

import calibkern  # noqa: E402
from calibkern.integrations import torchmetrics as ck_tm  # noqa: E402
from helpers import run_without  # noqa: E402

TOL = 2e-6


def _batches(n_rows, n_classes, *, ignore=None, scale=3.0, extra=()):
    generator = torch.Generator().manual_seed(n_rows * 31 + n_classes)
    out = []
    for _ in range(3):
        logits = torch.randn(n_rows, n_classes, *extra, generator=generator) * scale
        labels = torch.randint(0, n_classes, (n_rows, *extra), generator=generator)
        if ignore is not None:
            labels[torch.rand(labels.shape, generator=generator) < 0.2] = ignore
        out.append((logits, labels))
    return out


def _assert_close(ours, theirs):
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert abs(float(ours) - float(theirs)) <= TOL, (float(ours), float(theirs))


@pytest.mark.parametrize("n_rows, n_classes", [(1, 2), (47, 4), (123, 7)])
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("ignore_index", [None, -1, 2])
def test_multiclass_equals_torchmetrics(n_rows, n_classes, kind, ignore_index):
    norms = ("l1", "l2", "max")
    ours = [ck_tm.MulticlassCalibrationError(n_classes, norm=norm, ignore_index=ignore_index) for norm in norms]
    theirs = [tmc.MulticlassCalibrationError(n_classes, norm=norm, ignore_index=ignore_index) for norm in norms]
    for logits, labels in _batches(n_rows, n_classes, ignore=ignore_index):
        preds = logits.softmax(1) if kind == "probs" else logits
        has_rows = ignore_index is None or bool((labels != ignore_index).any())
        for mine, reference in zip(ours, theirs):
            if has_rows:  # forward: this batch's value (torchmetrics cannot compute a batch of no rows)
                _assert_close(mine(preds, labels), reference(preds, labels))
            else:
                mine.update(preds, labels)
                reference.update(preds, labels)
    for mine, reference in zip(ours, theirs):
        _assert_close(mine.compute(), reference.compute())


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_multiclass_extra_dimensions_and_float64(n_bins):
    ours = ck_tm.MulticlassCalibrationError(5, n_bins=n_bins)
    theirs = tmc.MulticlassCalibrationError(5, n_bins=n_bins)
    for logits, labels in _batches(6, 5, extra=(9,)):  # [N, C, T] with [N, T] targets
        ours.update(logits.double(), labels)
        theirs.update(logits.double(), labels)
    _assert_close(ours.compute(), theirs.compute())


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("ignore_index", [None, -1])
def test_binary_scores_equal_torchmetrics(norm, kind, ignore_index):
    ours = ck_tm.BinaryCalibrationError(norm=norm, ignore_index=ignore_index)
    theirs = tmc.BinaryCalibrationError(norm=norm, ignore_index=ignore_index)
    generator = torch.Generator().manual_seed(1)
    for shape in ((47,), (8, 5), (1,)):
        scores = torch.randn(shape, generator=generator) * 2
        labels = torch.randint(0, 2, shape, generator=generator)
        if ignore_index is not None and labels.numel() > 1:
            labels.view(-1)[::3] = ignore_index
        preds = scores.sigmoid() if kind == "probs" else scores
        _assert_close(ours(preds, labels), theirs(preds, labels))
    _assert_close(ours.compute(), theirs.compute())


def test_task_dispatcher_and_collection_and_state_dict():
    def collection(module):
        return MetricCollection({"ece": module.CalibrationError(task="multiclass", num_classes=4),
                                 "rmsce": module.CalibrationError(task="multiclass", num_classes=4, norm="l2"),
                                 "mce": module.CalibrationError(task="multiclass", num_classes=4, norm="max",
                                                                n_bins=10)})

    ours, theirs = collection(ck_tm), collection(tm.classification)
    assert isinstance(ours["ece"], ck_tm.MulticlassCalibrationError) and isinstance(ours["ece"], tm.Metric)
    for logits, labels in _batches(123, 4):
        step_ours, step_theirs = ours(logits, labels), theirs(logits, labels)
        for name in step_theirs:
            _assert_close(step_ours[name], step_theirs[name])
    ours.persistent(True)
    theirs.persistent(True)
    ours_again, theirs_again = collection(ck_tm), collection(tm.classification)
    ours_again.persistent(True)
    theirs_again.persistent(True)
    ours_again.load_state_dict(ours.state_dict())
    theirs_again.load_state_dict(theirs.state_dict())
    logits, labels = _batches(47, 4)[0]
    ours_again.update(logits, labels)
    theirs_again.update(logits, labels)
    final_ours, final_theirs = ours_again.compute(), theirs_again.compute()
    for name in final_theirs:
        _assert_close(final_ours[name], final_theirs[name])
    assert ours_again["ece"].counts.sum() == 3 * 123 + 47  # O(M) state: the per-bin counts, not the rows


def test_state_sums_across_processes():
    """The states are reduced by sum: two halves merged equal the whole (what a distributed sync does)."""
    (logits, labels), = _batches(123, 4)[:1]
    whole, first, second = (ck_tm.MulticlassCalibrationError(4) for _ in range(3))
    whole.update(logits, labels)
    first.update(logits[:60], labels[:60])
    second.update(logits[60:], labels[60:])
    assert all(first._reductions[name] is not None for name in ("counts", "sum_conf", "sum_correct"))
    first.merge_state(second)
    assert torch.equal(first.counts, whole.counts)
    torch.testing.assert_close(first.compute(), whole.compute(), rtol=0, atol=1e-7)


def test_confidence_of_one_is_the_known_difference():
    """torchmetrics bins a confidence of exactly 1 on its own; calibkern puts it into the last bin."""
    preds = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.94, 0.06]])  # one bin: gaps +1, −0.05, −0.06
    labels = torch.tensor([1, 0, 0])
    ours = ck_tm.MulticlassCalibrationError(2)(preds, labels)
    expected = calibkern.BinStats.from_confidences(preds.max(1).values, preds.argmax(1) == labels, 15).ece()
    assert abs(float(ours) - float(expected)) <= TOL
    assert abs(float(tmc.MulticlassCalibrationError(2)(preds, labels)) - float(ours)) > 0.07  # (1 + 0.11)/3 vs 0.89/3


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="num_classes"):
        ck_tm.MulticlassCalibrationError(1)
    with pytest.raises(ValueError, match="norm"):
        ck_tm.BinaryCalibrationError(norm="l3")
    with pytest.raises(ValueError, match="n_bins"):
        ck_tm.CalibrationError(task="binary", n_bins=0)
    with pytest.raises(ValueError, match="task"):
        ck_tm.CalibrationError(task="multilabel")
    metric = ck_tm.MulticlassCalibrationError(3)
    with pytest.raises(ValueError, match="target must lie in"):
        metric.update(torch.randn(4, 3), torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="preds must be"):
        metric.update(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="target must hold 0 or 1"):
        ck_tm.BinaryCalibrationError().update(torch.rand(3), torch.tensor([0, 2, 1]))


def test_plot_returns_matplotlib_objects():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    metric = ck_tm.BinaryCalibrationError()
    metric.update(torch.rand(20), torch.randint(0, 2, (20,)))
    fig, ax = metric.plot()
    assert hasattr(fig, "savefig") and hasattr(ax, "plot")
    matplotlib.pyplot.close(fig)


def test_import_error_names_the_extra():
    done = run_without(("torchmetrics",), "try:\n"
                                          "    import calibkern.integrations.torchmetrics\n"
                                          "except ImportError as error:\n"
                                          "    print(error)\n")
    assert "calibkern[torchmetrics]" in done.stdout, done.stderr
