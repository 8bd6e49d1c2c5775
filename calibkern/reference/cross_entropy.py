"""In-place cross-entropy pass used by the fused linear loss, with label smoothing and the z-loss.

With ``lse_i = logsumexp(z_i)``, label smoothing ε and z-loss scale λ (docs/math.md#the-fused-linear-loss):

    loss_i = lse_i − (1 − ε) z_{i,y_i} − (ε/V) Σ_j z_ij + λ lse_i²
    ∂loss_i/∂z_i = (1 + 2λ lse_i) softmax(z_i) − (1 − ε) e_{y_i} − ε/V

(ε = λ = 0: the plain ``lse_i − z_{i,y_i}`` and ``softmax(z_i) − e_{y_i}``). Computed from ``m = max z_i`` and
``s = Σ exp(z_i − m)`` as ``log s − (1 − ε)(z_{i,y_i} − m) − (ε/V) Σ_j (z_ij − m) + λ lse_i²`` (exact even when every
logit is huge); ``z_i`` is overwritten with the gradient. Ignored rows give loss 0 and gradient 0; a kept row
holding NaN or ±inf gives loss NaN and an all-NaN gradient (docs/backends.md, "Non-finite values").
"""

from __future__ import annotations

import torch


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0,
                   lse_square_scale: float = 0.0) -> torch.Tensor:
    keep = targets != ignore_index
    finite = torch.isfinite(logits).all(dim=1)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    n_columns = logits.shape[1]
    m = logits.amax(dim=1, keepdim=True)
    z_y = logits.gather(1, safe[:, None])
    # the mean of z − max as Σ (z − max) / V: the plain sum overflows float32 at the largest finite logits
    centred_mean = ((logits - m) / n_columns).sum(dim=1, keepdim=True) if label_smoothing else 0.0
    logits.sub_(m).exp_()
    s = logits.sum(dim=1, keepdim=True)
    log_s = s.log()
    lse = m + log_s
    loss = (log_s - (1 - label_smoothing) * (z_y - m) - label_smoothing * centred_mean
            + lse_square_scale * lse * lse).squeeze(1)
    logits.div_(s)
    if lse_square_scale:
        logits.mul_(1 + 2 * lse_square_scale * lse)
    if label_smoothing:
        logits.sub_(label_smoothing / n_columns)
    logits.scatter_add_(1, safe[:, None], torch.full_like(s, label_smoothing - 1))
    nan = torch.full((), float("nan"), dtype=logits.dtype, device=logits.device)
    logits.copy_(torch.where(keep[:, None], torch.where(finite[:, None], logits, nan), 0.0))
    return torch.where(keep, torch.where(finite, loss, nan), 0.0)
