"""Numerical robustness against the reference on every available backend (docs/math.md, docs/backends.md): logits of
±1e4,
all-equal rows (ties → lowest index), bf16 / fp16 inputs, N = 1, every row ignored, empty input, and a
streaming CalibrationMeter over 10⁷ rows whose memory stays flat.
"""

import ctypes
import os

import pytest
import torch

import calibkern as ck
from calibkern import reference as ref

from helpers import ACCURACY, IGNORE, M, em_state, outputs, random_labels, random_logits

BACKENDS = ck.available_backends()


def assert_matches_reference(logits, labels, backend):
    got, want = outputs(logits, labels, backend), outputs(logits, labels, "torch")
    for name, value in got.items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), f"{backend} {name} is not finite"
        if value.is_floating_point():
            tol = {} if value.dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(value, want[name], **tol, msg=lambda m: f"{backend} {name}: {m}")
        else:
            assert torch.equal(value, want[name]), f"{backend} {name}: {value} != {want[name]}"
    return got


def extreme_logits(n, k, dtype=torch.float32, seed=0):
    """Rows mixing ±1e4, 0 and large random values, several with exact ties at the maximum."""
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([-1e4, -9999.0, 0.0, 9999.0, 1e4])
    logits = choices[torch.randint(0, len(choices), (n, k), generator=g)]
    logits[::3] = torch.randn(len(logits[::3]), k, generator=g) * 1e4
    return logits.clamp(-1e4, 1e4).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_of_plus_minus_1e4(backend, dtype):
    logits = extreme_logits(64, 5, dtype)
    labels = random_labels(64, 5, ignore_frac=0.2)
    got = assert_matches_reference(logits, labels, backend)
    kept = int((labels != IGNORE).sum())
    assert int(got["top1.counts"].sum()) == kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_pick_the_lowest_index(backend, dtype):
    k = 4
    logits = torch.tensor([[2.0, 2.0, 2.0, 2.0],       # all equal: ŷ = 0, c = 1/K
                           [0.0, 0.0, 0.0, 0.0],
                           [-1e4, -1e4, -1e4, -1e4],
                           [1.0, 3.0, 3.0, 0.0],       # tie at the maximum: ŷ = 1
                           [5.0, -1.0, 5.0, 5.0]], dtype=dtype)  # ŷ = 0
    pred = torch.tensor([0, 0, 0, 1, 0])
    for labels in (pred, (pred + 1) % k):
        got = assert_matches_reference(logits, labels, backend)
        n_correct = int((labels == pred).sum())
        assert float(got["top1.sum_correct"].sum()) == n_correct
    # the all-equal rows have confidence exactly 1/K (bin floor(M/K)), the two-way ties 1/2 or less
    assert int(got["top1.counts"][int(M / k)]) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    logits = random_logits(300, 7, scale=4.0, dtype=dtype, seed=2)
    labels = random_labels(300, 7, ignore_frac=0.1, seed=3)
    got = assert_matches_reference(logits, labels, backend)
    for name in ("hard_bin.grad", "em_target.grad", "em_ece.grad"):
        assert got[name].dtype == dtype  # the gradient comes back in the logits' dtype
    # the statistics are those of the upcast values: half precision only rounds the input
    exact = ck.binned_stats(logits.float(), labels, M, backend="torch")
    assert torch.equal(got["top1.counts"], exact.counts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 5, 1000])
def test_a_single_row(backend, k):
    logits = random_logits(1, k, seed=k)
    for label in (0, k - 1):
        got = assert_matches_reference(logits, torch.tensor([label]), backend)
        assert int(got["top1.counts"].sum()) == 1
    assert ck.ece(logits, torch.tensor([0]), backend=backend).item() == pytest.approx(
        abs(float(ref.softmax_parts(logits)[1]) - float(logits.argmax() == 0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored(backend):
    logits = random_logits(9, 4, seed=6)
    labels = torch.full((9,), IGNORE)
    got = assert_matches_reference(logits, labels, backend)
    for name, value in got.items():
        assert torch.count_nonzero(value) == 0, f"{name} is not zero"
    for form in ("target", "ece"):
        z = logits.clone().requires_grad_(True)
        loss = ck.em_regularizer(z, labels, ck.EMState(M), form=form, backend=backend)  # mean over 0 rows
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    z = logits.clone().requires_grad_(True)
    loss = ck.calibration_loss(z, labels, ACCURACY, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    assert ck.ece(logits, labels, backend=backend).item() == 0.0
    state = ck.EMState(M)
    state.estep(logits, labels, backend=backend)
    state.mstep()  # no mass anywhere: the components stay, θ falls back to the prior mean
    assert all(torch.isfinite(t).all() for t in state.state_dict().values())
    torch.testing.assert_close(state.mu, ck.EMState(M).mu)
    torch.testing.assert_close(state.theta, torch.full((M,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_skipped_all_of_them(backend):
    logits = torch.full((5, 3), float("nan"))
    labels = torch.tensor([0, 1, 2, 0, 1])
    stats = ck.binned_stats(logits, labels, M, nonfinite="skip", backend=backend)
    assert int(stats.n_skipped) == 5 and int(stats.total()) == 0
    z = logits.clone().requires_grad_(True)
    loss = ck.calibration_loss(z, labels, ACCURACY, nonfinite="skip", backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_is_defined_or_a_clear_error(backend):
    logits, labels = torch.empty(0, 4), torch.empty(0, dtype=torch.long)
    # statistics and losses of no rows: zeros (an empty batch adds nothing)
    got = outputs(logits, labels, backend)
    for name, value in got.items():
        assert torch.count_nonzero(value) == 0, name
    meter = ck.CalibrationMeter(M, backend=backend)
    meter.update(logits, labels)
    assert all(torch.isfinite(v).all() and v.item() == 0 for v in meter.compute().values())
    # a metric of no rows is undefined: an error naming the argument
    for metric in (ck.ece, ck.classwise_ece):
        with pytest.raises(ValueError, match="logits is empty"):
            metric(logits, labels, backend=backend)
    for metric in (ck.adaptive_ece, ck.nll, ck.brier):
        with pytest.raises(ValueError, match="logits is empty"):
            metric(logits, labels)
    with pytest.raises(ValueError, match="before any update"):
        ck.CalibrationMeter(M).compute()


def test_meter_does_not_keep_the_autograd_graph():
    """Training logits carry a graph; the meter's running sums must not hold on to it."""
    meter = ck.CalibrationMeter(M)
    logits = random_logits(50, 4).requires_grad_(True)
    meter.update(logits, random_labels(50, 4))
    assert not any(v.requires_grad for v in meter.compute().values())


@pytest.mark.parametrize("call", [
    lambda z, y: ck.binned_stats(z, y),
    lambda z, y: ck.calibration_loss(z, y, ACCURACY),
    lambda z, y: ck.em_regularizer(z, y, ck.EMState(M)),
    lambda z, y: ck.EMState(M).estep(z, y),
    lambda z, y: ck.CalibrationMeter(M).update(z, y),
    lambda z, y: ck.adaptive_ece(z, y),
], ids=["binned_stats", "calibration_loss", "em_regularizer", "estep", "meter", "adaptive_ece"])
def test_labels_on_another_device_is_an_error(call):
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        call(random_logits(4, 3), torch.zeros(4, dtype=torch.long, device="meta"))


def _fused_cases():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(10, 8, generator=g)
    answers = torch.tensor([3, 4, 5, 6, 7, 3, 4, 5, 6, 7])
    return {
        "every label ignored": (hidden, torch.full((10,), IGNORE)),
        "empty": (hidden[:0], answers[:0]),
        "no answer positions": (hidden, torch.randint(10, 50, (10,), generator=g)),
        "one supervised row": (hidden[:2], torch.tensor([IGNORE, 4])),
        "hidden of 1e4": (hidden.sign() * 1e4, answers),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_fused_cases()))
@pytest.mark.parametrize("calibration", ["hard_bin", "em"])
def test_fused_linear_loss_edge_cases(backend, case, calibration):
    """Never NaN; an empty or fully ignored batch gives 0 and zero gradients; equal to the reference."""
    hidden, labels = _fused_cases()[case]
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(9))

    def run(name):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        state = {"bin_accuracy": ACCURACY} if calibration == "hard_bin" else {"em_state": em_state()}
        out = ck.fused_linear_calibration_loss(h, w, labels, option_ids=torch.tensor([3, 4, 5, 6]), shift=False,
                                               calibration=calibration, backend=name, **state)
        out.loss.backward()
        return {"loss": out.loss.detach(), "sft": out.sft_loss.detach(), "cal": out.cal_loss.detach(),
                "grad_hidden": h.grad, "grad_weight": w.grad}

    got, want = run(backend), run("torch")
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if (labels == IGNORE).all():
        assert all(torch.count_nonzero(value) == 0 for value in got.values())


# -------------------------------------------------------------------------------------- streaming 10⁷ rows

STREAM_ROWS, STREAM_CHUNK, STREAM_K = 10_000_000, 1_000_000, 4
EDGE_TOL = 2e-6  # |c·M − round(c·M)|: a few float32 ulps of c·M (c·M ≤ M = 10)


def _rss_bytes() -> int:
    """Resident set size, after handing freed heap pages back to the system where glibc allows it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _chunks():
    """The 10⁷ rows, generated chunk by chunk (never all at once), with ignored rows."""
    g = torch.Generator().manual_seed(7)
    for _ in range(STREAM_ROWS // STREAM_CHUNK):
        logits = torch.randn(STREAM_CHUNK, STREAM_K, generator=g) * 2.0
        labels = torch.randint(0, STREAM_K, (STREAM_CHUNK,), generator=g)
        labels[torch.rand(STREAM_CHUNK, generator=g) < 0.05] = IGNORE
        yield logits, labels


def _state_bytes(meter) -> int:
    tensors = [meter.sum_nll, meter.sum_brier, meter.stats.counts, meter.stats.sum_conf,
               meter.stats.sum_correct, meter.stats.n_skipped]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_streaming_meter_over_ten_million_rows_has_flat_memory():
    """The fastest CPU backend streams the rows; the reference's statistics of the same chunks are merged.

    Backends may round a confidence differently in its last float32 bit (their exp differs), so a sample
    whose confidence lies within that rounding of a bin edge may sit in either bin: such samples are counted
    and allowed to move. (NLL and Brier sums streamed against one shot: tests/test_properties.py.)
    """
    backend = "cpp" if "cpp" in BACKENDS else "torch"
    meter = ck.CalibrationMeter(M, backend=backend)
    expected = ck.BinStats.empty(M)
    at_edge = 0
    state_bytes, rss = [], []
    for logits, labels in _chunks():
        meter.update(logits, labels)
        expected = expected + ck.binned_stats(logits, labels, M, backend="torch")
        if backend != "torch":
            scaled = logits[labels != IGNORE].softmax(1).amax(1) * M
            at_edge += int(((scaled - scaled.round()).abs() < EDGE_TOL).sum())
            del scaled
        state_bytes.append(_state_bytes(meter))
        del logits, labels
        rss.append(_rss_bytes())
    assert len(set(state_bytes)) == 1 and state_bytes[0] < 1024  # O(M) state, the same after every chunk
    growth = max(rss[3:]) - max(rss[:3])  # after three chunks of warm-up
    chunk_bytes = STREAM_CHUNK * STREAM_K * 4
    assert growth < 2 * chunk_bytes, f"RSS grew by {growth / 2 ** 20:.1f} MiB while streaming: {rss}"

    result = meter.compute()
    n = int(expected.counts.sum())
    assert int(result["n"]) == n and 0.94 * STREAM_ROWS < n < 0.96 * STREAM_ROWS
    got = meter.stats
    assert at_edge < 100  # ≈ 10⁷ · 2·EDGE_TOL / 0.75 per edge
    assert int((got.counts - expected.counts).abs().sum()) <= 2 * at_edge
    assert float((got.sum_correct - expected.sum_correct).abs().max()) <= at_edge
    assert ((got.sum_conf - expected.sum_conf).abs() <= 1e-9 * expected.sum_conf + at_edge).all()
    assert got.sum_correct.sum() == expected.sum_correct.sum()  # integers, exact in float64
    torch.testing.assert_close(result["ece"], expected.ece(), rtol=0, atol=2 * at_edge / n + 1e-12)
    torch.testing.assert_close(result["accuracy"], expected.accuracy(), rtol=1e-12, atol=0)
    assert 0.0 < float(result["nll"]) < 10.0 and 0.0 <= float(result["brier"]) <= 2.0
