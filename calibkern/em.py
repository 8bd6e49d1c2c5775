"""EM-estimated ECE regulariser state for RCFT (docs/math.md#em-regulariser).

A mixture of M calibration components over the confidence: weights ``π_k``, means ``μ_k``, widths
``σ_k`` and per-component accuracies ``θ_k``; initialised at the equal-width bin centres,
``σ_k = 1/(2M)``, uniform ``π``, ``θ_k = μ_k``.

* E-step (:meth:`EMState.estep`, or the regulariser's own pass with ``accumulate=True``): responsibilities
  ``r_ik`` and the statistics ``S_k = Σ r``, ``C_k = Σ r c``, ``Q_k = Σ r c²``, ``R_k = Σ r · correct``,
  added to an accumulator.
* M-step (:meth:`EMState.mstep`): the accumulator is all-reduced over ranks, folded into the running
  statistics — replaced (``refresh="epoch"``: one full pass per epoch, an exact EM iteration) or
  ``running ← β·running + (1−β)·batch`` (``refresh="stream"``) — and then
  ``π_k ∝ S̄_k``, ``μ_k = C̄_k/S̄_k``, ``σ_k² = max(Q̄_k/S̄_k − μ_k², σ_min²)`` with ``σ_min = 1/(4M)``,
  ``θ_k = (R̄_k + a₀)/(S̄_k + a₀ + b₀)``. ``fixed_components=True`` keeps μ, σ, π (soft binning).
  An empty component (``S̄_k ≤ 1e-8 · Σ S̄``) keeps its μ and σ and gets weight ``1e-8 · Σ S̄`` so it can be revived.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _validate as V
from .ops import em as em_ops
from .ops._dispatch import prepare
from .reference.target_loss import REDUCTIONS

EMPTY_MASS = 1e-8
"""A component is empty when ``S̄_k ≤ EMPTY_MASS · Σ S̄`` (at most 1e-8 of the rows' mass, the weight it is floored
at): it keeps μ and σ. The E-step's last digits (float32 rounding, subnormal or floored responsibilities of far
components, which differ between backends) never move a component."""
REFRESH_MODES = ("epoch", "stream")
FORMS = ("target", "ece")
_PARAMS = ("pi", "mu", "sigma", "theta")
_STATS = ("accum", "running")


class EMState:
    """Mixture parameters, accumulated and running E-step statistics; ``state_dict`` round-trips exactly."""

    def __init__(self, n_components=10, refresh="epoch", momentum=0.9, prior=(1.0, 1.0), fixed_components=False):
        self.n_components = V.check_n_bins(n_components, "n_components")
        self.refresh = V.check_choice(refresh, "refresh", REFRESH_MODES)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.prior = check_prior(prior)
        self.fixed_components = bool(fixed_components)
        m = self.n_components
        self.sigma_min = 1.0 / (4 * m)
        centres = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        self.pi = torch.full((m,), 1.0 / m, dtype=torch.float64)
        self.mu = centres.clone()
        self.sigma = torch.full((m,), 1.0 / (2 * m), dtype=torch.float64)
        self.theta = centres.clone()
        self.accum = torch.zeros(4, m, dtype=torch.float64)
        self.running = torch.zeros(4, m, dtype=torch.float64)
        self.n_msteps = torch.zeros((), dtype=torch.int64)

    # -- parameters as the kernels take them -------------------------------------------------------------
    def to(self, device) -> "EMState":
        for name in _PARAMS + _STATS + ("n_msteps",):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def kernel_params(self, device):
        """``(log π, μ, σ, θ)`` as float32 on ``device``."""
        if self.pi.device != torch.device(device):
            self.to(device)
        return tuple(t.float().contiguous() for t in (self.pi.log(), self.mu, self.sigma, self.theta))

    # -- E-step -----------------------------------------------------------------------------------------
    def accumulate(self, stats: torch.Tensor) -> None:
        """Add E-step statistics [4, M] (rows S, C, Q, R) to the accumulator."""
        self.accum += stats.to(self.accum.device, torch.float64)

    @torch.no_grad()
    def estep(self, option_logits, labels, *, ignore_index=-100, nonfinite="error", backend=None) -> torch.Tensor:
        """Accumulate the responsibilities' statistics of one batch (no gradient); returns them."""
        rows = prepare(option_logits, labels, ignore_index=ignore_index, nonfinite=nonfinite, backend=backend,
                       logits_name="option_logits")
        log_pi, mu, sigma, _ = self.kernel_params(rows.logits.device)
        stats = em_ops.em_stats(rows, log_pi, mu, sigma, ignore_index)
        self.accumulate(stats)
        return stats

    # -- M-step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def mstep(self, group=None) -> None:
        """All-reduce the accumulator over ranks, fold it into the running statistics, update, reset."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.accum, op=dist.ReduceOp.SUM, group=group)
        if self.refresh == "epoch":
            self.running = self.accum.clone()
        else:
            beta = torch.where(self.n_msteps > 0, self.momentum, 0.0).to(torch.float64)
            self.running = beta * self.running + (1.0 - beta) * self.accum
        self.accum.zero_()
        self.n_msteps += 1

        s, c, q, r = self.running
        a0, b0 = self.prior
        self.theta = (r + a0) / (s + a0 + b0)
        if self.fixed_components:
            return
        total = s.sum()
        filled = s > EMPTY_MASS * total
        safe_s = torch.where(filled, s, torch.ones_like(s))
        self.pi = torch.where(total > 0, torch.maximum(s, EMPTY_MASS * total) / total.clamp_min(1e-300), self.pi)
        self.pi = self.pi / self.pi.sum()
        mu = torch.where(filled, c / safe_s, self.mu)
        var = torch.where(filled, q / safe_s - mu * mu, self.sigma ** 2)
        self.mu = mu
        self.sigma = torch.sqrt(var.clamp_min(self.sigma_min ** 2))

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in _PARAMS + _STATS + ("n_msteps",)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; every value is checked (:func:`check_state`) before any is set."""
        loaded = {}
        for name in _PARAMS + _STATS + ("n_msteps",):
            if name not in state:
                raise KeyError(f"EMState.load_state_dict: missing {name!r}")
            current = getattr(self, name)
            value = torch.as_tensor(state[name])
            if value.shape != current.shape:
                raise ValueError(f"EMState.load_state_dict: {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(current.shape)} (n_components={self.n_components})")
            loaded[name] = value.to(current.device, current.dtype).clone()
        check_state(loaded, "EMState.load_state_dict")
        for name, value in loaded.items():
            setattr(self, name, value)


def check_prior(prior) -> tuple[float, float]:
    """The Beta prior ``(a0, b0)`` of θ: two finite numbers ≥ 0 with ``a0 + b0 > 0``, so that
    ``θ_k = (R̄_k + a0)/(S̄_k + a0 + b0)`` is defined for a component with no mass."""
    if isinstance(prior, (str, bytes)) or not hasattr(prior, "__len__") or len(prior) != 2 \
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in prior):
        raise TypeError(f"prior must be two numbers (a0, b0), got {prior!r}")
    a0, b0 = float(prior[0]), float(prior[1])
    if not (math.isfinite(a0) and math.isfinite(b0) and a0 >= 0 and b0 >= 0 and a0 + b0 > 0):
        raise ValueError(f"prior must be two finite numbers (a0, b0) ≥ 0 with a0 + b0 > 0, got {prior!r}")
    return a0, b0


def check_state(state: dict, where: str) -> None:
    """Values an :class:`EMState` can hold: π ≥ 0 with a positive sum, μ and θ in [0, 1], σ > 0, finite
    statistics with S, Q ≥ 0, and a count of M-steps ≥ 0. Raises ``ValueError`` naming the entry."""
    def bad(name, what):
        raise ValueError(f"{where}: {name!r} must hold {what}")

    for name in _PARAMS + _STATS:
        if not torch.isfinite(state[name]).all():
            bad(name, "finite values")
    if (state["pi"] < 0).any() or not state["pi"].sum() > 0:
        bad("pi", "weights ≥ 0 with a positive sum")
    for name in ("mu", "theta"):
        if ((state[name] < 0) | (state[name] > 1)).any():
            bad(name, "values in [0, 1]")
    if not (state["sigma"] > 0).all():
        bad("sigma", "widths > 0")
    for name in _STATS:
        if (state[name][0] < 0).any() or (state[name][2] < 0).any():
            bad(name, "statistics with S = Σ r ≥ 0 and Q = Σ r c² ≥ 0 (rows S, C, Q, R)")
    if state["n_msteps"] < 0:
        bad("n_msteps", "a count ≥ 0")


def em_regularizer(option_logits, labels, state: EMState, *, form="target", rho=None, reduction="mean",
                   accumulate=False, ignore_index=-100, nonfinite="error", backend=None) -> torch.Tensor:
    """The EM-estimated ECE regulariser (docs/math.md#em-regulariser), differentiable with respect to ``option_logits``.

    ``form="target"``: ``L_i = (c_i − t_i)² + Σ_r (q_(r) − t_(r))²`` with ``t_i = Σ_k r_ik θ_k``, reduced by
    ``reduction`` over kept rows. ``form="ece"``: ``L = Σ_k (S_k/N) ρ(C_k/S_k − θ_k)`` (a batch scalar;
    ``rho`` is ``"square"``, the default, or ``"smooth_abs"``; the target form takes no ``rho``). With
    ``accumulate=True`` the pass's E-step statistics are added to ``state`` (no second pass).
    """
    if not isinstance(state, EMState):
        raise TypeError(f"state must be a calibkern.EMState, got {type(state).__name__}")
    V.check_choice(form, "form", FORMS)
    if form == "target" and rho is not None:
        raise ValueError("rho applies to form='ece'; form='target' is a squared loss")
    rho = V.check_choice("square" if rho is None else rho, "rho", em_ops.RHOS)
    rows = prepare(option_logits, labels, ignore_index=ignore_index, nonfinite=nonfinite, backend=backend,
                   logits_name="option_logits", row_loss=form == "target")
    log_pi, mu, sigma, theta = state.kernel_params(rows.logits.device)
    if form == "target":
        V.check_choice(reduction, "reduction", REDUCTIONS)
        loss, stats = em_ops.em_target_rows(rows, log_pi, mu, sigma, theta, ignore_index, reduction)
    else:
        if reduction != "mean":
            raise ValueError("reduction applies to form='target'; form='ece' is already a batch-level scalar")
        loss, stats = em_ops.em_ece_loss(rows, log_pi, mu, sigma, theta, ignore_index, rho)
    if accumulate:
        state.accumulate(stats)
    return loss
