"""Smooth ECE against the relplot package (its smECE on the same top-1 confidences), the curve's meaning,
and bad input."""

import numpy as np
import pytest
import torch

import calibkern as ck
from helpers import IGNORE, random_labels, random_logits

relplot = pytest.importorskip("relplot")
from relplot.diagrams import prepare_rel_diagram  # noqa: E402
from relplot.kernels import ReflectedGaussianKernel  # noqa: E402

BACKENDS = [b for b in ("torch", "cpp", "triton") if b in ck.available_backends()]


def calibrated_rows(n, k, scale, seed, tempered=1.0):
    """Logits and labels drawn from softmax(logits / tempered): calibrated at 1, over-confident above."""
    logits = random_logits(n, k, scale=scale, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.multinomial(torch.softmax(logits.double() / tempered, 1), 1, generator=g).squeeze(1)
    return logits, labels


def relplot_smece(logits, labels, temperature=1.0):
    keep = labels != IGNORE
    p = torch.softmax(logits[keep].float() / temperature, 1)
    confidence, predicted = p.max(1)
    correct = (predicted == labels[keep]).double()
    return relplot.smECE(confidence.double().numpy(), correct.numpy(), return_width=True)


@pytest.mark.parametrize("n,k,scale,tempered", [(1, 4, 1.0, 1.0), (47, 4, 3.0, 1.0), (123, 2, 0.5, 1.0),
                                                (2000, 4, 1.0, 1.0), (2000, 10, 4.0, 3.0), (5000, 4, 20.0, 1.0),
                                                (20000, 2, 0.3, 1.0)])
def test_equals_relplot(n, k, scale, tempered):
    logits, labels = calibrated_rows(n, k, scale, seed=n + k, tempered=tempered)
    expected, expected_sigma = relplot_smece(logits, labels)
    value, sigma = ck.smooth_ece(logits, labels, return_sigma=True)
    assert sigma == expected_sigma
    assert value.dtype == torch.float64 and value.dim() == 0
    assert abs(float(value) - expected) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_equals_relplot(backend, dtype):
    logits, labels = calibrated_rows(123, 5, 2.0, seed=11, tempered=2.0)
    logits = logits.to(dtype)
    labels[::7] = IGNORE
    expected, expected_sigma = relplot_smece(logits.float(), labels)
    value, sigma = ck.smooth_ece(logits, labels, backend=backend, return_sigma=True)
    assert sigma == expected_sigma and abs(float(value) - expected) <= 1e-6
    curve = ck.smooth_reliability(logits, labels, backend=backend)
    reference = ck.smooth_reliability(logits, labels, backend="torch")
    torch.testing.assert_close(curve.accuracy, reference.accuracy, rtol=0, atol=1e-6)  # float32 confidences


def test_fixed_bandwidth_ignored_rows_and_temperature_equal_relplot():
    logits = random_logits(300, 5, seed=3)
    labels = random_labels(300, 5, ignore_frac=0.3, seed=4)
    keep = labels != IGNORE
    p = torch.softmax(logits[keep] / 2.0, 1)
    confidence, predicted = p.max(1)
    correct = (predicted == labels[keep]).double().numpy()
    for sigma in (0.05, 0.2, 0.004):
        expected = relplot.smECE_sigma(confidence.double().numpy(), correct, sigma)
        assert abs(float(ck.smooth_ece(logits, labels, sigma=sigma, temperature=2.0)) - expected) <= 1e-6
    expected, expected_sigma = relplot_smece(logits, labels, temperature=2.0)
    assert abs(float(ck.smooth_ece(logits, labels, temperature=2.0)) - expected) <= 1e-6


def test_bandwidth_is_the_fixed_point():
    logits, labels = calibrated_rows(4000, 4, 2.0, seed=7, tempered=2.0)
    value, sigma = ck.smooth_ece(logits, labels, return_sigma=True)
    assert abs(sigma - float(value)) <= 1 / 512  # bisection on a 1/1024 grid of (0, 1]


def test_calibrated_is_small_and_miscalibrated_is_large():
    calibrated = ck.smooth_ece(*calibrated_rows(20000, 4, 1.5, seed=1))
    over = ck.smooth_ece(*calibrated_rows(20000, 4, 1.5, seed=1, tempered=3.0))
    assert float(calibrated) < 0.02 < 0.1 < float(over)


def test_curve_reads_accuracy_against_confidence():
    logits, labels = calibrated_rows(20000, 4, 1.5, seed=2, tempered=3.0)
    default = ck.smooth_reliability(logits, labels, points=50)
    assert default.points.shape == default.accuracy.shape == default.density.shape == (50,)
    assert default.sigma == ck.smooth_ece(logits, labels, return_sigma=True)[1]
    curve = ck.smooth_reliability(logits, labels, sigma=0.02, points=101)
    p = torch.softmax(logits, 1)
    confidence, predicted = p.max(1)
    correct = (predicted == labels).double()
    # at a narrow bandwidth, where the rows are dense, the curve is the local mean of correctness
    stats = ck.BinStats.from_confidences(confidence, correct, 10)
    for k in range(10):
        centre = (k + 0.5) / 10
        if stats.counts[k] > 2000:
            nearest = int(torch.argmin((curve.points - centre).abs()))
            assert abs(float(curve.accuracy[nearest]) - float(stats.sum_correct[k] / stats.counts[k])) < 0.05
    step = float(curve.points[1] - curve.points[0])
    assert abs(float(curve.density.sum()) * step - 1.0) < 0.02  # a probability density on [0, 1]
    # over-confident rows: accuracy below the diagonal where the mass lies
    heavy = curve.density > curve.density.max() / 4
    assert bool((curve.accuracy[heavy] < curve.points[heavy]).all())


def relplot_curve(confidence, correct, sigma=None):
    """relplot's reliability curve: ``prepare_rel_diagram``'s ``mu`` on its 200-point mesh at its own bandwidth,
    or its kernel smoother's at a fixed ``sigma``; and the bandwidth."""
    f, y = confidence.double().numpy(), correct.double().numpy()
    if sigma is None:
        out = prepare_rel_diagram(f, y, plot_confidence_band=False, report_CE_std=False)
        return out["mu"], out["sigma"]
    return ReflectedGaussianKernel(sigma).smooth(f, y, np.linspace(0, 1, 200))[0], sigma


CURVE_ROWS = {
    "spread": lambda: calibrated_rows(400, 4, 2.0, seed=21, tempered=2.0),
    "narrow band": lambda: (random_logits(300, 4, scale=0.4, seed=23), random_labels(300, 4, seed=24)),
    "confidences of 1": lambda: (random_logits(300, 2, scale=40.0, seed=22), random_labels(300, 2, seed=25)),
}


@pytest.mark.parametrize("rows", CURVE_ROWS)
@pytest.mark.parametrize("sigma", [None, 0.01, 0.3, 1.0])
def test_curve_equals_relplot(rows, sigma):
    """The curve is relplot's on the same rows (their confidences and correctness from ``top1_rows``): the
    smoothed correctness over the smoothed mass plus 10⁻⁴, at every point of [0, 1]."""
    logits, labels = CURVE_ROWS[rows]()
    top1 = ck.top1_rows(logits, labels)
    want, want_sigma = relplot_curve(top1.confidence[top1.kept], top1.correct[top1.kept], sigma)
    curve = ck.smooth_reliability(logits, labels, sigma=sigma, points=200)
    assert curve.sigma == want_sigma
    np.testing.assert_allclose(curve.accuracy.numpy(), want, rtol=0, atol=1e-6)


def test_curve_at_a_wide_bandwidth_is_the_rows_accuracy():
    """Confidences in a narrow band at σ = 1: the curve over the rows is flat at their accuracy (it once was
    ``t − r̂(t)``, a line that left [0, 1]); the density of the confidences integrates to 1 on [0, 1]."""
    logits, labels = CURVE_ROWS["narrow band"]()
    curve = ck.smooth_reliability(logits, labels, sigma=1.0, points=2001)
    low, high = curve.support
    over_rows = (curve.points >= low) & (curve.points <= high)
    accuracy = float(ck.binned_stats(logits, labels, 1).accuracy())
    torch.testing.assert_close(curve.accuracy[over_rows], torch.full_like(curve.accuracy[over_rows], accuracy),
                               rtol=0, atol=0.01)
    assert float(torch.trapezoid(curve.density, curve.points)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.02, 0.3, 1.0])
def test_density_integrates_to_one_and_support_is_the_rows_range(sigma):
    """Rows at confidence exactly 1 included (relplot's reflection keeps half of an end point's kernel on
    [0, 1]; the density restores the mirror image, docs/math.md#smooth-ece)."""
    logits, labels = CURVE_ROWS["confidences of 1"]()
    confidence = ck.top1_rows(logits, labels).confidence
    assert bool((confidence == 1).any())
    curve = ck.smooth_reliability(logits, labels, sigma=sigma, points=2001)  # every grid point and midpoint
    assert curve.support == (float(confidence.min()), float(confidence.max()))
    assert float(torch.trapezoid(curve.density, curve.points)) == pytest.approx(1.0, abs=1e-9)
    assert bool((curve.density >= 0).all()) and 0 <= float(curve.accuracy.min()) <= float(curve.accuracy.max()) <= 1


def test_report_diagrams_draw_the_curve_over_the_rows_only():
    """The demo's and --lm-eval's reliability diagrams (calibkern.pipeline.report) draw the curve from the
    smallest to the largest confidence of the rows, inside [0, 1]; a recorded curve without a support (results
    of older builds, which held t − r̂(t)) is not drawn."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibkern.pipeline.report import _draw, reliability_data

    logits, labels = CURVE_ROWS["narrow band"]()
    rel = reliability_data(logits, labels, 10, sigma=1.0)
    fig, (ax, counts_ax) = plt.subplots(2)
    _draw(ax, counts_ax, "rows", rel, {"ece": 0.1, "accuracy": 0.25})
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith("smooth")]
    confidence, accuracy = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    top1 = ck.top1_rows(logits, labels)
    assert (confidence[0], confidence[-1]) == (float(top1.confidence.min()), float(top1.confidence.max()))
    assert np.all(np.diff(confidence) > 0) and np.all((accuracy >= 0) & (accuracy <= 1))
    want, _ = relplot_curve(top1.confidence, top1.correct, 1.0)
    np.testing.assert_allclose(accuracy, np.interp(confidence, np.linspace(0, 1, 200), want), atol=1e-3)
    ax.clear()
    del rel["smooth"]["support"]
    _draw(ax, counts_ax, "rows", rel, {"ece": 0.1, "accuracy": 0.25})
    assert not [line for line in ax.get_lines() if line.get_label().startswith("smooth")]
    plt.close(fig)


@pytest.mark.parametrize("call,match", [
    (lambda x, y: ck.smooth_ece(x, y, sigma=0.0), "sigma"),
    (lambda x, y: ck.smooth_ece(x, y, sigma=1.5), "sigma"),
    (lambda x, y: ck.smooth_ece(x, y, sigma=float("nan")), "sigma"),
    (lambda x, y: ck.smooth_ece(x, y, temperature=0), "temperature"),
    (lambda x, y: ck.smooth_ece(x, torch.full_like(y, IGNORE)), "every row is ignored"),
    (lambda x, y: ck.smooth_ece(x[:, :, None], y), "logits"),
    (lambda x, y: ck.smooth_ece(x, y[:3]), "labels"),
    (lambda x, y: ck.smooth_reliability(x, y, points=1), "points"),
])
def test_bad_input_names_the_argument(call, match):
    logits, labels = random_logits(8, 3), random_labels(8, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(logits, labels)


def test_nonfinite_rows_raise_or_are_skipped():
    logits, labels = random_logits(50, 4, seed=5), random_labels(50, 4, seed=6)
    logits[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ck.smooth_ece(logits, labels)
    keep = torch.arange(50) != 3
    assert torch.equal(ck.smooth_ece(logits, labels, nonfinite="skip"), ck.smooth_ece(logits[keep], labels[keep]))


def test_extreme_logits_and_float16():
    logits = random_logits(500, 4, scale=200.0, seed=8)
    labels = random_labels(500, 4, seed=9)
    expected, _ = relplot_smece(logits, labels)
    assert abs(float(ck.smooth_ece(logits, labels)) - expected) <= 1e-6
    half = random_logits(500, 4, seed=10).half()
    expected, _ = relplot_smece(half.float(), labels)
    assert np.isclose(float(ck.smooth_ece(half, labels)), expected, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 47, 123, 70_001])
@pytest.mark.parametrize("cells", [1, 7, 1000, 10240])
def test_grid_moments_equal_float64_sums(backend, n, cells):
    from calibkern.ops import custom_ops

    g = torch.Generator().manual_seed(n + cells)
    confidence = torch.rand(n, generator=g)
    edges = torch.tensor([0.0, 1.0, 0.5, 3 / cells, 1 - 1e-7])[:n]  # both ends, cell edges, just below 1
    confidence[:edges.shape[0]] = edges
    correct = torch.rand(n, generator=g) < confidence
    got = custom_ops.grid_moments(confidence, correct, cells, backend)
    c = confidence.double()
    r = c - correct.double()
    cell = torch.clamp((c * cells).floor().long(), max=cells - 1)
    expected = torch.zeros(cells, 4, dtype=torch.float64)
    for column, value in enumerate((torch.ones_like(c), c, r, c * r)):
        expected[:, column] = torch.bincount(cell, value, minlength=cells)
    assert got.dtype == torch.float64 and got.shape == (cells, 4)
    assert torch.equal(got[:, 0], expected[:, 0])  # counts exact
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.skipif("cpp" not in ck.available_backends(), reason="the C++ extension is not built")
def test_cpp_grid_moments_do_not_depend_on_the_thread_count():
    from calibkern.ops import custom_ops

    g = torch.Generator().manual_seed(5)
    confidence = torch.rand(300_001, generator=g)
    correct = torch.rand(300_001, generator=g) < confidence
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(custom_ops.grid_moments(confidence, correct, 1000, "cpp"))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
