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
