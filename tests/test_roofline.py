"""The roofline sheet (benchmarks/roofline.py): docs/backends.md prints its table, its bounds are bytes ÷ bandwidth
and FLOPs ÷ FLOP rate at the headline shapes, the card is told from its CUDA name, and benchmarks/gpu_check.py times
every kernel of the sheet and prints bound ÷ measured time (its CPU-side parts; the timing needs a GPU)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


roofline = _load("roofline")
gpu_check = _load("gpu_check")


def test_docs_print_the_generated_table():
    with open(os.path.join(ROOT, "docs", "backends.md"), encoding="utf-8") as docs:
        assert roofline.markdown_table() in docs.read()


@pytest.mark.parametrize("name, card", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                        ("NVIDIA H200 NVL", "H200"), ("NVIDIA H100 PCIe", None),
                                        ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-80GB", None)])
def test_the_card_is_told_from_its_cuda_name(name, card):
    assert roofline.gpu_for(name) == (card and roofline.GPUS[card])


def test_bounds_are_bytes_over_bandwidth_or_flops_over_flop_rate():
    loads, h100, h200 = roofline.workloads(), roofline.GPUS["H100"], roofline.GPUS["H200"]
    n, vocab = roofline.LM_SHAPE
    read = n * vocab * 2 + n * 8  # bf16 logits and int64 labels
    assert loads["binned_stats top1 lm"].bound_s(h100) == pytest.approx(read / 3.35e12)
    assert loads["binned_stats top1 lm"].bound_s(h200) == pytest.approx(read / 4.8e12)
    assert loads["cross_entropy_ lm"].bound_s(h100) == pytest.approx(2 * n * vocab * 4 / 3.35e12)
    flops = 3 * 2 * n * roofline.HIDDEN_DIM * vocab
    assert loads["fused linear"].bound_s(h200) == pytest.approx(flops / 989e12)
    n_opt, k = roofline.OPTIONS_SHAPE
    assert loads["row loss options"].bytes == n_opt * k * 4 * 2 + n_opt * 8
    assert loads["bootstrap_stats"].bound_s(h100) == pytest.approx(n_opt * roofline.N_BOOT * 10 / 16.7e12)
    # a card known only by its copy bandwidth has no bound for the compute-bound rows
    copy_only = roofline.GPU("copy", 2e12)
    assert loads["fused linear"].bound_s(copy_only) is None
    assert loads["top1_rows lm"].bound_s(copy_only) == pytest.approx(loads["top1_rows lm"].bytes / 2e12)


def test_quick_run_shapes_scale_the_bounds():
    full, quick = roofline.workloads(1), roofline.workloads(16)
    assert quick["binned_stats top1 lm"].bytes < full["binned_stats top1 lm"].bytes / 200
    assert quick["binned_stats top1 options"].bytes == pytest.approx(full["binned_stats top1 options"].bytes / 16)


def test_gpu_check_times_every_kernel_of_the_sheet_and_prints_its_fraction():
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.py"), encoding="utf-8") as source:
        text = source.read()
    loads = roofline.workloads()
    for key in loads:
        assert f'"{key}"' in text, key
    timings = [{"op": key, "shape": load.shape, "roofline": key, "triton_ms": 2.0, "reference_ms": 4.0,
                "speedup_vs_reference": 2.0} for key, load in loads.items() if key != "fused linear"]
    timings.append({"op": "fused linear loss fwd+bwd", "shape": "s", "roofline": "fused linear",
                    "calibkern (CE) ms": 2e3 * loads["fused linear"].bound_s(roofline.GPUS["H100"]),
                    "calibkern (CE) peak MiB": 1.0})
    gpu = gpu_check.roofline_gpu("NVIDIA H100 80GB HBM3", copy_bw=3000.0)
    assert gpu == roofline.GPUS["H100"]
    gpu_check.roofline_fractions(timings, gpu, scale=1)
    for row in timings:
        ms = row.get("triton_ms", row.get("calibkern (CE) ms"))
        assert row["fraction_of_roofline"] == pytest.approx(loads[row["roofline"]].bound_s(gpu) * 1e3 / ms)
    report = {"device": "NVIDIA H100 80GB HBM3", "copy_GBps": 3000.0, "roofline_gpu": vars(gpu),
              "timings": timings, "goals": [], "correctness": {}}
    lines = gpu_check.summary_lines(report)
    assert any("roofline on H100 SXM (3.35 TB/s)" in line for line in lines)
    fused = next(line for line in lines if "fused linear" in line and "of the limit" in line)
    assert "50.0% of the limit" in fused  # the products' time, twice over
    assert sum("of the limit" in line for line in lines) == len(loads)


def test_an_unknown_card_is_read_against_the_measured_copy_bandwidth():
    gpu = gpu_check.roofline_gpu("NVIDIA A100-SXM4-80GB", copy_bw=1500.0)
    assert gpu.bandwidth == 1.5e12 and gpu.bf16_flops is None and "measured copy bandwidth" in gpu.name
