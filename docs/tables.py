"""Write the documents' tables of numbers from the committed result files, so the prose never carries numbers of its
own: ``python docs/tables.py`` rewrites every table between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``;
``python docs/tables.py --check`` exits 1 naming each table that differs (tests/test_pipeline.py runs it).

* ``demo-stages`` and ``demo-claims`` (docs/demo.md): ``docs/results/demo/results.json``, written by
  ``calibkern demo`` (its ``provenance`` says which build, machine and thread count);
* ``headline`` (README.md): ``benchmarks/results/cpu.json``, written by ``benchmarks/run_benchmarks.py``.
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_RESULTS = "docs/results/demo/results.json"
BENCHMARKS = "benchmarks/results/cpu.json"
STAGE_NAMES = {"base": "base", "dpo": "DPO", "temperature_scaling": "temperature scaling",
               "label_smoothing": "label smoothing", "cft": "CFT", "rcft": "RCFT", "rcft_no_reg": "RCFT, λ = 0"}

# README rows: (what, against, [(benchmark name, candidate, baseline, quantity)], how the gains read)
HEADLINE = [
    ("`ece`, N = 4096, V = 128256", "torchmetrics (softmax included)",
     [("ece from logits N=4096 V=128256 fp32", "cpp", "torchmetrics (softmax included)", "time")],
     lambda time: f"{time['gain']:.1f}× faster"),
    ("`ece`, N = 10⁶, K = 4", "torchmetrics",
     [("ece from logits N=1000000 K=4 fp32", "cpp", "torchmetrics (softmax included)", "time")],
     lambda time: f"{time['gain']:.1f}× faster"),
    ("`calibration_loss` fwd+bwd, N = 65536, K = 4", "the published code's per-bin Python loop",
     [("calibration_loss fwd+bwd N=65536 K=4", "cpp", "per-bin Python loop (published code)", "time")],
     lambda time: f"{time['gain']:.1f}× faster"),
    ("fused linear loss, N = 4096, D = 1024, V = 32000", "eager full logits + CE + calibration term",
     [("fused linear loss, N=4096 D=1024 V=32000 fp32 fwd+bwd, all rows supervised",
       "calibkern.fused_linear_calibration_loss (CE + hard_bin)",
       "eager: full logits, F.cross_entropy, calibration_loss", quantity) for quantity in ("time", "peak memory")],
     lambda time, memory: f"{1 / time['gain']:.2f}× the time, {1 / memory['gain']:.2f}× the memory"),
    ("CFT training step, tiny Llama, V = 32000", "a step written like the published code",
     [("CFT training step, Llama V=32000 D=256 4 layers, seq 256, batch 4",
       "calibkern CalibrationTrainer (one decoder pass, fused loss)",
       "reference-style step (2 forwards, full logits, per-bin loop)", quantity)
      for quantity in ("time per step", "peak RSS added by a step")],
     lambda time, memory: f"{time['gain']:.1f}× faster, {memory['gain']:.1f}× less memory"),
    ("streaming meter over 10⁷ rows", "torchmetrics (stores every prediction)",
     [("streaming ECE over 1e7 rows, K=4, chunks of 100000", "calibkern CalibrationMeter (O(M) state)",
       "torchmetrics MulticlassCalibrationError (stores every prediction)", "RSS growth over the stream")],
     lambda memory: f"+{memory['candidate_value']:.3f} MiB vs +{memory['baseline_value']:.0f} MiB"),
]


def _load(path: str) -> dict:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return json.load(handle)


def _number(value: float) -> str:
    return f"{value:.2e}" if value != 0 and abs(value) < 5e-4 else f"{value:.4f}"


def demo_stages() -> str:
    results = _load(DEMO_RESULTS)
    p = results["provenance"]
    threads = f"{p['threads']} thread{'s' if p['threads'] != 1 else ''}"
    lines = [f"`calibkern demo` (seed {p['seed']}, {threads}; calibkern {p['calibkern']} at "
             f"{p['commit'] or 'an unknown commit'}, torch {p['torch']}, transformers {p['transformers']}, backend "
             f"{p['backend']} of {', '.join(p['available_backends'])}, {p['cpu']}; `{DEMO_RESULTS}`):", "",
             "| stage | ECE | debiased ECE [95 % interval] | smooth ECE | accuracy | mean confidence | T |",
             "|---|---|---|---|---|---|---|"]
    for name, label in STAGE_NAMES.items():
        m = results["stages"][name]
        low, high = m["ece_ci"]
        temperature = f"{m['temperature']:.2f}" if "temperature" in m else ""
        lines.append(f"| {label} | {_number(m['ece'])} | {_number(m['ece_debiased'])} [{_number(low)}, "
                     f"{_number(high)}] | {_number(m['smece'])} | {_number(m['accuracy'])} | "
                     f"{_number(m['mean_confidence'])} | {temperature} |")
    return "\n".join(lines)


def demo_claims() -> str:
    results = _load(DEMO_RESULTS)
    checks = results["checks"]
    failed = [c["claim"] for c in checks if not c["holds"]]
    lines = ["| claim | measured | holds | difference |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} | {c.get('note', '')} |"
              for c in checks]
    summary = (f"{len(checks) - len(failed)} of {len(checks)} claims hold on this run; "
               + (f"**not**: {'; '.join(failed)}." if failed else "every one does."))
    return "\n".join(lines + ["", summary])


def headline() -> str:
    bench = _load(BENCHMARKS)
    rows = {(r["name"], r["candidate"], r["baseline"], r["quantity"]): r for r in bench["rows"]}
    m = bench["machine"]
    lines = [f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}, {m['date'][:10]} (git {m['git']}); "
             "every row: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).", "",
             "| what | against | measured |", "|---|---|---|"]
    for what, against, keys, text in HEADLINE:
        lines.append(f"| {what} | {against} | {text(*[rows[key] for key in keys])} |")
    return "\n".join(lines)


TABLES = {"README.md": {"headline": headline}, "docs/demo.md": {"demo-stages": demo_stages, "demo-claims": demo_claims}}


def rewrite(text: str, tables: dict) -> str:
    """``text`` with each ``<!-- table:NAME -->`` … ``<!-- /table:NAME -->`` block holding ``tables[NAME]()``."""
    for name, make in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no <!-- table:{name} --> … <!-- /table:{name} --> block")
        text = pattern.sub(lambda match: f"{match.group(1)}\n{make()}\n{match.group(2)}", text)
    return text


def stale() -> list[str]:
    """``FILE: NAME`` of every table whose text is not what the result files give."""
    found = []
    for path, tables in TABLES.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
            text = handle.read()
        for name in tables:
            if rewrite(text, {name: tables[name]}) != text:
                found.append(f"{path}: {name}")
    return found


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        found = stale()
        for entry in found:
            print(f"{entry}: differs from the result files; run python docs/tables.py", file=sys.stderr)
        return 1 if found else 0
    for path, tables in TABLES.items():
        full = os.path.join(ROOT, path)
        with open(full, encoding="utf-8") as handle:
            text = handle.read()
        new = rewrite(text, tables)  # before the file is opened for writing: an error leaves it as it was
        if new != text:
            with open(full, "w", encoding="utf-8") as handle:
                handle.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
