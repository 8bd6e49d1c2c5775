"""Fused linear calibration loss vs eager full logits, on CPU, side by side in one run.

Both candidates compute ``CE + hard-bin calibration term`` from ``hidden [N, D]`` and ``weight [V, D]``,
forward + backward (gradients for hidden and weight). Eager materialises the ``[N, V]`` logits and calls
``F.cross_entropy``; the candidate is ``calibkern.fused_linear_calibration_loss`` with the default backend.

* Time: candidate and baseline alternate in one process; the median of ``repeats`` runs each.
* Peak memory: each candidate runs once in a fresh subprocess; its peak is the process's resident-set
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the inputs are built) minus
  the resident set with the inputs in place — every byte the step allocates, torch's or not, counts.
  The weight's gradient (``V × D`` float32) is part of both peaks.

``python benchmarks/bench_fused_linear.py [--quick]`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

OPTION_IDS = [10, 11, 12, 13]
BIN_ACCURACY = torch.linspace(0.05, 0.95, 10)
ANSWER_EVERY = 64  # one answer-letter position per 64 tokens (a short multiple-choice sample)


def make_inputs(n_tok, dim, vocab, supervised_every, seed=0):
    """hidden, weight (both requiring grad) and labels; every ``supervised_every``-th row supervised."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tok, dim, generator=g).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * dim ** -0.5).requires_grad_()
    labels = torch.randint(len(OPTION_IDS) * 10, vocab, (n_tok,), generator=g)
    labels[torch.arange(n_tok) % supervised_every != 0] = -100
    answers = torch.arange(0, n_tok, max(ANSWER_EVERY, supervised_every))
    labels[answers] = torch.tensor(OPTION_IDS)[torch.randint(0, len(OPTION_IDS), answers.shape, generator=g)]
    return hidden, weight, labels


def fused_step(hidden, weight, labels):
    import calibkern

    out = calibkern.fused_linear_calibration_loss(hidden, weight, labels, option_ids=OPTION_IDS, shift=False,
                                                  calibration="hard_bin", bin_accuracy=BIN_ACCURACY)
    out.loss.backward()


def eager_step(hidden, weight, labels):
    """The textbook path: full logits, F.cross_entropy, option logits gathered from the full logits."""
    import calibkern

    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    options = torch.tensor(OPTION_IDS)
    is_answer = (labels[:, None] == options).any(1)
    option_logits = logits[is_answer][:, options]
    option_labels = (labels[is_answer][:, None] == options).long().argmax(1)
    loss = ce + calibkern.calibration_loss(option_logits, option_labels, BIN_ACCURACY)
    loss.backward()


STEPS = {"fused": fused_step, "eager": eager_step}


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak_here(step, config):
    """Run in the subprocess: peak resident bytes of one step above the resident set with the inputs."""
    inputs = make_inputs(**config)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _rss_bytes("VmRSS")
    STEPS[step](*inputs)
    return _rss_bytes("VmHWM") - base


def peak_memory(step, config):
    """Peak bytes above the inputs of one step, measured in a fresh subprocess."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak", step, json.dumps(config)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.strip().splitlines()[-1])


def median_times(config, repeats):
    """Median seconds per forward + backward for each step, alternating in this process."""
    inputs = make_inputs(**config)
    times = {name: [] for name in STEPS}
    for _ in range(repeats):
        for name, step in STEPS.items():
            for x in inputs[:2]:
                x.grad = None
            start = time.perf_counter()
            step(*inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _eager_fits(config):
    """Eager keeps ~4 full [N, V] float32 buffers at its peak; skip it when the machine lacks the memory."""
    need = 4 * config["n_tok"] * config["vocab"] * 4
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return need * 1.5 < available, need


def _cases(quick):
    """(n_tok, dim, vocab, supervised_every, time goal, memory goal or None)."""
    if quick:
        return [(512, 256, 8000, 1, "≤ 1.1×", "≤ 0.2×"), (512, 256, 8000, 64, "≤ 0.1×", None)]
    return [(4096, 1024, 32000, 1, "≤ 1.1×", "≤ 0.2×"), (4096, 1024, 32000, 64, "≤ 0.1×", None),
            (4096, 1024, 128256, 1, "report", "report")]


def rows(quick=False) -> list[dict]:
    """One row per case: median seconds and (where a memory goal is set) peak bytes above the inputs."""
    out = []
    for n_tok, dim, vocab, every, time_goal, mem_goal in _cases(quick):
        config = {"n_tok": n_tok, "dim": dim, "vocab": vocab, "supervised_every": every}
        supervised = "all rows" if every == 1 else f"1 in {every} rows"
        row = {"what": f"N={n_tok} D={dim} V={vocab} fp32 fwd+bwd, {supervised} supervised",
               "candidate": "calibkern.fused_linear_calibration_loss (hard_bin)",
               "baseline": "eager full logits + F.cross_entropy + calibration_loss",
               "goal": f"time {time_goal}" + ("" if mem_goal is None else f", peak memory above inputs {mem_goal}")}
        repeats = (3 if quick else 5) if vocab < 100000 else 2
        fits, need = _eager_fits(config)
        if fits:
            times = median_times(config, repeats)
            row.update(median_s=times["fused"], baseline_median_s=times["eager"],
                       ratio=times["fused"] / times["eager"])
        else:
            row.update(median_s=median_times_fused_only(config, repeats), baseline_median_s=None, ratio=None,
                       note=f"eager not run: needs ~{need / 2**30:.1f} GiB, more than this machine has free")
        if mem_goal is not None:
            fused_peak = peak_memory("fused", config)
            eager_peak = peak_memory("eager", config) if fits else None
            row.update(peak_mem_bytes=fused_peak, baseline_peak_mem_bytes=eager_peak,
                       peak_mem_ratio=None if eager_peak is None else fused_peak / eager_peak)
        out.append(row)
    return out


def median_times_fused_only(config, repeats):
    inputs = make_inputs(**config)
    times = []
    for _ in range(repeats):
        for x in inputs[:2]:
            x.grad = None
        start = time.perf_counter()
        fused_step(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fmt(value, unit=""):
    if value is None:
        return "—"
    if unit == "MiB":
        return f"{value / 2**20:.0f} MiB"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.3f}×"


def table(results) -> str:
    lines = ["| what | fused time | eager time | time ratio | fused peak | eager peak | memory ratio | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(" | ".join([
            f"| {r['what']}", _fmt(r.get("median_s"), "s"), _fmt(r.get("baseline_median_s"), "s"),
            _fmt(r.get("ratio")), _fmt(r.get("peak_mem_bytes"), "MiB"),
            _fmt(r.get("baseline_peak_mem_bytes"), "MiB"), _fmt(r.get("peak_mem_ratio")),
            r["goal"] + (f" ({r['note']})" if "note" in r else "") + " |"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--peak", nargs=2, metavar=("STEP", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(_measure_peak_here(args.peak[0], json.loads(args.peak[1])))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend "
          f"{__import__('calibkern').backends.resolve(None, torch.device('cpu'))[0]}")
    print(table(rows(quick=args.quick)))


if __name__ == "__main__":
    main()
