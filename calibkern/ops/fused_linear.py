"""Chunked linear + cross-entropy that never holds the full ``[n, V]`` logits (Liger-style).

For the selected rows ``r`` of ``hidden`` (the supervised positions), ``h = hidden[r]`` (``[n, D]``, the
only rows ever multiplied) and ``z_i = h_i Wᵀ + b`` (soft-capped, ``z ← c tanh(z / c)``, when ``softcap`` is
given; its slope ``1 − tanh²`` multiplies the chunk's gradient): ``loss_sum = Σ_i (logsumexp(z_i) − z_{i, y_i})``. The
forward pass walks the rows in chunks; per chunk it computes the logits, lets the backend's
``cross_entropy_`` overwrite them with ``g_i = ∂loss_i/∂z_i = softmax(z_i) − e_{y_i}``, and accumulates
(in float32)

    grad_h[i] = g_i W,      grad_weight += gᵀ h,      grad_bias += Σ_i g_i,

so only one chunk of logits is ever alive. The option logits ``z[:, option_ids] = h W[option_ids]ᵀ +
b[option_ids]`` (``[n, K]``) are a second, differentiable output: the calibration term's gradient arrives
in backward as ``∂L/∂z[:, option_ids]`` and is added into the same buffers, everything is scaled by
``∂L/∂loss_sum`` in place (no recompute of the logits), and ``grad_h`` is scattered to the rows ``r``.

With ``token`` (calibkern.ops.token_stats.TokenStatistics) each chunk's ``g`` is also read for the token and
Full-ECE statistics, and the token calibration term's gradient is folded into it; the loss output is then
``s · loss_sum + λ · cal_sum`` and ``(loss_sum, cal_sum, statistics…)`` follow as non-differentiable outputs.

With ``shard`` (calibkern.ops.vocab_parallel.VocabShard) ``weight`` and ``bias`` are this rank's rows of a
vocabulary split over a process group: the chunk's cross-entropy is the Python path of
calibkern.ops.vocab_parallel (the backend kernels normalise over the columns they see), the option logits are
all-reduced (each rank contributes the columns it holds), ``grad_weight`` / ``grad_bias`` stay local and
``grad_h`` is all-reduced in backward.
"""

from __future__ import annotations

import math

import torch

from . import custom_ops, vocab_parallel
from .token_stats import TokenStatistics
from .vocab_parallel import VocabShard, option_bias, option_weight

MIN_CHUNK_ROWS = 512


def default_chunk_size(n_rows: int, hidden_dim: int, vocab_size: int, hidden_itemsize: int) -> int:
    """Rows per chunk such that a chunk's float32 logits are about the size of ``hidden`` in bytes.

    At least ``MIN_CHUNK_ROWS`` rows: every chunk reads and writes all of ``grad_weight`` (``V × D``) for
    only ``2 · rows · V · D`` flops. Measured on CPU (N = 4096, D = 1024, V = 32000, one thread): 131-row
    chunks took 1.4× as long as 512-row chunks, which matched eager full logits.
    """
    rows = math.ceil(n_rows * hidden_dim * hidden_itemsize / (vocab_size * 4))
    return max(MIN_CHUNK_ROWS, rows)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``(loss_sum, option_logits) = f(hidden, weight, bias)`` over the rows ``rows`` of ``hidden [N, D]``.

    ``targets [n]`` are the target tokens of those rows (an ignored one, as under ``torch.compile`` where
    every position is a row, gives loss 0 and gradient 0), ``option_ids [K]`` the columns returned as
    ``option_logits [n, K]`` (float32, not soft-capped: the caller caps them with autograd). ``backend``
    names the backend whose ``cross_entropy_`` runs, through its custom op (calibkern/ops/custom_ops.py).
    ``grad_enabled`` is the caller's grad mode: without it no gradient is accumulated (evaluation).
    ``token`` (a :class:`~calibkern.ops.token_stats.TokenStatistics`, or None) reads each chunk's gradient for
    the token statistics and folds the token term into it; its sums follow the two outputs. ``shard``: the
    vocabulary split of ``weight`` (module docstring), None for a whole weight. ``ce_options``: the
    cross-entropy's ``(label_smoothing, lse_square_scale)``, applied by the kernel
    (calibkern/reference/cross_entropy.py).
    Backward may run once (the gradients are scaled in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, option_ids, chunk_size: int, backend: str,
                ignore_index: int, grad_enabled: bool, softcap: float | None = None,
                token: TokenStatistics | None = None, shard: VocabShard | None = None,
                ce_options: tuple[float, float] = (0.0, 0.0)):
        acc, device = torch.float32, hidden.device
        h_rows = hidden.index_select(0, rows)
        n, dim = h_rows.shape
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_rows = torch.empty((n, dim), dtype=acc, device=device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=device) if need_bias else None
        weight_t = weight.t()
        row_losses = []
        for start in range(0, n, chunk_size):
            h = h_rows[start:start + chunk_size]
            logits, cap_slope = chunk_logits(h, weight_t, bias, acc, softcap)
            chunk_targets = targets[start:start + chunk_size]
            prediction = None if token is None else token.predict(logits, chunk_targets, ignore_index, shard)
            label_grad = None
            if shard is None:
                row_losses.append(custom_ops.cross_entropy_(logits, chunk_targets, ignore_index, backend,
                                                            *ce_options))
            else:
                row_loss, label_grad = vocab_parallel.cross_entropy_(logits, chunk_targets, ignore_index, shard,
                                                                      *ce_options)
                row_losses.append(row_loss)
            grad_logits = logits  # overwritten in place by cross_entropy_
            if token is not None:
                token.update_(grad_logits, chunk_targets, ignore_index, fold=need_hidden or need_weight or need_bias,
                              prediction=prediction, shard=shard, label_grad=label_grad)
            if cap_slope is not None:
                grad_logits.mul_(cap_slope)
                del cap_slope
            if grad_rows is not None:
                grad_rows[start:start + chunk_size] = grad_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, grad_logits  # free this chunk before the next one is allocated
        loss_sum = torch.cat(row_losses).sum() if row_losses else torch.zeros((), dtype=acc, device=device)
        weight_options = option_weight(weight, option_ids, shard)
        option_logits = (h_rows @ weight_options.t() if bias is None
                         else torch.addmm(option_bias(bias, option_ids, shard), h_rows, weight_options.t())).to(acc)
        option_columns = option_ids
        if shard is not None:
            shard.all_reduce_(option_logits)
            option_columns, option_owned = shard.local(option_ids)
            ctx.option_owned = option_owned
        ctx.save_for_backward(h_rows, weight_options, rows, option_columns, grad_rows, grad_weight, grad_bias)
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        ctx.shard = shard
        ctx.used = False
        ctx.set_materialize_grads(False)
        if token is None:
            return loss_sum, option_logits
        extras = (loss_sum.clone(), *token.outputs(shard))
        if token.term:
            loss_sum = token.sft_weight * loss_sum + token.lam * token.cal_sum
        ctx.mark_non_differentiable(*extras)
        return (loss_sum, option_logits, *extras)

    @staticmethod
    def backward(ctx, grad_loss_sum, grad_option_logits, *_):
        if ctx.used:
            raise RuntimeError("fused_linear_calibration_loss supports one backward pass per forward "
                               "(its gradients are scaled in place); do not use retain_graph with it")
        ctx.used = True
        h_rows, weight_options, rows, option_columns, grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        for g in (grad_rows, grad_weight, grad_bias):
            if g is None:
                continue
            if grad_loss_sum is None:
                g.zero_()
            else:
                g.mul_(grad_loss_sum.to(g.dtype))
        if grad_option_logits is not None:
            grad_z = grad_option_logits.float()
            if grad_rows is not None:  # weight_options: zero rows for the options another rank holds
                grad_rows.addmm_(grad_z, weight_options.float())
            if ctx.shard is not None:
                grad_z = grad_z * ctx.option_owned  # the columns of the options this rank holds
            if grad_weight is not None:
                grad_weight.index_put_((option_columns,), grad_z.t() @ h_rows.float(), accumulate=True)
            if grad_bias is not None:
                grad_bias.index_put_((option_columns,), grad_z.sum(0), accumulate=True)
        grad_hidden = None
        if grad_rows is not None and ctx.shard is not None:
            ctx.shard.all_reduce_(grad_rows)  # Σ_r G^r W_r: every rank's columns
        if grad_rows is not None:
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=grad_rows.device)
            grad_hidden.index_copy_(0, rows, grad_rows.to(ctx.hidden_dtype))
        return (grad_hidden, _cast(grad_weight, ctx.weight_dtype), _cast(grad_bias, ctx.weight_dtype),
                None, None, None, None, None, None, None, None, None, None, None)


def chunk_logits(h, weight_t, bias, dtype, softcap):
    """``(z, dz/d(h Wᵀ + b))`` of one chunk: ``z = h Wᵀ + b`` in ``dtype``, soft-capped in place as
    ``z = c tanh(z / c)`` with slope ``1 − tanh²(z / c)`` when ``softcap`` is a number (slope None otherwise)."""
    logits = (h @ weight_t if bias is None else torch.addmm(bias, h, weight_t)).to(dtype)
    if softcap is None:
        return logits, None
    capped = logits.div_(softcap).tanh_()
    cap_slope = 1.0 - capped * capped
    return capped.mul_(softcap), cap_slope


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``c · tanh(z / c)`` (the identity for ``c = None``), differentiable."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _cast(grad, dtype):
    return None if grad is None else grad.to(dtype)
