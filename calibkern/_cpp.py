"""The ``cpp`` backend: the kernel contract of docs/backends.md on CPU tensors, computed by the compiled
extension (csrc/).

The extension is the ahead-of-time build ``calibkern._C`` when there is one built for this torch and this
CPU (calibkern/_build.py records what it was built for); otherwise it is compiled at first use against the
running torch into a per-user cache (calibkern/_jit.py; ``CALIBKERN_JIT=0`` turns that off, ``1`` or unset
leaves it on). Importing this module raises ImportError, saying why, when neither gives a usable extension,
which :mod:`calibkern.backends` reports as "cpp unavailable" with that reason. :data:`HOW_BUILT` says how the
extension in use was obtained and :data:`BUILD_TARGET` which instruction-set target it was compiled for.

Each function is a thin wrapper; the kernels are single-pass per row, OpenMP-parallel over fixed blocks of
rows, float32 math with float64 statistics, and bitwise identical for any number of threads.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from calibkern import _build
from calibkern import _validate as V
from calibkern._cpu_flags import cpu_flags
from calibkern.reference.bootstrap import POISSON_THRESHOLDS


def _ahead_of_time_problem() -> tuple[str | None, dict]:
    """(why the ahead-of-time build cannot be used here, or None when it can; its build record)."""
    if importlib.util.find_spec("calibkern._C") is None:
        return "calibkern._C was not built ahead of time", {}
    try:
        config = vars(importlib.import_module("calibkern._build_config"))
    except ImportError:  # built without a record: trust it
        return None, {}
    problem = _build.mismatch(config, *_build.torch_identity(), cpu_flags())
    return (None if problem is None else f"calibkern._C was {problem}"), config


def describe_target(march: str | None, cpu_flags) -> str:
    """``-march=<target>, <widest vector extension> (CPU flags: …)`` of a build."""
    flags = ", ".join(cpu_flags) or "none"
    return f"{_build.describe_target(march, cpu_flags)} (CPU flags: {flags})"


def _load_extension():
    """(module, how it was obtained, the instruction-set target it was compiled for)."""
    try:
        jit = _build.env_switch("CALIBKERN_JIT")
        problem, config = _ahead_of_time_problem()
    except ValueError as error:
        raise ImportError(str(error)) from None
    if problem is None:
        target = (describe_target(config["MARCH"], config.get("CPP_CPU_FLAGS", ())) if "MARCH" in config
                  else "a target calibkern/_build_config.py does not record")
        return importlib.import_module("calibkern._C"), "built ahead of time (calibkern._C)", target
    if jit is False:
        raise ImportError(f"{problem}, and CALIBKERN_JIT=0 turns off the build at first use")
    from calibkern import _jit

    try:
        entry = _jit.cache_entry()
        module, compiled = _jit.jit_load(problem, entry)
    except ImportError as error:
        raise ImportError(f"{problem}; {error}") from None
    how = "compiled by this process" if compiled else "loaded from the cache"
    target = describe_target(entry.record["march"], entry.record["cpu_flags"])
    return module, f"built at first use in {entry.directory}, {how} ({problem})", target


_C, HOW_BUILT, BUILD_TARGET = _load_extension()

_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}  # csrc/cpu/option_rows.h, Reduction


def binned_stats(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, temperature: float,
                 ignore_index: int, classwise: bool):
    """(counts, Σ conf, Σ correct) per bin — [M] for top-1, [K, M] classwise — and the number of kept rows
    left out for holding NaN or ±inf (found by the softmax pass itself)."""
    return _C.binned_stats(logits, labels, int(n_bins), float(temperature), int(ignore_index), bool(classwise))


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, temperature: float, ignore_index: int,
                classwise: bool):
    """binned_stats' top-1 outputs, ``[Σ NLL, Σ Brier]`` (float64 [2]) and the classwise statistics ([K, M], or
    [0, M] unless ``classwise``), all from one read of each row (two for classwise with K·M > 1024)."""
    return _C.metric_sums(logits, labels, int(n_bins), float(temperature), int(ignore_index), bool(classwise))


def top1_rows(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """(confidence float32 [N], correct bool [N]) per row; ignored rows 0 and False, non-finite kept rows NaN."""
    return _C.top1_rows(logits, labels, float(temperature), int(ignore_index))


def bootstrap_stats(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int, n_boot: int, seed: int):
    """(counts, Σ w c, Σ w · correct), each [n_boot, M], of Poisson replicates of the rows (the weights of
    calibkern.reference.bootstrap)."""
    thresholds = torch.tensor(POISSON_THRESHOLDS, dtype=torch.int64)
    return _C.bootstrap_stats(confidence, correct, thresholds, int(n_bins), int(n_boot), int(seed))


def grid_moments(confidence: torch.Tensor, correct: torch.Tensor, cells: int):
    """The smooth ECE's per-cell sums of (1, c, r, c·r) as float64 [cells, 4] (calibkern.reference.smooth_grid)."""
    return _C.grid_moments(confidence, correct, int(cells))


def _checked(outputs, n_classes: int, ignore_index: int):
    """A row-loss kernel's outputs, after the input checks it made in its own passes (counts of labels out
    of range and of rows with non-finite logits): the errors of calibkern._validate, naming the
    arguments of the public row losses (``calibration_loss``, ``em_regularizer``: ``option_logits``,
    ``labels``), whose validation leaves these two checks to the kernel (``prepare(row_loss=True)``)."""
    *outputs, bad_labels, nonfinite_rows = outputs
    if bad_labels:
        raise ValueError(V.label_range_message("labels", n_classes, ignore_index))
    if nonfinite_rows:
        raise ValueError(V.nonfinite_message("option_logits"))
    return tuple(outputs)


def hard_bin_loss(logits: torch.Tensor, labels: torch.Tensor, bin_accuracy: torch.Tensor, ignore_index: int,
                  reduction: str):
    """(loss, ∂loss/∂logits [N, K]) of ``Σ_j (p_j − τ_j)²`` with ``a = bin_accuracy[b(c)]``, reduced over kept rows
    in the kernel (the mean's 1/n_kept is in the gradient it writes)."""
    return _checked(_C.hard_bin_loss(logits, labels, bin_accuracy, int(ignore_index), _REDUCTION_CODES[reduction]),
                    logits.shape[1], ignore_index)


def em_target_loss(logits: torch.Tensor, labels: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor,
                   sigma: torch.Tensor, theta: torch.Tensor, ignore_index: int, reduction: str):
    """(loss, grad [N, K], stats [4, M]) of the EM target form, ``a = Σ_k r_k θ_k``, reduced as hard_bin_loss's."""
    return _checked(_C.em_target_loss(logits, labels, log_pi, mu, sigma, theta, int(ignore_index),
                                      _REDUCTION_CODES[reduction]), logits.shape[1], ignore_index)


def em_stats(logits: torch.Tensor, labels: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor,
             sigma: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """E-step statistics ``S = Σ r, C = Σ r c, Q = Σ r c², R = Σ r·correct`` as float64 [4, M]."""
    return _C.em_stats(logits, labels, log_pi, mu, sigma, int(ignore_index))


def em_ece_grad(logits: torch.Tensor, labels: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor,
                sigma: torch.Tensor, coef: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``w · c · (e_ŷ − p)`` with ``w = Σ_k r_k coef_k``, float32 [N, K]."""
    return _C.em_ece_grad(logits, labels, log_pi, mu, sigma, coef, int(ignore_index))


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0,
                   lse_square_scale: float = 0.0) -> torch.Tensor:
    """``loss_i = lse_i − (1 − ε) z_{i,y_i} − (ε/V) Σ_j z_ij + λ lse_i²``; overwrites float32 ``logits`` with its
    gradient (calibkern/reference/cross_entropy.py)."""
    return _C.cross_entropy_(logits, targets, int(ignore_index), float(label_smoothing), float(lse_square_scale))
