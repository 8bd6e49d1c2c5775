"""Property-based tests of the metrics (docs/math.md#ece) with hypothesis, on every available backend: random shapes
(N 1..200, K 2..50), values (including ties and ±1e4), bin counts M 1..20 and ignored rows.

* the binned statistics equal the per-sample definition (a Python loop over rows in float64);
* ECE (l1, l2, max, classwise) lies in [0, 1];
* permuting the rows changes nothing; statistics of split batches merged equal those of the whole.

The per-sample definition works in float64 while the kernels work in float32, so a confidence within float32
rounding of a bin edge may land on either side; such samples are counted and allowed to move.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calibkern as ck

IGNORE = -100
BACKENDS = ck.available_backends()
# the Triton interpreter runs each program in Python: fewer examples there
EXAMPLES = {"triton": 5}
EDGE_TOL = 1e-4  # |c·M − round(c·M)| below this: float32 rounding may put c in either neighbouring bin
SUM_TOL = 1e-5  # per-sample float32 error of a confidence


def settings_for(backend):
    return settings(max_examples=EXAMPLES.get(backend, 15), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def batches(draw, max_rows=200):
    """(logits float32 [N, K], labels int64 [N] with ignored rows, M).

    Values are seeded normal draws at a drawn scale; ``quantize`` rounds them to integers (many exact ties),
    and a drawn fraction of entries is replaced by ±1e4 or 0.
    """
    n, k, m = draw(st.integers(1, max_rows)), draw(st.integers(2, 50)), draw(st.integers(1, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
    if draw(st.booleans()):
        logits = logits.round()
    extreme = torch.rand(n, k, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.6]))
    special = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)[torch.randint(0, 3, (n, k), generator=g)]
    logits = torch.where(extreme, special, logits).float()
    labels = torch.randint(0, k, (n,), generator=g)
    labels[torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    return logits, labels, m


def definition(logits, labels, m, classwise=False):
    """Per-sample statistics, row by row: counts, Σ conf, Σ correct ([M] or [K, M]) and how many samples
    sit at a bin edge (within float32 rounding)."""
    n, k = logits.shape
    shape = (k, m) if classwise else (m,)
    counts, sum_conf, sum_correct = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape)
    at_edge = 0
    for row, label in zip(logits.double().tolist(), labels.tolist()):
        if label == IGNORE:
            continue
        top = max(row)
        exps = [math.exp(z - top) for z in row]
        total = sum(exps)
        p = [e / total for e in exps]
        pred = row.index(top)  # the first index attaining the maximum
        pairs = [(j, p[j], float(label == j)) for j in range(k)] if classwise else \
                [(None, 1.0 / total, float(label == pred))]
        for j, c, hit in pairs:
            scaled = c * m
            at_edge += abs(scaled - round(scaled)) < EDGE_TOL and 0 < round(scaled) < m
            b = min(int(np.floor(np.float32(c) * np.float32(m))), m - 1)
            index = b if j is None else (j, b)
            counts[index] += 1
            sum_conf[index] += c
            sum_correct[index] += hit
    return torch.from_numpy(counts), torch.from_numpy(sum_conf), torch.from_numpy(sum_correct), at_edge


def assert_stats_match_definition(stats, want):
    counts, sum_conf, sum_correct, at_edge = want
    moved = int((stats.counts - counts).abs().sum())
    assert moved <= 2 * at_edge, f"{moved // 2} samples in a different bin, {at_edge} at an edge"
    assert torch.equal(stats.counts.sum(-1), counts.sum(-1))
    assert torch.equal(stats.sum_correct.sum(-1), sum_correct.sum(-1))
    slack = SUM_TOL * counts.double() + at_edge  # a moved sample carries its confidence and correctness
    assert ((stats.sum_conf - sum_conf).abs() <= slack).all()
    assert ((stats.sum_correct - sum_correct).abs() <= at_edge).all()
    if at_edge == 0:
        assert torch.equal(stats.counts, counts) and torch.equal(stats.sum_correct, sum_correct)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binned_stats_equal_the_per_sample_definition(backend):
    @settings_for(backend)
    @given(batches())
    def check(batch):
        logits, labels, m = batch
        for classwise in (False, True):
            stats = ck.binned_stats(logits, labels, m, mode="classwise" if classwise else "top1", backend=backend)
            want = definition(logits, labels, m, classwise)
            assert_stats_match_definition(stats, want)
            if want[3] == 0:  # no sample at an edge: the ECE family of the definition's bins
                for norm in ("l1", "l2", "max"):
                    expected = ece_of(*want[:3], norm)
                    assert float(stats.ece(norm)) == pytest.approx(expected, abs=1e-5), norm

    check()


def ece_of(counts, sum_conf, sum_correct, norm):
    """ECE by its definition, bin by bin (classwise: the mean over classes)."""
    rows = [(counts, sum_conf, sum_correct)] if counts.dim() == 1 else list(zip(counts, sum_conf, sum_correct))
    values = []
    for n_k, s_k, a_k in rows:
        n = int(n_k.sum())
        gaps = [(int(c), abs(float(s) - float(a))) for c, s, a in zip(n_k, s_k, a_k) if c > 0]
        if norm == "l1":
            values.append(sum(g for _, g in gaps) / max(n, 1))
        elif norm == "l2":
            values.append(math.sqrt(sum(g * g / c for c, g in gaps) / max(n, 1)))
        else:
            values.append(max((g / c for c, g in gaps), default=0.0))
    return sum(values) / len(values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ece_lies_in_the_unit_interval(backend):
    @settings_for(backend)
    @given(batches())
    def check(batch):
        logits, labels, m = batch
        for stats in (ck.binned_stats(logits, labels, m, backend=backend),
                      ck.binned_stats(logits, labels, m, mode="classwise", backend=backend)):
            for norm in ("l1", "l2", "max"):
                value = float(stats.ece(norm))
                assert 0.0 <= value <= 1.0, (norm, value)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_order_does_not_matter(backend):
    @settings_for(backend)
    @given(batches(), st.randoms(use_true_random=False))
    def check(batch, rng):
        logits, labels, m = batch
        order = list(range(logits.shape[0]))
        rng.shuffle(order)
        for mode in ("top1", "classwise"):
            a = ck.binned_stats(logits, labels, m, mode=mode, backend=backend)
            b = ck.binned_stats(logits[order], labels[order], m, mode=mode, backend=backend)
            assert torch.equal(a.counts, b.counts) and torch.equal(a.sum_correct, b.sum_correct)
            torch.testing.assert_close(a.sum_conf, b.sum_conf, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.ece(), b.ece(), rtol=1e-12, atol=1e-12)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_batches_merge_to_the_whole(backend):
    @settings_for(backend)
    @given(batches(), st.lists(st.floats(0, 1), max_size=3))
    def check(batch, cuts):
        logits, labels, m = batch
        n = logits.shape[0]
        bounds = [0] + sorted(int(c * n) for c in cuts) + [n]
        parts = [(logits[a:b], labels[a:b]) for a, b in zip(bounds, bounds[1:])]  # empty parts included

        whole = ck.binned_stats(logits, labels, m, backend=backend)
        merged = sum((ck.binned_stats(z, y, m, backend=backend) for z, y in parts), ck.BinStats.empty(m))
        assert torch.equal(whole.counts, merged.counts) and torch.equal(whole.sum_correct, merged.sum_correct)
        torch.testing.assert_close(merged.sum_conf, whole.sum_conf, rtol=1e-12, atol=1e-12)

        meter = ck.CalibrationMeter(m, classwise=True, backend=backend)
        for z, y in parts:
            meter.update(z, y)
        one_shot = ck.CalibrationMeter(m, classwise=True, backend=backend)
        one_shot.update(logits, labels)
        streamed, direct = meter.compute(), one_shot.compute()
        for name in direct:
            torch.testing.assert_close(streamed[name], direct[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda msg: f"{name}: {msg}")

        state_split, state_whole = ck.EMState(m), ck.EMState(m)
        for z, y in parts:
            state_split.estep(z, y, backend=backend)
        state_whole.estep(logits, labels, backend=backend)
        torch.testing.assert_close(state_split.accum, state_whole.accum, rtol=1e-9, atol=1e-9)

    check()
