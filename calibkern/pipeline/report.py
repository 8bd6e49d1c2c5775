"""Reports: ``results.json``, ``results.md`` (the metrics table and the demo's checks) and reliability diagrams.

``results.json`` = ``{"config", "timings", "stages": {stage: metrics}, "reliability": {stage: {"accuracy",
"confidence", "counts", "smooth"}}, "checks": [...]}``; :func:`write_report` renders the Markdown and the PNGs from it
alone, so ``calibkern report DIR`` can redo them.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

import calibkern

from .outputs import check_name

STAGE_ORDER = ("base", "dpo", "temperature_scaling", "label_smoothing", "cft", "rcft", "rcft_no_reg")
TABLE_COLUMNS = ("ece", "ece_debiased", "smece", "ece_l2", "mce", "cw_ece", "accuracy", "mean_confidence", "nll",
                 "brier", "n")


def reliability_data(option_logits: torch.Tensor, labels: torch.Tensor, n_bins: int,
                     temperature: float = 1.0, sigma: float | None = None) -> dict:
    """Per-bin accuracy, mean confidence and count (``calibkern.binned_stats``) and the smooth reliability curve
    (``calibkern.smooth_reliability``: ``confidence``, ``accuracy``, ``density`` at 101 points, ``sigma``, and
    ``support``, the rows' smallest and largest confidence) as JSON-ready lists; ``sigma``: the bandwidth already
    found (a stage's ``smece_sigma``), else searched again."""
    logits = option_logits.float()
    rel = calibkern.binned_stats(logits, labels, n_bins, temperature=temperature).reliability()
    curve = calibkern.smooth_reliability(logits, labels, sigma=sigma, points=101, temperature=temperature)
    return {"accuracy": rel.accuracy.tolist(), "confidence": rel.confidence.tolist(), "counts": rel.counts.tolist(),
            "smooth": curve.as_lists()}


def _interval_note(lower: dict, upper: dict) -> str:
    """Whether the debiased ECEs of two stages differ beyond their 95 % intervals."""
    overlap = lower["ece_ci"][1] >= upper["ece_ci"][0] and upper["ece_ci"][1] >= lower["ece_ci"][0]
    return "inside the intervals" if overlap else "outside the intervals"


def demo_checks(stages: dict) -> list[dict]:
    """The demo's claims evaluated on measured metrics: ``{"claim", "measured", "holds", "note"}`` each.

    ECE claims use the debiased ECE (docs/math.md#debiased-ece), except the base model's side of the DPO claim: a
    calibrated base's debiased ECE is near 0 or below it, where "3 ×" could never fail, so its plug-in ECE (above
    the debiased one, and above 0) stands in; a comparison of two stages' ECEs notes whether
    the difference lies inside their 95 % intervals (the intervals overlap) or outside them. The CFT accuracy
    claim is one-sided: CFT loses at most 2 points against DPO (gaining is not a failure)."""
    base, dpo, ts = stages["base"], stages["dpo"], stages["temperature_scaling"]
    cft, rcft, ablation = stages["cft"], stages["rcft"], stages["rcft_no_reg"]
    gap = dpo["mean_confidence"] - dpo["accuracy"]

    def ece(m):
        return m["ece_debiased"]

    def check(claim, measured, holds, note=""):
        return {"claim": claim, "measured": measured, "holds": bool(holds), "note": note}

    return [
        check("base debiased ECE ≤ 0.06", f"{ece(base):.4f}", ece(base) <= 0.06),
        check("DPO debiased ECE ≥ 3 × base's plug-in ECE", f"{ece(dpo):.4f} vs 3 × {base['ece']:.4f} = "
              f"{3 * base['ece']:.4f}", ece(dpo) >= 3 * base["ece"], _interval_note(base, dpo)),
        check("DPO mean confidence − accuracy ≥ 0.10", f"{gap:.4f}", gap >= 0.10),
        check("CFT debiased ECE ≤ 0.06", f"{ece(cft):.4f}", ece(cft) <= 0.06),
        check("CFT accuracy ≥ DPO accuracy − 2 points", f"{cft['accuracy']:.4f} vs {dpo['accuracy']:.4f}",
              cft["accuracy"] >= dpo["accuracy"] - 0.02),
        check("RCFT accuracy > DPO accuracy", f"{rcft['accuracy']:.4f} vs {dpo['accuracy']:.4f}",
              rcft["accuracy"] > dpo["accuracy"]),
        check("RCFT debiased ECE ≤ DPO's / 2", f"{ece(rcft):.4f} vs {ece(dpo) / 2:.4f}", ece(rcft) <= ece(dpo) / 2,
              _interval_note(rcft, dpo)),
        check("RCFT debiased ECE < RCFT λ=0's", f"{ece(rcft):.4f} vs {ece(ablation):.4f}",
              ece(rcft) < ece(ablation), _interval_note(rcft, ablation)),
        check("temperature scaling: T moved from 1", f"T = {ts['temperature']:.4f}", abs(ts["temperature"] - 1) > 1e-3),
        check("temperature scaling: debiased ECE drops", f"{ece(ts):.4f} vs {ece(dpo):.4f}", ece(ts) < ece(dpo),
              _interval_note(ts, dpo)),
        check("temperature scaling: accuracy unchanged", f"{ts['accuracy']:.4f} vs {dpo['accuracy']:.4f}",
              ts["accuracy"] == dpo["accuracy"]),
    ]


def ordered_stages(stages: dict) -> list[str]:
    return [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]


def markdown(results: dict) -> str:
    """The metrics table (one row per stage), the checks, and the timings."""
    stages = results["stages"]
    lines = ["# calibkern results", "", "| stage | " + " | ".join(TABLE_COLUMNS) + " | debiased ECE, 95% CI | T |",
             "|---" * (len(TABLE_COLUMNS) + 3) + "|"]
    for name in ordered_stages(stages):
        m = stages[name]
        cells = [str(m[c]) if c == "n" else f"{m[c]:.4f}" if c in m else "" for c in TABLE_COLUMNS]
        low, high = m["ece_ci"]
        temperature = f"{m['temperature']:.3f}" if "temperature" in m else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | [{low:.4f}, {high:.4f}] | {temperature} |")
    if results.get("checks"):
        lines += ["", "## Checks", "", "| claim | measured | holds | difference |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} | {c.get('note', '')} |"
                  for c in results["checks"]]
    if results.get("timings"):
        lines += ["", "## Timings (seconds)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    return "\n".join(lines) + "\n"


def _draw(ax, counts_ax, name: str, rel: dict, metrics: dict) -> None:
    """The binned reliability bars, the smooth curve over the rows (when recorded with its support; results of
    older builds hold another curve, not drawn) and, in ``counts_ax`` below, the rows per bin
    (calibkern.plot.draw_reliability)."""
    from calibkern.plot import draw_reliability

    smece = f", smECE {metrics['smece']:.3f}" if "smece" in metrics else ""
    draw_reliability(ax, counts_ax, rel["accuracy"], rel["confidence"], rel["counts"], rel.get("smooth"),
                     title=f"{name}\nECE {metrics['ece']:.3f}{smece}, acc {metrics['accuracy']:.3f}")


def write_reliability_plot(path: str, name: str, rel: dict, metrics: dict) -> None:
    """One reliability diagram over its histogram of rows per bin (:func:`reliability_data`), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibkern.plot import diagram_axes

    fig, axes = diagram_axes(1)
    _draw(axes[0, 0], axes[1, 0], name, rel, metrics)
    axes[0, 0].legend(loc="upper left", fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_plots(results: dict, out_dir: str) -> list[str]:
    """``reliability_<stage>.png`` per stage and ``reliability_all.png`` side by side, each a reliability
    diagram over a histogram of the rows per bin; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibkern.plot import diagram_axes

    names = [check_name(n, "stage name") for n in ordered_stages(results["stages"]) if n in results.get("reliability", {})]
    paths = []
    for name in names:
        paths.append(os.path.join(out_dir, f"reliability_{name}.png"))
        write_reliability_plot(paths[-1], name, results["reliability"][name], results["stages"][name])
    if names:
        fig, axes = diagram_axes(len(names))
        for column, name in enumerate(names):
            _draw(axes[0, column], axes[1, column], name, results["reliability"][name], results["stages"][name])
        paths.append(os.path.join(out_dir, "reliability_all.png"))
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def write_derived(results: dict, out_dir: str | os.PathLike) -> None:
    """``results.md`` and the PNGs, rendered into a scratch folder inside ``out_dir`` and each renamed into place:
    an interrupted rewrite leaves every file whole, old or new, and all of them drawn from the same results."""
    out_dir = os.fspath(out_dir)
    with tempfile.TemporaryDirectory(prefix=".report-", dir=out_dir) as scratch:
        with open(os.path.join(scratch, "results.md"), "w", encoding="utf-8") as handle:
            handle.write(markdown(results))
        write_plots(results, scratch)
        for name in sorted(os.listdir(scratch)):
            os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))


def write_report(results: dict, out_dir: str | os.PathLike) -> None:
    """``results.json``, ``results.md`` and the PNGs in ``out_dir``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    write_derived(results, out_dir)


def load_results(out_dir: str | os.PathLike) -> dict:
    """``out_dir/results.json``; a missing or malformed file, or a stage name that is not a plain file name
    (it becomes ``reliability_<stage>.png``), is an error naming it."""
    path = os.path.join(os.fspath(out_dir), "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no results.json (run `calibkern demo` or `calibkern pipeline` first)")
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
    except (RecursionError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable JSON ({type(error).__name__}: {str(error)[:100]})") from None
    if not isinstance(results, dict) or not isinstance(results.get("stages"), dict):
        raise ValueError(f"{path}: expected an object with a 'stages' object")
    if not isinstance(results.get("reliability", {}), dict):
        raise ValueError(f"{path}: 'reliability' must be an object")
    for name in [*results["stages"], *results.get("reliability", {})]:
        check_name(name, f"{path}: stage name")
    return results
