"""Rendering the benchmark rows: the ratio table (terminal and Markdown), the JSON file and the bar chart.

Rows are the dicts of benchmarks/timing.py; ``gain = baseline / candidate`` (× better), ``met = gain ≥
min_gain``.
"""

from __future__ import annotations

import json
import math
import os
import textwrap

COLUMNS = ("benchmark", "quantity", "candidate", "baseline", "candidate value", "baseline value",
           "gain (baseline ÷ candidate)", "goal", "result")


def format_value(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale or suffix == "µs":
                return f"{value / scale:.3g} {suffix}"
    return f"{value:.4g} {unit}".strip()


def format_gain(gain) -> str:
    if gain is None:
        return "—"
    if math.isinf(gain):
        return "∞"
    return f"{gain:,.0f}×" if gain >= 1000 else f"{gain:.3g}×"


def result_of(row: dict) -> str:
    if row["skipped"]:
        return f"skipped: {row['skipped']}"
    return {True: "met", False: "MISSED", None: "—"}[row["met"]]


def table_cells(row: dict) -> list[str]:
    return [row["name"], row["quantity"], row["candidate"], row["baseline"],
            format_value(row["candidate_value"], row["unit"]), format_value(row["baseline_value"], row["unit"]),
            format_gain(row["gain"]), row["goal"] or "—", result_of(row)]


def markdown_table(rows: list[dict]) -> str:
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(COLUMNS), line(["---"] * len(COLUMNS))] + [line(table_cells(row)) for row in rows])


def terminal_table(rows: list[dict]) -> str:
    """The table with each row's candidate and baseline on a second line, so that it fits a terminal."""
    head = ("benchmark / quantity", "candidate", "baseline", "gain", "goal", "result")
    body = []
    for row in rows:
        cells = table_cells(row)
        body.append((f"{cells[0]} / {cells[1]}" if cells[1] else cells[0], cells[4], cells[5], cells[6], cells[7],
                     cells[8]))
        if row["candidate"] or row["baseline"]:
            body.append((f"    {row['candidate']}  vs  {row['baseline']}", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(1, len(head))]
    first = max(len(r[0]) for r in [head] + body if not r[0].startswith("    ")) if body else len(head[0])

    def render(r):
        if r[0].startswith("    "):
            return r[0]
        return "  ".join([r[0].ljust(first)] + [c.ljust(w) for c, w in zip(r[1:], widths)]).rstrip()

    rule = "-" * (first + sum(widths) + 2 * len(widths))
    return "\n".join([render(head), rule] + [render(r) for r in body])


def _finite(value):
    """JSON has no infinity: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _restored(value):
    """The inverse of :func:`_finite`."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {key: _restored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restored(item) for item in value]
    return value


def read_json(path: str) -> dict:
    with open(path) as source:
        return _restored(json.load(source))


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as out:
        json.dump(_finite(document), out, indent=1, ensure_ascii=False)
        out.write("\n")


def machine_line(machine: dict) -> str:
    return (f"{machine['cpu_model']}, {machine['cpu_count']} logical CPUs ({machine['torch_threads']} torch "
            f"threads), {machine['memory_gib']:.0f} GiB RAM, Linux {machine['kernel']}, Python {machine['python']}, "
            f"torch {machine['torch']}, calibkern backends: {', '.join(machine['calibkern_backends'])}")


def write_markdown(path: str, document: dict, chart_name: str | None) -> None:
    machine, rows = document["machine"], document["rows"]
    load = document["load_average"]
    lines = [
        "# calibkern benchmark results",
        "",
        f"Measured on **{machine_line(machine)}**, {machine['date']} (git {machine['git']}).",
        "",
        f"Run: `{document['command']}` ({document['mode']} run). Load average (1 min) {load['start']:.2f} at the "
        f"start, {load['end']:.2f} at the end (the end includes the benchmarks' own threads)"
        + (" — **the machine was busy: these numbers are not representative**." if document["busy"] else "."),
        "",
        "Each row compares a calibkern candidate with the baseline a user would otherwise pick. "
        "`gain = baseline ÷ candidate`: how many times faster (time rows) or smaller (memory rows) the "
        "candidate is; a goal of “candidate ≤ x × baseline” is `gain ≥ 1/x`. Times are medians of repeated "
        "runs with the candidates alternated and warm-up runs excluded; memory is the process's resident "
        "set (RSS), one fresh process per candidate (see each benchmark's docstring in `benchmarks/`).",
        "",
        markdown_table(rows),
        "",
    ]
    if chart_name:
        lines += [f"![gains]({chart_name})", ""]
    notes = [row for row in rows if row.get("notes")]
    if notes:
        lines += ["## Notes", ""] + [f"- **{row['name']} / {row['quantity']}**: {row['notes']}" for row in notes]
        lines.append("")
    suites = document["suites"]
    lines += ["## Suites", "", "| suite | module | status | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | `benchmarks/{suite['module']}.py` | {suite['status']} | {suite['seconds']:.1f} |"
              for name, suite in suites.items()]
    lines.append("")
    comparisons = os.path.join(os.path.dirname(os.path.abspath(__file__)), "before_after.md")
    if os.path.exists(comparisons):  # before/after comparisons of past changes, kept by hand beside the runs
        with open(comparisons, encoding="utf-8") as handle:
            lines += [handle.read()]
    with open(path, "w") as out:
        out.write("\n".join(lines))


def _versus(row: dict) -> str:
    """"quantity: candidate vs baseline", the candidate left out when its label is long."""
    candidate = f"{row['candidate']} " if len(row["candidate"]) <= 16 else ""
    return f"{row['quantity']}: {candidate}vs {row['baseline']}"


def write_chart(path: str, rows: list[dict], title: str) -> bool:
    """Horizontal bars of each measured row's gain (log scale), its goal as a black tick; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return False
    shown = [row for row in rows if not row["skipped"] and row["gain"] is not None]
    if not shown:
        return False
    cap = 1e4
    gains = [min(row["gain"], cap) for row in shown]
    colours = ["tab:green" if row["met"] else "tab:red" if row["met"] is False else "tab:gray" for row in shown]
    labels = [textwrap.fill(row["name"], 48) + "\n" + textwrap.shorten(_versus(row), 64) for row in shown]
    figure, axes = plt.subplots(figsize=(11, 0.75 * len(shown) + 1.6))
    positions = range(len(shown))
    axes.barh(positions, gains, color=colours)
    for position, row in zip(positions, shown):
        if row["min_gain"]:
            axes.plot([row["min_gain"]] * 2, [position - 0.4, position + 0.4], color="black", linewidth=2)
        axes.text(min(row["gain"], cap), position, " " + format_gain(row["gain"]), va="center", fontsize=8)
    axes.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("gain = baseline ÷ candidate (log scale)")
    legend = [Patch(color="tab:green", label="goal met"), Patch(color="tab:red", label="goal missed"),
              Patch(color="tab:gray", label="no goal"), Line2D([], [], color="black", linewidth=2, label="goal")]
    axes.legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
