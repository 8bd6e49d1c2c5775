"""Multi-process data parallel (docs/math.md#ece, docs/math.md#em-regulariser): two gloo processes on CPU, each
holding half the rows, give
exactly the single-process result on all of them — ``BinStats.all_reduce``, ``CalibrationMeter.all_reduce``
and ``EMState.mstep`` (which all-reduces its accumulator).

One ``torch.multiprocessing.spawn`` launch (module fixture) runs every check; each rank saves what it
computed, and the tests compare it with the whole-data computation here. Counts must be equal; float sums
(whose summation order differs between one process and two) agree to 1e-12.
"""


import pytest
import torch
import torch.distributed as dist

import calibkern as ck

from helpers import random_labels, random_logits, spawn_ranks

WORLD = 2
N, K, M = 1001, 4, 10  # odd N: the two halves differ in size
EM_ROUNDS = 3
SUM_TOL = dict(rtol=0, atol=1e-12)


def data():
    """The whole data set: logits with a few non-finite rows (skipped), labels with ignored rows."""
    logits = random_logits(N, K, scale=2.5, seed=11)
    logits[[5, 600, 900]] = float("nan")
    labels = random_labels(N, K, ignore_frac=0.1, seed=12)
    return logits, labels


def shard(rank: int):
    """Rank ``rank``'s contiguous half of the rows."""
    logits, labels = data()
    bounds = [0, N // 2, N]
    return logits[bounds[rank]:bounds[rank + 1]], labels[bounds[rank]:bounds[rank + 1]]


def em_batch(logits, labels, round_index):
    """The rows of EM round ``round_index`` (a third of the data each round)."""
    n = logits.shape[0]
    part = slice(round_index * n // EM_ROUNDS, (round_index + 1) * n // EM_ROUNDS)
    return logits[part], labels[part]


def compute(logits, labels, em_rows):
    """Everything under test, from the rows one process holds. ``em_rows(r)`` gives EM round r's rows."""
    out = {}
    for mode in ("top1", "classwise"):
        stats = ck.binned_stats(logits, labels, M, mode=mode, nonfinite="skip").all_reduce()
        out[f"stats_{mode}"] = (stats.counts, stats.sum_conf, stats.sum_correct, stats.n_skipped)

    meter = ck.CalibrationMeter(M, classwise=True, nonfinite="skip")
    half = logits.shape[0] // 2
    meter.update(logits[:half], labels[:half])
    meter.update(logits[half:], labels[half:])
    out["meter_state_local"] = meter.state_dict()
    out["meter"] = meter.all_reduce().compute()

    for refresh in ("epoch", "stream"):
        state = ck.EMState(M, refresh=refresh, momentum=0.7)
        for r in range(EM_ROUNDS):
            z, y = em_rows(r)
            if refresh == "epoch":
                state.estep(z, y, nonfinite="skip")
            else:  # the regulariser's own pass accumulates the E-step statistics
                ck.em_regularizer(z, y, state, accumulate=True, nonfinite="skip")
            state.mstep()
        out[f"em_{refresh}"] = state.state_dict()
    return out


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        logits, labels = shard(rank)
        result = compute(logits, labels, lambda r: em_batch(logits, labels, r))
        # a rank that saw no data still joins the meter's all-reduce: rank 0 holds every row, rank 1 none
        idle = ck.CalibrationMeter(M, classwise=True, n_classes=K, nonfinite="skip")
        if rank == 0:
            idle.update(*data())
        result["meter_idle_rank"] = idle.all_reduce().compute()
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()




@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    ranks = spawn_ranks(_worker, out_dir, WORLD)

    def whole_em_rows(r):  # EM round r on one process: the round's rows of every rank
        parts = [em_batch(*shard(rank), r) for rank in range(WORLD)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    whole = compute(*data(), whole_em_rows)
    return ranks, whole


def _assert_same(got, want, path="", exact=False):
    """Nested dicts / tuples of tensors: integers equal, floats to SUM_TOL (bitwise with ``exact``)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _assert_same(got[key], want[key], f"{path}.{key}", exact)
    elif isinstance(want, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]", exact)
    elif want.dtype.is_floating_point and not exact:
        torch.testing.assert_close(got, want, **SUM_TOL, msg=lambda m: f"{path}: {m}")
    else:
        assert torch.equal(got, want), f"{path}: {got} != {want}"


@pytest.mark.parametrize("key", ["stats_top1", "stats_classwise"])
def test_binstats_all_reduce_equals_single_process(results, key):
    ranks, whole = results
    for rank in ranks:
        _assert_same(rank[key], whole[key], key)
    counts, _, _, n_skipped = whole[key]
    assert int(n_skipped) == 3
    assert int(counts.sum(-1).flatten()[0]) == int((data()[1] != -100).sum()) - 3


def test_meter_all_reduce_equals_single_process(results):
    ranks, whole = results
    for rank in ranks:
        _assert_same(rank["meter"], whole["meter"], "meter")


def test_meter_state_dicts_sum_to_the_all_reduced_meter(results):
    """all_reduce sums exactly the state_dict tensors: the ranks' local states, summed key-wise and loaded into a
    fresh meter, report bitwise what the all-reduced meters report."""
    ranks, _ = results
    summed = {key: sum(rank["meter_state_local"][key] for rank in ranks) for key in ranks[0]["meter_state_local"]}
    meter = ck.CalibrationMeter(M, classwise=True, nonfinite="skip")
    meter.load_state_dict(summed)
    _assert_same(meter.compute(), ranks[0]["meter"], "meter_from_state", exact=True)


def test_meter_all_reduce_with_a_rank_that_saw_no_data(results):
    ranks, whole = results
    for rank in ranks:
        _assert_same(rank["meter_idle_rank"], whole["meter"], "meter_idle_rank")


@pytest.mark.parametrize("refresh", ["epoch", "stream"])
def test_em_mstep_all_reduces_the_statistics(results, refresh):
    ranks, whole = results
    key = f"em_{refresh}"
    for rank in ranks:
        _assert_same(rank[key], whole[key], key)
    assert int(whole[key]["n_msteps"]) == EM_ROUNDS
    assert not torch.equal(whole[key]["mu"], ck.EMState(M).mu)  # the M-steps moved the components


def test_ranks_agree_bitwise(results):
    """After the reductions every rank holds the very same numbers."""
    (first, second), _ = results
    shared = [key for key in first if key != "meter_state_local"]  # each rank's own rows before the reduction
    _assert_same({key: second[key] for key in shared}, {key: first[key] for key in shared}, exact=True)
