"""In-place cross-entropy pass used by the fused linear loss.

``loss_i = logsumexp(z_i) − z_{i,y_i}``, computed as ``log s − (z_{i,y_i} − m)`` with ``m = max z_i`` and
``s = Σ exp(z_i − m)`` (exact even when every logit is huge); ``z_i`` is overwritten with
``∂loss_i/∂z_i = exp(z_i − m)/s − e_{y_i}``. Ignored rows give loss 0 and gradient 0; a kept row holding NaN
or ±inf gives loss NaN and an all-NaN gradient (docs/backends.md, "Non-finite values").
"""

from __future__ import annotations

import torch


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    keep = targets != ignore_index
    finite = torch.isfinite(logits).all(dim=1)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    m = logits.amax(dim=1, keepdim=True)
    z_y = logits.gather(1, safe[:, None])
    logits.sub_(m).exp_()
    s = logits.sum(dim=1, keepdim=True)
    loss = (s.log() - (z_y - m)).squeeze(1)
    logits.div_(s)
    logits.scatter_add_(1, safe[:, None], -torch.ones_like(s))
    nan = torch.full((), float("nan"), dtype=logits.dtype, device=logits.device)
    logits.copy_(torch.where(keep[:, None], torch.where(finite[:, None], logits, nan), 0.0))
    return torch.where(keep, torch.where(finite, loss, nan), 0.0)
