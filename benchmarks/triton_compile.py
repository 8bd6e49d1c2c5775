"""Compile every launched Triton kernel, at every launch configuration calibkern's launchers choose, for real
NVIDIA targets — no GPU needed — and read registers, spills and shared memory from the cubins.

    python benchmarks/triton_compile.py [--arch 80 90] [--json FILE] [--shapes full|test|all] [--jobs N]
        [--kernels NAME ...]  (make gpu-compile)

The configurations (constexprs, ``num_warps`` and other launch options such as a register cap) come from the
launchers' own heuristics (``row_blocks``, ``top1_blocks``, ``rows_blocks``, ``ce_blocks``, ``metric_blocks``,
``bootstrap_blocks``, ``classwise_blocks``, ``sum_blocks``, ``warps`` and the options constants in
calibkern/ops/triton), evaluated with the GPU constants (this script refuses to run under ``TRITON_INTERPRET=1``), over
the shapes calibkern supports: logits fp32/bf16/fp16, K from 2 to 262144, N from 1 to 2²¹ and beyond, n_bins 1 to
100, top-1 and classwise, each loss form. ``--shapes all`` (the default): every power of two of N, K and n_bins, which
reaches every block configuration the heuristics can produce (they round N, K and n_bins up to powers of two, and
saturate below N = 2²¹); ``full``: chosen values; ``test``: the shapes of the test suite. Identical configurations
are compiled once, ``--jobs`` at a time (default: every CPU). Each record: kernel, arch, config, registers, spills
(local + stack bytes), shared_bytes, cubin_bytes. A record fails when it does not compile, spills, uses more shared
memory than the arch allows (sm_80: 163 KiB, sm_90: 227 KiB) or more than 255 registers.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile.py: unset TRITON_INTERPRET (the launch heuristics differ under the interpreter)")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from calibkern.ops.triton import binning, bootstrap, calibration, common, cross_entropy, row_metrics  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# the rows kernel's flags (EM, LOSS, STATS, ECE_GRAD) for each op that launches it (calibration.py)
ROW_OPS = {"hard_bin_loss": (False, True, False, False), "em_target_loss": (True, True, True, False),
           "em_stats": (True, False, True, False), "em_ece_grad": (True, False, False, True)}
SHAPES = {
    "full": dict(K=(2, 3, 4, 5, 8, 16, 31, 64, 100, 1000, 4096, 5000, 32000, 128256, 262144),
                 N=(1, 100, 4096, 1_000_000), M=(1, 10, 15, 64, 100), dtypes=tuple(DTYPES)),
    "test": dict(K=(4, 1000, 32000), N=(64, 4096), M=(10,), dtypes=("fp32", "bf16"),
                 partials=(1, 64, 1024), lengths=(1, 2, 10, 40)),
    # every power of two of N, K and n_bins: every block configuration the heuristics can produce
    "all": dict(K=tuple(2 ** j for j in range(1, 13)) + (262144,), N=tuple(2 ** j for j in range(22)),
                M=(1, 2, 4, 8, 16, 32, 64, 100), dtypes=tuple(DTYPES)),
}
for _shapes in (SHAPES["full"], SHAPES["all"]):
    _shapes.update(partials=tuple(2 ** j for j in range(14)), lengths=tuple(2 ** j for j in range(10)))


def _sig(pointers: dict, scalars: dict, constexprs: dict) -> tuple[dict, dict]:
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constexprs}}
    return signature, constexprs


def launches(shapes: dict) -> dict:
    """{(kernel, signature, constexprs, num_warps, options) key: (jit function, signature, constexprs, num_warps,
    other launch options)}."""
    found = {}

    def add(fn, signature, constexprs, num_warps, **options):
        key = (fn.__name__, tuple(signature.items()), tuple(constexprs.items()), num_warps, tuple(options.items()))
        found.setdefault(key, (fn, signature, constexprs, num_warps, options))

    ints = {"N": "i32", "K": "i32", "M": "i32", "ignore_index": "i32"}
    for dtype in shapes["dtypes"]:
        logits = DTYPES[dtype]
        for n in shapes["N"]:
            for k in shapes["K"]:
                ce_n, ce_k = cross_entropy.ce_blocks(n, k)
                ce_sig = {"logits_ptr": "*fp32", "targets_ptr": "*i64", "loss_ptr": "*fp32"}
                add(cross_entropy._cross_entropy_kernel, *_sig(ce_sig, {"N": "i32", "V": "i32", "ignore_index": "i32",
                                                                       "smoothing": "fp32", "z_scale": "fp32"},
                                                             {"BLOCK_N": ce_n, "BLOCK_K": ce_k}),
                    common.warps(ce_n, ce_k))
                block_n, block_k = common.row_blocks(n, k)
                w = common.warps(block_n, block_k)
                add(binning._row_softmax_kernel,
                    *_sig({"logits_ptr": logits, "max_ptr": "*fp32", "sum_ptr": "*fp32"},
                          {"N": "i32", "K": "i32", "inv_t": "fp32"}, {"BLOCK_N": block_n, "BLOCK_K": block_k}), w,
                    maxnreg=binning.CLASSWISE_MAXNREG)
                add(row_metrics._top1_rows_kernel,
                    *_sig({"logits_ptr": logits, "labels_ptr": "*i64", "conf_ptr": "*fp32", "correct_ptr": "*i8"},
                          {"N": "i32", "K": "i32", "inv_t": "fp32", "ignore_index": "i32"},
                          {"BLOCK_N": block_n, "BLOCK_K": block_k}), w)
                for m in shapes["M"]:
                    s_n, s_k, s_m, s_w = row_metrics.metric_blocks(n, k, m)
                    for store_rows in (False, True):  # top-1 only, or with the classwise statistics
                        add(row_metrics._metric_sums_kernel,
                            *_sig({"logits_ptr": logits, "labels_ptr": "*i64", "counts_ptr": "*i64",
                                   "conf_ptr": "*fp64", "correct_ptr": "*fp64", "nonfinite_ptr": "*i64",
                                   "scores_ptr": "*fp64", "max_ptr": "*fp32", "sum_ptr": "*fp32"},
                                  {**ints, "inv_t": "fp32"},
                                  {"BLOCK_N": s_n, "BLOCK_K": s_k, "BLOCK_M": s_m, "STORE_ROWS": store_rows}), s_w,
                            maxnreg=row_metrics.METRIC_MAXNREG)
                    b_n, b_m, b_t = bootstrap.bootstrap_blocks(n, m)
                    for seed_type in ("i32", "i64"):  # a seed key below or above 2³¹
                        add(bootstrap._bootstrap_kernel,
                            *_sig({"conf_ptr": "*fp32", "correct_ptr": "*i8", "thresholds_ptr": "*i64",
                                   "counts_ptr": "*i64", "sum_conf_ptr": "*fp64", "sum_correct_ptr": "*fp64"},
                                  {"n": "i32", "M": "i32", "n_thresholds": "i32", "seed_key": seed_type,
                                   "golden": "i64"},
                                  {"BLOCK_N": b_n, "BLOCK_M": b_m, "BLOCK_T": b_t}), 4)
                    t_n, t_k, block_m = binning.top1_blocks(n, k, m)
                    add(binning._top1_kernel,
                        *_sig({"logits_ptr": logits, "labels_ptr": "*i64", "counts_ptr": "*i64", "conf_ptr": "*fp64",
                               "correct_ptr": "*fp64", "nonfinite_ptr": "*i64"},
                              {**ints, "inv_t": "fp32"}, {"BLOCK_N": t_n, "BLOCK_K": t_k, "BLOCK_M": block_m}),
                        common.warps(t_n, t_k))
                    row_block, class_block, chunks, _, c_w = binning.classwise_blocks(n, k, m)
                    # (ROW_SOFTMAX, TOP1_SCORES): given m and s, or one read for binned_stats and metric_sums
                    for flags in ([(True, False), (True, True)] if binning.classwise_in_one_read(n, k, m)
                                  else [(False, False)]):
                        add(binning._classwise_kernel,
                            *_sig({"logits_ptr": logits, "labels_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
                                   "counts_ptr": "*i64", "conf_ptr": "*fp64", "correct_ptr": "*fp64",
                                   "top1_counts_ptr": "*i64", "top1_conf_ptr": "*fp64", "top1_correct_ptr": "*fp64",
                                   "nonfinite_ptr": "*i64", "scores_ptr": "*fp64"},
                                  {**ints, "inv_t": "fp32", "rows_per_chunk": "i32"},
                                  {"BLOCK_N": row_block, "BLOCK_K": class_block, "BLOCK_M": block_m,
                                   "ROW_SOFTMAX": flags[0], "TOP1_SCORES": flags[1]}), c_w,
                            maxnreg=binning.CLASSWISE_MAXNREG)
                    for em, loss, stats, ece_grad in ROW_OPS.values():
                        pointers = {"logits_ptr": logits, "labels_ptr": "*i64"}
                        absent = {}
                        optional = (("loss_ptr", loss, "*fp32"), ("grad_ptr", loss or ece_grad, "*fp32"),
                                    ("stats_ptr", stats, "*fp64"), ("acc_ptr", loss, "*fp32"),
                                    ("log_pi_ptr", em, "*fp32"), ("mu_ptr", em, "*fp32"),
                                    ("sigma_ptr", em, "*fp32"), ("coef_ptr", ece_grad, "*fp32"))
                        for name, present, kind in optional:
                            if present:
                                pointers[name] = kind
                            else:
                                absent[name] = None
                        r_n, r_k, r_m, r_w = calibration.rows_blocks(n, k, m, em, loss, stats, ece_grad)
                        constexprs = {**absent, "EM": em, "LOSS": loss, "STATS": stats, "ECE_GRAD": ece_grad,
                                      "BLOCK_N": r_n, "BLOCK_K": r_k, "BLOCK_M": r_m}
                        signature, _ = _sig(pointers, {**ints, "gamma0": "fp32"}, constexprs)
                        order = ["logits_ptr", "labels_ptr", "loss_ptr", "grad_ptr", "stats_ptr", "acc_ptr",
                                 "log_pi_ptr", "mu_ptr", "sigma_ptr", "coef_ptr", "N", "K", "M", "ignore_index",
                                 "gamma0", "EM", "LOSS", "STATS", "ECE_GRAD", "BLOCK_N", "BLOCK_K", "BLOCK_M"]
                        add(calibration._calibration_rows_kernel, {name: signature[name] for name in order},
                            constexprs, r_w, **calibration.ROWS_OPTIONS)
    # the partial sums of every kernel (int64 counts, float64 sums) of P partials of L values: for the test shapes
    # a few (P, L) of their launches (L: a count, the score pair, M, 4M); else every power of two of P and L up to
    # one beyond the largest block sum_blocks picks: every block configuration
    for partial_type in ("*i64", "*fp64"):
        for count in shapes["partials"]:
            for length in shapes["lengths"]:
                block_p, block_l = common.sum_blocks(count, length)
                add(common._sum_partials_kernel,
                    *_sig({"partials_ptr": partial_type, "out_ptr": partial_type}, {"P": "i32", "L": "i32"},
                          {"BLOCK_P": block_p, "BLOCK_L": block_l}), 4)
    return found


def _cuobjdump() -> str:
    return glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))[0]


def compile_one(fn, signature, constexprs, num_warps, options: dict, arch: int) -> dict:
    config = {k: v for k, v in constexprs.items() if v is not None} | {"num_warps": num_warps, **options,
                                                                      "logits": signature.get("logits_ptr")}
    record = {"kernel": fn.__name__, "arch": arch, "config": config}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})
    except Exception as error:  # noqa: BLE001 - a compile failure is the record's result
        return record | {"error": str(error).strip().splitlines()[-1][:300]}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))
    return record | {"registers": int(fields.get("REG", -1)), "spills": spills,
                     "shared_bytes": max(int(fields.get("SHARED", 0)), int(kernel.metadata.shared)),
                     "cubin_bytes": len(kernel.asm["cubin"])}


_CONFIGS: list = []  # the launch configurations, shared with the forked workers


def _compile_task(task: tuple[int, int]) -> dict:
    """Compile configuration ``_CONFIGS[index]`` for ``arch`` and judge it."""
    index, arch = task
    record = compile_one(*_CONFIGS[index], arch)
    return record | {"problems": problems(record)}


def problems(record: dict) -> list[str]:
    if "error" in record:
        return [f"does not compile: {record['error']}"]
    found = []
    if record["spills"]:
        found.append(f"spills {record['spills']} bytes")
    if record["shared_bytes"] > SHARED_LIMIT[record["arch"]]:
        found.append(f"shared memory {record['shared_bytes']} > {SHARED_LIMIT[record['arch']]}")
    if record["registers"] > 255:
        found.append(f"{record['registers']} registers")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile in this many processes")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (default: every launched kernel)")
    args = parser.parse_args()
    _CONFIGS[:] = [config for config in launches(SHAPES[args.shapes]).values()
                   if not args.kernels or config[0].__name__ in args.kernels]
    tasks = [(index, arch) for index in range(len(_CONFIGS)) for arch in args.arch]
    records = []
    print(f"{len(_CONFIGS)} launch configurations × {len(args.arch)} targets", flush=True)
    print("| kernel | arch | config | registers | spills | shared | result |\n|---|---|---|---|---|---|---|")
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for record in pool.imap(_compile_task, tasks):
            records.append(record)
            config = ", ".join(f"{k}={v}" for k, v in record["config"].items())
            print(f"| {record['kernel']} | sm_{record['arch']} | {config} | {record.get('registers', '—')} | "
                  f"{record.get('spills', '—')} | {record.get('shared_bytes', '—')} | "
                  f"{'; '.join(record['problems']) or 'ok'} |", flush=True)
    if args.json:
        with open(args.json, "w") as out:  # a record a line
            out.write("[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n")
    failed = [r for r in records if r["problems"]]
    print(f"\n{len(records)} compiled, {len(failed)} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
