"""Argument checks shared by every public entry point (SPEC §9).

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or value)
with a message that names the argument. Checks on tensor *values* (label range, finiteness) need the
values: on CPU tensors they raise at once; on CUDA tensors they use ``torch._assert_async`` so the
training step never waits on the host (the error then surfaces as a device-side assertion).
"""

from __future__ import annotations

import math
import numbers

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


def check_labels(labels, n_rows: int, n_classes: int, ignore_index: int, device: torch.device,
                 name: str = "labels", *, values: bool = True) -> torch.Tensor:
    """Integer labels [N] in [0, K) or equal to ``ignore_index``; returned as int64. ``values=False`` checks
    the kind, shape and device only (for a kernel that checks the range itself)."""
    check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n_rows:
        raise ValueError(f"{name} has {labels.shape[0]} entries but logits has {n_rows} rows")
    check_same_device(device, labels, name)
    labels = labels.long()
    if n_rows and values:
        fast = _cpu_checks(labels)
        message = label_range_message(name, n_classes, ignore_index)
        if fast is not None:
            if not fast.labels_in_range(labels.contiguous(), n_classes, ignore_index):
                raise ValueError(message)
        else:
            require((((labels >= 0) & (labels < n_classes)) | (labels == ignore_index)).all(), message)
    return labels


def check_same_device(device: torch.device, tensor: torch.Tensor, name: str) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logits is on {device}")


def check_n_bins(n_bins, name: str = "n_bins") -> int:
    """A positive int (Python or NumPy)."""
    n_bins = check_int(n_bins, name)
    if n_bins < 1:
        raise ValueError(f"{name} must be ≥ 1, got {n_bins}")
    return n_bins


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


def _cpu_checks(t: torch.Tensor):
    """``calibkern._C`` when it can check ``t`` (a CPU tensor, eager mode, the extension built), else None.

    Its checks read the tensor once in parallel without an [N, K] temporary; the torch expressions they
    replace cost several times the op they guard.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    try:
        from calibkern import _cpp
    except ImportError:
        return None
    return _cpp._C


def _float_kernel_dtype(logits: torch.Tensor) -> bool:
    return logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


def nonfinite_message(name: str, scaled: bool = False) -> str:
    what = "NaN or infinite values" + (" (after division by temperature)" if scaled else "")
    return f"{name} contains {what}; pass nonfinite='skip' to skip such rows"


def handle_nonfinite(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, nonfinite: str,
                     name: str = "logits"):
    """Apply the ``nonfinite`` policy to rows holding NaN or ±inf.

    ``"error"`` raises naming the argument; ``"skip"`` turns such rows into ignored rows (their label
    becomes ``ignore_index`` and their logits 0) and returns how many were skipped as an int64 tensor.
    Returns ``(logits, labels, n_skipped)``; ``n_skipped`` is None under ``"error"`` (nothing skipped).
    """
    check_choice(nonfinite, "nonfinite", NONFINITE_MODES)
    fast = _cpu_checks(logits) if _float_kernel_dtype(logits) else None
    if nonfinite == "error":
        if fast is not None:
            if not fast.all_finite(logits.contiguous()):
                raise ValueError(nonfinite_message(name))
        else:
            require(torch.isfinite(logits).all(), nonfinite_message(name))
        return logits, labels, None
    finite_rows = fast.finite_rows(logits.contiguous()) if fast is not None else torch.isfinite(logits).all(dim=1)
    bad = ~finite_rows
    logits = torch.where(bad[:, None], torch.zeros((), dtype=logits.dtype, device=logits.device), logits)
    labels = torch.where(bad, torch.full_like(labels, ignore_index), labels)
    return logits, labels, bad.sum()
