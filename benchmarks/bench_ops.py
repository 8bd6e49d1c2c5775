"""The cpp backend's ops against their baselines on CPU (issue 3; benchmarks/RESULTS.md).

Every comparison times its candidates side by side in one process with :func:`timing.median_times`
(warm-up excluded, candidates alternated, medians of the rounds):

* ``ece`` from logits, N = 4096, V = 128256, fp32: ``calibkern.ece(backend="cpp")`` against the torch
  reference backend, torchmetrics' ``multiclass_calibration_error`` with its softmax included, and one plain
  read of the tensor (``torch.sum``); plus the cpp kernel alone (``calibkern._cpp.binned_stats``, without the
  public function's input validation) against the same read.
* ``ece``, N = 10⁶, K = 4: cpp against torchmetrics and the reference.
* ``calibration_loss`` forward + backward, N = 65536, K = 4: cpp against the reference and against the
  per-bin Python loop of the published reference code (benchmarks/reference_style.py).
* the EM ``target`` regulariser forward + backward, same size: cpp against the reference.
* every metric around ``ece``, N = 10⁶, K = 4, on the rows ``ece`` reads (auto backend, cpp here):
  ``CalibrationMeter(10).update``, ``nll``, ``brier`` (goal ≤ 2× ``ece``), ``classwise_ece`` (≤ 3×), and
  ``adaptive_ece`` against one ``torch.sort`` of the N confidences (≤ 3×).
* ``ece_confidence_interval`` at N = 10⁵ with 1000 resamples, both methods, against a user's Python loop of
  ``calibkern.ece`` over 1000 resampled copies of the rows (goal ≥ 10× faster).
* many bins: cpp ``ece`` at N = 10⁶, K = 100 with 1000 bins against 15 bins (goal ≤ 1.5×), and its peak memory
  above the logits in a fresh process (goal ≤ 64 MiB; the bin partials are bounded by a fixed number of row blocks).
* ``classwise_ece`` at vocabulary size, N = 4096, V = 128256, fp32, against ``ece`` on the same logits (≤ 3×).

``rows(quick)`` returns dicts ``{what, candidate, baseline, median_s, baseline_median_s, ratio, goal}``
(``ratio = baseline / candidate``: how many times faster the candidate is); run this file to print them.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

N_BINS = 10


def _row(what, times, candidate, baseline, goal):
    cand, base = times[candidate]["median_s"], times[baseline]["median_s"]
    return {"what": what, "candidate": candidate, "baseline": baseline, "median_s": cand,
            "baseline_median_s": base, "ratio": base / cand if cand > 0 else float("inf"), "goal": goal}


def _torchmetrics_ece(logits, labels):
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = torch.softmax(logits, dim=1)
    return multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=N_BINS, norm="l1")


def _rows_and_labels(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen) * 2.0
    return logits, torch.randint(0, k, (n,), generator=gen)


def _vocabulary_rows(quick: bool):
    """``(n, V, logits, labels)`` of the vocabulary-sized problem: V = 128256, N = 4096 (256 when ``quick``)."""
    n, v = (256 if quick else 4096), 128256
    return (n, v, *_rows_and_labels(n, v))


def ece_vocab(quick: bool) -> list[dict]:
    import calibkern
    from calibkern import _cpp

    n, v, logits, labels = _vocabulary_rows(quick)
    what = f"ece from logits N={n} V={v} fp32"
    times = timing.median_times({
        "cpp": lambda: calibkern.ece(logits, labels, N_BINS, backend="cpp"),
        "cpp kernel": lambda: _cpp.binned_stats(logits, labels, N_BINS, 1.0, -100, False),
        "torch reference": lambda: calibkern.ece(logits, labels, N_BINS, backend="torch"),
        "torchmetrics (softmax included)": lambda: _torchmetrics_ece(logits, labels),
        "torch.sum (one read)": lambda: torch.sum(logits),
    }, repeats=3 if quick else 5, warmup=1)
    return [_row(what, times, "cpp", "torchmetrics (softmax included)", "≥ 15× faster"),
            _row(what, times, "cpp", "torch reference", "≥ 8× faster"),
            _row(what, times, "cpp", "torch.sum (one read)", "time ≤ 2.5×"),
            _row(what, times, "cpp kernel", "torch.sum (one read)", "time ≤ 2.5×")]


def ece_small_k(quick: bool) -> list[dict]:
    import calibkern

    n = 100_000 if quick else 1_000_000
    logits, labels = _rows_and_labels(n, 4)
    what = f"ece from logits N={n} K=4 fp32"
    times = timing.median_times({
        "cpp": lambda: calibkern.ece(logits, labels, N_BINS, backend="cpp"),
        "torch reference": lambda: calibkern.ece(logits, labels, N_BINS, backend="torch"),
        "torchmetrics (softmax included)": lambda: _torchmetrics_ece(logits, labels),
    }, repeats=5 if quick else 11, warmup=2)
    return [_row(what, times, "cpp", "torchmetrics (softmax included)", "≥ 15× faster"),
            _row(what, times, "cpp", "torch reference", "")]


def metrics_small_k(quick: bool) -> list[dict]:
    import calibkern

    n = 100_000 if quick else 1_000_000
    logits, labels = _rows_and_labels(n, 4)
    meter = calibkern.CalibrationMeter(N_BINS)
    confidences = torch.softmax(logits, dim=1).amax(dim=1)
    what = f"metrics from logits N={n} K=4 fp32"
    times = timing.median_times({
        "ece": lambda: calibkern.ece(logits, labels, N_BINS),
        "CalibrationMeter.update": lambda: meter.update(logits, labels),
        "nll": lambda: calibkern.nll(logits, labels),
        "brier": lambda: calibkern.brier(logits, labels),
        "classwise_ece": lambda: calibkern.classwise_ece(logits, labels, N_BINS),
        "adaptive_ece": lambda: calibkern.adaptive_ece(logits, labels, N_BINS),
        "torch.sort of the N confidences": lambda: torch.sort(confidences, stable=True),
    }, repeats=5 if quick else 11, warmup=2)
    return [_row(what, times, "CalibrationMeter.update", "ece", "time ≤ 2×"),
            _row(what, times, "nll", "ece", "time ≤ 2×"),
            _row(what, times, "brier", "ece", "time ≤ 2×"),
            _row(what, times, "classwise_ece", "ece", "time ≤ 3×"),
            _row(what, times, "adaptive_ece", "torch.sort of the N confidences", "time ≤ 3×")]


def bootstrap_interval(quick: bool) -> list[dict]:
    import calibkern

    n, n_boot = (10_000, 100) if quick else (100_000, 1000)
    logits, labels = _rows_and_labels(n, 4, seed=2)

    def python_loop():
        generator = torch.Generator().manual_seed(0)
        for _ in range(n_boot):
            index = torch.randint(n, (n,), generator=generator)
            calibkern.ece(logits[index], labels[index], N_BINS)

    what = f"ece_confidence_interval N={n} K=4, {n_boot} resamples"
    times = timing.median_times({
        "percentile (kernel bootstrap)": lambda: calibkern.ece_confidence_interval(
            logits, labels, N_BINS, method="percentile", n_boot=n_boot),
        "debiased (default)": lambda: calibkern.ece_confidence_interval(logits, labels, N_BINS, n_boot=n_boot),
        "Python loop of ece over resampled rows": python_loop,
    }, repeats=3, warmup=1)
    return [_row(what, times, "percentile (kernel bootstrap)", "Python loop of ece over resampled rows",
                 "≥ 10× faster"),
            _row(what, times, "debiased (default)", "Python loop of ece over resampled rows", "≥ 10× faster")]


def _fwd_bwd(loss_fn, logits):
    def step():
        z = logits.detach().requires_grad_()
        loss_fn(z).backward()
    return step


def losses(quick: bool) -> list[dict]:
    import calibkern
    from reference_style import reference_style_calibration_loss

    n = 8192 if quick else 65536
    logits, labels = _rows_and_labels(n, 4, seed=1)
    bin_accuracy = torch.linspace(0.3, 0.95, N_BINS)
    bin_counts = torch.full((N_BINS,), n / N_BINS)
    repeats, warmup = (5, 2) if quick else (21, 3)

    def hard_bin(backend):
        return _fwd_bwd(lambda z: calibkern.calibration_loss(z, labels, bin_accuracy, n_bins=N_BINS,
                                                             backend=backend), logits)

    what = f"calibration_loss fwd+bwd N={n} K=4"
    times = timing.median_times({
        "cpp": hard_bin("cpp"),
        "torch reference": hard_bin("torch"),
        "per-bin Python loop (published code)": _fwd_bwd(
            lambda z: reference_style_calibration_loss(z, bin_accuracy, bin_counts, N_BINS), logits),
    }, repeats=repeats, warmup=warmup)
    rows = [_row(what, times, "cpp", "torch reference", "≥ 10× faster"),
            _row(what, times, "cpp", "per-bin Python loop (published code)", "≥ 50× faster")]

    state = calibkern.EMState(n_components=N_BINS)

    def em(backend):
        return _fwd_bwd(lambda z: calibkern.em_regularizer(z, labels, state, form="target", backend=backend),
                        logits)

    what = f"EM target regulariser fwd+bwd N={n} K=4"
    times = timing.median_times({"cpp": em("cpp"), "torch reference": em("torch")},
                                repeats=repeats, warmup=warmup)
    return rows + [_row(what, times, "cpp", "torch reference", "")]


def ece_peak_extra_mib(n: int, k: int, n_bins: int) -> dict:
    """Peak resident memory of one cpp ``ece`` call above the process's memory with its logits made (run in a
    fresh process with timing.UNCACHED_MALLOC)."""
    import calibkern

    logits, labels = _rows_and_labels(n, k)
    calibkern.ece(logits[:64], labels[:64], n_bins, backend="cpp")  # imports and first-call set-up
    before = timing.current_rss_mib()
    timing.reset_peak_rss()
    calibkern.ece(logits, labels, n_bins, backend="cpp")
    return {"extra_mib": timing.peak_rss_mib() - before}


def ece_many_bins(quick: bool) -> list[dict]:
    import calibkern

    n, k = (100_000 if quick else 1_000_000), 100
    logits, labels = _rows_and_labels(n, k)
    what = f"cpp ece N={n} K={k} fp32, many bins"
    times = timing.median_times({
        "1000 bins": lambda: calibkern.ece(logits, labels, 1000, backend="cpp"),
        "15 bins": lambda: calibkern.ece(logits, labels, 15, backend="cpp"),
    }, repeats=3 if quick else 7, warmup=1)
    del logits, labels
    extra = timing.in_subprocess("bench_ops", "ece_peak_extra_mib", env=timing.UNCACHED_MALLOC, n=n, k=k,
                                 n_bins=1000)["extra_mib"]
    return [_row(what, times, "1000 bins", "15 bins", "time ≤ 1.5×"),
            {"what": what, "candidate": "1000 bins, peak memory above the logits", "baseline": "64 MiB budget",
             "peak_mem_bytes": max(extra, 1e-3) * 2**20, "baseline_peak_mem_bytes": 64 * 2**20,
             "goal": "peak memory ≤ 1× the budget"}]


def classwise_vocab(quick: bool) -> list[dict]:
    import calibkern

    n, v, logits, labels = _vocabulary_rows(quick)
    what = f"classwise_ece N={n} V={v} fp32"
    times = timing.median_times({
        "classwise_ece": lambda: calibkern.classwise_ece(logits, labels, N_BINS, backend="cpp"),
        "ece": lambda: calibkern.ece(logits, labels, N_BINS, backend="cpp"),
    }, repeats=3 if quick else 5, warmup=1)
    return [_row(what, times, "classwise_ece", "ece", "time ≤ 3×")]


def rows(quick: bool = False) -> list[dict]:
    return (ece_small_k(quick) + metrics_small_k(quick) + bootstrap_interval(quick) + losses(quick) + ece_vocab(quick)
            + ece_many_bins(quick) + classwise_vocab(quick))


def main() -> None:
    """``python bench_ops.py [--quick] [--only NAME,NAME]`` (NAME: a function of this module returning rows)."""
    quick = "--quick" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    header = f"{'what':44} {'candidate':12} {'baseline':38} {'cand':>9} {'base':>9} {'ratio':>8}  goal"
    print(header)
    print("-" * len(header))
    for row in rows(quick) if only is None else [row for name in only for row in globals()[name](quick)]:
        cand, base = (row["median_s"], row["baseline_median_s"]) if "median_s" in row else (
            row["peak_mem_bytes"] / 2**20, row["baseline_peak_mem_bytes"] / 2**20)
        print(f"{row['what']:44} {row['candidate']:12} {row['baseline']:38} {cand:9.4f} {base:9.4f} "
              f"{base / cand:8.2f}  {row['goal']}")


if __name__ == "__main__":
    main()
