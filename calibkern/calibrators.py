"""Post-hoc calibrators fitted on held-out predictions (docs/math.md#temperature-scaling); no transformers needed.

:class:`TemperatureScaling` (Guo et al. 2017; the paper's post-hoc baseline): one scalar ``T > 0`` for every
row, ``p = softmax(z / T)``, with ``T`` minimising the mean NLL of the fitting rows,

    NLL(T) = (1/N) Σ_i [logsumexp(z_i / T) − z_{i, y_i} / T],

by L-BFGS (strong-Wolfe line search) over ``log T`` from ``T = 1``, in float64 on the rows' logits. The argmax,
hence the accuracy, does not change with ``T``.
"""

from __future__ import annotations

import math

import torch

from . import _validate as V
from .ops._dispatch import check_label_values
from .scores import as_logits


class TemperatureScaling:
    """``fit(logits, labels)`` finds the NLL-optimal ``T`` (``self.temperature``, a float); ``transform(logits)``
    returns ``logits / T``. ``state_dict`` / ``load_state_dict`` hold ``T``. ``input`` takes ``"logits"``,
    ``"probs"`` or ``"log_probs"`` and 1-D binary scores, as every metric does (docs/math.md#inputs)."""

    def __init__(self, *, max_iter: int = 100, ignore_index: int = -100):
        self.max_iter = V.check_n_bins(max_iter, "max_iter")
        self.ignore_index = V.check_ignore_index(ignore_index)
        self.temperature = 1.0

    def fit(self, logits, labels, *, input: str = "logits") -> "TemperatureScaling":
        """Fit ``T`` on the rows whose label is not ``ignore_index``; returns ``self``."""
        logits = V.check_logits(as_logits(logits, input))
        labels = V.check_labels(labels, logits.shape[0], logits.device)
        check_label_values(labels, logits.shape[1], self.ignore_index)
        keep = labels != self.ignore_index
        logits, labels = logits.detach()[keep].double(), labels[keep]
        if logits.shape[0] == 0:
            raise ValueError("labels: every row is ignored, so there is nothing to fit a temperature on")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(V.nonfinite_message("logits"))
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-12,
                                      tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits * torch.exp(-log_t), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        temperature = float(log_t.detach().exp())
        if not math.isfinite(temperature) or temperature <= 0:
            raise RuntimeError(f"temperature fit diverged (T = {temperature}): the rows are separable, so the NLL "
                               "keeps falling as T → 0")
        self.temperature = temperature
        return self

    def transform(self, logits, *, input: str = "logits") -> torch.Tensor:
        """``logits / T`` (as logits; 1-D binary scores as ``[N, 2]``), in the logits' dtype."""
        logits = as_logits(logits, input, warn=False)
        return logits / self.temperature

    __call__ = transform

    def state_dict(self) -> dict:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        self.temperature = V.check_positive_float(state["temperature"], "temperature")

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature:.6g})"
