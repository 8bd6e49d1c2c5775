"""Chunked linear + cross-entropy that never holds the full ``[n, V]`` logits (Liger-style).

For the selected rows ``r`` of ``hidden`` (the supervised positions) and ``z_i = h_{r_i} Wᵀ + b``:
``loss_sum = Σ_i (logsumexp(z_i) − z_{i, y_i})``. The forward pass walks the rows in chunks; per chunk it
computes the logits, gathers the option columns ``z_i[option_ids]``, lets the backend's
``cross_entropy_`` overwrite the logits with ``∂loss_i/∂z_i = softmax(z_i) − e_{y_i}``, and accumulates
(in float32)

    grad_hidden[r_i] = g_i W,      grad_weight += gᵀ h,      grad_bias += Σ_i g_i,

so only one chunk of logits is ever alive. The option logits ``[n, K]`` are a second, differentiable
output: the calibration term's gradient arrives in backward as ``∂L/∂z[:, option_ids]`` and is added into
the same buffers (rows ``option_ids`` of ``grad_weight`` and ``grad_bias``), then everything is scaled by
``∂L/∂loss_sum`` in place — no recompute of the logits.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

MIN_CHUNK_ROWS = 128


def default_chunk_size(n_rows: int, hidden_dim: int, vocab_size: int, hidden_itemsize: int) -> int:
    """Rows per chunk such that a chunk's float32 logits are about the size of ``hidden`` in bytes.

    At least ``MIN_CHUNK_ROWS`` rows: every chunk reads and writes all of ``grad_weight`` (``V × D``) for
    ``2 · rows · V · D`` flops, so fewer rows would make that accumulation memory-bound.
    """
    rows = math.ceil(n_rows * hidden_dim * hidden_itemsize / (vocab_size * 4))
    return max(MIN_CHUNK_ROWS, rows)


def _chunks(n: int, chunk_size: int):
    return ((start, min(start + chunk_size, n)) for start in range(0, n, chunk_size))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``(loss_sum, option_logits) = f(hidden, weight, bias)`` over the rows ``rows`` of ``hidden [N, D]``.

    ``targets [n]`` are the target tokens of those rows (none ignored), ``option_ids [K]`` the columns
    returned as ``option_logits [n, K]`` (float32). ``kernels`` is a backend module with ``cross_entropy_``.
    ``grad_enabled`` is the caller's grad mode: without it no gradient is accumulated (evaluation).
    Backward may run once (the gradients are scaled in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, option_ids, chunk_size: int, kernels: ModuleType,
                ignore_index: int, grad_enabled: bool):
        acc = torch.float32
        device = hidden.device
        n, k = rows.shape[0], option_ids.shape[0]
        weight_t = weight.t()
        row_loss = torch.empty(n, dtype=acc, device=device)
        option_logits = torch.empty((n, k), dtype=acc, device=device)
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=device) if need_bias else None
        for start, end in _chunks(n, chunk_size):
            chunk_rows = rows[start:end]
            h = hidden.index_select(0, chunk_rows)
            logits = h @ weight_t if bias is None else torch.addmm(bias, h, weight_t)
            logits = logits.to(acc)
            torch.index_select(logits, 1, option_ids, out=option_logits[start:end])
            row_loss[start:end] = kernels.cross_entropy_(logits, targets[start:end], ignore_index)
            grad_logits = logits  # overwritten in place by cross_entropy_
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, chunk_rows, (grad_logits.to(weight.dtype) @ weight).to(acc))
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, grad_logits, h  # free this chunk before the next one is allocated
        ctx.save_for_backward(hidden, weight, rows, option_ids, grad_hidden, grad_weight, grad_bias)
        ctx.chunk_size = chunk_size
        ctx.used = False
        ctx.set_materialize_grads(False)
        return row_loss.sum(), option_logits

    @staticmethod
    def backward(ctx, grad_loss_sum, grad_option_logits):
        if ctx.used:
            raise RuntimeError("fused_linear_calibration_loss supports one backward pass per forward "
                               "(its gradients are scaled in place); do not use retain_graph with it")
        ctx.used = True
        hidden, weight, rows, option_ids, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        for g in (grad_hidden, grad_weight, grad_bias):
            if g is None:
                continue
            if grad_loss_sum is None:
                g.zero_()
            else:
                g.mul_(grad_loss_sum.to(g.dtype))
        if grad_option_logits is not None:
            _add_option_grad(grad_option_logits.float(), hidden, weight, rows, option_ids, ctx.chunk_size,
                             grad_hidden, grad_weight, grad_bias)
        return (_cast(grad_hidden, hidden.dtype), _cast(grad_weight, weight.dtype), _cast(grad_bias, weight.dtype),
                None, None, None, None, None, None, None)


def _cast(grad, dtype):
    return None if grad is None else grad.to(dtype)


def _add_option_grad(grad_z, hidden, weight, rows, option_ids, chunk_size, grad_hidden, grad_weight, grad_bias):
    """Add the gradient of ``z = h_rows W[option_ids]ᵀ + b[option_ids]`` given ``grad_z = ∂L/∂z [n, K]``."""
    weight_options = weight.index_select(0, option_ids).to(grad_z.dtype)
    grad_weight_options = torch.zeros_like(weight_options)
    for start, end in _chunks(rows.shape[0], chunk_size):
        chunk_rows, g = rows[start:end], grad_z[start:end]
        if grad_hidden is not None:
            grad_hidden.index_put_((chunk_rows,), g @ weight_options, accumulate=True)
        if grad_weight is not None:
            grad_weight_options.addmm_(g.t(), hidden.index_select(0, chunk_rows).to(g.dtype))
    if grad_weight is not None:
        grad_weight.index_put_((option_ids,), grad_weight_options, accumulate=True)
    if grad_bias is not None:
        grad_bias.index_put_((option_ids,), grad_z.sum(0), accumulate=True)
