"""Fused linear calibration loss vs eager full logits, on CPU, side by side in one run.

Both candidates compute ``CE + hard-bin calibration term`` from ``hidden [N, D]`` and ``weight [V, D]``
(fp32), forward + backward with gradients for hidden and weight. Eager materialises the ``[N, V]`` logits
and calls ``F.cross_entropy``, then gathers the option logits from them; the candidate is
``calibkern.fused_linear_calibration_loss`` on the default backend (cpp when built, else torch).

* Time: the two alternate in one process (benchmarks/timing.py); the median of the rounds.
* Peak memory above the inputs: each candidate runs once in a fresh process with glibc's allocator cache
  off (``timing.UNCACHED_MALLOC``); after the inputs exist ``VmHWM`` is reset, and the row reports the peak
  resident set of one step minus the resident set before it — every byte the step allocates, torch's or
  not, counts (the ``V × D`` gradient of the weight included, for both).

Token-level rows (:func:`token_rows`, docs/math.md#token-level-calibration): the option-free fused loss
(``CE`` only) without telemetry, with ``token_stats=True``, with ``full_stats=True`` and with the
``token_hard_bin`` term, and the three matrix products of the step alone (``h Wᵀ``, ``dZ W``, ``dZᵀ h`` at
full size) — all five alternated in one run, every row supervised.

``python benchmarks/bench_fused_linear.py [--quick] [--token-only]`` prints the rows as a table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import timing  # noqa: E402

OPTION_IDS = [10, 11, 12, 13]
N_BINS = 10
ANSWER_EVERY = 64  # one answer-letter position per 64 tokens (a short multiple-choice sample)
EAGER_FULL_BUFFERS = 5  # [N, V] float32 buffers alive at eager's peak (measured: 2.5 GiB at V = 32000)


def make_inputs(n_tok, dim, vocab, supervised_every, seed=0):
    """hidden, weight (both requiring grad) and labels: every ``supervised_every``-th row supervised, an
    option token every ``ANSWER_EVERY`` rows."""
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
                                                  calibration="hard_bin",
                                                  bin_accuracy=torch.linspace(0.05, 0.95, N_BINS))
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
    loss = ce + calibkern.calibration_loss(option_logits, option_labels, torch.linspace(0.05, 0.95, N_BINS))
    loss.backward()


STEPS = {"fused": fused_step, "eager": eager_step}
TOKEN_ACCURACY = torch.linspace(0.05, 0.95, N_BINS)
TOKEN_STEPS = {
    "plain": {"calibration": None},
    "token_stats": {"calibration": None, "token_stats": True},
    "full_stats": {"calibration": None, "full_stats": True},
    "token_hard_bin": {"calibration": "token_hard_bin", "bin_accuracy": TOKEN_ACCURACY, "token_stats": True},
}


def _token_runner(options, inputs):
    import calibkern

    hidden, weight, labels = inputs

    def run():
        hidden.grad = weight.grad = None
        calibkern.fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, shift=False,
                                                **options).loss.backward()
    return run


def _matmul_runner(inputs):
    """The step's three products at full size: ``Z = h Wᵀ``, ``dZ W`` and ``dZᵀ h`` (a random dZ, made once)."""
    hidden, weight, _ = inputs
    h, w = hidden.detach(), weight.detach()
    grad_z = torch.randn(h.shape[0], w.shape[0]) * 1e-4

    def run():
        torch.mm(h, w.t())
        torch.mm(grad_z, w)
        torch.mm(grad_z.t(), h)
    return run


def token_rows(quick=False, n_tok=None, repeats=None) -> list[dict]:
    """Token telemetry and the token term against the plain fused loss, and the fused loss with token_stats
    against its three matrix products (module docstring); ``n_tok`` scales the rows down (the chunk's shape,
    512 × V, stays). Besides the medians, each row notes the median of the per-round ratios (the candidates
    of a round run back to back, so a load change between rounds cancels)."""
    n_tok, dim, vocab = (512, 256, 8000) if quick else (n_tok or 4096, 1024, 32000)
    inputs = make_inputs(n_tok, dim, vocab, supervised_every=1)
    candidates = {name: _token_runner(options, inputs) for name, options in TOKEN_STEPS.items()}
    candidates["matmuls"] = _matmul_runner(inputs)
    times = timing.median_times(candidates, repeats=repeats or (3 if quick else 7), warmup=1)
    shape = f"N={n_tok} D={dim} V={vocab} fp32 fwd+bwd, all rows supervised"
    goals = {"token_stats": "≤ 1.03×", "full_stats": "≤ 1.15×", "token_hard_bin": "≤ 1.05×"}
    def paired(name, base):
        ratios = sorted(a / b for a, b in zip(times[name]["samples_s"], times[base]["samples_s"]))
        return f"median of per-round ratios {ratios[len(ratios) // 2]:.3f}× over {len(ratios)} rounds"

    out = [{"what": f"fused CE + {name}, {shape}", "candidate": f"fused_linear_calibration_loss, {name}",
            "baseline": "fused_linear_calibration_loss, CE without telemetry", "goal": f"time {goals[name]}",
            "median_s": times[name]["median_s"], "baseline_median_s": times["plain"]["median_s"],
            "note": paired(name, "plain")}
           for name in goals]
    out.append({"what": f"fused CE + token_stats vs its matrix products, {shape}",
                "candidate": "fused_linear_calibration_loss, token_stats",
                "baseline": "h Wᵀ, dZ W, dZᵀ h alone (torch.mm, full size)", "goal": "time ≤ 1.2×",
                "median_s": times["token_stats"]["median_s"], "baseline_median_s": times["matmuls"]["median_s"],
                "note": paired("token_stats", "matmuls")})
    out.append({"what": f"fused CE without telemetry vs its matrix products, {shape}",
                "candidate": "fused_linear_calibration_loss, CE",
                "baseline": "h Wᵀ, dZ W, dZᵀ h alone (torch.mm, full size)",
                "goal": "time (report)", "median_s": times["plain"]["median_s"],
                "baseline_median_s": times["matmuls"]["median_s"], "note": paired("plain", "matmuls")})
    for row in out:
        row["ratio"] = row["median_s"] / row["baseline_median_s"]
    if quick:
        for row in out:
            row["goal"] = "time (report)"
    return out


def _runner(step, inputs):
    def run():
        for x in inputs[:2]:
            x.grad = None
        STEPS[step](*inputs)
    return run


def step_peak(step: str, config: dict) -> dict:
    """In a fresh process: the peak resident bytes one step adds above the resident set with the inputs.

    A small step runs first, so that imports and lazy initialisation are not counted.
    """
    STEPS[step](*make_inputs(n_tok=256, dim=32, vocab=300, supervised_every=config["supervised_every"]))
    inputs = make_inputs(**config)
    if not timing.reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs) on this kernel")
    start = timing.current_rss_mib()
    STEPS[step](*inputs)
    return {"peak_bytes": int((timing.peak_rss_mib() - start) * 2**20)}


def _peak(step, config):
    return timing.in_subprocess("bench_fused_linear", "step_peak", env=timing.UNCACHED_MALLOC, step=step,
                                config=config)["peak_bytes"]


def _eager_fits(config):
    """Whether eager's full-logits buffers fit in the memory free now (with half as much again to spare)."""
    need = EAGER_FULL_BUFFERS * config["n_tok"] * config["vocab"] * 4
    with open("/proc/meminfo") as meminfo:
        free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    return need * 1.5 < free, need


def _cases(quick):
    """(n_tok, dim, vocab, supervised_every, time goal, memory goal or None)."""
    if quick:  # overhead-dominated shapes: a smoke run, the goals are for the full shapes
        return [(512, 256, 8000, 1, "(report)", "(report)"), (512, 256, 8000, 64, "(report)", None)]
    return [(4096, 1024, 32000, 1, "≤ 1.1×", "≤ 0.2×"), (4096, 1024, 32000, 64, "≤ 0.1×", None),
            (4096, 1024, 128256, 1, "(report)", "(report)")]


def rows(quick=False) -> list[dict]:
    """One row per case: median seconds and, where a memory goal is set, peak bytes above the inputs."""
    out = []
    for n_tok, dim, vocab, every, time_goal, mem_goal in _cases(quick):
        config = {"n_tok": n_tok, "dim": dim, "vocab": vocab, "supervised_every": every}
        supervised = "all rows" if every == 1 else f"1 in {every} rows"
        row = {"what": f"fused linear loss, N={n_tok} D={dim} V={vocab} fp32 fwd+bwd, {supervised} supervised",
               "candidate": "calibkern.fused_linear_calibration_loss (CE + hard_bin)",
               "baseline": "eager: full logits, F.cross_entropy, calibration_loss",
               "goal": f"time {time_goal}" + ("" if mem_goal is None else f", peak memory above inputs {mem_goal}")}
        fits, need = _eager_fits(config)
        steps = ("fused", "eager") if fits else ("fused",)
        inputs = make_inputs(**config)
        repeats = 3 if quick or vocab > 100000 else 5
        times = timing.median_times({s: _runner(s, inputs) for s in steps}, repeats=repeats, warmup=1)
        del inputs
        row.update(median_s=times["fused"]["median_s"],
                   baseline_median_s=times["eager"]["median_s"] if fits else None)
        row["ratio"] = row["baseline_median_s"] and row["median_s"] / row["baseline_median_s"]
        if not fits:
            row["note"] = f"eager not run: needs ~{need / 2**30:.1f} GiB, more than is free here"
        if mem_goal is not None:
            row["peak_mem_bytes"] = _peak("fused", config)
            row["baseline_peak_mem_bytes"] = _peak("eager", config) if fits else None
            row["peak_mem_ratio"] = row["baseline_peak_mem_bytes"] and (row["peak_mem_bytes"]
                                                                        / row["baseline_peak_mem_bytes"])
        out.append(row)
    return out + token_rows(quick)


def _fmt(value, unit):
    if value is None:
        return "—"
    return {"s": f"{value:.3f} s", "MiB": f"{value / 2**20:.0f} MiB", "×": f"{value:.3f}×"}[unit]


def table(results) -> str:
    lines = ["| case | fused time | eager time | time ratio | fused peak | eager peak | memory ratio | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r["what"], _fmt(r.get("median_s"), "s"), _fmt(r.get("baseline_median_s"), "s"),
                 _fmt(r.get("ratio"), "×"), _fmt(r.get("peak_mem_bytes"), "MiB"),
                 _fmt(r.get("baseline_peak_mem_bytes"), "MiB"), _fmt(r.get("peak_mem_ratio"), "×"),
                 r["goal"] + (f" ({r['note']})" if "note" in r else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--token-only", action="store_true", help="only the token-level rows")
    parser.add_argument("--token-rows", type=int, default=None, help="token rows: N (default 4096)")
    parser.add_argument("--repeats", type=int, default=None, help="token rows: timed rounds")
    args = parser.parse_args()
    import calibkern

    backend = calibkern.backends.resolve(None, torch.device("cpu"))[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, calibkern backend {backend}")
    if args.token_only:
        print(table(token_rows(quick=args.quick, n_tok=args.token_rows, repeats=args.repeats)))
    else:
        print(table(rows(quick=args.quick)))


if __name__ == "__main__":
    main()
