"""The triton backend against the reference (``calibkern.reference``), kernel by kernel and through the
public API, plus the ``torch.library`` custom ops under ``torch.compile``.

Runs on CPU tensors through the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before
triton is imported) or on CUDA tensors where a GPU exists. Small shapes: N ≤ 64, K up to 4099 (not a
multiple of the K-tile), fp32 and fp16, and one bf16 case (the interpreter has no bf16 arithmetic, but the
kernels only load bf16 and convert it). Bin counts must match exactly; values and gradients to float32
tolerance.
"""

import os
import subprocess
import sys

import pytest
import torch

import calibkern
from calibkern import reference as ref
from helpers import em_params, float32_tolerance, random_labels, random_logits

pytest.importorskip("triton", reason="triton is not installed (pip install 'calibkern[triton]')")
if not calibkern.backends.is_available("triton"):
    pytest.skip("the triton backend needs a CUDA device or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

from calibkern.ops import custom_ops  # noqa: E402,F401  (registers torch.ops.calibkern.*)
from calibkern.ops import triton as tri  # noqa: E402
from calibkern.ops.triton import common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
ATOL, RTOL = 2e-6, 1e-5  # float32 math on values of order 1
DTYPES = [torch.float32, torch.float16]

# (N, K, max K-tile): one tile, several tiles with a ragged last one, K = 4099 over the default 4096 tile
SHAPES = [(64, 4, None), (17, 37, 16), (33, 4099, None), (5, 2, None)]


@pytest.fixture
def max_block_k(request, monkeypatch):
    """Narrow the K-tile so that small K still runs the online softmax over several tiles."""
    if request.param is not None:
        monkeypatch.setattr(common, "MAX_BLOCK_K", request.param)
    return request.param


def inputs(n, k, dtype, seed=0):
    logits = random_logits(n, k, dtype=dtype, seed=seed).to(DEVICE)
    labels = random_labels(n, k, ignore_frac=0.2, seed=seed + 1).to(DEVICE)
    return logits, labels


def bin_accuracy(m, seed=0):
    acc = torch.rand(m, generator=torch.Generator().manual_seed(seed))
    acc[-1] = 1.0  # d = 0: all non-max targets 0
    acc[0] = 0.0
    return acc.to(DEVICE)


def assert_stats_equal(got, want):
    counts, sum_conf, sum_correct, n_nonfinite = got
    assert torch.equal(n_nonfinite, want[3])
    assert counts.dtype == torch.int64 and sum_conf.dtype == sum_correct.dtype == torch.float64
    torch.testing.assert_close(counts, want[0], rtol=0, atol=0)
    torch.testing.assert_close(sum_correct, want[2], rtol=0, atol=0)
    torch.testing.assert_close(sum_conf, want[1], rtol=RTOL, atol=1e-5)


def assert_close(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------ kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,max_block_k", SHAPES, indirect=["max_block_k"])
@pytest.mark.parametrize("classwise", [False, True])
def test_binned_stats_matches_reference(n, k, max_block_k, dtype, classwise):
    logits, labels = inputs(n, k, dtype)
    for n_bins, temperature in [(10, 1.0), (7, 0.7)]:
        args = (logits, labels, n_bins, temperature, IGNORE, classwise)
        assert_stats_equal(tri.binned_stats(*args), ref.binned_stats(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,max_block_k", SHAPES, indirect=["max_block_k"])
def test_target_losses_match_reference(n, k, max_block_k, dtype):
    logits, labels = inputs(n, k, dtype, seed=3)
    acc = bin_accuracy(10)
    log_pi, mu, sigma, theta = em_params(6, device=DEVICE)
    for reduction in ("none", "sum", "mean"):
        assert_close(tri.hard_bin_loss(logits, labels, acc, IGNORE, reduction),
                     ref.hard_bin_loss(logits, labels, acc, IGNORE, reduction))
        got = tri.em_target_loss(logits, labels, log_pi, mu, sigma, theta, IGNORE, reduction)
        want = ref.em_target_loss(logits, labels, log_pi, mu, sigma, theta, IGNORE, reduction)
        assert_close(got[:2], want[:2])
        torch.testing.assert_close(got[2], want[2], rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,max_block_k", SHAPES, indirect=["max_block_k"])
def test_em_kernels_match_reference(n, k, max_block_k, dtype):
    logits, labels = inputs(n, k, dtype, seed=5)
    log_pi, mu, sigma, theta = em_params(70, device=DEVICE)  # more components than one step of the loop over M
    got = tri.em_stats(logits, labels, log_pi, mu, sigma, IGNORE)
    assert got.dtype == torch.float64 and got.shape == (4, 70)
    torch.testing.assert_close(got, ref.em_stats(logits, labels, log_pi, mu, sigma, IGNORE), rtol=RTOL, atol=1e-5)
    coef = theta - 0.5
    assert_close([tri.em_ece_grad(logits, labels, log_pi, mu, sigma, coef, IGNORE)],
                 [ref.em_ece_grad(logits, labels, log_pi, mu, sigma, coef, IGNORE)])


@pytest.mark.parametrize("n,k,max_block_k", SHAPES, indirect=["max_block_k"])
def test_cross_entropy_in_place_matches_reference(n, k, max_block_k):
    logits, targets = inputs(n, k, torch.float32, seed=7)
    got_logits, want_logits = logits.clone(), logits.clone()
    assert_close([tri.cross_entropy_(got_logits, targets, IGNORE), got_logits],
                 [ref.cross_entropy_(want_logits, targets, IGNORE), want_logits])


@pytest.mark.parametrize("max_block_k", [16], indirect=True)
def test_bfloat16_inputs_are_loaded_as_float32(max_block_k):
    """bf16 logits (the GPU's training dtype): the kernels only convert them, so the interpreter runs them."""
    logits, labels = inputs(17, 37, torch.bfloat16, seed=9)
    for classwise in (False, True):
        args = (logits, labels, 10, 1.0, IGNORE, classwise)
        assert_stats_equal(tri.binned_stats(*args), ref.binned_stats(*args))
    log_pi, mu, sigma, theta = em_params(10, device=DEVICE)
    assert_close(tri.em_target_loss(logits, labels, log_pi, mu, sigma, theta, IGNORE, "mean")[:2],
                 ref.em_target_loss(logits, labels, log_pi, mu, sigma, theta, IGNORE, "mean")[:2])


class NotLaunched:
    """Stands in for a kernel that must not run: launching it fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a second read of the logits")


@pytest.mark.parametrize("k", [2, 37])
@pytest.mark.parametrize("n_bins", [10, 70])  # 70: two steps of the kernel's loop over the bins
def test_classwise_statistics_read_the_logits_once_where_one_class_tile_spans_k(monkeypatch, k, n_bins):
    """binned_stats and metric_sums with the classwise statistics launch the classwise kernel alone: it takes each
    row's softmax, its top-1 bin and its scores from the tile it bins (docs/backends.md#functions)."""
    from calibkern.ops.triton import binning, row_metrics

    logits, labels = inputs(47, k, torch.float32, seed=11)
    logits[3, 1] = float("nan")  # a non-finite kept row, counted once
    labels[3] = 0
    args = (logits, labels, n_bins, 0.8, IGNORE, True)
    assert binning.classwise_in_one_read(47, k, n_bins)
    monkeypatch.setattr(binning, "_row_softmax_kernel", NotLaunched())
    monkeypatch.setattr(row_metrics, "_metric_sums_kernel", NotLaunched())
    assert_stats_equal(tri.binned_stats(*args), ref.binned_stats(*args))
    got, want = tri.metric_sums(*args), ref.metric_sums(*args)
    for index in (0, 3, 5):  # counts, non-finite rows, classwise counts
        assert torch.equal(got[index], want[index])
    for index in (1, 2, 4, 6, 7):
        torch.testing.assert_close(got[index], want[index], rtol=RTOL, atol=1e-5)


# ------------------------------------------------------------------------------------------------ edge cases

def edge_logits(dtype):
    """Rows for ties (within and across K-tiles of width 16), exact bin edges and extreme logits (K = 40)."""
    big = torch.finfo(dtype).max / 2
    rows = torch.zeros(13, 40, dtype=torch.float64)
    rows[1, [3, 20, 37]] = 2.0  # tied maxima in three tiles: ŷ = 3
    rows[2, [20, 21]] = 5.0  # tie inside one tile
    rows[3, [5, 30]] = 1.0  # second max tied with the max across tiles
    rows[4, 0] = 1e4  # c = 1 exactly: last bin; q2 underflows to 0
    rows[5, 39], rows[5, :39] = big, -big  # largest finite logits
    rows[6, :20] = 50.0  # c = 1/20: the edge 1/M for M = 20
    rows[7, :] = torch.linspace(-30, 30, 40)
    rows[8, 17] = 30.0  # q2 tiny but positive
    rows[9, :] = -big  # all equal and extreme: c = 1/40
    rows[10, :8] = 100.0  # c = 1/8: the edge 1/M for M = 8
    rows[11, 2] = 0.5
    rows[12, [30, 35]] = 100.0  # c = 1/2: an edge for every even M
    return rows.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_block_k", [16], indirect=True)
def test_ties_bin_edges_and_extreme_logits(max_block_k, dtype):
    logits = edge_logits(dtype)
    labels = torch.tensor([0, 3, 20, 5, 0, 39, 0, 39, 17, 0, 0, IGNORE, 30], device=DEVICE)
    for n_bins in (10, 20, 8):
        got = tri.binned_stats(logits, labels, n_bins, 1.0, IGNORE, False)
        assert_stats_equal(got, ref.binned_stats(logits, labels, n_bins, 1.0, IGNORE, False))
        assert_stats_equal(tri.binned_stats(logits, labels, n_bins, 1.0, IGNORE, True),
                           ref.binned_stats(logits, labels, n_bins, 1.0, IGNORE, True))
    # M = 8: c = 1/8 opens bin 1, c = 1/2 bin 4, c = 1 closes bin 7; ties broken low, so every kept row is correct
    assert got[0].tolist() == [5, 1, 0, 1, 1, 0, 1, 3] and torch.equal(got[2], got[0].double())
    for n_bins in (8, 20):
        acc = torch.linspace(0, 1, n_bins, device=DEVICE)
        assert_close(tri.hard_bin_loss(logits, labels, acc, IGNORE, "none"),
                     ref.hard_bin_loss(logits, labels, acc, IGNORE, "none"))
    log_pi, mu, sigma, theta = em_params(10, device=DEVICE)
    got = tri.em_target_loss(logits, labels, log_pi, mu, sigma, theta, IGNORE, "none")
    assert_close(got[:2], ref.em_target_loss(logits, labels, log_pi, mu, sigma, theta, IGNORE, "none")[:2])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    if dtype == torch.float32:  # against torch's own softmax: exact where logsumexp(z) rounds to max z
        z, keep = logits.clone(), (labels != IGNORE)[:, None]
        want_loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
        want_grad = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels.clamp(0), 40)) * keep
        assert_close([tri.cross_entropy_(z, labels, IGNORE), z], [want_loss, want_grad])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN on purpose
@pytest.mark.parametrize("classwise", [False, True], ids=["top1", "classwise"])
def test_binned_stats_leaves_out_and_counts_nonfinite_rows(classwise):
    logits, labels = inputs(30, 6, torch.float32)
    labels[1] = 0
    labels[9] = IGNORE
    logits[1, 2], logits[4, 0], logits[9, 5] = float("nan"), -float("inf"), float("inf")
    got = tri.binned_stats(logits, labels, 10, 1.0, IGNORE, classwise)
    assert_stats_equal(got, ref.binned_stats(logits, labels, 10, 1.0, IGNORE, classwise))
    assert got[3] == int((labels[[1, 4]] != IGNORE).sum())


def test_empty_batch_and_all_rows_ignored():
    empty = torch.zeros(0, 5, device=DEVICE)
    no_labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    counts, sum_conf, _, _ = tri.binned_stats(empty, no_labels, 10, 1.0, IGNORE, True)
    assert counts.shape == (5, 10) and counts.sum() == 0 and sum_conf.sum() == 0
    assert tri.hard_bin_loss(empty, no_labels, bin_accuracy(10), IGNORE, "mean")[1].shape == (0, 5)
    logits, _ = inputs(9, 5, torch.float32)
    ignored = torch.full((9,), IGNORE, device=DEVICE)
    assert tri.binned_stats(logits, ignored, 10, 1.0, IGNORE, False)[0].sum() == 0
    for reduction in ("none", "mean"):
        loss, grad = tri.hard_bin_loss(logits, ignored, bin_accuracy(10), IGNORE, reduction)
        assert not loss.any() and not grad.any()


def test_statistics_are_bitwise_reproducible():
    logits, labels = inputs(64, 37, torch.float32)
    first = tri.binned_stats(logits, labels, 10, 1.0, IGNORE, True)
    second = tri.binned_stats(logits, labels, 10, 1.0, IGNORE, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------------ public API

def test_triton_is_listed_and_calibkern_imports_without_triton():
    assert "triton" in calibkern.available_backends()
    code = "import sys, calibkern; assert 'triton' not in sys.modules, 'calibkern imported triton eagerly'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_public_api_with_backend_triton():
    logits, labels = inputs(48, 6, torch.float32, seed=11)
    for mode in ("top1", "classwise"):
        got = calibkern.binned_stats(logits, labels, 10, mode=mode, backend="triton")
        want = calibkern.binned_stats(logits, labels, 10, mode=mode, backend="torch")
        assert_stats_equal((got.counts, got.sum_conf, got.sum_correct, got.n_skipped),
                           (want.counts, want.sum_conf, want.sum_correct, want.n_skipped))
    torch.testing.assert_close(calibkern.ece(logits, labels, 10, backend="triton"),  # from float32 confidences
                               calibkern.ece(logits, labels, 10, backend="torch"), **float32_tolerance(48))

    def loss_and_grad(fn, backend):
        x = logits.clone().requires_grad_()
        loss = fn(x, backend)
        loss.backward()
        return loss.detach(), x.grad

    acc = bin_accuracy(10)
    state = calibkern.EMState(n_components=10)
    losses = [lambda x, b: calibkern.calibration_loss(x, labels, acc, n_bins=10, backend=b),
              lambda x, b: calibkern.em_regularizer(x, labels, state, backend=b),
              lambda x, b: calibkern.em_regularizer(x, labels, state, form="ece", backend=b)]
    for fn in losses:
        assert_close(loss_and_grad(fn, "triton"), loss_and_grad(fn, "torch"))


# ------------------------------------------------------------------------------------------------ custom ops

def custom_op_args(logits, labels):
    log_pi, mu, sigma, theta = em_params(5, device=DEVICE)
    x = logits.clone().requires_grad_()
    return {
        "hard_bin_loss": (x, labels, bin_accuracy(5), IGNORE, "mean"),
        "em_target_loss": (x, labels, log_pi, mu, sigma, theta, IGNORE, "none"),
        "em_ece_loss": (x, labels, log_pi, mu, sigma, theta, IGNORE, "smooth_abs"),
        "em_ece_grad": (logits, labels, log_pi, mu, sigma, theta, IGNORE),
        "em_stats": (logits, labels, log_pi, mu, sigma, IGNORE),
        "binned_stats": (logits, labels, 5, 1.0, IGNORE, True),
        "cross_entropy_": (logits.clone(), labels, IGNORE),
    }


OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")  # tracing: the compile test


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_ops_pass_opcheck(backend):
    logits, labels = inputs(8, 4, torch.float32)
    for name, args in custom_op_args(logits, labels).items():
        torch.library.opcheck(getattr(torch.ops.calibkern, name), (*args, backend), test_utils=OPCHECKS)


def test_torch_compile_traces_a_training_step_without_graph_breaks():
    logits, labels = inputs(16, 4, torch.float32)
    weight = torch.randn(4, 4, device=DEVICE)
    log_pi, mu, sigma, theta = em_params(5, device=DEVICE)
    acc = bin_accuracy(5)

    def step(x, backend):
        z = x @ weight
        hard, _ = torch.ops.calibkern.hard_bin_loss(z, labels, acc, IGNORE, "mean", backend)
        target, _, _ = torch.ops.calibkern.em_target_loss(z, labels, log_pi, mu, sigma, theta, IGNORE, "none",
                                                          backend)
        ece, _, _ = torch.ops.calibkern.em_ece_loss(z, labels, log_pi, mu, sigma, theta, IGNORE, "square", backend)
        return hard + target.mean() + ece

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for backend in ("triton", "torch"):
        x_compiled, x_eager = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = compiled(x_compiled, backend)
        loss.backward()
        step(x_eager, backend).backward()
        torch.testing.assert_close(loss, step(logits, backend))
        torch.testing.assert_close(x_compiled.grad, x_eager.grad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists: gpu_check would run for real")
def test_gpu_check_fails_clearly_without_cuda():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
