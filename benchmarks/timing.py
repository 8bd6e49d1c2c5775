"""What every calibkern benchmark shares: side-by-side timing, process memory, and the result row.

Timing (:func:`median_times`): every candidate first runs ``warmup`` times untimed (at least once); then
``repeats`` rounds, each timing every candidate with the order rotated by one per round (no candidate
always runs first or right after another), with ``time.perf_counter``. A sample is one call, or — for a
candidate whose warm-up call took less than ``MIN_SAMPLE_S`` — the mean of enough back-to-back calls to
last about that long, so that a sub-millisecond op is not timed against the clock's resolution, the cache
misses of the ``gc.collect()`` before the sample and the wake-up of sleeping worker threads alone. The
reported time is the median of the rounds.

Memory: resident set size of the process (``/proc/self/status``). :func:`in_subprocess` runs a function in a
fresh Python process, so that one candidate's allocations, allocator caches and peak never mix with
another's; ``VmHWM`` (the peak) can be reset with :func:`reset_peak_rss` where the kernel allows it.
:data:`UNCACHED_MALLOC` makes glibc return every freed block of 64 KiB or more to the system at once, so
that RSS follows the live allocations rather than the allocator's cache (use it for memory runs only).

A result row (:func:`ratio_row`, :func:`skipped_row`) is a flat dict; ``gain = baseline / candidate``
(how many times faster, or smaller, the candidate is) and ``met = gain ≥ min_gain``. Goals stated as
"candidate ≤ x × baseline" are ``min_gain = 1 / x``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from statistics import median

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
UNCACHED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


MIN_SAMPLE_S = 0.02


def median_times(candidates: dict[str, Callable[[], object]], *, repeats: int = 5,
                 warmup: int = 1) -> dict[str, dict]:
    """``{name: {"median_s", "samples_s", "calls_per_sample"}}`` for callables timed side by side (module
    docstring)."""
    names = list(candidates)
    calls = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            candidates[name]()
            once = time.perf_counter() - start
        calls[name] = max(1, min(1000, round(MIN_SAMPLE_S / max(once, 1e-9))))
    samples = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            start = time.perf_counter()
            for _ in range(calls[name]):
                candidates[name]()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: {"median_s": median(values), "samples_s": values, "calls_per_sample": calls[name]}
            for name, values in samples.items()}


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss_mib() -> float:
    """Resident set size of this process now (``VmRSS``), MiB."""
    return _status_kib("VmRSS") / 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process (``VmHWM``) since start or the last reset, MiB."""
    return _status_kib("VmHWM") / 1024.0


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux ≥ 4.0, ``/proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def in_subprocess(module: str, function: str, timeout: float = 600.0, env: dict | None = None, **kwargs) -> dict:
    """``module.function(**kwargs)`` in a fresh interpreter (benchmarks/ and the repository on the path, ``env``
    added to the environment); returns its JSON dict."""
    code = ("import json, sys; sys.path[:0] = sys.argv[1].split('|'); import importlib; "
            "result = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(**json.loads(sys.argv[4])); "
            "print('\\nRESULT ' + json.dumps(result))")
    command = [sys.executable, "-c", code, f"{BENCH_DIR}|{REPO_ROOT}", module, function, json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{module}.{function} failed in a subprocess (exit {done.returncode}): {tail[0]}")
    return json.loads(results[-1][len("RESULT "):])


def ratio_row(*, source: str, name: str, candidate: str, baseline: str, candidate_value: float,
              baseline_value: float, quantity: str = "time", unit: str = "s", goal: str = "",
              min_gain: float | None = None, notes: str = "", **extra) -> dict:
    """One measured comparison; ``gain = baseline_value / candidate_value``, ``met = gain ≥ min_gain``."""
    gain = baseline_value / candidate_value if candidate_value > 0 else float("inf")
    return {"source": source, "name": name, "candidate": candidate, "baseline": baseline, "quantity": quantity,
            "unit": unit, "candidate_value": candidate_value, "baseline_value": baseline_value, "gain": gain,
            "goal": goal, "min_gain": min_gain, "met": None if min_gain is None else bool(gain >= min_gain),
            "skipped": None, "notes": notes, **extra}


def skipped_row(*, source: str, name: str, reason: str, candidate: str = "", baseline: str = "",
                goal: str = "", min_gain: float | None = None) -> dict:
    """A comparison that could not run here, with the reason (a missing backend, package or module)."""
    return {"source": source, "name": name, "candidate": candidate, "baseline": baseline, "quantity": "",
            "unit": "", "candidate_value": None, "baseline_value": None, "gain": None, "goal": goal,
            "min_gain": min_gain, "met": None, "skipped": reason, "notes": ""}
