"""``top1_rows`` and the one-pass ``metric_sums`` on every backend against the reference and float64
(docs/math.md#proper-scores): odd shapes, ignored rows, every dtype, extreme logits, confident rows whose Brier
score only survives without cancellation, non-finite rows, and the meter and metrics built on them."""

import math

import pytest
import torch

import calibkern as ck
from calibkern import reference as ref
from calibkern.ops.row_metrics import metric_sums_tensors
from helpers import random_labels, random_logits

IGNORE = -100
M = 10
BACKENDS = ck.available_backends()
INTERPRETED = {"triton"}
# (N, K): odd sizes, one long row with several Triton tiles and several C++ chunks
SHAPES = [(1, 2), (47, 4), (123, 9), (123, 65), (17, 4099)]


def dtypes(backend):
    return [torch.float32, torch.float16] + ([] if backend in INTERPRETED else [torch.bfloat16])


def rows(n, k, dtype, kind="random", seed=0):
    logits = random_logits(n, k, scale=3.0, seed=seed + n + k)
    if kind == "extreme":
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n, k), generator=g) * 2.0 - 1.0
        logits = torch.where(torch.rand(n, k, generator=g) < 0.3, signs * 1e4, logits)
    return logits.to(dtype), random_labels(n, k, ignore_frac=0.2, seed=k)


def float64_scores(logits, labels, temperature=1.0):
    """Per-row NLL and Brier of the kept rows in float64 with the textbook formulas."""
    keep = labels != IGNORE
    z = logits[keep].double() / temperature
    log_p = torch.log_softmax(z, dim=1)
    y = labels[keep][:, None]
    one_hot = torch.zeros_like(z).scatter_(1, y, 1.0)
    return -log_p.gather(1, y).squeeze(1), (log_p.exp() - one_hot).square().sum(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_top1_rows_match_the_reference(backend, n, k, kind):
    for dtype in dtypes(backend):
        logits, labels = rows(n, k, dtype, kind)
        got = ck.top1_rows(logits, labels, temperature=1.5, backend=backend)
        want_conf, want_correct = ref.top1_rows(logits, labels, 1.5, IGNORE)
        assert got.confidence.dtype == torch.float32 and got.correct.dtype == torch.bool
        torch.testing.assert_close(got.confidence, want_conf, rtol=2e-6, atol=2e-7)
        assert torch.equal(got.correct, want_correct)
        assert torch.equal(got.kept, labels != IGNORE)
        kept = labels != IGNORE
        exact = torch.softmax(logits[kept].double() / 1.5, dim=1).amax(dim=1)
        torch.testing.assert_close(got.confidence[kept].double(), exact, rtol=1e-5, atol=1e-7)
        assert (got.confidence[~kept] == 0).all() and not got.correct[~kept].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_rows_mark_nonfinite_rows(backend):
    logits, labels = rows(47, 5, torch.float32)
    labels[3] = 1
    logits[3, 2], logits[4, 0] = float("nan"), float("inf")
    labels[4] = IGNORE  # an ignored row is never read
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        ck.top1_rows(logits, labels, backend=backend)
    got = ck.top1_rows(logits, labels, nonfinite="skip", backend=backend)
    assert torch.isnan(got.confidence[3]) and not got.kept[3] and not got.correct[3]
    assert got.confidence[4] == 0 and int(got.n_skipped) == 1


def test_top1_rows_float64_on_the_reference():
    logits, labels = rows(47, 4, torch.float64)
    got = ck.top1_rows(logits, labels, backend="torch")
    assert got.confidence.dtype == torch.float64
    kept = labels != IGNORE
    torch.testing.assert_close(got.confidence[kept], torch.softmax(logits[kept], 1).amax(1), rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="float64"):
        ck.top1_rows(logits, labels, backend="cpp" if "cpp" in BACKENDS else "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,n_bins", [(300, 64, 30), (70, 600, 30), (33, 40000, 10)])
def test_classwise_paths_for_many_bins_and_wide_rows_match_the_reference(backend, n, k, n_bins):
    """The classwise statistics where K·M outgrows the fast paths: short rows with 30 bins (per-row binning on
    ``cpp``), K·M = 18000 and 400000 (``cpp``'s grouped pass; on Triton a second read), with the top-1 bins and
    scores of the same pass and a non-finite row."""
    logits, labels = rows(n, k, torch.float32)
    logits[2, 5] = float("inf")
    labels[2] = 1
    got = metric_sums_tensors(logits, labels, n_bins, classwise=True, nonfinite="skip", backend=backend)
    want = ref.metric_sums(logits, labels, n_bins, 1.0, IGNORE, True)
    assert int(got[3]) == int(want[3]) == 1
    for index in (0, 5):
        assert torch.equal(got[index], want[index])
    for index in (1, 2, 4, 6, 7):
        torch.testing.assert_close(got[index], want[index], rtol=1e-6, atol=1e-5)
    stats = ck.binned_stats(logits, labels, n_bins, mode="classwise", nonfinite="skip", backend=backend)
    assert torch.equal(stats.counts, want[5])
    torch.testing.assert_close(stats.sum_conf, want[6], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("classwise", [False, True])
def test_metric_sums_match_the_reference_and_float64(backend, n, k, classwise):
    for dtype in dtypes(backend):
        logits, labels = rows(n, k, dtype)
        got = metric_sums_tensors(logits, labels, M, classwise=classwise, temperature=0.7, backend=backend)
        want = ref.metric_sums(logits, labels, M, 0.7, IGNORE, classwise)
        top1 = ref.binned_stats(logits, labels, M, 0.7, IGNORE, False)
        for index in (0, 5):  # top-1 and classwise counts
            assert torch.equal(got[index], want[index])
        for index in (1, 2, 6, 7):
            torch.testing.assert_close(got[index], want[index], rtol=1e-6, atol=1e-5)
        assert torch.equal(got[0], top1[0]) and got[5].shape == ((k, M) if classwise else (0, M))
        nll, brier = float64_scores(logits, labels, 0.7)
        torch.testing.assert_close(got[4], torch.stack([nll.sum(), brier.sum()]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [4, 100])
def test_brier_and_nll_keep_their_relative_precision_on_confident_rows(backend, k):
    """Rows ``[a, 0, …, 0]`` with label 0 and ``p_y ≥ 1 − 1e-7``: exact
    ``Brier = ((K−1) q)² + (K−1) q²`` and ``NLL = log1p((K−1) e^{−a})`` with ``q = e^{−a} / (1 + (K−1) e^{−a})``."""
    a = torch.tensor([21.0, 25.0, 30.0, 40.0])
    logits = torch.zeros(len(a), k)
    logits[:, 0] = a
    labels = torch.zeros(len(a), dtype=torch.int64)
    q = torch.exp(-a.double()) / (1 + (k - 1) * torch.exp(-a.double()))
    exact_brier = ((k - 1) * q).square() + (k - 1) * q.square()
    exact_nll = torch.log1p((k - 1) * torch.exp(-a.double()))
    assert (1 - 1 / (1 + (k - 1) * torch.exp(-a.double())) <= 1e-7).all()
    for dtype, tol in ((torch.float32, 1e-3), (torch.float64, 1e-6)):
        if dtype == torch.float64 and backend != "torch":
            continue
        for i in range(len(a)):
            row = logits[i:i + 1].to(dtype)
            got_brier = ck.brier(row, labels[i:i + 1], backend=backend)
            got_nll = ck.nll(row, labels[i:i + 1], backend=backend)
            assert abs(float(got_brier) / float(exact_brier[i]) - 1) <= tol, (dtype, float(a[i]), float(got_brier))
            assert abs(float(got_nll) / float(exact_nll[i]) - 1) <= tol, (dtype, float(a[i]), float(got_nll))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 100])
def test_nll_is_finite_for_finite_extremes(backend, k):
    """Logits of opposite float32 extremes: ``m − z_y`` exceeds float32's range (6e38), the NLL does not
    (its sums are float64): the mean over the rows equals float64's, short rows and long ones, meter included."""
    logits = torch.zeros(3, k)
    logits[0, :2] = torch.tensor([3e38, -3e38])
    logits[1, :2] = torch.tensor([-3.4e38, 3.4e38])
    logits[2, 0] = 1.0
    labels = torch.tensor([1, 0, 0])
    exact = float(ck.nll(logits.double(), labels, backend="torch"))
    assert exact == pytest.approx((6e38 + 6.8e38 + math.log1p((k - 1) / math.e)) / 3, rel=1e-6)
    meter = ck.CalibrationMeter(M, backend=backend)
    meter.update(logits, labels)
    for got in (ck.nll(logits, labels, backend=backend), meter.compute()["nll"]):
        assert math.isfinite(float(got)) and float(got) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nll_and_brier_apply_the_nonfinite_policy(backend):
    logits, labels = rows(47, 5, torch.float32)
    labels[3] = 1
    logits[3, 2] = float("nan")
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        ck.nll(logits, labels, backend=backend)
    kept = torch.ones(47, dtype=torch.bool)
    kept[3] = False
    for metric in (ck.nll, ck.brier):
        torch.testing.assert_close(metric(logits, labels, nonfinite="skip", backend=backend),
                                   metric(logits[kept], labels[kept], backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [4, 65])
def test_meter_equals_one_shot_metrics_over_the_concatenated_batches(backend, k):
    logits, labels = rows(123, k, torch.float32)
    meter = ck.CalibrationMeter(M, classwise=True, temperature=1.3, backend=backend)
    for start in range(0, 123, 40):
        meter.update(logits[start:start + 40], labels[start:start + 40])
    out = meter.compute()
    kwargs = dict(temperature=1.3, backend=backend)
    torch.testing.assert_close(out["ece"], ck.ece(logits, labels, M, **kwargs), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["cw_ece"], ck.classwise_ece(logits, labels, M, **kwargs), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["nll"], ck.nll(logits, labels, **kwargs), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["brier"], ck.brier(logits, labels, **kwargs), rtol=1e-9, atol=1e-12)
    nll, brier = float64_scores(logits, labels, 1.3)
    torch.testing.assert_close(out["nll"], nll.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["brier"], brier.mean(), rtol=1e-5, atol=0)
    assert int(out["n"]) == int((labels != IGNORE).sum())


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("n,k,n_bins", [(5000, 4, M), (5000, 9, M), (700, 100, M), (500, 64, 30), (50, 40000, M)])
def test_cpp_results_are_bitwise_identical_for_any_thread_count(n, k, n_bins):
    """Every classwise path: lanes, per-block partials (short rows with many bins, long rows) and the grouped pass
    (K·M beyond the blocks' partials; K = 40000 puts 16 rows in a group, so 50 rows make 4 groups)."""
    logits, labels = rows(n, k, torch.float32)
    conf, correct = torch.rand(n), torch.rand(n) < 0.5
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append([*metric_sums_tensors(logits, labels, n_bins, classwise=True, backend="cpp"),
                         *class_stats(logits, labels, n_bins),
                         *ck.top1_rows(logits, labels, backend="cpp"),
                         *calibkern_bootstrap(conf, correct, "cpp")])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def class_stats(logits, labels, n_bins):
    stats = ck.binned_stats(logits, labels, n_bins, mode="classwise", backend="cpp")
    return stats.counts, stats.sum_conf, stats.sum_correct


def calibkern_bootstrap(conf, correct, backend, n_boot=64, seed=3):
    from calibkern.ops import custom_ops
    return custom_ops.bootstrap_stats(conf, correct, M, n_boot, seed, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 47, 123, 2000])
def test_bootstrap_replicates_equal_the_reference_on_every_backend(backend, n):
    if backend in INTERPRETED and n > 123:
        pytest.skip("the interpreter runs one program per replicate")
    g = torch.Generator().manual_seed(n)
    conf = torch.rand(n, generator=g)
    conf[: n // 4] = torch.linspace(0, 1, M + 1).repeat(n)[: n // 4]  # confidences on bin edges
    correct = torch.rand(n, generator=g) < conf
    for seed in (0, 7, -1, 2 ** 40 + 5):
        got = calibkern_bootstrap(conf, correct, backend, seed=seed)
        want = ref.bootstrap_stats(conf, correct, M, 64, seed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])  # integer sums: exactly
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-9)


def test_bootstrap_weights_are_poisson_one():
    w = ref.bootstrap.poisson_weights(200000, torch.arange(2), 11, "cpu").double()
    assert abs(w.mean() - 1) < 0.01 and abs(w.var() - 1) < 0.02
    freq = torch.bincount(w.long().reshape(-1), minlength=4)[:4].double() / w.numel()
    expected = torch.tensor([math.exp(-1) / math.factorial(j) for j in range(4)], dtype=torch.float64)
    torch.testing.assert_close(freq, expected, rtol=0.02, atol=0)
    other_seed = ref.bootstrap.poisson_weights(200000, torch.arange(2), 12, "cpu").double()
    assert abs(torch.corrcoef(torch.stack([w.reshape(-1), other_seed.reshape(-1)]))[0, 1]) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_percentile_interval_is_the_same_on_every_backend(backend):
    logits, labels = rows(123, 4, torch.float32)
    got = ck.ece_confidence_interval(logits, labels, M, method="percentile", n_boot=200, seed=5, backend=backend)
    want = ck.ece_confidence_interval(logits, labels, M, method="percentile", n_boot=200, seed=5, backend="torch")
    assert got.method == "percentile" and got.low <= got.estimate <= got.high
    for a, b in zip(got[:3], want[:3]):
        assert abs(a - b) <= 1e-6


def test_the_custom_ops_trace_under_torch_compile():
    """The fake functions give the shapes and dtypes the kernels return: fullgraph compiles and equals eager."""
    from calibkern.ops import custom_ops

    backend = "cpp" if "cpp" in BACKENDS else "torch"
    logits, labels = rows(47, 4, torch.float32)

    def run(z, y):
        sums = custom_ops.metric_sums(z, y, M, 1.0, IGNORE, True, backend)
        conf, correct = custom_ops.top1_rows(z, y, 1.0, IGNORE, backend)
        replicates = custom_ops.bootstrap_stats(conf, correct, M, 8, 0, backend)
        return (*sums, conf, correct, *replicates)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, labels), run(logits, labels), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
