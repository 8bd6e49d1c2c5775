"""Reports: ``results.json``, ``results.md`` (the metrics table and the demo's checks) and reliability diagrams.

``results.json`` = ``{"config", "timings", "stages": {stage: metrics}, "reliability": {stage: {"accuracy",
"confidence", "counts"}}, "checks": [...]}``; :func:`write_report` renders the Markdown and the PNGs from it
alone, so ``calibkern report DIR`` can redo them.
"""

from __future__ import annotations

import json
import os

import torch

import calibkern

STAGE_ORDER = ("base", "dpo", "temperature_scaling", "label_smoothing", "cft", "rcft", "rcft_no_reg")
TABLE_COLUMNS = ("ece", "ece_debiased", "ece_l2", "mce", "cw_ece", "accuracy", "mean_confidence", "nll", "brier", "n")


def reliability_data(option_logits: torch.Tensor, labels: torch.Tensor, n_bins: int,
                     temperature: float = 1.0) -> dict:
    """Per-bin accuracy, mean confidence and count (``calibkern.binned_stats``) as JSON-ready lists."""
    rel = calibkern.binned_stats(option_logits.float(), labels, n_bins, temperature=temperature).reliability()
    return {"accuracy": rel.accuracy.tolist(), "confidence": rel.confidence.tolist(), "counts": rel.counts.tolist()}


def demo_checks(stages: dict) -> list[dict]:
    """The demo's claims (issue 6) evaluated on measured metrics: ``{"claim", "measured", "holds"}`` each."""
    base, dpo, ts = stages["base"], stages["dpo"], stages["temperature_scaling"]
    cft, rcft, ablation = stages["cft"], stages["rcft"], stages["rcft_no_reg"]
    gap = dpo["mean_confidence"] - dpo["accuracy"]

    def check(claim, measured, holds):
        return {"claim": claim, "measured": measured, "holds": bool(holds)}

    return [
        check("base ECE ≤ 0.06", f"{base['ece']:.4f}", base["ece"] <= 0.06),
        check("DPO ECE ≥ 3 × base ECE", f"{dpo['ece']:.4f} vs 3 × {base['ece']:.4f} = {3 * base['ece']:.4f}",
              dpo["ece"] >= 3 * base["ece"]),
        check("DPO mean confidence − accuracy ≥ 0.10", f"{gap:.4f}", gap >= 0.10),
        check("CFT ECE ≤ 0.06", f"{cft['ece']:.4f}", cft["ece"] <= 0.06),
        check("CFT accuracy within 2 points of DPO's", f"{cft['accuracy']:.4f} vs {dpo['accuracy']:.4f}",
              abs(cft["accuracy"] - dpo["accuracy"]) <= 0.02),
        check("RCFT accuracy > DPO accuracy", f"{rcft['accuracy']:.4f} vs {dpo['accuracy']:.4f}",
              rcft["accuracy"] > dpo["accuracy"]),
        check("RCFT ECE ≤ DPO ECE / 2", f"{rcft['ece']:.4f} vs {dpo['ece'] / 2:.4f}", rcft["ece"] <= dpo["ece"] / 2),
        check("RCFT ECE < RCFT λ=0 ECE", f"{rcft['ece']:.4f} vs {ablation['ece']:.4f}", rcft["ece"] < ablation["ece"]),
        check("temperature scaling: T moved from 1", f"T = {ts['temperature']:.4f}", abs(ts["temperature"] - 1) > 1e-3),
        check("temperature scaling: ECE drops", f"{ts['ece']:.4f} vs {dpo['ece']:.4f}", ts["ece"] < dpo["ece"]),
        check("temperature scaling: accuracy unchanged", f"{ts['accuracy']:.4f} vs {dpo['accuracy']:.4f}",
              ts["accuracy"] == dpo["accuracy"]),
    ]


def _ordered(stages: dict) -> list[str]:
    return [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]


def markdown(results: dict) -> str:
    """The metrics table (one row per stage), the checks, and the timings."""
    stages = results["stages"]
    lines = ["# calibkern results", "", "| stage | " + " | ".join(TABLE_COLUMNS) + " | debiased ECE, 95% CI | T |",
             "|---" * (len(TABLE_COLUMNS) + 3) + "|"]
    for name in _ordered(stages):
        m = stages[name]
        cells = [str(m[c]) if c == "n" else f"{m[c]:.4f}" if c in m else "" for c in TABLE_COLUMNS]
        low, high = m["ece_ci"]
        temperature = f"{m['temperature']:.3f}" if "temperature" in m else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | [{low:.4f}, {high:.4f}] | {temperature} |")
    if results.get("checks"):
        lines += ["", "## Checks", "", "| claim | measured | holds |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} |" for c in results["checks"]]
    if results.get("timings"):
        lines += ["", "## Timings (seconds)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    return "\n".join(lines) + "\n"


def _draw(ax, name: str, rel: dict, metrics: dict) -> None:
    n_bins = len(rel["counts"])
    width = 1.0 / n_bins
    centres = [(k + 0.5) * width for k in range(n_bins)]
    filled = [k for k in range(n_bins) if rel["counts"][k] > 0]
    ax.bar([centres[k] for k in filled], [rel["accuracy"][k] for k in filled], width=width * 0.95,
           color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar([centres[k] for k in filled], [rel["confidence"][k] - rel["accuracy"][k] for k in filled],
           bottom=[rel["accuracy"][k] for k in filled], width=width * 0.95, color="tab:red", alpha=0.35,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}\nECE {metrics['ece']:.3f}, acc {metrics['accuracy']:.3f}", fontsize=9)


def write_plots(results: dict, out_dir: str) -> list[str]:
    """``reliability_<stage>.png`` per stage and ``reliability_all.png`` side by side; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in _ordered(results["stages"]) if n in results.get("reliability", {})]
    paths = []
    for name in names:
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        _draw(ax, name, results["reliability"][name], results["stages"][name])
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"reliability_{name}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.3), squeeze=False)
        for ax, name in zip(axes[0], names):
            _draw(ax, name, results["reliability"][name], results["stages"][name])
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "reliability_all.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(results: dict, out_dir: str | os.PathLike) -> None:
    """``results.json``, ``results.md`` and the PNGs in ``out_dir``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results))
    write_plots(results, out_dir)


def load_results(out_dir: str | os.PathLike) -> dict:
    """``out_dir/results.json``; a missing or malformed file is an error naming it."""
    path = os.path.join(os.fspath(out_dir), "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no results.json (run `calibkern demo` or `calibkern pipeline` first)")
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
    if not isinstance(results, dict) or not isinstance(results.get("stages"), dict):
        raise ValueError(f"{path}: expected an object with a 'stages' object")
    return results
