"""Baselines written the way the published CFT reference code computes its loss (benchmarks/RESULTS.md).

These are deliberately *not* how calibkern works; they are what a user starting from the paper's code runs.
The hard-bin term there (docs/math.md#cft-term, the ``official_compat`` form) is computed with:

* a Python loop over the M bins, a boolean mask per bin over the batch, and a host read
  (``mask.sum().item()``) per bin to skip empty bins — M device-to-host synchronisations per call;
* per bin: the bin's max confidences and its non-max probabilities sorted in descending order, the targets
  ``t_(r) = (1 − a)(1 + tanh(γ q_(r))) / ((K − 1) + Σ_s tanh(γ q_(s)))`` with
  ``γ = ln(K − 1) / (q_(2) (1 − a))`` (0 when a = 1), gradients flowing through the targets;
* ``loss_k = (Σ (c − a)² + Σ (q − t)²) / N⁰_k`` accumulated in float64, the top bin [1 − 1/M, 1] skipped.

The value equals ``calibkern.calibration_loss(..., official_compat=True)`` (tested in
benchmarks/test_bench_losses.py). The training step built on it (forward pass twice per step, full logits)
is in benchmarks/bench_trainer.py.
"""

from __future__ import annotations

import math

import torch


def reference_style_calibration_loss(option_logits: torch.Tensor, bin_accuracy: torch.Tensor,
                                     bin_counts: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """Hard-bin calibration term over ``option_logits [N, K]`` with a per-bin Python loop (module docstring)."""
    probs = torch.softmax(option_logits.float(), dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    max_conf, not_max = sorted_probs[:, 0], sorted_probs[:, 1:]
    bins = torch.floor(max_conf.detach() * n_bins).long().clamp(0, n_bins - 1)
    n_classes = option_logits.shape[1]
    loss = torch.zeros((), dtype=torch.float64, device=option_logits.device)
    for k in range(n_bins - 1):
        mask = bins == k
        if mask.sum().item() == 0:
            continue
        accuracy = bin_accuracy[k]
        group_max, group_not_max = max_conf[mask], not_max[mask]
        targets = _not_max_targets(accuracy, group_not_max, n_classes)
        loss_k = (torch.square(group_max - accuracy).to(torch.float64).sum()
                  + torch.square(group_not_max - targets).to(torch.float64).sum())
        loss = loss + loss_k / bin_counts[k]
    return loss


def _not_max_targets(accuracy: torch.Tensor, not_max: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Order-preserving targets for the sorted non-max probabilities ``[n, K − 1]``, summing to ``1 − a``."""
    if accuracy.item() == 1.0:
        return torch.zeros_like(not_max)
    gamma = math.log(n_classes - 1) / not_max[:, :1] / (1.0 - accuracy)
    u = torch.tanh(gamma * not_max)
    return (1.0 - accuracy) * (1.0 + u) / ((n_classes - 1) + u.sum(dim=-1, keepdim=True))
