"""GPU check of the triton backend in one command: ``make gpu-check`` (needs a CUDA device).

1. Correctness against the reference backend (``calibkern.reference``) at real sizes: N = 4096 rows of a
   V = 128256 vocabulary in bf16, and N = 65536 rows of K = 4 options. Bin counts must agree except for
   rows whose confidence lies within float32 rounding of a bin edge; sums, losses and gradients to
   float32 tolerance; the statistics bitwise equal from run to run.
2. Speed: ``triton.testing.do_bench`` medians of the triton kernels against the reference backend and
   torchmetrics' calibration error (softmax included); GB/s against the device's copy bandwidth, measured
   here as a ``torch`` copy of the same bytes; the fused linear loss (hidden states → SFT CE + calibration
   term) against eager full logits and Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when installed,
   with peak memory.
3. Roofline: each timed kernel's lower bound (benchmarks/roofline.py, the sheet of
   docs/backends.md#roofline-what-a-first-gpu-run-will-be-read-against) for the card ``torch.cuda.get_device_name()``
   names (H100 SXM, H200; any other card is read against the copy bandwidth measured here), as bound ÷ measured
   time: the fraction of the limit the kernel reaches.
4. A short table, printed last, and JSON in ``benchmarks/results/gpu_<device name>.json``.

Goals (docs/backends.md, issue #4): ``binned_stats`` ≥ 70 % of the measured copy bandwidth; ``calibration_loss``
forward + backward ≥ 10× faster than the reference backend; at N = 65536, K = 4 the meter's update, ``nll`` and
``brier`` ≤ 2× ``ece``, ``classwise_ece`` ≤ 3×, ``adaptive_ece`` ≤ 3× one ``torch.sort``, and the percentile
interval (1000 resamples) ≥ 10× a loop of ``ece`` over resampled rows. Exit status 1 when a correctness check fails,
2 when the machine cannot run the check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, RESULTS_DIR.parent):  # calibkern from a checkout that is not installed; roofline.py
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))

import roofline  # noqa: E402

IGNORE = -100
N_BINS = 15
COPY_GOAL = 0.70  # binned_stats GB/s ÷ copy GB/s
LOSS_SPEEDUP_GOAL = 10.0  # calibration_loss forward+backward, reference ÷ triton



def fail(message: str, status: int = 2):
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(status)


def require_cuda():
    """Exit with a clear message unless triton and a CUDA device can run the kernels for real."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        fail("TRITON_INTERPRET=1 is set, so triton would run on the CPU interpreter; unset it for the GPU check")
    import torch

    if not torch.cuda.is_available():
        fail("no CUDA device: this script measures the triton kernels on an NVIDIA GPU (torch.cuda.is_available() "
             f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda}). On CPU, run `make test` "
             "(the interpreter tests) and `make bench`.")
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("triton is not installed: pip install 'calibkern[triton]'")


# ---------------------------------------------------------------------------------------------- measuring

def bench_ms(fn: Callable[[], object], grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` (CUDA events, cache flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median"))


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def copy_gbps(nbytes: int, device) -> float:
    """The device's copy bandwidth on ``nbytes``: (read + write) bytes ÷ median time of ``dst.copy_(src)``."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6


def max_err(got, want) -> float:
    import torch

    if got.numel() == 0:
        return 0.0
    return float((got.double() - want.double()).abs().max())


# ---------------------------------------------------------------------------------------------- inputs

def make_inputs(n: int, k: int, dtype, device, seed: int):
    """Logits with a realistic spread of confidences, 10 % of rows ignored."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, k, generator=g, device=device) * (1.0 + 4.0 * torch.rand(n, 1, generator=g, device=device))
    labels = torch.randint(0, k, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < 0.1] = IGNORE
    return logits.to(dtype).contiguous(), labels


def near_edge_rows(probs, n_bins: int) -> int:
    """Values whose c · M lies within float32 rounding of an inner bin edge (their bin may differ by one)."""
    import torch

    scaled = probs.float() * n_bins
    edge = scaled.round()
    near = (scaled - edge).abs() <= 4 * torch.finfo(torch.float32).eps * n_bins
    return int((near & (edge > 0) & (edge < n_bins)).sum())


# ---------------------------------------------------------------------------------------------- correctness

def check_binned_stats(logits, labels, classwise: bool) -> dict:
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    args = (logits, labels, N_BINS, 1.0, IGNORE, classwise)
    got, again, want = tri.binned_stats(*args), tri.binned_stats(*args), ref.binned_stats(*args)
    keep = labels != IGNORE
    probs, conf, _ = ref.softmax_parts(logits[keep])
    allowed = 2 * near_edge_rows(probs if classwise else conf, N_BINS)
    n = int(keep.sum())
    result = {
        "count_mismatch": int((got[0] - want[0]).abs().sum()),
        "count_mismatch_allowed": allowed,
        "counts_total_equal": bool(got[0].sum() == want[0].sum()),
        "sum_conf_max_err": max_err(got[1], want[1]),
        "sum_correct_max_err": max_err(got[2], want[2]),
        "bitwise_reproducible": all(bool((a == b).all()) for a, b in zip(got, again)),
    }
    moved = allowed // 2  # rows that may sit in a neighbouring bin; each moves at most 1 of Σ c and Σ correct
    result["ok"] = (result["count_mismatch"] <= allowed and result["counts_total_equal"]
                    and result["sum_conf_max_err"] <= 1e-6 * max(n, 1) + moved
                    and result["sum_correct_max_err"] <= moved and result["bitwise_reproducible"])
    return result


def check_metric_sums(logits, labels, classwise: bool) -> dict:
    """metric_sums against the reference: bins as check_binned_stats, [Σ NLL, Σ Brier] to 1e-5 relative."""
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    args = (logits, labels, N_BINS, 1.0, IGNORE, classwise)
    got, again, want = tri.metric_sums(*args), tri.metric_sums(*args), ref.metric_sums(*args)
    keep = labels != IGNORE
    probs, conf, _ = ref.softmax_parts(logits[keep])
    allowed = 2 * near_edge_rows(conf, N_BINS) + (2 * near_edge_rows(probs, N_BINS) if classwise else 0)
    scores_err = float(((got[4] - want[4]).abs() / want[4].abs().clamp_min(1.0)).max())
    result = {"count_mismatch": int((got[0] - want[0]).abs().sum() + (got[5] - want[5]).abs().sum()),
              "count_mismatch_allowed": allowed, "scores_rel_err": scores_err,
              "bitwise_reproducible": all(bool((a == b).all()) for a, b in zip(got, again))}
    result["ok"] = (result["count_mismatch"] <= allowed and scores_err <= 1e-5 and result["bitwise_reproducible"])
    return result


def check_top1_rows_and_bootstrap(logits, labels) -> dict:
    """top1_rows against the reference; bootstrap_stats' integer sums equal to the reference's."""
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    conf, correct = tri.top1_rows(logits, labels, 1.0, IGNORE)
    want_conf, want_correct = ref.top1_rows(logits, labels, 1.0, IGNORE)
    keep = labels != IGNORE
    rows = min(int(keep.sum()), 100_000)
    c, k = conf[keep][:rows].contiguous(), correct[keep][:rows].contiguous()
    got, want = tri.bootstrap_stats(c, k, N_BINS, 200, 0), ref.bootstrap_stats(c, k, N_BINS, 200, 0)
    result = {"confidence_max_err": max_err(conf, want_conf), "correct_mismatch": int((correct != want_correct).sum()),
              "bootstrap_counts_equal": bool(torch_equal(got[0], want[0]) and torch_equal(got[2], want[2])),
              "bootstrap_sum_conf_max_err": max_err(got[1], want[1])}
    result["ok"] = (result["confidence_max_err"] <= 1e-6 and result["correct_mismatch"] == 0
                    and result["bootstrap_counts_equal"] and result["bootstrap_sum_conf_max_err"] <= 1e-6)
    return result


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def check_rows(name: str, got, want) -> dict:
    """Per-row losses / gradients / statistics of the calibration kernels to float32 tolerance."""
    errors = {f"{name}_{i}_max_err": max_err(g, w) for i, (g, w) in enumerate(zip(got, want))}
    return {**errors, "ok": all(e <= 1e-5 * max(1.0, float(w.double().abs().max())) for e, w in
                                zip(errors.values(), want))}


def check_calibration_kernels(logits, labels, params) -> dict:
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    log_pi, mu, sigma, theta, accuracy = params
    out = {}
    out["hard_bin_loss"] = check_rows("hard_bin_loss", tri.hard_bin_loss(logits, labels, accuracy, IGNORE, "none"),
                                      ref.hard_bin_loss(logits, labels, accuracy, IGNORE, "none"))
    em = (logits, labels, log_pi, mu, sigma)
    out["em_target_loss"] = check_rows("em_target_loss", tri.em_target_loss(*em, theta, IGNORE, "none"),
                                       ref.em_target_loss(*em, theta, IGNORE, "none"))
    out["em_stats"] = check_rows("em_stats", [tri.em_stats(*em, IGNORE)], [ref.em_stats(*em, IGNORE)])
    coef = theta - 0.5
    out["em_ece_grad"] = check_rows("em_ece_grad", [tri.em_ece_grad(*em, coef, IGNORE)],
                                    [ref.em_ece_grad(*em, coef, IGNORE)])
    return out


def check_cross_entropy(logits, labels) -> dict:
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    got_logits, want_logits = logits.float().clone(), logits.float().clone()
    got = tri.cross_entropy_(got_logits, labels, IGNORE)
    want = ref.cross_entropy_(want_logits, labels, IGNORE)
    result = {"loss_max_err": max_err(got, want), "grad_max_err": max_err(got_logits, want_logits)}
    result["ok"] = result["loss_max_err"] <= 1e-4 and result["grad_max_err"] <= 1e-6
    return result


# ---------------------------------------------------------------------------------------------- timing

def em_params(n_bins: int, device):
    import torch

    mu = (torch.arange(n_bins, device=device) + 0.5) / n_bins
    sigma = torch.full((n_bins,), 0.5 / n_bins, device=device)
    log_pi = torch.full((n_bins,), -math.log(n_bins), device=device)
    theta = mu * 0.8
    accuracy = torch.linspace(0.1, 1.0, n_bins, device=device)
    return log_pi, mu, sigma, theta, accuracy


def time_binned_stats(logits, labels, label: str, classwise: bool, copy_bw: float, load: str) -> dict:
    """Kernel-level triton vs reference, torchmetrics (top-1 only), and the public API on triton; ``load`` names
    the roofline workload."""
    import calibkern
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    args = (logits, labels, N_BINS, 1.0, IGNORE, classwise)
    row = {"op": f"binned_stats {'classwise' if classwise else 'top1'}", "shape": label, "roofline": load,
           "triton_ms": bench_ms(lambda: tri.binned_stats(*args)),
           "reference_ms": bench_ms(lambda: ref.binned_stats(*args)),
           "public_api_triton_ms": bench_ms(lambda: calibkern.binned_stats(
               logits, labels, N_BINS, mode="classwise" if classwise else "top1", backend="triton"))}
    if not classwise:
        try:
            from torchmetrics.functional.classification import multiclass_calibration_error
        except ImportError:
            row["torchmetrics_ms"] = None
        else:
            row["torchmetrics_ms"] = bench_ms(lambda: multiclass_calibration_error(
                logits, labels, logits.shape[1], n_bins=N_BINS, norm="l1", ignore_index=IGNORE,
                validate_args=False))
    nbytes = logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
    row["reads"] = 2 if classwise else 1  # classwise: a softmax pass, then the binning pass
    row["triton_GBps"] = row["reads"] * nbytes / row["triton_ms"] / 1e6
    row["fraction_of_copy_bw"] = row["triton_GBps"] / copy_bw
    row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
    return row


METRIC_GOALS = {"CalibrationMeter.update": 2.0, "nll": 2.0, "brier": 2.0, "classwise_ece": 3.0}
METRIC_ROOFLINE = {"CalibrationMeter.update": "metric_sums top1 options", "nll": "metric_sums top1 options",
                   "brier": "metric_sums top1 options", "classwise_ece": "metric_sums classwise options"}


def time_metrics(logits, labels, label: str) -> list[dict]:
    """Every metric through the public API on triton against ``ece`` on the same rows (and the reference);
    ``adaptive_ece`` against one ``torch.sort`` of the confidences; the kernel bootstrap (N ≤ 10⁵, 1000
    resamples) against a loop of ``ece`` over resampled rows (100 resamples, scaled to 1000)."""
    import torch

    import calibkern

    def metric(name, backend):
        if name == "CalibrationMeter.update":
            meter = calibkern.CalibrationMeter(N_BINS, backend=backend)
            return lambda: meter.update(logits, labels)
        if name == "classwise_ece":
            return lambda: calibkern.classwise_ece(logits, labels, N_BINS, backend=backend)
        return lambda: getattr(calibkern, name)(logits, labels, backend=backend)

    ece_ms = bench_ms(lambda: calibkern.ece(logits, labels, N_BINS, backend="triton"))
    rows = []
    for name, limit in METRIC_GOALS.items():
        row = {"op": f"{name} (public API)", "shape": label, "roofline": METRIC_ROOFLINE[name],
               "triton_ms": bench_ms(metric(name, "triton")),
               "reference_ms": bench_ms(metric(name, "torch")), "ece_ms": ece_ms, "goal_vs_ece": limit}
        row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
        row["time_vs_ece"] = row["triton_ms"] / ece_ms
        rows.append(row)
    conf = torch.softmax(logits.float(), dim=1).amax(dim=1)
    sort_ms = bench_ms(lambda: torch.sort(conf, stable=True))
    adaptive_ms = bench_ms(lambda: calibkern.adaptive_ece(logits, labels, N_BINS, backend="triton"))
    rows.append({"op": "adaptive_ece (public API)", "shape": label, "adaptive_ms": adaptive_ms, "sort_ms": sort_ms,
                 "time_vs_sort": adaptive_ms / sort_ms})
    n = min(logits.shape[0], 100_000)
    z, y = logits[:n], labels[:n]

    def loop(resamples=100):
        generator = torch.Generator(device=z.device).manual_seed(0)
        for _ in range(resamples):
            index = torch.randint(n, (n,), generator=generator, device=z.device)
            calibkern.ece(z[index], y[index], N_BINS, backend="triton")
            torch.cuda.synchronize()

    interval_ms = bench_ms(lambda: calibkern.ece_confidence_interval(z, y, N_BINS, method="percentile",
                                                                   n_boot=1000, backend="triton"))
    loop_ms = 10 * bench_ms(loop)
    rows.append({"op": "ece_confidence_interval percentile", "shape": f"N={n}, 1000 resamples",
                 "interval_ms": interval_ms, "loop_ms": loop_ms, "speedup_vs_loop": loop_ms / interval_ms})
    return rows


def time_calibration_losses(logits, labels, params, label: str) -> list[dict]:
    """Forward + backward through the public API on each backend (the goal: ≥ 10× the reference)."""
    import calibkern

    log_pi, mu, sigma, theta, accuracy = params
    state = calibkern.EMState(n_components=N_BINS).to(logits.device)
    x = logits.float().clone().requires_grad_()
    losses = {
        "calibration_loss fwd+bwd":
            lambda b: calibkern.calibration_loss(x, labels, accuracy, n_bins=N_BINS, backend=b),
        "em_regularizer target fwd+bwd": lambda b: calibkern.em_regularizer(x, labels, state, backend=b),
        "em_regularizer ece fwd+bwd": lambda b: calibkern.em_regularizer(x, labels, state, form="ece", backend=b),
    }
    rows = []
    for name, loss in losses.items():
        row = {"op": name, "shape": label, "roofline": "row loss options"}
        for backend in ("triton", "torch"):
            row[f"{'reference' if backend == 'torch' else backend}_ms"] = bench_ms(
                lambda: loss(backend).backward(), grad_to_none=[x])
        row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
        rows.append(row)
    try:  # the published code's per-bin Python loop (benchmarks/reference_style.py), where present
        from reference_style import reference_style_calibration_loss
    except ImportError:
        return rows
    counts = calibkern.binned_stats(logits, labels, N_BINS, backend="torch").counts.double().clamp_min(1)
    kept = labels != IGNORE
    rows[0]["published_style_ms"] = bench_ms(
        lambda: reference_style_calibration_loss(x[kept], accuracy, counts, N_BINS).backward(), grad_to_none=[x])
    return rows


def time_cross_entropy(logits, labels, label: str, copy_bw: float) -> dict:
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    buffer = logits.float().clone()  # overwritten in place on every run; the work is the same
    row = {"op": "cross_entropy_ (in place)", "shape": label, "roofline": "cross_entropy_ lm",
           "triton_ms": bench_ms(lambda: tri.cross_entropy_(buffer, labels, IGNORE)),
           "reference_ms": bench_ms(lambda: ref.cross_entropy_(buffer, labels, IGNORE))}
    nbytes = buffer.numel() * buffer.element_size()
    row["reads"] = 2  # a softmax pass, then read + write of the gradient
    row["triton_GBps"] = 3 * nbytes / row["triton_ms"] / 1e6
    row["fraction_of_copy_bw"] = row["triton_GBps"] / copy_bw
    row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
    return row


def time_fused_linear(n: int, vocab: int, hidden_dim: int, device) -> dict:
    """Hidden states → SFT cross-entropy (+ hard-bin term), forward + backward: time and peak memory."""
    import torch
    import torch.nn.functional as F

    import calibkern

    label = f"N={n}, V={vocab}, D={hidden_dim} bf16"
    g = torch.Generator(device=device).manual_seed(3)
    hidden = (torch.randn(n, hidden_dim, generator=g, device=device) / math.sqrt(hidden_dim)).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_dim, generator=g, device=device)).to(torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    option_ids = torch.arange(4, device=device) + 100
    labels[::8] = option_ids[torch.randint(0, 4, (labels[::8].numel(),), generator=g, device=device)]
    labels[1::16] = IGNORE
    params = [hidden, weight]

    def eager():
        F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE).backward()

    candidates = {"eager full logits (CE)": eager}
    row = {"op": "fused linear loss fwd+bwd", "shape": label, "roofline": "fused linear"}
    fused = getattr(calibkern, "fused_linear_calibration_loss", None)
    if fused is None:
        row["note"] = "calibkern.fused_linear_calibration_loss is not available in this checkout"
    else:
        accuracy = torch.linspace(0.1, 1.0, 10, device=device)
        with torch.no_grad():
            got = fused(hidden, weight, labels, option_ids=option_ids, calibration=None, shift=False,
                        backend="triton").sft_loss
            want = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE)
        row["sft_loss_rel_err_vs_eager"] = float((got - want).abs() / want)

        def calibkern_loss(**calibration):
            return fused(hidden, weight, labels, option_ids=option_ids, shift=False, backend="triton", **calibration)

        candidates["calibkern (CE)"] = lambda: calibkern_loss(calibration=None).loss.backward()
        candidates["calibkern (CE + hard-bin)"] = lambda: calibkern_loss(bin_accuracy=accuracy).loss.backward()
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        row["liger"] = "Liger-Kernel not installed (pip install liger-kernel)"
    else:
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        candidates["Liger fused linear CE"] = lambda: liger(weight, hidden, labels).backward()
    for name, fn in candidates.items():
        row[f"{name} ms"] = bench_ms(fn, grad_to_none=params)
        for p in params:
            p.grad = None
        row[f"{name} peak MiB"] = peak_bytes(fn) / 2**20
        for p in params:
            p.grad = None
    return row


def time_kernel(op: str, label: str, load: str, triton_fn: Callable[[], object],
                reference_fn: Callable[[], object]) -> dict:
    """One triton kernel against the reference backend's function on the same arguments."""
    row = {"op": op, "shape": label, "roofline": load, "triton_ms": bench_ms(triton_fn),
           "reference_ms": bench_ms(reference_fn)}
    row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
    return row


def time_row_kernels(lm_logits, lm_labels, lm_label: str, opt_logits, opt_labels, opt_label: str,
                     n_boot: int) -> list[dict]:
    """metric_sums (top-1 at the vocabulary, classwise at the options), top1_rows at both, and bootstrap_stats over
    every options row's confidence."""
    from calibkern import reference as ref
    from calibkern.ops import triton as tri

    def both(name, *args):
        return lambda: getattr(tri, name)(*args), lambda: getattr(ref, name)(*args)

    conf, correct = tri.top1_rows(opt_logits, opt_labels, 1.0, -1)  # every row kept
    return [
        time_kernel("metric_sums top1", lm_label, "metric_sums top1 lm",
                    *both("metric_sums", lm_logits, lm_labels, N_BINS, 1.0, IGNORE, False)),
        time_kernel("metric_sums classwise", opt_label, "metric_sums classwise options",
                    *both("metric_sums", opt_logits, opt_labels, N_BINS, 1.0, IGNORE, True)),
        time_kernel("top1_rows", lm_label, "top1_rows lm", *both("top1_rows", lm_logits, lm_labels, 1.0, IGNORE)),
        time_kernel("top1_rows", opt_label, "top1_rows options",
                    *both("top1_rows", opt_logits, opt_labels, 1.0, IGNORE)),
        time_kernel("bootstrap_stats", f"n={conf.numel()}, {n_boot} replicates", "bootstrap_stats",
                    *both("bootstrap_stats", conf, correct, N_BINS, n_boot, 0)),
    ]


def roofline_fractions(timings: list[dict], gpu: "roofline.GPU", scale: int) -> None:
    """Each row's roofline bound on ``gpu`` (ms) and bound ÷ measured time, the fraction of the limit reached."""
    loads = roofline.workloads(scale)
    for row in timings:
        if "roofline" not in row:
            continue
        bound, ms = loads[row["roofline"]].bound_s(gpu), row.get("triton_ms", row.get("calibkern (CE) ms"))
        row["roofline_bound_ms"] = None if bound is None else bound * 1e3
        row["fraction_of_roofline"] = None if bound is None or ms is None else bound * 1e3 / ms


def roofline_gpu(device_name: str, copy_bw: float) -> "roofline.GPU":
    """The card's roofline rates, or the copy bandwidth measured here for a card the table lacks."""
    return roofline.gpu_for(device_name) or roofline.GPU(f"{device_name} (measured copy bandwidth)", copy_bw * 1e9)


# ---------------------------------------------------------------------------------------------- report

def summary_lines(report: dict) -> list[str]:
    lines = [f"calibkern GPU check — {report['device']} (copy bandwidth {report['copy_GBps']:.0f} GB/s)",
             f"{'op':<36} {'shape':<26} {'triton ms':>10} {'ref ms':>10} {'tm ms':>9} {'speed-up':>9} "
             f"{'GB/s':>7} {'% copy':>7}"]
    for row in report["timings"]:
        if "triton_ms" not in row:
            continue
        tm, frac = row.get("torchmetrics_ms"), row.get("fraction_of_copy_bw")
        tm_text = f"{tm:.3f}" if tm else "-"
        gbps_text = f"{row['triton_GBps']:.0f}" if frac else "-"
        frac_text = f"{100 * frac:.0f}%" if frac else "-"
        lines.append(f"{row['op']:<36} {row['shape']:<26} {row['triton_ms']:>10.3f} {row['reference_ms']:>10.3f} "
                     f"{tm_text:>9} {row['speedup_vs_reference']:>8.1f}x {gbps_text:>7} {frac_text:>7}")
    for row in report["timings"]:
        if "published_style_ms" in row:
            lines.append(f"{row['op']} as the published code computes it (per-bin loop, .item() per bin): "
                         f"{row['published_style_ms']:.3f} ms; triton is "
                         f"{row['published_style_ms'] / row['triton_ms']:.1f}x faster")
        if row["op"].startswith("fused linear"):
            lines.append(f"{row['op']} ({row['shape']}), calibkern CE vs eager relative error "
                         f"{row.get('sft_loss_rel_err_vs_eager', float('nan')):.1e}:")
            for key, value in row.items():
                if key.endswith(" ms"):
                    name = key[:-3]
                    lines.append(f"  {name:<34} {value:>9.2f} ms {row[name + ' peak MiB']:>9.0f} MiB peak")
                elif key in ("note", "liger"):
                    lines.append(f"  {value}")
    gpu = report["roofline_gpu"]
    lines.append(f"roofline on {gpu['name']} ({gpu['bandwidth'] / 1e12:.2f} TB/s): bound ÷ measured time "
                 "(docs/backends.md#roofline-what-a-first-gpu-run-will-be-read-against)")
    for row in report["timings"]:
        if row.get("fraction_of_roofline") is not None:
            ms = row.get("triton_ms", row.get("calibkern (CE) ms"))
            lines.append(f"  {row['op']:<36} {row['shape']:<26} {ms:>10.3f} ms  bound {row['roofline_bound_ms']:>9.4f} "
                         f"ms  {100 * row['fraction_of_roofline']:>5.1f}% of the limit")
    for goal in report["goals"]:
        lines.append(f"goal {goal['goal']}: measured {goal['measured']:.2f} → {'MET' if goal['met'] else 'MISSED'}")
    failed = [name for name, result in report["correctness"].items() if not result["ok"]]
    lines.append("correctness: " + ("all checks passed" if not failed else "FAILED: " + ", ".join(failed)))
    return lines


def goals(timings: list[dict]) -> list[dict]:
    out = []
    for row in timings:
        if row.get("roofline") == "binned_stats top1 lm":
            out.append({"goal": f"binned_stats ≥ {COPY_GOAL:.0%} of copy bandwidth ({row['shape']})",
                        "measured": row["fraction_of_copy_bw"], "met": row["fraction_of_copy_bw"] >= COPY_GOAL})
        if "time_vs_ece" in row:
            out.append({"goal": f"{row['op']} ≤ {row['goal_vs_ece']:.0f}x ece ({row['shape']})",
                        "measured": row["time_vs_ece"], "met": row["time_vs_ece"] <= row["goal_vs_ece"]})
        if "time_vs_sort" in row:
            out.append({"goal": f"adaptive_ece ≤ 3x one torch.sort ({row['shape']})", "measured": row["time_vs_sort"],
                        "met": row["time_vs_sort"] <= 3.0})
        if "speedup_vs_loop" in row:
            out.append({"goal": f"percentile interval ≥ 10x a loop of ece ({row['shape']})",
                        "measured": row["speedup_vs_loop"], "met": row["speedup_vs_loop"] >= 10.0})
        if row["op"] == "calibration_loss fwd+bwd":
            out.append({"goal": f"calibration_loss fwd+bwd ≥ {LOSS_SPEEDUP_GOAL:.0f}x reference ({row['shape']})",
                        "measured": row["speedup_vs_reference"],
                        "met": row["speedup_vs_reference"] >= LOSS_SPEEDUP_GOAL})
    return out


def run(device, scale: int = 1) -> dict:
    """Every check and timing on ``device``; ``scale`` divides the row counts and the vocabulary."""
    import torch
    import triton

    shapes = roofline.shapes(scale)
    (lm_n, vocab), (opt_n, k) = shapes["lm"], shapes["options"]
    lm_logits, lm_labels = make_inputs(lm_n, vocab, torch.bfloat16, device, seed=0)
    opt_logits, opt_labels = make_inputs(opt_n, k, torch.float32, device, seed=1)
    lm_label, opt_label = f"N={lm_n}, V={vocab} bf16", f"N={opt_n}, K={k} fp32"
    params = em_params(N_BINS, device)

    correctness = {
        f"binned_stats top1 {lm_label}": check_binned_stats(lm_logits, lm_labels, classwise=False),
        f"binned_stats top1 {opt_label}": check_binned_stats(opt_logits, opt_labels, classwise=False),
        f"binned_stats classwise {opt_label}": check_binned_stats(opt_logits, opt_labels, classwise=True),
        f"cross_entropy_ N={lm_n}, V={vocab} fp32": check_cross_entropy(lm_logits, lm_labels),
        f"metric_sums top1 {lm_label}": check_metric_sums(lm_logits, lm_labels, classwise=False),
        f"metric_sums classwise {opt_label}": check_metric_sums(opt_logits, opt_labels, classwise=True),
        f"top1_rows + bootstrap_stats {opt_label}": check_top1_rows_and_bootstrap(opt_logits, opt_labels),
    }
    for dtype in (torch.float32, torch.bfloat16):
        for name, result in check_calibration_kernels(opt_logits.to(dtype), opt_labels, params).items():
            correctness[f"{name} N={opt_n}, K={k} {str(dtype)[6:]}"] = result
    failed = [name for name, result in correctness.items() if not result["ok"]]
    print("correctness:", "all passed" if not failed else f"FAILED {failed}", flush=True)

    copy_bw = copy_gbps(lm_logits.numel() * lm_logits.element_size(), device)
    timings = [time_binned_stats(lm_logits, lm_labels, lm_label, False, copy_bw, "binned_stats top1 lm"),
               time_binned_stats(opt_logits, opt_labels, opt_label, False, copy_bw, "binned_stats top1 options"),
               time_binned_stats(opt_logits, opt_labels, opt_label, True, copy_bw, "binned_stats classwise options"),
               *time_row_kernels(lm_logits, lm_labels, lm_label, opt_logits, opt_labels, opt_label, shapes["n_boot"]),
               *time_calibration_losses(opt_logits, opt_labels, params, opt_label),
               *time_metrics(opt_logits, opt_labels, opt_label),
               time_cross_entropy(lm_logits, lm_labels, f"N={lm_n}, V={vocab} fp32", copy_bw)]
    print("timed the kernels; now the fused linear loss", flush=True)
    del lm_logits
    torch.cuda.empty_cache()
    timings.append(time_fused_linear(lm_n, vocab, shapes["hidden_dim"], device))
    name = torch.cuda.get_device_name(device)
    gpu = roofline_gpu(name, copy_bw)
    roofline_fractions(timings, gpu, scale)
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "scale": scale,
            "copy_GBps": copy_bw, "roofline_gpu": vars(gpu), "correctness": correctness, "timings": timings,
            "goals": goals(timings)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes divided by 16, no JSON written")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/gpu_<device>.json)")
    args = parser.parse_args(argv)
    require_cuda()
    import torch

    report = run(torch.device("cuda"), scale=16 if args.quick else 1)
    if not args.quick or args.out:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", report["device"]).strip("_")
        out = args.out or RESULTS_DIR / f"gpu_{slug}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    print("\n".join(summary_lines(report)))
    return 0 if all(result["ok"] for result in report["correctness"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
