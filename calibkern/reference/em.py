"""E-step responsibilities and the EM regulariser's per-row pieces (docs/math.md#em-regulariser).

``r_k = softmax_k(log π_k − log σ_k − (c − μ_k)² / (2σ_k²))`` over mixture components; sufficient
statistics ``S = Σ r``, ``C = Σ r c``, ``Q = Σ r c²``, ``R = Σ r · correct`` over kept rows.
"""

from __future__ import annotations

import torch

from .softmax import softmax_parts
from .target_loss import reduced_row_loss, target_loss


def responsibilities(conf, log_pi, mu, sigma) -> torch.Tensor:
    c = conf[:, None]
    mu, sigma = mu.to(c.dtype), sigma.to(c.dtype)
    score = log_pi.to(c.dtype) - sigma.log() - (c - mu) ** 2 / (2.0 * sigma * sigma)
    return torch.softmax(score, dim=1)


def _stats(r, conf, correct, keep) -> torch.Tensor:
    w = r.double() * keep[:, None]
    c = conf.double()[:, None]
    return torch.stack([w.sum(0), (w * c).sum(0), (w * c * c).sum(0), (w * correct.double()[:, None]).sum(0)])


def em_stats(logits, labels, log_pi, mu, sigma, ignore_index: int) -> torch.Tensor:
    _, conf, pred = softmax_parts(logits)
    keep = labels != ignore_index
    return _stats(responsibilities(conf, log_pi, mu, sigma), conf, pred == labels, keep)


def em_target_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index: int, reduction: str):
    p, conf, pred = softmax_parts(logits)
    keep = labels != ignore_index
    r = responsibilities(conf, log_pi, mu, sigma)
    loss, grad = reduced_row_loss(*target_loss(p, pred, r @ theta.to(r.dtype), keep), keep, reduction)
    return loss, grad, _stats(r, conf, pred == labels, keep)


def em_ece_grad(logits, labels, log_pi, mu, sigma, coef, ignore_index: int) -> torch.Tensor:
    """``w · c · (e_ŷ − p)`` with ``w = Σ_k r_k coef_k``: the ``ece`` form's gradient given ``∂L/∂C_k``."""
    p, conf, pred = softmax_parts(logits)
    keep = (labels != ignore_index).to(p.dtype)
    w = responsibilities(conf, log_pi, mu, sigma) @ coef.to(p.dtype)
    dc_dz = torch.nn.functional.one_hot(pred, p.shape[1]).to(p.dtype) - p
    return (w * conf * keep)[:, None] * dc_dz
