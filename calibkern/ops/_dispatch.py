"""The common front half of every op: validate the row inputs, apply the non-finite policy, pick a backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate as V
from .. import backends


@dataclass
class RowInputs:
    """Validated ``logits [N, K]`` (contiguous) and ``labels`` (int64) with the name of the backend that runs
    them; every kernel is then reached through its custom op (calibkern/ops/custom_ops.py) with that name."""

    logits: torch.Tensor
    labels: torch.Tensor
    n_skipped: torch.Tensor | None  # rows skipped for non-finite logits; None when the policy skips none
    backend: str


def prepare(logits, labels, *, ignore_index: int = -100, nonfinite: str = "error", backend=None,
            logits_name: str = "logits", allow_empty: bool = True, row_loss: bool = False) -> RowInputs:
    """``nonfinite=None`` leaves non-finite rows to the kernel (``binned_stats`` counts them itself).

    ``row_loss=True`` (``hard_bin_loss``, ``em_target_loss``): when the ``cpp`` kernel runs eagerly it checks
    the label range and, under ``nonfinite="error"``, the finiteness of every row in the passes it makes
    anyway (calibkern._cpp raises the same errors), so the two separate reads are skipped here.
    """
    V.check_logits(logits, logits_name, allow_empty=allow_empty)
    V.check_ignore_index(ignore_index)
    name, _ = backends.resolve(backend, logits.device, logits.dtype)
    kernel_checks = row_loss and name == "cpp" and not torch.compiler.is_compiling()
    labels = V.check_labels(labels, logits.shape[0], logits.device)
    if not kernel_checks and labels.shape[0]:
        check_label_values(labels, logits.shape[1], ignore_index)
    if logits.dtype == torch.float64 and name != "torch":
        raise TypeError(f"{logits_name} is float64, which only backend='torch' takes; backend {name!r} takes "
                        "float32, bfloat16 or float16")
    if nonfinite is None or (kernel_checks and nonfinite == "error"):
        n_skipped = None
    else:
        logits, labels, n_skipped = handle_nonfinite(logits, labels, ignore_index, nonfinite, logits_name)
    return RowInputs(logits.contiguous(), labels.contiguous(), n_skipped, name)


def _compiled_checks(t: torch.Tensor):
    """The extension's input checks for ``t`` (a CPU tensor, eager mode, the cpp backend available), else None.

    They read the tensor once in parallel without an [N, K] temporary; the torch expressions they replace
    cost several times the op they guard.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling() or not backends.is_available("cpp"):
        return None
    return backends.get_module("cpp")._C


def check_label_values(labels: torch.Tensor, n_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Every label (int64) lies in ``[0, n_classes)`` or equals ``ignore_index``."""
    fast = _compiled_checks(labels)
    message = V.label_range_message(name, n_classes, ignore_index)
    if fast is not None:
        if not fast.labels_in_range(labels.contiguous(), n_classes, ignore_index):
            raise ValueError(message)
    else:
        V.require((((labels >= 0) & (labels < n_classes)) | (labels == ignore_index)).all(), message)


def handle_nonfinite(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, nonfinite: str,
                     name: str = "logits"):
    """Apply the ``nonfinite`` policy to rows holding NaN or ±inf.

    ``"error"`` raises naming the argument; ``"skip"`` turns such rows into ignored rows (their label
    becomes ``ignore_index`` and their logits 0) and returns how many were skipped as an int64 tensor.
    Returns ``(logits, labels, n_skipped)``; ``n_skipped`` is None under ``"error"`` (nothing skipped).
    """
    V.check_choice(nonfinite, "nonfinite", V.NONFINITE_MODES)
    fast = _compiled_checks(logits) if logits.dtype != torch.float64 else None
    if nonfinite == "error":
        if fast is not None:
            if not fast.all_finite(logits.contiguous()):
                raise ValueError(V.nonfinite_message(name))
        else:
            V.require(torch.isfinite(logits).all(), V.nonfinite_message(name))
        return logits, labels, None
    finite_rows = fast.finite_rows(logits.contiguous()) if fast is not None else torch.isfinite(logits).all(dim=1)
    bad = ~finite_rows
    logits = torch.where(bad[:, None], torch.zeros((), dtype=logits.dtype, device=logits.device), logits)
    labels = torch.where(bad, torch.full_like(labels, ignore_index), labels)
    return logits, labels, bad.sum()
