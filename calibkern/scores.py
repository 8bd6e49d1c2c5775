"""What a metric's scores are: the ``input=`` argument of every metric (docs/math.md#inputs).

The kernels read logits ``z`` and take ``p = softmax(z)``. ``as_logits`` turns the other kinds into logits with
that softmax: probabilities ``p`` → ``log p``, log-probabilities → themselves (``softmax(log p) = p / Σ_j p_j``,
so rows are renormalised), a zero probability → the dtype's ``log(tiny)`` (≈ −87 in float32, a probability below
10⁻³⁷ instead of 0). 1-D scores are one binary prediction per row, the positive class's score: logits ``z`` →
``[0, z]`` (``softmax = [1 − σ(z), σ(z)]``), probabilities ``p`` → ``[log(1 − p), log p]``, log-probabilities
``l`` → ``[log(1 − eˡ), l]``; labels are 0/1.

With ``input="logits"`` a batch that looks like probabilities — every row ≥ 0 and summing to 1 within 10⁻³ (1-D:
every score in [0, 1]) — gets a :class:`ProbabilitiesAsLogitsWarning` naming ``input="probs"``: softmax of
probabilities is a different, flatter distribution. The check reads the first 16 rows (4096 scores of 1-D input), and
the whole batch only when those look like probabilities: a minimum (and, when no score is negative, the row sums)
with a host read; metrics are evaluation code (a ``CalibrationMeter`` checks its first batch only), the losses never
run it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

from . import _validate as V

INPUTS = ("logits", "probs", "log_probs")
SUM_TOLERANCE = 1e-3
PROBE_ROWS, PROBE_SCORES = 16, 4096  # what looks_like_probabilities reads before it reads the whole batch


class ProbabilitiesAsLogitsWarning(UserWarning):
    """Scores passed as logits (the default) look like probabilities."""


def looks_like_probabilities(scores: torch.Tensor) -> bool:
    """Every score ≥ 0 and every row summing to 1 within ``SUM_TOLERANCE`` (1-D: every score in [0, 1]). The first
    ``PROBE_ROWS`` rows (``PROBE_SCORES`` scores of 1-D input) are checked first: logits nearly always fail there,
    so the whole batch is read only when they look like probabilities."""
    if scores.numel() == 0 or scores.device.type == "meta" or torch.compiler.is_compiling():
        return False
    head = scores[:PROBE_SCORES] if scores.dim() == 1 else scores[:PROBE_ROWS]
    return _all_like_probabilities(head) and (head.shape[0] == scores.shape[0] or _all_like_probabilities(scores))


def _all_like_probabilities(scores: torch.Tensor) -> bool:
    if scores.dim() == 1:
        low, high = torch.aminmax(scores)
        return bool((low >= 0) & (high <= 1))
    if scores.amin() < 0:  # logits nearly always hold a negative score: one cheap reduction decides
        return False
    return bool((scores.sum(dim=1, dtype=torch.float32) - 1).abs().amax() <= SUM_TOLERANCE)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside calibkern, for a warning raised by this module's caller."""
    package, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _log(p: torch.Tensor) -> torch.Tensor:
    """``log p`` in p's dtype (float32 for half precision), 0 → ``log(tiny)``."""
    p = p if p.dtype == torch.float64 else p.float()
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def as_logits(scores, input: str = "logits", name: str = "logits", *, warn: bool = True) -> torch.Tensor:
    """Logits ``[N, K]`` (float) whose softmax is the distribution ``scores`` of kind ``input`` describe (module
    docstring); ``[N]`` scores become ``[N, 2]``. Probabilities must lie in [0, 1] and log-probabilities be ≤ 0
    (``ValueError`` naming ``name``; NaN is left to the metric's ``nonfinite`` policy); shapes and dtypes are
    checked by the metric as for logits."""
    V.check_choice(input, "input", INPUTS)
    V.check_tensor(scores, name)
    if scores.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {scores.dtype}")
    if input == "logits" and warn and scores.dim() in (1, 2) and looks_like_probabilities(scores):
        shape = "every score lies in [0, 1]" if scores.dim() == 1 else "every row is ≥ 0 and sums to 1"
        warnings.warn(f"{name}: {shape}, like probabilities, but input='logits' (the default) applies a "
                      f"{'sigmoid' if scores.dim() == 1 else 'softmax'} to them; pass input='probs' if they are "
                      "probabilities (input='log_probs' for their logarithms)", ProbabilitiesAsLogitsWarning,
                      stacklevel=_caller_level())
    if input == "probs":
        V.require(~((scores < 0) | (scores > 1)).any(), f"{name} must lie in [0, 1] with input='probs'")
    elif input == "log_probs":
        V.require(~(scores > 0).any(), f"{name} must be ≤ 0 with input='log_probs' (log-probabilities)")
    if scores.dim() != 1:
        return scores if input == "logits" else _log(scores) if input == "probs" else _clamped_log_probs(scores)
    if input == "logits":
        return torch.stack([torch.zeros_like(scores), scores], dim=1)
    if input == "probs":
        return torch.stack([_log(1 - scores), _log(scores)], dim=1)
    log_p = _clamped_log_probs(scores)
    return torch.stack([_log(-torch.expm1(log_p)), log_p], dim=1)


def _clamped_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (float32 for half precision) with ``−inf`` (a zero probability) raised to ``log(tiny)``."""
    log_p = log_p if log_p.dtype == torch.float64 else log_p.float()
    return log_p.clamp_min(math.log(torch.finfo(log_p.dtype).tiny))
