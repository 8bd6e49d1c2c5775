"""Every launched Triton kernel compiles for a real NVIDIA target (sm_90) at the launch configurations the
test shapes reach under the GPU heuristics — no GPU needed: no compile error, no spill, shared memory within
the arch's limit, at most 255 registers (benchmarks/triton_compile.py; `make gpu-compile` runs every shape
calibkern supports for sm_80 and sm_90)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU heuristics, not the interpreter's
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_compile.py"), "--shapes", "test",
                          "--arch", "90", "--json", str(tmp_path / "records.json")], env=env, capture_output=True,
                         text=True, timeout=900)
    records = json.loads((tmp_path / "records.json").read_text())
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_cross_entropy_kernel", "_row_softmax_kernel", "_top1_kernel", "_classwise_kernel",
                       "_sum_partials_kernel", "_calibration_rows_kernel", "_top1_rows_kernel", "_metric_sums_kernel",
                       "_bootstrap_kernel"}
    failed = [r for r in records if r["problems"]]
    assert out.returncode == 0 and not failed, failed or out.stderr[-2000:]
    assert all(r["registers"] <= 255 and r["spills"] == 0 for r in records)
