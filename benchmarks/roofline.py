"""Roofline lower bounds of calibkern's GPU kernels at the shapes ``make gpu-check`` times.

For each kernel: the bytes it must move (its inputs read once, its outputs written once; the per-program partial
sums, under 1 % of any row here, left out), the bf16 tensor-core FLOPs and the CUDA-core operations it must do,
and the time those take at a GPU's peak rates, ``bound = max(bytes / bandwidth, FLOPs / FLOP rate, ops / op
rate)``. One table: ``python benchmarks/roofline.py`` prints it as the sheet of
docs/backends.md#roofline-what-a-first-gpu-run-will-be-read-against (tests/test_roofline.py checks the two agree),
and benchmarks/gpu_check.py divides each bound by the time it measures on the card it finds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# the shapes gpu_check times (``scale`` divides rows and vocabulary for its --quick run)
LM_SHAPE = (4096, 128256)  # rows × vocabulary, bf16 logits
OPTIONS_SHAPE = (65536, 4)  # rows × options, fp32 logits
HIDDEN_DIM = 4096
N_BOOT = 1000  # bootstrap replicates
LABEL_BYTES = 8  # int64 labels
# CUDA-core operations per (row, replicate) of the bootstrap: the replicate's 32-bit hash of the row's key (an
# xor, two multiplies, three shifts, three xors) and one Poisson-threshold compare
BOOTSTRAP_OPS = 10


@dataclass(frozen=True)
class GPU:
    """Peak rates: HBM bytes/s, dense bf16 tensor-core FLOP/s, int32 CUDA-core operations/s."""
    name: str
    bandwidth: float
    bf16_flops: float | None = None
    int_ops: float | None = None


# H100 SXM and H200: 132 SMs at 1.98 GHz, 64 int32 lanes each; they differ in memory alone
GPUS = {"H100": GPU("H100 SXM", 3.35e12, 989e12, 16.7e12), "H200": GPU("H200", 4.8e12, 989e12, 16.7e12)}


@dataclass(frozen=True)
class Workload:
    kernel: str
    shape: str
    work: str
    bytes: float
    flops: float = 0.0
    int_ops: float = 0.0

    def bound_s(self, gpu: GPU) -> float | None:
        """max(bytes / bandwidth, FLOPs / FLOP rate, ops / op rate); None when the GPU lacks a rate it needs."""
        if (self.flops and gpu.bf16_flops is None) or (self.int_ops and gpu.int_ops is None):
            return None
        return max(self.bytes / gpu.bandwidth, self.flops / (gpu.bf16_flops or 1.0),
                   self.int_ops / (gpu.int_ops or 1.0))


def gpu_for(device_name: str) -> GPU | None:
    """The table's GPU for a ``torch.cuda.get_device_name()`` (H100 SXM, H200); None for any other card (an H100
    PCIe or NVL has other rates)."""
    if "H200" in device_name:
        return GPUS["H200"]
    if "H100" in device_name and not re.search(r"PCIe|NVL", device_name, re.IGNORECASE):
        return GPUS["H100"]
    return None


def shapes(scale: int = 1) -> dict:
    """The timed shapes, rows and vocabulary divided by ``scale``."""
    return {"lm": (LM_SHAPE[0] // scale, LM_SHAPE[1] // scale), "options": (OPTIONS_SHAPE[0] // scale,
                                                                            OPTIONS_SHAPE[1]),
            "hidden_dim": HIDDEN_DIM // scale, "n_boot": N_BOOT}


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def workloads(scale: int = 1) -> dict[str, Workload]:
    """{key: Workload} of every kernel gpu_check times, at its shapes."""
    s = shapes(scale)
    (lm_n, vocab), (opt_n, k), dim, n_boot = s["lm"], s["options"], s["hidden_dim"], s["n_boot"]
    lm_read = lm_n * vocab * 2 + lm_n * LABEL_BYTES
    opt_logits = opt_n * k * 4
    opt_read = opt_logits + opt_n * LABEL_BYTES
    lm, opt = f"N = {lm_n}, V = {vocab}, bf16", f"N = {opt_n}, K = {k}, fp32"
    read_lm, read_opt = f"read {_mb(lm_read)}", f"read {_mb(opt_read)}"
    rows_out = 4 + 1  # float32 confidence, bool correct
    ce_bytes = lm_n * vocab * 4
    products = 3 * 2 * lm_n * dim * vocab  # logits, ∂hidden, ∂weight
    linear_bytes = 2 * (lm_n * dim + vocab * dim) * 2  # read hidden and weight, write their gradients, bf16
    pairs = opt_n * n_boot
    return {
        "binned_stats top1 lm": Workload("binned_stats top-1, ece", lm, read_lm, lm_read),
        "binned_stats top1 options": Workload("binned_stats top-1, ece", opt, read_opt, opt_read),
        "binned_stats classwise options": Workload("binned_stats classwise", opt, f"{read_opt} (once)", opt_read),
        "metric_sums top1 lm": Workload("metric_sums top-1 (meter, nll, brier)", lm, read_lm, lm_read),
        "metric_sums top1 options": Workload("metric_sums top-1 (meter, nll, brier)", opt, read_opt, opt_read),
        "metric_sums classwise options": Workload("metric_sums classwise, classwise_ece", opt,
                                                  f"{read_opt} (once)", opt_read),
        "top1_rows lm": Workload("top1_rows", lm, f"{read_lm}, write {_mb(lm_n * rows_out)}",
                                 lm_read + lm_n * rows_out),
        "top1_rows options": Workload("top1_rows", opt, f"{read_opt}, write {_mb(opt_n * rows_out)}",
                                      opt_read + opt_n * rows_out),
        "bootstrap_stats": Workload("bootstrap_stats (percentile interval)", f"n = {opt_n}, {n_boot} replicates",
                                    f"{pairs:.2e} (row, replicate) pairs × {BOOTSTRAP_OPS} int32 ops",
                                    opt_n * rows_out, int_ops=pairs * BOOTSTRAP_OPS),
        "row loss options": Workload("calibration_loss, em_regularizer fwd+bwd", opt,
                                     f"{read_opt}, write {_mb(opt_logits)} gradient", opt_read + opt_logits),
        "cross_entropy_ lm": Workload("cross_entropy_ (in place)", f"N = {lm_n}, V = {vocab}, fp32",
                                      f"read and write {_mb(ce_bytes)}", 2 * ce_bytes),
        "fused linear": Workload("fused linear loss fwd+bwd, its three products",
                                 f"N = {lm_n}, D = {dim}, V = {vocab}, bf16", f"{products:.2e} FLOP",
                                 linear_bytes, flops=products),
    }


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def markdown_table(scale: int = 1) -> str:
    """The roofline sheet of docs/backends.md."""
    lines = ["| kernel | shape | must move / compute | H100 bound | H200 bound |", "|---|---|---|---|---|"]
    for load in workloads(scale).values():
        lines.append(f"| {load.kernel} | {load.shape} | {load.work} | {_time(load.bound_s(GPUS['H100']))} | "
                     f"{_time(load.bound_s(GPUS['H200']))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
