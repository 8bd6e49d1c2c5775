"""In-place cross-entropy pass used by the fused linear loss.

``loss_i = logsumexp(z_i) − z_{i,y_i}``; ``z_i`` is overwritten with ``∂loss_i/∂z_i = softmax(z_i) − e_{y_i}``.
Ignored rows give loss 0 and gradient 0.
"""

from __future__ import annotations

import torch


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=1)
    loss = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep
    logits.sub_(lse[:, None]).exp_()
    logits.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
    logits.mul_(keep[:, None])
    return loss
