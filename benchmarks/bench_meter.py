"""Streaming ECE over 10⁷ rows: ``calibkern.CalibrationMeter`` against torchmetrics' module.

Both see the same stream of ``[chunk, K = 4]`` logits and labels (a pool of ten seeded chunks, cycled, so
no candidate pays for data generation) and return the top-1 ECE (M = 10 bins, l1) at the end:

* ``calibkern.CalibrationMeter``: per chunk, one read of the rows (the ``metric_sums`` kernel) adds the bin
  statistics and the NLL and Brier sums to an O(M) state; nothing of the chunk is kept.
* ``torchmetrics.classification.MulticlassCalibrationError``: per chunk, softmax, then the confidences and
  correctness of every row are appended to its state; ``compute()`` concatenates them and bins.

Each pass runs in a fresh process with glibc's allocator cache off (``timing.UNCACHED_MALLOC``), after a
warm-up update and a ``reset()``; it records the RSS before the first chunk and after every chunk (the memory
curve; the row compares the growth from before the first to after the last chunk), the peak through
``compute()``, and the time of all updates plus ``compute()``. The passes of the two candidates alternate;
the time is the median over the passes, the curves are those of the last pass.
"""

from __future__ import annotations

import time

import torch

import timing

SOURCE = "meter"
N_CLASSES, N_BINS, CHUNK, POOL = 4, 10, 100_000, 10
LABELS = {"calibkern": "calibkern CalibrationMeter (O(M) state)",
          "torchmetrics": "torchmetrics MulticlassCalibrationError (stores every prediction)"}


def _make_metric(candidate: str):
    if candidate == "calibkern":
        import calibkern

        meter = calibkern.CalibrationMeter(n_bins=N_BINS)
        return meter, meter.update, lambda: meter.compute()["ece"]
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=N_CLASSES, n_bins=N_BINS, norm="l1")
    return metric, metric.update, metric.compute


def stream(candidate: str, n_rows: int, seed: int = 0) -> dict:
    """One pass over ``n_rows`` rows in chunks (run in a fresh process): time, RSS curve, peak, ECE."""
    generator = torch.Generator().manual_seed(seed)
    pool = [(torch.randn(CHUNK, N_CLASSES, generator=generator) * 2.0,
             torch.randint(N_CLASSES, (CHUNK,), generator=generator)) for _ in range(POOL)]
    metric, update, compute = _make_metric(candidate)
    update(*pool[0])
    metric.reset()
    start = timing.current_rss_mib()
    timing.reset_peak_rss()
    curve, elapsed = [], 0.0
    for index in range(n_rows // CHUNK):
        tick = time.perf_counter()
        update(*pool[index % POOL])
        elapsed += time.perf_counter() - tick
        curve.append(timing.current_rss_mib())
    tick = time.perf_counter()
    ece = float(compute())
    elapsed += time.perf_counter() - tick
    return {"seconds": elapsed, "start_rss_mib": start, "rss_mib": curve, "after_compute_rss_mib":
            timing.current_rss_mib(), "peak_rss_mib": timing.peak_rss_mib(), "ece": ece}


def _thin(curve: list[float], points: int = 21) -> list[float]:
    """At most ``points`` evenly spaced samples of a curve, first and last included."""
    if len(curve) <= points:
        return curve
    return [curve[round(i * (len(curve) - 1) / (points - 1))] for i in range(points)]


def rows(quick: bool = False) -> list[dict]:
    n_rows = 10**6 if quick else 10**7
    passes = 1 if quick else 3
    name = f"streaming ECE over {n_rows:.0e} rows, K={N_CLASSES}, chunks of {CHUNK}".replace("e+0", "e")
    try:
        import torchmetrics  # noqa: F401
    except ImportError as error:
        return [timing.skipped_row(source=SOURCE, name=name, reason=f"torchmetrics not installed ({error})",
                                   candidate=LABELS["calibkern"], baseline=LABELS["torchmetrics"])]
    results = {candidate: [] for candidate in LABELS}
    for _ in range(passes):
        for candidate in LABELS:
            results[candidate].append(timing.in_subprocess("bench_meter", "stream", env=timing.UNCACHED_MALLOC,
                                                           candidate=candidate, n_rows=n_rows))
    last = {candidate: runs[-1] for candidate, runs in results.items()}
    growth = {candidate: run["rss_mib"][-1] - run["start_rss_mib"] for candidate, run in last.items()}
    endpoints = "; ".join(
        f"{candidate}: RSS {run['start_rss_mib']:.1f} → {run['rss_mib'][-1]:.1f} MiB over the stream, peak "
        f"{run['peak_rss_mib']:.1f} MiB through compute(), ECE {run['ece']:.6f}" for candidate, run in last.items())
    common = dict(source=SOURCE, name=name, candidate=LABELS["calibkern"], baseline=LABELS["torchmetrics"])
    seconds = {candidate: sorted(run["seconds"] for run in runs) for candidate, runs in results.items()}
    return [
        timing.ratio_row(**common, quantity="time (updates + compute)", unit="s",
                         candidate_value=seconds["calibkern"][len(seconds["calibkern"]) // 2],
                         baseline_value=seconds["torchmetrics"][len(seconds["torchmetrics"]) // 2],
                         goal="report", samples=seconds),
        timing.ratio_row(**common, quantity="RSS growth over the stream", unit="MiB",
                         candidate_value=growth["calibkern"], baseline_value=growth["torchmetrics"],
                         goal="flat vs growing (≥ 20× less growth)", min_gain=20.0, notes=endpoints,
                         curves_mib={candidate: _thin(run["rss_mib"]) for candidate, run in last.items()}),
    ]
