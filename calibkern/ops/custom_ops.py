"""The kernel contract as PyTorch custom ops (``torch.ops.calibkern.*``), so ``torch.compile`` traces a
training step through them without graph breaks. The public ops (``calibration_loss``, ``em_regularizer``,
the metrics) and the E-step call them through the :class:`KernelOp` objects of this module, which hold
their only autograd formulas. Importing :mod:`calibkern.ops` registers them (it never imports triton).

A :class:`KernelOp` called from compiled code is the custom op. Called in eager mode it runs the same body
under the same autograd formula as a plain ``autograd.Function``: the custom-op layer (argument defaults,
the compile-disable wrapper, the redispatch) costs about 80 µs of Python per call and 50 µs more in
backward (measured on CPU at N = 16), which is more than the whole kernel of a calibration term at
N = 65536.

Each op takes the backend by name (``"auto"`` picks triton for CUDA tensors, see
:func:`calibkern.backends.resolve`) and runs that backend's kernel, which stays opaque to the compiler;
``register_fake`` gives the output shapes and dtypes. Autograd:

* ``hard_bin_loss`` / ``em_target_loss``: ``loss = R(f(z_i))`` with the reduction R over kept rows of
  calibkern.reference.reduce_rows; the kernel writes ``∂loss/∂z_i`` (the mean's 1/n_kept included) in the
  forward pass, so ``∂L/∂z_i = grad_i · ∂L/∂loss`` (``∂L/∂loss_i`` per row for ``"none"``): no recompute, the
  [N, K] gradient is the saved state (the C++ node of csrc/row_grad.h hands it back uncopied when the
  graph is freed by that backward and ``∂L/∂loss`` is exactly 1);
* ``em_ece_loss``: ``L = Σ_k (S_k/N) ρ(C_k/S_k − θ_k)`` with r detached; backward is the second phase
  ``∂L/∂z_i = (Σ_k r_ik ρ'(d_k)/N) · c_i (e_ŷ − p_i)`` (``em_ece_grad``), scaled by ``∂L_out``;
* ``binned_stats``, ``metric_sums``, ``top1_rows``, ``bootstrap_stats``, ``grid_moments``, ``em_stats``,
  ``em_ece_grad`` and the in-place ``cross_entropy_`` have no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..backends import resolve

# the compiled extension, None when it was not built (then the Python autograd.Function runs every eager op)
_C = backends.get_module("cpp")._C if backends.is_available("cpp") else None


def _kernels(backend: str, logits: Tensor):
    return resolve(backend, logits.device)[1]


class KernelOp:
    """The custom op ``torch.ops.calibkern.<body's name>`` and its eager form (module docstring).

    ``fake`` gives the output shapes; ``setup_context`` and ``backward`` (both or neither) the autograd
    formula, registered on the op and used by the eager ``autograd.Function``; ``eager(body)``, where given,
    returns a faster eager form with the same formula, or None to keep the Function. Call with every
    argument positionally, ``backend`` included (the eager form fills no defaults).
    """

    def __init__(self, body, *, fake, setup_context=None, backward=None, eager=None, mutates_args=()):
        name = body.__name__
        op = torch.library.custom_op(f"calibkern::{name}", mutates_args=mutates_args)(body)
        op.register_fake(fake)
        self.op = getattr(torch.ops.calibkern, name)
        self.function = None  # the autograd.Function form (differentiable ops)
        self.eager = body     # what an eager call runs
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)

            def forward(ctx, *args):  # ctx in forward: apply then binds no argument defaults (inspect, ~60 µs)
                output = body(*args)
                setup_context(ctx, args, output)
                return output

            self.function = type(name, (torch.autograd.Function,),
                                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})
            self.eager = (eager and eager(body)) or self.function.apply

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.eager(*args)


def _float_dtype(logits: Tensor) -> torch.dtype:
    """Loss and gradient dtype: float64 for float64 logits (reference only), float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _new_rows(logits: Tensor, reduction: str = "none") -> tuple[Tensor, Tensor]:
    """Fake (loss, grad): loss [N] for reduction "none", else a scalar; grad [N, K]."""
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    return (logits.new_empty(loss_shape, dtype=_float_dtype(logits)),
            logits.new_empty(logits.shape, dtype=_float_dtype(logits)))


# ---------------------------------------------------------------- per-row target losses (differentiable)

def _save_row_grad(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.logits_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no [N, K] zeros for the non-differentiable outputs' gradients


def _row_loss_backward(ctx, grad_loss, *_):
    """``∂L/∂z = grad · ∂L/∂loss``, always a new tensor: the saved gradient stays intact for a retained graph."""
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    (grad,) = ctx.saved_tensors
    factor = grad_loss.to(grad.dtype)
    grad = grad * (factor[:, None] if factor.dim() else factor)  # reduction "none": one factor per row
    return (grad.to(ctx.logits_dtype),) + (None,) * (ctx.n_inputs - 1)


def _cpp_row_grad(body):
    """The eager form of a row-loss op when the extension is built (else None): the kernel, then, when the
    logits need a gradient, ``calibkern._C.attach_row_grad``, a C++ autograd node with
    _row_loss_backward's formula (csrc/row_grad.h): no Python runs in backward."""
    if _C is None:
        return None

    def eager(logits, *args):
        loss, *rest = body(logits, *args)
        if logits.requires_grad and torch.is_grad_enabled():
            loss = _C.attach_row_grad(logits, loss, rest[0])
        return (loss, *rest)
    return eager


def hard_bin_loss(logits: Tensor, labels: Tensor, bin_accuracy: Tensor, ignore_index: int, reduction: str = "none",
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(loss, ∂loss/∂logits [N, K]) of the hard-bin target loss (docs/math.md#cft-term), reduced over kept rows."""
    return tuple(_kernels(backend, logits).hard_bin_loss(logits, labels, bin_accuracy, ignore_index, reduction))


hard_bin_loss = KernelOp(
    hard_bin_loss, setup_context=_save_row_grad, backward=_row_loss_backward, eager=_cpp_row_grad,
    fake=lambda logits, labels, bin_accuracy, ignore_index, reduction="none", backend="auto":
        _new_rows(logits, reduction))


def em_target_loss(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, theta: Tensor,
                   ignore_index: int, reduction: str = "none", backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ∂loss/∂logits [N, K], E-step statistics float64 [4, M]) of the EM target form, reduced over kept
    rows."""
    return tuple(_kernels(backend, logits).em_target_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index,
                                                          reduction))


em_target_loss = KernelOp(
    em_target_loss, setup_context=_save_row_grad, backward=_row_loss_backward, eager=_cpp_row_grad,
    fake=lambda logits, labels, log_pi, mu, sigma, theta, ignore_index, reduction="none", backend="auto":
        (*_new_rows(logits, reduction), logits.new_empty((4, mu.shape[0]), dtype=torch.float64)))


# ---------------------------------------------------------------- EM `ece` form (differentiable, two phases)

RHOS = ("square", "smooth_abs")
SMOOTH_ABS_EPS = 1e-3


def rho(x: Tensor, kind: str) -> Tensor:
    """``x²`` or the smoothed absolute value ``√(x² + ε²) − ε``."""
    if kind == "square":
        return x * x
    return torch.sqrt(x * x + SMOOTH_ABS_EPS ** 2) - SMOOTH_ABS_EPS


def rho_prime(x: Tensor, kind: str) -> Tensor:
    if kind == "square":
        return 2.0 * x
    return x / torch.sqrt(x * x + SMOOTH_ABS_EPS ** 2)


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


def _fake_ece_loss(logits, labels, log_pi, mu, sigma, theta, ignore_index, rho_kind, backend="auto"):
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
    grad = em_ece_grad(logits, labels, log_pi, mu, sigma, scaled, ctx.ignore_index, ctx.backend)
    return (grad.to(logits.dtype),) + (None,) * 8


em_ece_loss = KernelOp(em_ece_loss, fake=_fake_ece_loss, setup_context=_save_ece_inputs, backward=_ece_backward)


# ---------------------------------------------------------------- no gradient

def em_ece_grad(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, coef: Tensor,
                ignore_index: int, backend: str = "auto") -> Tensor:
    """w · c · (e_ŷ − p) with w = Σ_k r_k coef_k, [N, K]."""
    return _kernels(backend, logits).em_ece_grad(logits, labels, log_pi, mu, sigma, coef, ignore_index)


em_ece_grad = KernelOp(em_ece_grad, fake=lambda logits, *_: _new_rows(logits)[1])


def em_stats(logits: Tensor, labels: Tensor, log_pi: Tensor, mu: Tensor, sigma: Tensor, ignore_index: int,
             backend: str = "auto") -> Tensor:
    """E-step statistics float64 [4, M]: S = Σ r, C = Σ r c, Q = Σ r c², R = Σ r · correct."""
    return _kernels(backend, logits).em_stats(logits, labels, log_pi, mu, sigma, ignore_index)


em_stats = KernelOp(em_stats, fake=lambda logits, labels, log_pi, mu, *_:
                    logits.new_empty((4, mu.shape[0]), dtype=torch.float64))


def binned_stats(logits: Tensor, labels: Tensor, n_bins: int, temperature: float, ignore_index: int,
                 classwise: bool, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(counts int64, Σ conf float64, Σ correct float64), [M] or [K, M] (classwise), and n_nonfinite (int64,
    0-dim): kept rows whose scaled logits hold NaN or ±inf are left out of the bins and counted."""
    return tuple(_kernels(backend, logits).binned_stats(logits, labels, n_bins, temperature, ignore_index,
                                                        classwise))


def _fake_binned_stats(logits, labels, n_bins, temperature, ignore_index, classwise, backend="auto"):
    shape = (logits.shape[1], n_bins) if classwise else (n_bins,)
    return (logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float64),
            logits.new_empty(shape, dtype=torch.float64), logits.new_empty((), dtype=torch.int64))


binned_stats = KernelOp(binned_stats, fake=_fake_binned_stats)


def metric_sums(logits: Tensor, labels: Tensor, n_bins: int, temperature: float, ignore_index: int, classwise: bool,
                backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """binned_stats' top-1 (counts, Σ conf, Σ correct, n_nonfinite), ``[Σ NLL, Σ Brier]`` float64 [2] over the
    kept finite rows (docs/math.md#proper-scores), and the classwise (counts, Σ p, Σ correct) [K, M] —
    [0, M] unless ``classwise`` — from one read of each row."""
    return tuple(_kernels(backend, logits).metric_sums(logits, labels, n_bins, temperature, ignore_index, classwise))


def _fake_metric_sums(logits, labels, n_bins, temperature, ignore_index, classwise, backend="auto"):
    class_shape = (logits.shape[1] if classwise else 0, n_bins)
    return (*_fake_binned_stats(logits, labels, n_bins, temperature, ignore_index, False),
            logits.new_empty((2,), dtype=torch.float64), logits.new_empty(class_shape, dtype=torch.int64),
            logits.new_empty(class_shape, dtype=torch.float64), logits.new_empty(class_shape, dtype=torch.float64))


metric_sums = KernelOp(metric_sums, fake=_fake_metric_sums)


def top1_rows(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
              backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(confidence [N], correct bool [N]) per row: ``c = 1/s`` and ``ŷ = y``. The confidence is float32 (float64
    for float64 logits); ignored rows get 0 and False, kept rows whose scaled logits hold NaN or ±inf NaN and
    False."""
    return tuple(_kernels(backend, logits).top1_rows(logits, labels, temperature, ignore_index))


top1_rows = KernelOp(top1_rows, fake=lambda logits, *_: (logits.new_empty(logits.shape[0], dtype=_float_dtype(logits)),
                                                         logits.new_empty(logits.shape[0], dtype=torch.bool)))


def bootstrap_stats(confidence: Tensor, correct: Tensor, n_bins: int, n_boot: int, seed: int,
                    backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(counts int64, Σ w c float64, Σ w · correct float64), each [n_boot, M], of Poisson replicates of the rows
    (``confidence`` [n], ``correct`` bool [n]) with the counter-based weights of calibkern.reference.bootstrap."""
    return tuple(_kernels(backend, confidence).bootstrap_stats(confidence, correct, n_bins, n_boot, seed))


def _fake_bootstrap_stats(confidence, correct, n_bins, n_boot, seed, backend="auto"):
    return (confidence.new_empty((n_boot, n_bins), dtype=torch.int64),
            confidence.new_empty((n_boot, n_bins), dtype=torch.float64),
            confidence.new_empty((n_boot, n_bins), dtype=torch.float64))


bootstrap_stats = KernelOp(bootstrap_stats, fake=_fake_bootstrap_stats)


def grid_moments(confidence: Tensor, correct: Tensor, cells: int, backend: str = "auto") -> Tensor:
    """float64 [cells, 4]: per cell ``j = min(⌊c · cells⌋, cells − 1)`` the sums of ``(1, c, r, c · r)``,
    ``r = c − correct``, over the rows (``confidence`` [n] in [0, 1], ``correct`` bool [n]; the smooth ECE's
    grid, calibkern.reference.smooth_grid)."""
    return _kernels(backend, confidence).grid_moments(confidence, correct, cells)


grid_moments = KernelOp(grid_moments, fake=lambda confidence, correct, cells, *_: confidence.new_empty(
    (cells, 4), dtype=torch.float64))


def cross_entropy_(logits: Tensor, targets: Tensor, ignore_index: int, backend: str = "auto",
                   label_smoothing: float = 0.0, lse_square_scale: float = 0.0) -> Tensor:
    """Per-row cross-entropy [n] with label smoothing and the z-loss; logits are overwritten with its gradient
    (softmax − one-hot without them; 0 for ignored rows; calibkern/reference/cross_entropy.py)."""
    return _kernels(backend, logits).cross_entropy_(logits, targets, ignore_index, label_smoothing, lse_square_scale)


cross_entropy_ = KernelOp(cross_entropy_, mutates_args=("logits",),
                          fake=lambda logits, *_: logits.new_empty(logits.shape[0], dtype=torch.float32))
