"""torchmetrics' ``MulticlassCalibrationError`` against calibkern's drop-in of it (calibkern.integrations.torchmetrics).

The loop a user runs: 10 ``update``s of ``[100000, 4]`` float32 logits (a pool of seeded batches, so no candidate
pays for data generation) and one ``compute()`` (M = 15 bins, l1 — both classes' defaults). torchmetrics appends
every row's confidence and correctness and bins them in ``compute()``; calibkern adds each batch's per-bin sums
(one read of the logits by the ``cpp`` kernel) to an O(M) state. Time: the median of alternated runs
(timing.median_times). Memory: the process's RSS growth over the ten updates, in a fresh process per candidate
with glibc's allocator cache off (timing.UNCACHED_MALLOC). The same loop is timed again (no goal) for
probabilities (the softmax of those logits) and for ``BinaryCalibrationError`` on ``[100000]`` scores, logits and
probabilities. One torch thread (the machine is shared; set ``BENCH_THREADS`` for more).

    python benchmarks/bench_torchmetrics.py     (or: python benchmarks/run_benchmarks.py --only torchmetrics)
"""

from __future__ import annotations

import json
import os

import torch

import timing

SOURCE = "torchmetrics"
N_CLASSES, N_BINS, ROWS, UPDATES = 4, 15, 100_000, 10
NAME = f"torchmetrics loop: {UPDATES} updates of N={ROWS} K={N_CLASSES} logits + compute, M={N_BINS}"


def _metric(candidate: str, binary: bool = False):
    if candidate == "calibkern":
        from calibkern.integrations import torchmetrics as module
    else:
        from torchmetrics import classification as module
    if binary:
        return module.BinaryCalibrationError(n_bins=N_BINS)
    return module.MulticlassCalibrationError(num_classes=N_CLASSES, n_bins=N_BINS)


def _batches(kind: str = "multiclass logits"):
    """``UPDATES`` seeded batches of ``kind``: "multiclass logits" / "multiclass probabilities" ``[ROWS, K]``, or
    "binary logits" / "binary probabilities" ``[ROWS]``."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(UPDATES):
        binary = kind.startswith("binary")
        scores = torch.randn(ROWS, *(() if binary else (N_CLASSES,)), generator=generator) * 2
        if kind.endswith("probabilities"):
            scores = scores.sigmoid() if binary else scores.softmax(1)
        batches.append((scores, torch.randint(0, 2 if binary else N_CLASSES, (ROWS,), generator=generator)))
    return batches


def _loop(metric, batches) -> torch.Tensor:
    metric.reset()
    for logits, labels in batches:
        metric.update(logits, labels)
    return metric.compute()


def memory_growth(candidate: str, threads: int) -> dict:
    """RSS growth (MiB) over the updates and ``compute()``, after a warm-up loop."""
    torch.set_num_threads(threads)
    metric, batches = _metric(candidate), _batches()
    _loop(metric, batches)
    metric.reset()
    before = timing.current_rss_mib()
    for logits, labels in batches:
        metric.update(logits, labels)
    after = timing.current_rss_mib()
    metric.compute()
    return {"growth_mib": after - before}


def rows(quick: bool = False, threads: int | None = None) -> list[dict]:
    """The time row and the memory row (``quick`` changes nothing: the loop is the goal's)."""
    threads = threads or int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    batches = _batches()
    metrics = {name: _metric(name) for name in ("calibkern", "torchmetrics")}
    values = {name: float(_loop(metric, batches)) for name, metric in metrics.items()}
    times = timing.median_times({name: (lambda m=metric: _loop(m, batches)) for name, metric in metrics.items()},
                                repeats=7)
    memory = {name: timing.in_subprocess("bench_torchmetrics", "memory_growth", env=timing.UNCACHED_MALLOC,
                                         candidate=name, threads=threads)["growth_mib"] for name in metrics}
    labels = {"calibkern": "calibkern.integrations.torchmetrics.MulticlassCalibrationError",
              "torchmetrics": "torchmetrics MulticlassCalibrationError"}
    note = f"{threads} torch thread(s); values {values['calibkern']:.7f} vs {values['torchmetrics']:.7f}"
    return [*_other_inputs(threads), timing.ratio_row(source=SOURCE, name=NAME, candidate=labels["calibkern"],
                             baseline=labels["torchmetrics"], candidate_value=times["calibkern"]["median_s"],
                             baseline_value=times["torchmetrics"]["median_s"], goal="≥ 10× faster", min_gain=10.0,
                             notes=note),
            timing.ratio_row(source=SOURCE, name=NAME, quantity="memory growth", unit="MiB",
                             candidate=labels["calibkern"], baseline=labels["torchmetrics"],
                             candidate_value=max(memory["calibkern"], 0.0),
                             baseline_value=memory["torchmetrics"], goal="flat (O(M) state)", notes=note)]


def _other_inputs(threads: int) -> list[dict]:
    """The loop's time for multiclass probabilities and binary scores (reported, no goal)."""
    result = []
    for kind in ("multiclass probabilities", "binary logits", "binary probabilities"):
        batches = _batches(kind)
        metrics = {name: _metric(name, binary=kind.startswith("binary")) for name in ("calibkern", "torchmetrics")}
        values = {name: float(_loop(metric, batches)) for name, metric in metrics.items()}
        times = timing.median_times({name: (lambda m=metric: _loop(m, batches)) for name, metric in metrics.items()},
                                    repeats=7)
        metric_class = "BinaryCalibrationError" if kind.startswith("binary") else "MulticlassCalibrationError"
        result.append(timing.ratio_row(
            source=SOURCE, name=NAME.replace(f"K={N_CLASSES} logits", kind if kind.startswith("binary")
                                             else f"K={N_CLASSES} {kind}"), candidate=f"calibkern {metric_class}",
            baseline=f"torchmetrics {metric_class}", candidate_value=times["calibkern"]["median_s"],
            baseline_value=times["torchmetrics"]["median_s"], goal="report",
            notes=f"{threads} torch thread(s); values {values['calibkern']:.7f} vs {values['torchmetrics']:.7f}"))
    return result


if __name__ == "__main__":
    for row in rows():
        print(json.dumps(row))
