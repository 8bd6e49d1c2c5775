"""The common front half of every op: validate the row inputs, apply the non-finite policy, pick a backend."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from .. import _validate as V
from ..backends import resolve


@dataclass
class RowInputs:
    """Validated ``logits [N, K]`` (contiguous) and ``labels`` (int64) with the backend that runs them."""

    logits: torch.Tensor
    labels: torch.Tensor
    n_skipped: torch.Tensor | None  # rows skipped for non-finite logits; None when the policy skips none
    backend: str
    kernels: ModuleType


def prepare(logits, labels, *, ignore_index: int = -100, nonfinite: str = "error", backend=None,
            logits_name: str = "logits", allow_empty: bool = True, row_loss: bool = False) -> RowInputs:
    """``nonfinite=None`` leaves non-finite rows to the kernel (``binned_stats`` counts them itself).

    ``row_loss=True`` (``hard_bin_loss``, ``em_target_loss``): when the ``cpp`` kernel runs eagerly it checks
    the label range and, under ``nonfinite="error"``, the finiteness of every row in the passes it makes
    anyway (calibkern._cpp raises the same errors), so the two separate reads are skipped here.
    """
    V.check_logits(logits, logits_name, allow_empty=allow_empty)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    name, kernels = resolve(backend, logits.device, logits.dtype)
    kernel_checks = row_loss and name == "cpp" and not torch.compiler.is_compiling()
    labels = V.check_labels(labels, logits.shape[0], logits.shape[1], ignore_index, logits.device,
                            values=not kernel_checks)
    if logits.dtype == torch.float64 and name != "torch":
        raise TypeError(f"{logits_name} is float64, which only backend='torch' takes; backend {name!r} takes "
                        "float32, bfloat16 or float16")
    if nonfinite is None or (kernel_checks and nonfinite == "error"):
        n_skipped = None
    else:
        logits, labels, n_skipped = V.handle_nonfinite(logits, labels, ignore_index, nonfinite, logits_name)
    return RowInputs(logits.contiguous(), labels.contiguous(), n_skipped, name, kernels)
