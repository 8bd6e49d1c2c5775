"""The kernel contract as PyTorch custom ops (``torch.ops.calibkern.*``), so ``torch.compile`` traces a
training step through them without graph breaks. The public differentiable ops (``calibration_loss``,
``em_regularizer``) and the E-step run through these ops: this module holds their only autograd formulas.
Importing :mod:`calibkern.ops` registers them (it never imports triton).

Each op takes the backend by name (``"auto"`` picks triton for CUDA tensors, see
:func:`calibkern.backends.resolve`) and runs that backend's kernel, which stays opaque to the compiler;
``register_fake`` gives the output shapes and dtypes. Autograd:

* ``hard_bin_loss`` / ``em_target_loss``: ``loss = R(f(z_i))`` with the reduction R over kept rows of
  calibkern.reference.reduce_rows; the kernel writes ``∂loss/∂z_i`` (the mean's 1/n_kept included) in the
  forward pass, so ``∂L/∂z_i = grad_i · ∂L/∂loss`` (``∂L/∂loss_i`` per row for ``"none"``): no recompute, the
  [N, K] gradient is the saved state, and a scalar ``∂L/∂loss`` that is exactly 1 on the CPU hands it back
  as it is (no copy);
* ``em_ece_loss``: ``L = Σ_k (S_k/N) ρ(C_k/S_k − θ_k)`` with r detached; backward is the second phase
  ``∂L/∂z_i = (Σ_k r_ik ρ'(d_k)/N) · c_i (e_ŷ − p_i)`` (``em_ece_grad``), scaled by ``∂L_out``;
* ``binned_stats``, ``em_stats``, ``em_ece_grad`` and the in-place ``cross_entropy_`` have no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import resolve
from .em import rho, rho_prime


def _kernels(backend: str, logits: Tensor):
    return resolve(backend, logits.device)[1]


def _float_dtype(logits: Tensor) -> torch.dtype:
    """Loss and gradient dtype: float64 for float64 logits (reference only), float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _new_rows(logits: Tensor, reduction: str = "none") -> tuple[Tensor, Tensor]:
    """Fake (loss, grad): loss [N] for reduction "none", else a scalar; grad [N, K]."""
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    return (logits.new_empty(loss_shape, dtype=_float_dtype(logits)),
            logits.new_empty(logits.shape, dtype=_float_dtype(logits)))


# ---------------------------------------------------------------- per-row target losses (differentiable)

@torch.library.custom_op("calibkern::hard_bin_loss", mutates_args=())
def hard_bin_loss(logits: Tensor, labels: Tensor, bin_accuracy: Tensor, ignore_index: int, reduction: str = "none",
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(loss, ∂loss/∂logits [N, K]) of the hard-bin target loss (SPEC §4.2), reduced over kept rows."""
    return tuple(_kernels(backend, logits).hard_bin_loss(logits, labels, bin_accuracy, ignore_index, reduction))


@hard_bin_loss.register_fake
def _(logits, labels, bin_accuracy, ignore_index, reduction="none", backend="auto"):
    return _new_rows(logits, reduction)


@torch.library.custom_op("calibkern::em_target_loss", mutates_args=())
def em_target_loss(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, theta: Tensor,
                   ignore_index: int, reduction: str = "none", backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ∂loss/∂logits [N, K], E-step statistics float64 [4, M]) of the EM target form, reduced over kept
    rows."""
    return tuple(_kernels(backend, logits).em_target_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index,
                                                          reduction))


@em_target_loss.register_fake
def _(logits, labels, log_pi, mu, sigma, theta, ignore_index, reduction="none", backend="auto"):
    return (*_new_rows(logits, reduction), logits.new_empty((4, mu.shape[0]), dtype=torch.float64))


def _save_row_grad(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.logits_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no [N, K] zeros for the non-differentiable outputs' gradients


def _row_loss_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    (grad,) = ctx.saved_tensors
    if grad_loss.dim():  # reduction "none": one factor per row
        grad = grad * grad_loss.to(grad.dtype)[:, None]
    elif not _is_one(grad_loss):
        grad = grad * grad_loss.to(grad.dtype)
    return (grad.to(ctx.logits_dtype),) + (None,) * (ctx.n_inputs - 1)


def _is_one(x: Tensor) -> bool:
    """Whether a 0-dim CPU tensor is exactly 1: a host read that waits on no device, never while compiling.
    Handing the saved gradient back uncopied is safe: autograd copies it when the graph is retained."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and x.item() == 1


hard_bin_loss.register_autograd(_row_loss_backward, setup_context=_save_row_grad)
em_target_loss.register_autograd(_row_loss_backward, setup_context=_save_row_grad)


# ---------------------------------------------------------------- EM `ece` form (differentiable, two phases)

@torch.library.custom_op("calibkern::em_ece_loss", mutates_args=())
def em_ece_loss(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, theta: Tensor,
                ignore_index: int, rho_kind: str, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(L scalar, E-step statistics float64 [4, M], coef float64 [M] = ρ'(d_k)/N) — phase one."""
    stats = _kernels(backend, logits).em_stats(logits, labels, log_pi, mu, sigma, ignore_index)
    s, c = stats[0], stats[1]
    n = s.sum().clamp_min(1.0)
    filled = s > 0
    d = torch.where(filled, c / s.clamp_min(1e-300) - theta.double(), torch.zeros_like(s))
    loss = (s / n * rho(d, rho_kind)).sum().to(_float_dtype(logits))
    coef = torch.where(filled, rho_prime(d, rho_kind) / n, torch.zeros_like(s))
    return loss, stats, coef


@em_ece_loss.register_fake
def _(logits, labels, log_pi, mu, sigma, theta, ignore_index, rho_kind, backend="auto"):
    m = mu.shape[0]
    return (logits.new_empty((), dtype=_float_dtype(logits)), logits.new_empty((4, m), dtype=torch.float64),
            logits.new_empty((m,), dtype=torch.float64))


def _save_ece_inputs(ctx, inputs, output):
    logits, labels, log_pi, mu, sigma, _, ignore_index, _, backend = inputs
    ctx.save_for_backward(logits, labels, log_pi, mu, sigma, output[2])
    ctx.ignore_index, ctx.backend = ignore_index, backend
    ctx.mark_non_differentiable(*output[1:])


def _ece_backward(ctx, grad_loss, *_):
    logits, labels, log_pi, mu, sigma, coef = ctx.saved_tensors
    scaled = (coef * grad_loss.double()).to(_float_dtype(logits))
    grad = torch.ops.calibkern.em_ece_grad(logits, labels, log_pi, mu, sigma, scaled, ctx.ignore_index,
                                           ctx.backend)
    return (grad.to(logits.dtype),) + (None,) * 8


em_ece_loss.register_autograd(_ece_backward, setup_context=_save_ece_inputs)


# ---------------------------------------------------------------- no gradient

@torch.library.custom_op("calibkern::em_ece_grad", mutates_args=())
def em_ece_grad(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, coef: Tensor,
                ignore_index: int, backend: str = "auto") -> Tensor:
    """w · c · (e_ŷ − p) with w = Σ_k r_k coef_k, [N, K]."""
    return _kernels(backend, logits).em_ece_grad(logits, labels, log_pi, mu, sigma, coef, ignore_index)


@em_ece_grad.register_fake
def _(logits, labels, log_pi, mu, sigma, coef, ignore_index, backend="auto"):
    return _new_rows(logits)[1]


@torch.library.custom_op("calibkern::em_stats", mutates_args=())
def em_stats(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, ignore_index: int,
             backend: str = "auto") -> Tensor:
    """E-step statistics float64 [4, M]: S = Σ r, C = Σ r c, Q = Σ r c², R = Σ r · correct."""
    return _kernels(backend, logits).em_stats(logits, labels, log_pi, mu, sigma, ignore_index)


@em_stats.register_fake
def _(logits, labels, log_pi, mu, sigma, ignore_index, backend="auto"):
    return logits.new_empty((4, mu.shape[0]), dtype=torch.float64)


@torch.library.custom_op("calibkern::binned_stats", mutates_args=())
def binned_stats(logits: Tensor, labels: Tensor, n_bins: int, temperature: float, ignore_index: int,
                 classwise: bool, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(counts int64, Σ conf float64, Σ correct float64), [M] or [K, M] (classwise), and n_nonfinite (int64,
    0-dim): kept rows whose scaled logits hold NaN or ±inf are left out of the bins and counted."""
    return tuple(_kernels(backend, logits).binned_stats(logits, labels, n_bins, temperature, ignore_index,
                                                        classwise))


@binned_stats.register_fake
def _(logits, labels, n_bins, temperature, ignore_index, classwise, backend="auto"):
    shape = (logits.shape[1], n_bins) if classwise else (n_bins,)
    return (logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float64),
            logits.new_empty(shape, dtype=torch.float64), logits.new_empty((), dtype=torch.int64))


@torch.library.custom_op("calibkern::cross_entropy_", mutates_args=("logits",))
def cross_entropy_(logits: Tensor, targets: Tensor, ignore_index: int, backend: str = "auto") -> Tensor:
    """Per-row cross-entropy [n]; logits are overwritten with softmax − one-hot (0 for ignored rows)."""
    return _kernels(backend, logits).cross_entropy_(logits, targets, ignore_index)


@cross_entropy_.register_fake
def _(logits, targets, ignore_index, backend="auto"):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
