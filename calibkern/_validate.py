"""Argument checks shared by every public entry point (docs/reliability.md, "Error rules").

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or value)
with a message that names the argument. Checks on tensor *values* (label range, finiteness) need the
values: on CPU tensors they raise at once; on CUDA tensors they use ``torch._assert_async`` so the
training step never waits on the host (the error then surfaces as a device-side assertion). This module
imports nothing from calibkern.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HOST_CHECK_MAX = 4096  # a CPU parameter vector up to this length is checked in Python (a few µs, no torch ops)
NONFINITE_MODES = ("error", "skip")


def require(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the boolean 0-dim tensor ``condition`` holds.

    Under ``torch.compile`` (``torch.compiler.is_compiling()``) the check is ``torch._assert_async`` on
    every device, so the compiled graph never guards on data: compiled code then raises a
    ``RuntimeError`` carrying ``message`` from the assertion instead of a ``ValueError``.
    """
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_logits(logits, name: str = "logits", *, allow_empty: bool = False) -> torch.Tensor:
    """A 2-D floating tensor [N, K] with K ≥ 2."""
    check_tensor(logits, name)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have K ≥ 2 classes (columns), got K = {logits.shape[1]}")
    if logits.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (N = 0 rows)")
    return logits


def label_range_message(name: str, n_classes: int, ignore_index: int) -> str:
    return f"{name} must lie in [0, {n_classes}) or equal ignore_index={ignore_index}"


def check_labels(labels, n_rows: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """Integer labels [N] on ``device``, returned as int64. Their values (in [0, K) or ``ignore_index``) are
    checked where the op is dispatched (calibkern.ops._dispatch.check_label_values), or by the kernel."""
    check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n_rows:
        raise ValueError(f"{name} has {labels.shape[0]} entries but logits has {n_rows} rows")
    check_same_device(device, labels, name)
    return labels.long()


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_same_device(device: torch.device, tensor: torch.Tensor, name: str) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logits is on {device}")


def _physical_memory() -> int:
    """This machine's physical memory in bytes (16 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 16 * 2**30


# read once at import: the checks below run inside compiled graphs too, where os.sysconf cannot be traced
MEMORY_BYTES = _physical_memory()


BIN_BYTES = 64  # what a metric holds per bin at once: its float64 statistics and temporaries, 8 × 8 bytes
REPLICATE_BIN_BYTES = 24  # a bootstrap replicate's statistics per bin: counts, Σ confidence, Σ correct


def check_fits(value: int, name: str, unit_bytes: int, what: str) -> int:
    """``value`` units of ``unit_bytes`` each within a quarter of physical memory (and int32 indices)."""
    limit = min(2**31 - 1, MEMORY_BYTES // (4 * unit_bytes))
    if value > limit:
        raise ValueError(f"{name} = {value:,} is too large: {what} would take {value * unit_bytes / 2**30:,.1f} GiB; at "
                         f"most a quarter of this machine's {MEMORY_BYTES / 2**30:.0f} GiB of memory is allowed "
                         f"(at most {limit:,})")
    return value


def check_n_bins(n_bins, name: str = "n_bins") -> int:
    """A positive int (Python or NumPy) whose per-bin statistics fit in memory (:func:`check_fits`)."""
    n_bins = check_int(n_bins, name)
    if n_bins < 1:
        raise ValueError(f"{name} must be ≥ 1, got {n_bins}")
    return check_fits(n_bins, name, BIN_BYTES, "the per-bin statistics")


def check_n_boot(n_boot, n_bins: int) -> int:
    """A positive int whose ``n_boot × n_bins`` bootstrap statistics fit in memory."""
    n_boot = check_n_bins(n_boot, "n_boot")
    check_fits(n_boot, "n_boot", REPLICATE_BIN_BYTES * n_bins, f"the statistics of {n_boot:,} replicates × {n_bins} bins")
    return n_boot


def check_int(value, name: str) -> int:
    """Any integer (Python or NumPy), as an int; bools and floats are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_vector(x, name: str, length: int, device: torch.device, *, low=None, high=None) -> torch.Tensor:
    """A 1-D tensor (or sequence) of ``length`` finite values in [low, high], as float32 on ``device``."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a 1-D tensor of {length} numbers") from exc
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    x = x.to(device=device)
    bounds = "" if low is None and high is None else f" in [{low}, {high}]"
    message = f"{name} must hold finite values{bounds}"
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and length <= _HOST_CHECK_MAX:
        lo, hi = (-math.inf if low is None else low), (math.inf if high is None else high)
        if not all(math.isfinite(v) and lo <= v <= hi for v in x.tolist()):
            raise ValueError(message)
        return x
    ok = torch.isfinite(x).all()
    if low is not None:
        ok = ok & (x >= low).all()
    if high is not None:
        ok = ok & (x <= high).all()
    require(ok, message)
    return x


def nonfinite_message(name: str, scaled: bool = False) -> str:
    what = "NaN or infinite values" + (" (after division by temperature)" if scaled else "")
    return f"{name} contains {what}; pass nonfinite='skip' to skip such rows"
