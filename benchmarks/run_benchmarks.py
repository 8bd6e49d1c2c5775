"""Runs every calibkern benchmark side by side and writes the report (benchmarks/RESULTS.md; `make bench`).

    python benchmarks/run_benchmarks.py [--quick] [--only SUITE[,SUITE]] [--out DIR] [--render]

Each suite is a module ``benchmarks/<module>.py`` with ``rows(quick=False) -> list[dict]`` (rows as built by
benchmarks/timing.py). A suite that is missing, fails to import (a backend not built, a package not
installed) or raises is reported as a skipped row with the reason; the run goes on. Writes
``<out>/cpu.json`` (machine, rows, suites), ``<out>/cpu.png`` (the gains as bars) and
``benchmarks/RESULTS.md`` (the table, the machine named). With ``--only`` the other suites' rows already in
``cpu.json`` are kept; ``--render`` rewrites the report and chart from ``cpu.json`` without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path[:0] = [BENCH_DIR, REPO_ROOT]

import report  # noqa: E402
import timing  # noqa: E402

SUITES = {"ops": "bench_ops", "fused_linear": "bench_fused_linear", "trainer": "bench_trainer",
          "meter": "bench_meter", "compile": "bench_compile", "smooth_ece": "bench_smooth_ece",
          "torchmetrics": "bench_torchmetrics", "nn": "bench_nn"}
ROW_DEFAULTS = {"source": "", "name": "", "candidate": "", "baseline": "", "quantity": "", "unit": "",
                "candidate_value": None, "baseline_value": None, "gain": None, "goal": "", "min_gain": None,
                "met": None, "skipped": None, "notes": ""}


def machine_info() -> dict:
    import torch

    try:
        import calibkern

        backends = calibkern.available_backends()
    except Exception as error:  # the report must still name the machine
        backends = [f"calibkern failed to import: {error}"]
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    git = subprocess.run(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": memory_gib, "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "calibkern_backends": backends, "git": git,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def normalise(row, source: str) -> list[dict]:
    """Rows with every field of ROW_DEFAULTS; gain and met filled in from the values where missing.

    Also takes the medians form ``{what, median_s, baseline_median_s, peak_mem_bytes,
    baseline_peak_mem_bytes, goal, note}`` (one dict for a time and a memory comparison), whose goal text
    is read as comma-separated parts like "time ≤ 1.1×", "peak memory ≤ 0.2×", "≥ 15× faster".
    """
    if not isinstance(row, dict):
        return [timing.skipped_row(source=source, name=f"{source}: malformed row", reason=f"not a dict: {row!r}")]
    if "median_s" in row or "peak_mem_bytes" in row:
        return [normalise(part, source)[0] for part in _split_medians_row(row)]
    row = {**ROW_DEFAULTS, "source": source, **row}
    base, cand = row["baseline_value"], row["candidate_value"]
    if row["gain"] is None and not row["skipped"] and base is not None and cand is not None:
        row["gain"] = base / cand if cand > 0 else float("inf")
    if row["met"] is None and row["gain"] is not None and row["min_gain"] is not None:
        row["met"] = bool(row["gain"] >= row["min_gain"])
    return [row]


def _goal_parts(text: str) -> dict:
    """``{"time" | "memory": (text, min_gain)}`` from a goal text ("≤ x×" → 1/x, "≥ x×" → x)."""
    parts = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        match = re.search(r"([≤≥]|<=|>=)\s*([0-9.]+)\s*×", part)
        min_gain = None
        if match:
            value = float(match.group(2))
            min_gain = value if match.group(1) in ("≥", ">=") else 1.0 / value
        parts["memory" if "mem" in part else "time"] = (part, min_gain)
    return parts


def _split_medians_row(row: dict) -> list[dict]:
    goals = _goal_parts(row.get("goal") or "")
    common = {"name": row.get("what") or row.get("name", ""), "candidate": row.get("candidate", ""),
              "baseline": row.get("baseline", ""), "notes": row.get("note") or row.get("notes") or ""}
    out = []
    if "median_s" in row:
        goal, min_gain = goals.get("time", ("", None))
        out.append({**common, "quantity": "time", "unit": "s", "candidate_value": row["median_s"],
                    "baseline_value": row.get("baseline_median_s"), "goal": goal, "min_gain": min_gain})
    if "peak_mem_bytes" in row:
        goal, min_gain = goals.get("memory", ("", None))
        base = row.get("baseline_peak_mem_bytes")
        out.append({**common, "quantity": "peak memory", "unit": "MiB",
                    "candidate_value": row["peak_mem_bytes"] / 2**20,
                    "baseline_value": None if base is None else base / 2**20, "goal": goal, "min_gain": min_gain})
    return out


def run_suite(suite: str, module_name: str, quick: bool) -> tuple[list[dict], str]:
    """The suite's rows and its status; never raises."""
    def skipped(reason):
        return [timing.skipped_row(source=suite, name=f"{suite} suite (benchmarks/{module_name}.py)",
                                   reason=reason)], "skipped"

    try:
        module = __import__(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return skipped(f"benchmarks/{module_name}.py is not there yet")
        return skipped(f"import failed: {error}")
    except Exception as error:
        traceback.print_exc()
        return skipped(f"import failed: {type(error).__name__}: {error}")
    if not hasattr(module, "rows"):
        return skipped(f"benchmarks/{module_name}.py has no rows(quick=...)")
    try:
        rows = module.rows(quick=quick)
    except Exception as error:
        traceback.print_exc()
        return skipped(f"{type(error).__name__}: {error}")
    return [part for row in rows for part in normalise(row, suite)], "ok"


def previous_results(path: str) -> dict:
    try:
        return report.read_json(path)
    except (OSError, ValueError):
        return {"rows": [], "suites": {}}


def publish(document: dict, out: str, markdown: str) -> None:
    """Prints the table; writes ``<out>/cpu.json``, ``<out>/cpu.png`` and the Markdown report."""
    machine, rows = document["machine"], document["rows"]
    print()
    print(report.terminal_table(rows))
    json_path, chart_path = os.path.join(out, "cpu.json"), os.path.join(out, "cpu.png")
    report.write_json(json_path, document)
    title = (f"calibkern, {document['mode']} run: {machine['cpu_model']}, {machine['cpu_count']} CPUs, "
             f"torch {machine['torch']}")
    charted = report.write_chart(chart_path, rows, title)
    chart_name = os.path.relpath(chart_path, os.path.dirname(os.path.abspath(markdown))) if charted else None
    report.write_markdown(markdown, document, chart_name)
    total = sum(suite["seconds"] for suite in document["suites"].values())
    written = ", ".join([json_path, markdown] + ([chart_path] if charted else []))
    print(f"\n{len(document['suites'])} suites in {total:.0f} s; wrote {written}"
          + ("" if charted else " (no chart: no matplotlib)"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    parser.add_argument("--only", default="", help=f"comma-separated suites out of {', '.join(SUITES)}")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results"), help="folder for cpu.json, cpu.png")
    parser.add_argument("--markdown", default=os.path.join(BENCH_DIR, "RESULTS.md"), help="the Markdown report")
    parser.add_argument("--render", action="store_true", help="only rewrite the report and chart from cpu.json")
    args = parser.parse_args(argv)
    json_path = os.path.join(args.out, "cpu.json")
    if args.render:
        publish(report.read_json(json_path), args.out, args.markdown)
        return 0
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")

    machine = machine_info()
    load_start = os.getloadavg()[0]
    mode = "quick" if args.quick else "full"
    print(f"calibkern benchmarks ({mode}) on {report.machine_line(machine)}", flush=True)
    rows, suites = [], {}
    for suite in chosen:
        print(f"[{suite}] running benchmarks/{SUITES[suite]}.py ...", flush=True)
        start = time.perf_counter()
        suite_rows, status = run_suite(suite, SUITES[suite], args.quick)
        seconds = time.perf_counter() - start
        print(f"[{suite}] {status}, {len(suite_rows)} rows, {seconds:.1f} s", flush=True)
        rows += suite_rows
        suites[suite] = {"module": SUITES[suite], "status": status, "seconds": seconds, "mode": mode}

    if args.only:  # keep the other suites' rows from the last run
        previous = previous_results(json_path)
        kept = [row for row in previous["rows"] if row.get("source") not in chosen]
        rows = sorted(kept + rows, key=lambda row: list(SUITES).index(row["source"])
                      if row.get("source") in SUITES else len(SUITES))
        merged = {**previous.get("suites", {}), **suites}
        suites = {name: merged[name] for name in SUITES if name in merged}
    load_end = os.getloadavg()[0]
    # the end load includes the benchmarks' own threads; only the load before the run tells of other work
    busy = load_start > 0.5 * (os.cpu_count() or 1)
    command = "python benchmarks/run_benchmarks.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    modes = {suite["mode"] for suite in suites.values()}
    document = {"machine": machine, "mode": modes.pop() if len(modes) == 1 else "mixed quick/full",
                "command": command, "load_average": {"start": load_start, "end": load_end}, "busy": busy,
                "suites": suites, "rows": rows}

    publish(document, args.out, args.markdown)
    if busy:
        print(f"warning: load average {load_start:.1f} on {os.cpu_count()} CPUs before the run — the machine was "
              "busy; rerun on a quiet machine for representative numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
