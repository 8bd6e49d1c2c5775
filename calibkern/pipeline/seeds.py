"""``calibkern demo --seeds 0,1,2``: the demo once per seed, and a summary over the seeds (docs/demo.md).

``OUT/seed_<s>/`` holds each run's full report; ``OUT/summary.json`` and ``OUT/summary.md`` hold, per stage,
the mean ± sample standard deviation of the ECE (plug-in and debiased), the smooth ECE and the accuracy over
the seeds, and per claim how many seeds hold it and, for a comparison of two ECEs, on how many seeds the
difference lies inside the two stages' 95 % intervals.
"""

from __future__ import annotations

import json
import os
import statistics

from .config import DemoConfig
from .demo import run_demo
from .provenance import provenance
from .report import ordered_stages

SUMMARY_METRICS = ("ece", "ece_debiased", "smece", "accuracy")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: distinct non-negative integers, at least one."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def _spread(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def summarise(per_seed: dict[int, dict]) -> dict:
    """The summary of several demo results dicts (seed → ``results.json`` content)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    stages = {
        stage: {metric: _spread([per_seed[s]["stages"][stage][metric] for s in seeds])
                for metric in SUMMARY_METRICS if metric in first["stages"][stage]}
        for stage in ordered_stages(first["stages"])
    }
    claims = []
    for index, check in enumerate(first["checks"]):
        outcomes = [per_seed[s]["checks"][index] for s in seeds]
        claims.append({"claim": check["claim"], "held": sum(c["holds"] for c in outcomes), "seeds": len(seeds),
                       "failed_on": [s for s, c in zip(seeds, outcomes) if not c["holds"]],
                       "inside_intervals": sum(c.get("note") == "inside the intervals" for c in outcomes)
                       if check.get("note") else None})
    return {"seeds": seeds, "stages": stages, "claims": claims}


def summary_markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    metrics = [m for m in SUMMARY_METRICS if any(m in row for row in summary["stages"].values())]
    lines = [f"# calibkern demo over seeds {', '.join(map(str, seeds))}", "",
             "Mean ± sample standard deviation over the seeds.", "",
             "| stage | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for stage, row in summary["stages"].items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['sd']:.4f}" if m in row else "" for m in metrics]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "| claim | seeds holding it | failed on | ECE difference inside the intervals |", "|---|---|---|---|"]
    for claim in summary["claims"]:
        failed = ", ".join(map(str, claim["failed_on"])) or "—"
        inside = "—" if claim["inside_intervals"] is None else f"{claim['inside_intervals']} / {claim['seeds']}"
        lines.append(f"| {claim['claim']} | {claim['held']} / {claim['seeds']} | {failed} | {inside} |")
    return "\n".join(lines) + "\n"


def run_seeds(config: DemoConfig, seeds: list[int], out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """The demo with ``config`` at each seed into ``out_dir/seed_<s>``, then the summary files; returns it."""
    out_dir = os.fspath(out_dir)
    per_seed = {seed: run_demo(config.replace(seed=seed), os.path.join(out_dir, f"seed_{seed}"), progress=progress)
                for seed in seeds}
    summary = {**summarise(per_seed), "provenance": provenance()}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(summary_markdown(summary))
    return summary
