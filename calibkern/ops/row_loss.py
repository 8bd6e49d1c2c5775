"""One autograd.Function for every kernel that returns per-row losses together with their gradient."""

from __future__ import annotations

import torch


class KernelRowLoss(torch.autograd.Function):
    """``loss_i = f(z_i)`` where the kernel writes ``∂loss_i/∂z_i`` during the forward pass.

    ``kernel(logits, *args) -> (loss [N], grad [N, K], *extras)``; extras (e.g. E-step statistics) are
    returned as non-differentiable outputs. Backward: ``∂L/∂z_i = grad_i · ∂L/∂loss_i`` — no recompute,
    one [N, K] buffer kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, logits, kernel, *args):
        loss, grad, *extras = kernel(logits.detach(), *args)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        ctx.n_args = len(args)
        ctx.mark_non_differentiable(*extras)
        return (loss.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        grad_logits = (grad * grad_loss.to(grad.dtype)[:, None]).to(ctx.logits_dtype)
        return (grad_logits, None) + (None,) * ctx.n_args
