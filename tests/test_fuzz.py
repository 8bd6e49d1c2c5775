"""Differential fuzzer: every op on every backend against the ``torch`` reference, on inputs drawn by hypothesis.

For each draw — shapes (N, K, V, D, n_bins up to 10⁴) including 1 and odd sizes, every dtype the backend takes,
temperatures down to overflow, ignored rows, exact ties, ±1e4 logits, option-logit gaps up to 10⁴ (K = 2 and 3
among them: a non-max probability that is subnormal or 0), bin accuracies of exactly 0 and 1, EM states with
components far from every confidence (up to 64 components, an M-step included), interval seeds outside
[0, 2⁶³), and NaN / ±inf at random positions of every floating input (logits, hidden, weight, bias, bin
accuracies, EM parameters) — a backend must agree
with the reference on *whether it raises* (the same exception type) and, when neither raises, on every
value and gradient (NaN where the reference has NaN).

Confidences within float32 rounding of a bin edge may be binned either side by two correct kernels (their
``exp`` differ by an ulp): such rows are left out of per-row comparisons, and the binned statistics allow
exactly those rows to move.

CI runs a seeded, bounded profile (``derandomize=True``, a few dozen draws per op and backend). The long
profile is ``pytest -m fuzz`` (thousands of unseeded draws; set ``CALIBKERN_FUZZ_EXAMPLES`` to change it).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calibkern as ck
from calibkern.ops.row_metrics import metric_sums_tensors

IGNORE = -100
BACKENDS = [b for b in ck.available_backends() if b != "torch"]
INTERPRETED = {"triton"}  # the Triton interpreter runs each program in NumPy: fewer and smaller draws
EDGE_TOL = 1e-4  # |c·M − round(c·M)| below this: either neighbouring bin is right
FLOAT = (ValueError, TypeError, RuntimeError)


def profile(backend: str, long: bool):
    if long:
        examples = int(os.environ.get("CALIBKERN_FUZZ_EXAMPLES", "2000"))
        return settings(max_examples=examples // (10 if backend in INTERPRETED else 1), deadline=None,
                        suppress_health_check=list(HealthCheck))
    return settings(max_examples=15 if backend in INTERPRETED else 150, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def dtypes(backend):
    # the Triton interpreter has no bfloat16 arithmetic
    return [torch.float32, torch.float16] + ([] if backend in INTERPRETED else [torch.bfloat16])


# --------------------------------------------------------------------------------------------- drawing

def poison(draw, g, x: torch.Tensor, kinds=("none", "none", "one", "some", "many")) -> torch.Tensor:
    """``x`` with NaN, +inf or −inf at one random position (a diverging run's first sign), at a few, or
    at many (often none)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "none" or x.numel() == 0:
        return x
    if kind == "one":
        where = torch.zeros(x.numel(), dtype=torch.bool)
        where[torch.randint(0, x.numel(), (1,), generator=g)] = True
        where = where.view(x.shape)
    else:
        where = torch.rand(x.shape, generator=g) < (0.02 if kind == "some" else 0.3)
    values = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    special = values[torch.randint(0, 3, x.shape, generator=g)]
    return torch.where(where, special, x)


# option-logit gaps: a non-max probability that is small, subnormal (1/q₂ overflows float32 past a gap of 88.7)
# or 0 (past 103.9)
GAPS = [30.0, 70.0, 89.0, 95.0, 100.0, 103.0, 200.0, 1e3, 1e4]


@st.composite
def option_batches(draw, backend, max_rows=64, max_k=40, max_bins=10_000):
    """(logits [N, K] in a backend dtype, labels [N] with ignored rows, n_bins, generator)."""
    kind = draw(st.sampled_from(["any", "gaps", "gaps, K = 2", "gaps, K = 3"]))
    n = draw(st.sampled_from([1, 2, 3, 16, 17, 47]) | st.integers(1, max_rows))
    k = {"gaps, K = 2": 2, "gaps, K = 3": 3}.get(kind) or draw(st.sampled_from([2, 3, 4, 5]) | st.integers(2, max_k))
    max_bins = min(max_bins, 1000) if backend in INTERPRETED else max_bins  # 10⁴-bin one-hots cost NumPy seconds
    m = draw(st.integers(1, 20) | st.sampled_from([b for b in (64, 1000, max_bins) if b <= max_bins]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
    if draw(st.booleans()):
        logits = logits.round()  # exact ties, confidences at bin edges such as 1/2 and 1/4
    if kind != "any":  # rows of large gaps: 0 for a random option, −gap (one of GAPS, or any up to 1e4) else
        gaps = torch.tensor(GAPS + [draw(st.floats(10.0, 1e4))], dtype=torch.float64)
        gapped = -gaps[torch.randint(0, len(gaps), (n, k), generator=g)]
        gapped[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = 0.0
        logits = torch.where(torch.rand(n, 1, generator=g) < 0.7, gapped, logits)
    extreme = torch.rand(n, k, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    special = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)[torch.randint(0, 3, (n, k), generator=g)]
    logits = torch.where(extreme, special, logits).to(draw(st.sampled_from(dtypes(backend))))
    logits = poison(draw, g, logits)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    return logits, labels, m, g


def em_state(draw, g, m: int) -> ck.EMState:
    """An EMState with m components at random valid parameters (through load_state_dict): anywhere, or narrow
    ones crowded at a random end of [0, 1], far from most confidences (their responsibilities underflow)."""
    state = ck.EMState(n_components=m)
    entries = state.state_dict()
    entries["pi"] = torch.rand(m, generator=g, dtype=torch.float64) + 1e-3
    entries["mu"] = torch.rand(m, generator=g, dtype=torch.float64)
    entries["sigma"] = torch.rand(m, generator=g, dtype=torch.float64) * 0.2 + 1.0 / (4 * m)
    if draw(st.booleans()):
        far = torch.rand(m, generator=g) < 0.5
        entries["mu"] = torch.where(far, torch.rand(m, generator=g, dtype=torch.float64) * 0.05, entries["mu"])
        entries["mu"] = 1.0 - entries["mu"] if draw(st.booleans()) else entries["mu"]
        entries["sigma"] = torch.where(far, torch.full((m,), 1.0 / (4 * m), dtype=torch.float64), entries["sigma"])
    entries["theta"] = torch.rand(m, generator=g, dtype=torch.float64)
    state.load_state_dict(entries)
    return state


# --------------------------------------------------------------------------------------------- comparing

def outcome(fn, backend):
    """``("ok", tensors)`` or ``("raised", exception type)``."""
    try:
        return "ok", fn(backend)
    except FLOAT as error:
        return "raised", type(error)


def agree(fn, backend, compare):
    """The backend raises exactly when the reference does (same type); otherwise ``compare(got, want)``."""
    want = outcome(fn, "torch")
    got = outcome(fn, backend)
    assert got[0] == want[0], f"{backend}: {got} but the reference {want}"
    if want[0] == "raised":
        assert got[1] is want[1], f"{backend} raised {got[1].__name__}, the reference {want[1].__name__}"
    else:
        compare(got[1], want[1])


def close(got, want, rtol=1e-4, atol=1e-5, what=""):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def ambiguous_rows(logits, labels, m, temperature=1.0):
    """Kept rows whose float64 top-1 confidence lies within EDGE_TOL/M of an interior bin edge."""
    z = logits.double() / temperature
    c = torch.softmax(z, dim=1).amax(dim=1)
    scaled = c * m
    near = ((scaled - scaled.round()).abs() < EDGE_TOL) & (scaled.round() > 0) & (scaled.round() < m)
    return near & (labels != IGNORE) & torch.isfinite(z).all(dim=1)


# --------------------------------------------------------------------------------------------- properties

def check_binned_stats(backend, data):
    logits, labels, m, g = data.draw(option_batches(backend))
    mode = data.draw(st.sampled_from(["top1", "classwise"]))
    nonfinite = data.draw(st.sampled_from(["error", "skip"]))
    temperature = data.draw(st.sampled_from([1.0, 0.5, 3.0, 1e-36]))

    def run(b):
        s = ck.binned_stats(logits, labels, m, mode=mode, temperature=temperature, nonfinite=nonfinite, backend=b)
        return s.counts, s.sum_conf, s.sum_correct, s.n_skipped

    if mode == "top1":
        moved = int(ambiguous_rows(logits, labels, m, temperature).sum())
    else:  # any class probability near an edge may move
        p = torch.softmax(logits.double() / temperature, dim=1) * m
        near = ((p - p.round()).abs() < EDGE_TOL) & (p.round() > 0) & (p.round() < m)
        moved = int((near & (labels != IGNORE)[:, None]).sum())

    def compare(got, want):
        counts, sum_conf, sum_correct, n_skipped = got
        assert torch.equal(n_skipped, want[3]), "n_skipped"
        assert torch.equal(counts.sum(-1), want[0].sum(-1)), "rows binned"
        assert int((counts - want[0]).abs().sum()) <= 2 * moved, "counts"
        tol = 1e-5 * max(1, logits.shape[0]) + moved
        close(sum_conf, want[1], rtol=0, atol=tol, what="sum_conf")
        close(sum_correct, want[2], rtol=0, atol=tol, what="sum_correct")

    agree(run, backend, compare)


def check_top1_rows(backend, data):
    logits, labels, _, _ = data.draw(option_batches(backend))
    nonfinite = data.draw(st.sampled_from(["error", "skip"]))
    temperature = data.draw(st.sampled_from([1.0, 0.5, 3.0, 1e-36]))

    def run(b):
        return tuple(ck.top1_rows(logits, labels, temperature=temperature, nonfinite=nonfinite, backend=b))

    def compare(got, want):
        close(got[0], want[0], rtol=1e-5, atol=1e-7, what="confidence")
        for index, name in ((1, "correct"), (2, "kept"), (3, "n_skipped")):
            assert torch.equal(got[index], want[index]), name

    agree(run, backend, compare)


def check_metric_sums(backend, data):
    logits, labels, m, _ = data.draw(option_batches(backend))
    classwise = data.draw(st.booleans())
    nonfinite = data.draw(st.sampled_from(["error", "skip"]))
    temperature = data.draw(st.sampled_from([1.0, 0.5, 3.0, 1e-36]))

    def run(b):
        return metric_sums_tensors(logits, labels, m, classwise=classwise, temperature=temperature,
                                   nonfinite=nonfinite, backend=b)

    moved = int(ambiguous_rows(logits, labels, m, temperature).sum())
    p = torch.softmax(logits.double() / temperature, dim=1) * m
    near = ((p - p.round()).abs() < EDGE_TOL) & (p.round() > 0) & (p.round() < m)
    moved_classes = int((near & (labels != IGNORE)[:, None]).sum())

    def compare(got, want):
        assert torch.equal(got[3], want[3]), "n_skipped"
        n = max(1, logits.shape[0])
        for offset, allowed in ((0, moved), (5, moved_classes)):
            counts, sum_conf, sum_correct = got[offset:offset + 3]
            assert torch.equal(counts.sum(-1), want[offset].sum(-1)), "rows binned"
            assert int((counts - want[offset]).abs().sum()) <= 2 * allowed, "counts"
            close(sum_conf, want[offset + 1], rtol=0, atol=1e-5 * n + allowed, what="sum_conf")
            close(sum_correct, want[offset + 2], rtol=0, atol=1e-5 * n + allowed, what="sum_correct")
        close(got[4], want[4], rtol=1e-4, atol=1e-5 * n, what="[Σ NLL, Σ Brier]")

    agree(run, backend, compare)


def check_calibration_loss(backend, data):
    logits, labels, m, g = data.draw(option_batches(backend))
    bin_accuracy = poison(data.draw, g, torch.rand(m, generator=g), ("none", "none", "none", "one"))
    exact = data.draw(st.sampled_from(["some", "all 0", "all 1"]))  # a = 0 or 1: d = 1 or no non-max mass
    if exact == "some":
        bin_accuracy[torch.rand(m, generator=g) < 0.2] = 0.0
        bin_accuracy[torch.rand(m, generator=g) < 0.2] = 1.0
    else:
        bin_accuracy[torch.isfinite(bin_accuracy)] = float(exact[-1])
    weights = torch.randn(logits.shape[0], generator=g)
    skip = ambiguous_rows(logits, labels, m)

    def run(b):
        z = logits.detach().clone().requires_grad_()
        loss = ck.calibration_loss(z, labels, bin_accuracy, n_bins=m, reduction="none", backend=b)
        (grad,) = torch.autograd.grad((loss * weights).sum(), z)
        return loss, grad

    def compare(got, want):
        keep = ~skip
        close(got[0][keep], want[0][keep], what="loss")
        close(got[1][keep], want[1][keep], atol=1e-4, what="grad")

    agree(run, backend, compare)


def check_em_regularizer(backend, data):
    logits, labels, _, g = data.draw(option_batches(backend))
    m = data.draw(st.integers(1, 20) | st.sampled_from([32, 64]))
    form = data.draw(st.sampled_from(["target", "ece"]))
    entries = em_state(data.draw, g, m).state_dict()
    weights = torch.randn(logits.shape[0], generator=g)

    def run(b):
        state = ck.EMState(m)
        state.load_state_dict(entries)
        z = logits.detach().clone().requires_grad_()
        if form == "target":
            loss = ck.em_regularizer(z, labels, state, reduction="none", backend=b)
            objective = (loss * weights).sum()
        else:
            loss = objective = ck.em_regularizer(z, labels, state, form="ece", backend=b)
        (grad,) = torch.autograd.grad(objective, z)
        stats = state.estep(logits, labels, backend=b)
        state.mstep()
        return loss, grad, stats, state.mu, state.sigma, state.pi, state.theta

    def compare(got, want):
        close(got[0], want[0], what="loss")
        close(got[1], want[1], atol=1e-4, what="grad")
        close(got[2], want[2], rtol=1e-4, atol=1e-4, what="E-step statistics")
        # the M-step: empty components (S ≤ 1e-8 ΣS) keep μ, σ on every backend; a mass within float32 rounding of
        # that threshold may fall either side
        s, threshold = want[2][0], ck.em.EMPTY_MASS * want[2][0].sum()
        sure = (s - threshold).abs() > 1e-3 * threshold
        for index, name in ((3, "mu"), (4, "sigma")):
            close(got[index][sure], want[index][sure], rtol=1e-3, atol=1e-4, what=f"M-step {name}")
        for index, name in ((5, "pi"), (6, "theta")):
            close(got[index], want[index], rtol=1e-3, atol=1e-6, what=f"M-step {name}")

    agree(run, backend, compare)


def check_interval(backend, data):
    logits, labels, m, _ = data.draw(option_batches(backend, max_bins=1000))
    method = data.draw(st.sampled_from(["debiased", "percentile"]))
    seed = data.draw(st.sampled_from([-1, 2 ** 63, 2 ** 64 + 5, -(2 ** 70)]) | st.integers(-(2 ** 80), 2 ** 80))
    if ambiguous_rows(logits, labels, m).any():  # a row binned either side changes every replicate
        return

    def run(b):
        interval = ck.ece_confidence_interval(logits, labels, m, method=method, n_boot=20, seed=seed, backend=b)
        return torch.tensor([interval.estimate, interval.low, interval.high], dtype=torch.float64)

    agree(run, backend, lambda got, want: close(got, want, rtol=1e-4, atol=1e-5, what="interval"))


@st.composite
def fused_inputs(draw, backend):
    b, t = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 7, 13]))
    d, v = draw(st.sampled_from([1, 8, 19])), draw(st.sampled_from([5, 16, 20, 61]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    dtype = draw(st.sampled_from(dtypes(backend)))
    hidden = poison(draw, g, torch.randn(b, t, d, generator=g))
    # a scale of 100: option-logit gaps of hundreds, non-max probabilities subnormal or 0
    weight = poison(draw, g, torch.randn(v, d, generator=g) * draw(st.sampled_from([0.1, 1.0, 5.0, 100.0])))
    bias = poison(draw, g, torch.randn(v, generator=g)) if draw(st.booleans()) else None
    option_ids = torch.randperm(v, generator=g)[:draw(st.integers(2, 4))]
    labels = torch.randint(0, v, (b, t), generator=g)
    answers = torch.rand(b, t, generator=g) < 0.4
    labels = torch.where(answers, option_ids[torch.randint(0, len(option_ids), (b, t), generator=g)], labels)
    labels[torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    calibration = draw(st.sampled_from([None, "hard_bin", "em"]))
    n_bins = draw(st.integers(1, 12))
    extra = {}
    if calibration == "hard_bin":
        extra["bin_accuracy"] = torch.rand(n_bins, generator=g)
        extra["bin_accuracy"][torch.rand(n_bins, generator=g) < 0.3] = float(draw(st.sampled_from([0.0, 1.0])))
    elif calibration == "em":
        extra["em_state"] = em_state(draw, g, n_bins)
    cast = [x if x is None else x.to(dtype) for x in (hidden, weight, bias)]
    return (*cast, labels, option_ids, calibration, n_bins, extra)


def check_fused_linear(backend, data):
    hidden, weight, bias, labels, option_ids, calibration, n_bins, extra = data.draw(fused_inputs(backend))
    if calibration == "hard_bin":  # the hard-bin term jumps where a confidence changes bin
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
        z = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double()[option_ids].t()
        if bias is not None:
            z = z + bias.double()[option_ids]
        answer = torch.isin(targets, option_ids)
        if ambiguous_rows(z, torch.where(answer, 0, IGNORE), n_bins).any():
            return

    def run(b):
        inputs = [x if x is None else x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        out = ck.fused_linear_calibration_loss(inputs[0], inputs[1], labels, bias=inputs[2], option_ids=option_ids,
                                               calibration=calibration, n_bins=n_bins, backend=b, **extra)
        differentiable = [x for x in inputs if x is not None]
        grads = torch.autograd.grad(out.loss, differentiable, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(differentiable, grads)]
        s = out.bin_stats
        return (out.sft_loss, out.cal_loss, s.counts, s.n_skipped, *grads)

    def compare(got, want):
        tol = {torch.float32: 1e-4}.get(hidden.dtype, 2e-2)
        close(got[0], want[0], rtol=tol, atol=tol, what="sft_loss")
        close(got[1], want[1], rtol=tol, atol=tol, what="cal_loss")
        if hidden.dtype == torch.float32 and calibration != "hard_bin":
            assert torch.equal(got[2], want[2]) or int((got[2] - want[2]).abs().sum()) <= 2, "bin counts"
        assert torch.equal(got[3], want[3]), "n_skipped"
        for index, (a, b) in enumerate(zip(got[4:], want[4:])):
            close(a, b, rtol=tol, atol=tol * 10, what=f"gradient {index}")

    agree(run, backend, compare)


PROPERTIES = [check_binned_stats, check_top1_rows, check_metric_sums, check_calibration_loss, check_em_regularizer,
              check_fused_linear, check_interval]


def _case(prop, backend, long):
    return profile(backend, long)(given(data=st.data())(lambda data: prop(backend, data)))


@pytest.mark.skipif(not BACKENDS, reason="no backend besides the reference is available")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.__name__.removeprefix("check_"))
def test_backend_agrees_with_reference(prop, backend):
    _case(prop, backend, long=False)()


@pytest.mark.fuzz
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: p.__name__.removeprefix("check_"))
def test_backend_agrees_with_reference_long(prop, backend):
    _case(prop, backend, long=True)()
