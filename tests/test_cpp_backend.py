"""The cpp backend (calibkern._C) against the torch reference, kernel by kernel (docs/backends.md).

Bin counts must be equal exactly; sums, losses and gradients to float32 tolerance; and every result
bitwise identical with 1 and 2 OpenMP threads (fixed-block reductions).
"""

import math

import pytest
import torch

_C = pytest.importorskip("calibkern._C", reason="the C++ extension calibkern._C is not built")

from calibkern import _cpp as cpp  # noqa: E402
from calibkern import reference as ref  # noqa: E402
from helpers import em_params  # noqa: E402

IGNORE = -100
M_BINS = 10
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K): every K at small N, the long rows (32000) and the large N only where they matter; at N = 1000
# every K that full row groups transpose in registers (2–8) and the first that they gather (9)
SHAPES = ([(1, k) for k in (2, 3, 4, 5, 31, 32000)] + [(47, k) for k in (2, 3, 4, 5, 8, 31, 32000)]
          + [(1000, k) for k in (2, 3, 4, 5, 6, 7, 8, 9, 31, 100)] + [(65536, 4)])
KINDS = ["random", "extreme", "ties"]


def make_rows(n: int, k: int, dtype: torch.dtype, kind: str, seed: int = 0):
    """Logits [n, k] and labels [n] (every 5th row ignored). ``extreme``: ±1e4 mixed with ordinary values;
    ``ties``: every 3rd row all equal (confidence 1/k exactly, on a bin edge when k divides M) and the rest
    with the maximum repeated."""
    gen = torch.Generator().manual_seed(seed * 1000003 + n * 101 + k)
    z = torch.randn(n, k, generator=gen) * 3.0
    if kind == "extreme":
        signs = torch.randint(0, 2, (n, k), generator=gen) * 2.0 - 1.0
        z = torch.where(torch.rand(n, k, generator=gen) < 0.3, signs * 1e4, z)
    elif kind == "ties":
        z = z.round()
        z[:, 1] = z.max(dim=1).values
        z[::3] = 0.5
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[::5] = IGNORE
    return z.to(dtype), labels


def assert_same(got, want, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{index}]: {g.dtype}{tuple(g.shape)}"
        if g.dtype == torch.int64:
            assert torch.equal(g, w), f"{what}[{index}]: counts differ"
        elif g.dtype == torch.float64:  # sums over rows
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}[{index}]: {m}")
        else:  # per-row float32 losses and gradients
            torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-6, msg=lambda m: f"{what}[{index}]: {m}")


def run_all(backend, x, y, bins=M_BINS):
    """Every kernel of the contract on one input with one backend module, as {name: result}."""
    acc = torch.linspace(0.05, 1.0, bins)
    log_pi, mu, sigma, weight = em_params()
    em = (x, y, log_pi, mu, sigma)
    out = {}
    for classwise in (False, True):
        for temperature in (1.0, 1.7):
            out[f"binned_stats cw={classwise} T={temperature}"] = backend.binned_stats(
                x, y, bins, temperature, IGNORE, classwise)
    for reduction in ("none", "sum", "mean"):
        out[f"hard_bin_loss {reduction}"] = backend.hard_bin_loss(x, y, acc, IGNORE, reduction)
        out[f"em_target_loss {reduction}"] = backend.em_target_loss(*em, weight, IGNORE, reduction)
    out["em_stats"] = backend.em_stats(*em, IGNORE)
    out["em_ece_grad"] = backend.em_ece_grad(*em, weight - 0.5, IGNORE)
    if x.dtype == torch.float32:
        z = x.clone()
        out["cross_entropy_"] = (backend.cross_entropy_(z, y, IGNORE), z)
    return out


def assert_backends_agree(x, y, what):
    want = run_all(ref, x, y)
    for name, got in run_all(cpp, x, y).items():
        assert_same(got, want[name], f"{name} {what}")


@pytest.mark.parametrize("n,k", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", KINDS)
def test_kernels_match_reference(n, k, dtype, kind):
    if (k > 1000 and kind != "random") or (n * k > 200_000 and dtype != torch.float32):
        pytest.skip("long rows run with random logits, large shapes in fp32 only, to keep the file fast")
    assert_backends_agree(*make_rows(n, k, dtype, kind), f"N={n} K={k}")


@pytest.mark.parametrize("k,bins", [(2, 10), (4, 4), (4, 8), (5, 10), (10, 10), (8, 16), (100, 10), (80, 40)])
def test_confidence_on_bin_edges(k, bins):
    """All-equal rows give c = 1/k exactly; when c·M is an integer the row lands in bin c·M."""
    x = torch.zeros(33, k)
    y = torch.arange(33) % k
    counts, sum_conf, _, _ = cpp.binned_stats(x, y, bins, 1.0, IGNORE, False)
    want = ref.binned_stats(x, y, bins, 1.0, IGNORE, False)
    assert_same((counts, sum_conf), want[:2], "edges")
    assert counts[min(int(torch.tensor(1.0 / k) * bins), bins - 1)] == 33


def test_confidence_one_lands_in_last_bin():
    x = torch.tensor([[1e4, -1e4], [0.0, -1e4], [-1e4, 1e4, ], [3.0, 3.0]])
    y = torch.tensor([0, 1, 1, 0])
    counts, sum_conf, sum_correct, _ = cpp.binned_stats(x, y, 10, 1.0, IGNORE, False)
    assert counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 3]
    assert sum_conf[9].item() == 3.0 and sum_correct.tolist()[9] == 2.0


VOCAB = 128259  # a vocabulary-sized row whose last 3 classes are a vector's scalar tail
CUT = 1027  # VOCAB − CUT is a multiple of 2048 plus 256: a row's last CUT columns sit in the same lanes


def assert_vocabulary_bins_as_cut_rows(x, y, bins, at_end):
    """Classwise statistics of vocabulary-sized rows (x: −1e4, e = 0, outside its first or, ``at_end``, last CUT
    columns) equal those of the rows cut to those CUT columns, where K·M ≤ 16384 bins every class from the exact
    c = e/s right after its softmax — the same e and s: the cut columns hold e = 0. Counts and Σ 1[j = y] exactly,
    Σ p to float32 rounding (p = e·(1/s) at vocabulary size)."""
    columns = slice(VOCAB - CUT, VOCAB) if at_end else slice(0, CUT)
    cut_y = y - (VOCAB - CUT) if at_end else y
    big = cpp.binned_stats(x, y, bins, 1.0, IGNORE, True)
    cut = cpp.binned_stats(x[:, columns].contiguous(), cut_y, bins, 1.0, IGNORE, True)
    assert torch.equal(big[0][columns], cut[0]) and torch.equal(big[2][columns], cut[2])
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[columns] = False
    assert torch.equal(big[0][others, 0], torch.full((VOCAB - CUT,), len(x))) and not big[0][others, 1:].any()
    torch.testing.assert_close(big[1][columns], cut[1], rtol=1e-6, atol=0)
    return cut


@pytest.mark.parametrize("at_end", [False, True], ids=["first-classes", "scalar-tail"])
@pytest.mark.parametrize("edge", [1, 2], ids=["bin-0-edge", "bin-2-edge"])
def test_classwise_vocabulary_rows_on_bin_edges(edge, at_end):
    """At vocabulary size p = e·(1/s) decides bin 0 only where p·M < 1 − 2⁻¹⁶; elsewhere the bin is the exact
    float32 c = e/s's. Rows of logits 0 (e = 1), one logit log f and −1e4 elsewhere, Σ e = s a few ulps from M/edge,
    so that c·M of the e = 1 classes rounds to the edge (1: the fast bin-0 test's boundary; 2: a bin taken from
    c), to one ulp below it and to one ulp above it, land in the exact path's bins."""
    bins, one, s = 10, torch.tensor(1.0), torch.tensor(10.0 / edge)
    x = torch.full((4, VOCAB), -1e4)
    seen = set()
    for row, step in enumerate((-2, -1, 0, 1)):  # s nudged by ulps
        value = s
        for _ in range(abs(step)):
            value = torch.nextafter(value, torch.tensor(0.0 if step < 0 else 99.0))
        t = (one / value) * bins
        seen.add(0 if t == edge else -1 if torch.nextafter(t, torch.tensor(99.0)) == edge else
                 1 if torch.nextafter(t, torch.tensor(0.0)) == edge else None)
        n = math.floor(value.item())
        logits = [0.0] * n + ([math.log(value.item() - n)] if value.item() > n else [])
        if at_end:  # the 0 logits last, three of them in the scalar tail
            logits.reverse()
        first = VOCAB - len(logits) if at_end else 0
        x[row, first:first + len(logits)] = torch.tensor(logits)
    assert seen >= {-1, 0, 1}, seen  # c·M one ulp below the edge, on it, one ulp above
    y = torch.tensor([3, 0, 4099, 1]) if not at_end else torch.tensor([VOCAB - 1, VOCAB - 2, 4099, VOCAB - 4])
    cut = assert_vocabulary_bins_as_cut_rows(x, y, bins, at_end)
    assert cut[0][:, edge - 1].any() and cut[0][:, edge].any()  # the e = 1 classes fall on both sides


def test_classwise_vocabulary_rows_bin_as_the_exact_row_path():
    """Classes whose e·(1/s) and e/s (float32) fall on the two sides of the 0.1 edge: at vocabulary size they land
    in the exact c = e/s's bin. Found among e = 1 − k·2⁻²⁴ (logit −k·2⁻²⁴, exactly that e on any exp within an ulp)
    and s up to 40 ulps from 10; each row: that class, 8 logits 0 and one log(s − 8 − e)."""
    bins, one = 10, torch.tensor(1.0)
    e = 1 - torch.arange(200, dtype=torch.float64) * 2**-24
    rows = []
    for step in range(-40, 41):
        s = torch.tensor(10.0)
        for _ in range(abs(step)):
            s = torch.nextafter(s, torch.tensor(0.0 if step < 0 else 99.0))
        straddle = (((e.float() / s) * bins >= 1) != ((e.float() * (one / s)) * bins >= 1)).nonzero().flatten()
        rows += [(s.item(), e[i].item()) for i in straddle]
    assert len(rows) >= 4, rows
    x = torch.full((len(rows), VOCAB), -1e4)
    for row, (s, e_near) in enumerate(rows):
        x[row, :10] = torch.tensor([math.log(e_near)] + [0.0] * 8 + [math.log(s - 8 - e_near)])
    y = torch.arange(len(rows)) % 2  # the straddling class or a 0 logit
    cut = assert_vocabulary_bins_as_cut_rows(x, y, bins, at_end=False)
    assert cut[0][0, 1] > 0  # the straddling classes in bin 1 (c·M ≥ 1 where e·(1/s)·M < 1)


def test_ignored_rows_contribute_nothing():
    x, y = make_rows(300, 4, torch.float32, "random")
    y[:] = IGNORE
    counts, sum_conf, _, _ = cpp.binned_stats(x, y, M_BINS, 1.0, IGNORE, False)
    assert counts.sum() == 0 and sum_conf.sum() == 0
    for reduction in ("none", "mean"):
        loss, grad = cpp.hard_bin_loss(x, y, torch.rand(M_BINS), IGNORE, reduction)
        assert not loss.any() and not grad.any()
    z = x.clone()
    assert not cpp.cross_entropy_(z, y, IGNORE).any() and not z.any()
    assert not cpp.em_stats(x, y, *em_params()[:3], IGNORE).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", [2, 17, 3000])
def test_finite_rows(dtype, k):
    x = torch.randn(40, k)
    x[3, 0], x[7, k - 1], x[11, k // 2], x[12, 1] = float("nan"), float("inf"), -float("inf"), 1e38
    x = x.to(dtype)
    assert torch.equal(_C.finite_rows(x), torch.isfinite(x).all(dim=1))
    assert not _C.all_finite(x) and _C.all_finite(x[13:])
    assert _C.all_finite(x[:0])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", [2, 4, 17, 64, 65, 3000])
@pytest.mark.parametrize("classwise", [False, True], ids=["top1", "classwise"])
def test_binned_stats_leaves_out_and_counts_nonfinite_rows(dtype, k, classwise):
    """The kernel's own pass finds kept rows holding NaN/±inf (anywhere in the row, including a chunk's
    scalar tail), leaves them out and counts them exactly like the reference; ignored rows are never read."""
    x, y = make_rows(70, k, torch.float32, "random")
    x[3, 0], x[7, k - 1], x[11, k // 2], x[12, 1], x[40, k - 1] = float("nan"), float("inf"), -float("inf"), 1e30, 1e38
    y[5], x[5, 0] = IGNORE, float("nan")
    x = x.to(dtype)
    for temperature in (1.0, 1e-10):  # 1e38 · 1e10 overflows to inf only after scaling
        got = cpp.binned_stats(x, y, M_BINS, temperature, IGNORE, classwise)
        want = ref.binned_stats(x, y, M_BINS, temperature, IGNORE, classwise)
        assert_same(got, want, f"K={k} T={temperature}")
        assert got[3] == (3 if temperature == 1.0 and dtype != torch.float16 else 4)  # row 40 is ignored


def test_labels_in_range():
    y = torch.randint(0, 7, (200_000,))
    y[::9] = IGNORE
    assert _C.labels_in_range(y, 7, IGNORE)
    for bad in (7, -1, -101):
        z = y.clone()
        z[150_001] = bad
        assert not _C.labels_in_range(z, 7, IGNORE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,k", [(1, 4), (47, 4), (47, 9), (70, 65), (70, 3000)])
def test_row_loss_kernels_count_their_input_faults(n, k, dtype):
    """hard_bin_loss and em_target_loss check what prepare(row_loss=True) leaves to them, in their own
    passes: labels outside [0, K) other than ignore_index, and rows (ignored ones too, as prepare's check
    of the whole tensor) holding NaN or ±inf — each counted once, also in a partial row group."""
    x, y = make_rows(n, k, torch.float32, "random")
    log_pi, mu, sigma, theta = em_params()
    acc = torch.linspace(0.05, 0.95, M_BINS)

    def faults(x, y):
        hard = _C.hard_bin_loss(x.to(dtype), y, acc, IGNORE, 2)[2:]
        em = _C.em_target_loss(x.to(dtype), y, log_pi, mu, sigma, theta, IGNORE, 0)[3:]
        assert hard == em
        return hard

    assert faults(x, y) == (0, 0)
    bad_y = y.clone()
    bad_y[n - 1] = k
    bad_y[0] = -1 if n > 1 else k
    assert faults(x, bad_y) == (min(n, 2), 0)
    bad_x = x.clone()
    bad_x[n - 1, k - 1] = float("nan")  # the last row: a partial group's lanes repeat it
    if n > 1:
        bad_x[0, 0], y[0] = float("inf"), IGNORE
    assert faults(bad_x, y) == (0, min(n, 2))
    with pytest.raises(ValueError, match="option_logits contains NaN or infinite"):
        cpp.hard_bin_loss(bad_x.to(dtype), y, acc, IGNORE, "mean")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, %d\) or equal ignore_index=-100" % k):
        cpp.em_target_loss(x.to(dtype), bad_y, log_pi, mu, sigma, theta, IGNORE, "sum")


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 31, 100])
@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_row_losses_err_no_more_than_the_float32_reference(k, scale):
    """Against a float64 ground truth, the row-loss kernels' per-row losses and gradients err no more than the
    float32 reference's plus a small tolerance (a few float32 ulps at magnitude one)."""
    gen = torch.Generator().manual_seed(k * 10 + int(scale))
    x = torch.randn(4000, k, generator=gen) * scale
    y = torch.randint(0, k, (4000,), generator=gen)
    acc = torch.rand(M_BINS, generator=gen) * 0.9 + 0.05
    log_pi, mu, sigma, theta = em_params()
    calls = {"hard_bin_loss": lambda m, x, f: m.hard_bin_loss(x, y, f(acc), IGNORE, "none"),
             "em_target_loss": lambda m, x, f: m.em_target_loss(x, y, *map(f, (log_pi, mu, sigma, theta)), IGNORE,
                                                                "none")[:2]}
    for name, call in calls.items():
        truth = call(ref, x.double(), torch.Tensor.double)
        same_dtype = call(ref, x, torch.Tensor.float)
        kernel = call(cpp, x, torch.Tensor.float)
        for what, t, r, c, tol in zip(("loss", "grad"), truth, same_dtype, kernel, (1e-6, 1e-6)):
            ref_err = (r.double() - t).abs().max().item()
            err = (c.double() - t).abs().max().item()
            assert err <= ref_err + tol, f"{name} {what}: kernel error {err:.3g}, float32 reference {ref_err:.3g}"


@pytest.mark.parametrize("bins", [1, 2, 15, 16, 17, 32, 33, 100])
def test_hard_bin_loss_reads_every_bin_accuracy(bins):
    """The bin-accuracy table is read from registers for M ≤ 32 (one or two of them) and gathered from
    memory above: every layout gives the reference's losses, with rows spread over every bin."""
    x, y = make_rows(1000, 4, torch.float32, "random")
    x = x * torch.linspace(0.0, 2.0, 1000)[:, None]  # confidences from 1/K up to near 1
    acc = torch.rand(bins, generator=torch.Generator().manual_seed(bins))
    assert_same(cpp.hard_bin_loss(x, y, acc, IGNORE, "none"), ref.hard_bin_loss(x, y, acc, IGNORE, "none"),
                f"M={bins}")


def test_empty_input():
    assert_backends_agree(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), "N=0")


def test_long_rows_keep_first_argmax_across_chunks():
    """The online softmax finds the first maximum even when it repeats in a later chunk of the row."""
    x = torch.randn(3, 262144)
    x[:, 5000] = 50.0
    x[:, 200000] = 50.0
    y = torch.tensor([5000, 200000, 7])
    got = cpp.binned_stats(x, y, M_BINS, 1.0, IGNORE, False)
    assert_same(got, ref.binned_stats(x, y, M_BINS, 1.0, IGNORE, False), "K=262144")
    assert got[2].sum() == 1.0


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert _C.max_threads() == n
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n,k,dtype", [(20000, 4, torch.float32), (3000, 31, torch.bfloat16),
                                       (300, 3000, torch.float32), (40, 32000, torch.float16)],
                         ids=["short", "mid", "long", "vocab"])
def test_bitwise_identical_for_any_thread_count(n, k, dtype):
    x, y = make_rows(n, k, dtype, "random", seed=3)
    one, two = (_with_threads(threads, lambda: run_all(cpp, x, y)) for threads in (1, 2))
    for name in one:
        for a, b in zip(_tensors(one[name]), _tensors(two[name]), strict=True):
            assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def _tensors(result):
    return [result] if isinstance(result, torch.Tensor) else [t for part in result for t in _tensors(part)]
