"""Smooth ECE (Błasiok & Nakkiran 2023) and the smooth reliability curve (docs/math.md#smooth-ece).

The residuals ``r_i = c_i − 1[correct_i]`` and the unit masses of the top-1 confidences are spread onto a grid
of G points on [0, 1] by linear interpolation, convolved with a Gaussian of bandwidth σ reflected at 0 and 1,
and read at T evaluation points ``t``: ``r̂(t) = R_σ(t) / (D_σ(t) + 10⁻⁴)``, and
``smECE_σ = Σ_t |r̂(t)| (D_σ(t) + 10⁻⁴) / Σ_t (D_σ(t) + 10⁻⁴)``. ``smooth_ece`` picks σ as the fixed point
``σ = smECE_σ`` by 10 bisection steps on (0, 1] (σ never below 10⁻³). Grid and evaluation sizes:
``G = ⌊max(2000, round(20/σ)) / 2⌋ + 1``, ``T = max(200, round(10/σ))`` — the discretisation of the ``relplot``
package, so the numbers equal its ``smECE`` on the same confidences. The reliability curve is relplot's too: the
correctness ``a_i`` smoothed the same way, ``Â(t) = A_σ(t) / (D_σ(t) + 10⁻⁴)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from . import _validate as V
from .backends import resolve
from .ops import custom_ops
from .ops.row_metrics import kept_top1
from .scores import as_logits

SIGMA_FLOOR = 1e-3
SEARCH_STEPS = 10
DENSITY_FLOOR = 1e-4
CURVE_POINTS = 200


class SmoothReliability(NamedTuple):
    """The kernel-smoothed reliability curve at ``points`` confidences ``t`` (docs/math.md#smooth-ece):
    ``accuracy`` the smoothed correctness ``Â(t) = A(t) / (D(t) + 10⁻⁴)`` in [0, 1] (relplot's curve),
    ``density`` the smoothed probability density of the confidences (∫₀¹ = 1), ``sigma`` the bandwidth and
    ``support`` the smallest and largest confidence of the rows: the curve is data there, extrapolation
    elsewhere (the reliability diagrams draw it on ``support`` only)."""

    points: torch.Tensor
    accuracy: torch.Tensor
    density: torch.Tensor
    sigma: float
    support: tuple[float, float]

    def as_lists(self) -> dict:
        """JSON-ready: ``{"confidence", "accuracy", "density", "sigma", "support"}`` (``confidence`` the points)."""
        return {"confidence": self.points.tolist(), "accuracy": self.accuracy.tolist(),
                "density": self.density.tolist(), "sigma": self.sigma, "support": list(self.support)}


def _grid_points(sigma: float) -> int:
    return max(2000, round(20 / sigma)) // 2 + 1


def _onto_grid(moments: torch.Tensor) -> torch.Tensor:
    """[2, cells + 1]: a per-row value ``v`` (the residual ``r``, or the correctness) and the unit masses spread
    by linear interpolation onto the ``cells + 1`` points ``j/cells``, from the rows' per-cell sums
    ``(1, c, v, c·v)`` (``grid_moments``). A row at ``c`` in cell ``j`` gives ``1 − s`` of its value to point j
    and ``s = c·cells − j`` to point ``j + 1``; summed over a cell, ``Σ s = cells Σ c − j Σ 1`` and
    ``Σ s·v = cells Σ c·v − j Σ v``."""
    cells = moments.shape[0]
    count, sum_c, sum_v, sum_cv = moments.unbind(1)
    j = torch.arange(cells, dtype=torch.float64, device=moments.device)
    to_right = torch.stack([cells * sum_cv - j * sum_v, cells * sum_c - j * count])
    grids = torch.zeros(2, cells + 1, dtype=torch.float64, device=moments.device)
    grids[:, :-1] = torch.stack([sum_v, count]) - to_right
    grids[:, 1:] += to_right
    return grids


def _correct_moments(moments: torch.Tensor, zero_moments: torch.Tensor) -> torch.Tensor:
    """Per-cell ``(1, c, a, c·a)`` sums of the correctness ``a`` from ``grid_moments`` of the rows with their
    correctness, ``(1, c, c − a, c² − c·a)``, and with none, ``(1, c, c, c²)``."""
    return torch.cat([moments[:, :2], zero_moments[:, 2:] - moments[:, 2:]], dim=1)


def _reflected_smooth(grids: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each row of ``grids`` (G points on [0, 1]) convolved with ``N(0, σ²)``'s density sampled on a [−½, ½]
    window of G points, the grid mirrored at both ends first (one batched FFT product). The end points are not
    mirrored onto themselves, so a unit mass at 0 or 1 keeps half the window's mass on [0, 1]."""
    size = grids.shape[-1]
    offsets = torch.linspace(0, 1, size, dtype=torch.float64, device=grids.device) - 0.5
    kernel = torch.exp(-offsets.square() / (2 * sigma ** 2)) / (math.sqrt(2 * math.pi) * sigma)
    mirrored = torch.cat([grids.flip(-1)[:, :-1], grids, grids.flip(-1)[:, 1:]], dim=-1)
    length = 1 << (mirrored.shape[-1] + size - 2).bit_length()  # ≥ the linear convolution's length
    start = size - 1 + size // 2
    if grids.device.type == "cpu":  # a few thousand points: one thread (numpy) beats torch's thread hand-offs
        mirrored, kernel = mirrored.numpy(), kernel.numpy()
        full = np.fft.irfft(np.fft.rfft(mirrored, length) * np.fft.rfft(kernel, length), length)
        return torch.from_numpy(full[:, start:start + size])
    full = torch.fft.irfft(torch.fft.rfft(mirrored, length) * torch.fft.rfft(kernel, length), length)
    return full[:, start:start + size]


def _interpolate(points: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``grid`` (values at ``j/(G − 1)``) read at float64 ``points`` by linear interpolation."""
    size = grid.shape[0]
    left = (points * (size - 1)).long().clamp(0, size - 2)
    right_share = (points - left.to(points.dtype) / (size - 1)) * (size - 1)  # a long / int is float32
    return grid[left] * (1 - right_share) + grid[left + 1] * right_share


class _Smoother:
    """The rows' residuals and masses on each grid size used so far (a bandwidth search reuses them)."""

    def __init__(self, confidence: torch.Tensor, correct: torch.Tensor, backend: str):
        self.confidence, self.correct, self.backend = confidence, correct, backend
        self.moments: dict[int, torch.Tensor] = {}

    def _moments(self, size: int) -> torch.Tensor:
        """The rows' per-cell sums ``(1, c, r, c·r)`` on the grid of ``size`` points (cached per size)."""
        if size not in self.moments:
            self.moments[size] = custom_ops.grid_moments(self.confidence, self.correct, size - 1, self.backend)
        return self.moments[size]

    def curve(self, sigma: float, n_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, r̂(t), D_σ(t) + 10⁻⁴)`` at ``n_points`` evenly spaced ``t``."""
        residual, mass = _reflected_smooth(_onto_grid(self._moments(_grid_points(sigma))), sigma)
        points = torch.linspace(0, 1, n_points, dtype=torch.float64, device=self.confidence.device)
        density = _interpolate(points, mass) + DENSITY_FLOOR
        return points, _interpolate(points, residual) / density, density

    def reliability(self, sigma: float, n_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, Â(t), density(t))``: the smoothed correctness over the smoothed mass plus 10⁻⁴ (relplot's
        curve), and the density of the confidences with the end points' mirror images restored (a unit mass
        at 0 or 1 then holds the window's mass, as every other does) and divided by its integral on the grid."""
        size = _grid_points(sigma)
        moments = self._moments(size)
        zero = custom_ops.grid_moments(self.confidence, torch.zeros_like(self.correct), size - 1, self.backend)
        correct, mass = _onto_grid(_correct_moments(moments, zero))
        mirrored_mass = mass.clone()
        mirrored_mass[[0, -1]] *= 2
        smoothed_correct, smoothed_mass, density = _reflected_smooth(
            torch.stack([correct, mass, mirrored_mass]), sigma)
        density = density.clamp_min(0)
        density = density / torch.trapezoid(density, dx=1.0 / (size - 1))
        points = torch.linspace(0, 1, n_points, dtype=torch.float64, device=self.confidence.device)
        accuracy = _interpolate(points, smoothed_correct) / (_interpolate(points, smoothed_mass) + DENSITY_FLOOR)
        return points, accuracy.clamp(0, 1), _interpolate(points, density)

    def ece(self, sigma: float) -> float:
        _, residual, density = self.curve(sigma, max(round(10 / sigma), CURVE_POINTS))
        return float((residual.abs() * density).sum() / density.sum())

    def fixed_point(self) -> float:
        """The bandwidth σ with ``σ = smECE_σ``: 1 if ``smECE_1 > 1``, else the smallest σ with
        ``σ ≥ smECE_σ`` among the bisection steps on (0, 1] (relplot's search; σ below 10⁻³ counts as too narrow)."""
        def too_narrow(sigma):
            return sigma < SIGMA_FLOOR or sigma < self.ece(sigma)

        if too_narrow(1.0):
            return 1.0
        high, low = 1.0, 0.0
        for _ in range(SEARCH_STEPS):
            middle = (high + low) / 2
            if too_narrow(middle):
                low = middle
            else:
                high = middle
        return high


def _smoother(logits, labels, temperature, ignore_index, nonfinite, backend, input="logits") -> _Smoother:
    """The kept rows' top-1 confidences and correctness, from one read of the logits by ``backend``'s kernel."""
    confidence, correct = kept_top1(as_logits(logits, input), labels, temperature, ignore_index, nonfinite, backend)
    if confidence.shape[0] == 0:
        raise ValueError("labels: every row is ignored, so there is no smooth ECE to compute")
    return _Smoother(confidence, correct, resolve(backend, confidence.device, confidence.dtype)[0])


def _check_sigma(sigma) -> float | None:
    if sigma is None:
        return None
    sigma = V.check_positive_float(sigma, "sigma")
    if sigma > 1.0:
        raise ValueError(f"sigma must lie in (0, 1], got {sigma}")
    return sigma


@torch.no_grad()
def smooth_ece(logits, labels, *, sigma=None, temperature=1.0, ignore_index=-100, nonfinite="error",
               backend=None, return_sigma=False, input="logits"):
    """Smooth ECE of the top-1 confidences ``max softmax(logits / temperature)`` against correctness, as a
    float64 0-dim tensor; ``sigma=None`` takes the fixed-point bandwidth (``return_sigma=True`` returns it too,
    as ``(smece, sigma)``). The logits are read once, by ``backend``'s ``top1_rows`` kernel; the smoothing runs
    on the rows' confidences. An evaluation metric: the bandwidth search reads values on the host. ``input``:
    ``"logits"``, ``"probs"`` or ``"log_probs"``, ``[N, K]`` or 1-D binary scores (docs/math.md#inputs).
    """
    sigma = _check_sigma(sigma)
    smoother = _smoother(logits, labels, temperature, ignore_index, nonfinite, backend, input)
    sigma = smoother.fixed_point() if sigma is None else sigma
    value = torch.tensor(smoother.ece(sigma), dtype=torch.float64)
    return (value, sigma) if return_sigma else value


@torch.no_grad()
def smooth_ece_from_confidences(confidences, correct, *, sigma=None, backend=None, return_sigma=False):
    """relplot's ``smECE(f, y)``: the smooth ECE of any scores ``f`` in [0, 1] (1-D; e.g. a binary model's
    positive-class probability) against 0/1 outcomes ``y`` — :func:`smooth_ece`'s smoothing and bandwidth on given
    confidences instead of the top-1 confidences of logits (scores taken in float32)."""
    sigma = _check_sigma(sigma)
    for x, name in ((confidences, "confidences"), (correct, "correct")):
        V.check_tensor(x, name)
    if confidences.dim() != 1 or correct.shape != confidences.shape or confidences.shape[0] == 0:
        raise ValueError(f"confidences and correct must be 1-D of one length ≥ 1, got {tuple(confidences.shape)} "
                         f"and {tuple(correct.shape)}")
    V.require(((confidences >= 0) & (confidences <= 1)).all(), "confidences must lie in [0, 1]")
    V.require(((correct == 0) | (correct == 1)).all(), "correct must be bool or 0/1")
    confidence = confidences.float()
    smoother = _Smoother(confidence, correct.bool(), resolve(backend, confidence.device, confidence.dtype)[0])
    sigma = smoother.fixed_point() if sigma is None else sigma
    value = torch.tensor(smoother.ece(sigma), dtype=torch.float64)
    return (value, sigma) if return_sigma else value


@torch.no_grad()
def smooth_reliability(logits, labels, *, sigma=None, points=CURVE_POINTS, temperature=1.0, ignore_index=-100,
                       nonfinite="error", backend=None, input="logits") -> SmoothReliability:
    """The smooth reliability curve (:class:`SmoothReliability`) at ``points`` evenly spaced confidences in
    [0, 1], at ``sigma`` (default: the smooth ECE's fixed-point bandwidth); equal to relplot's curve on the same
    confidences."""
    sigma = _check_sigma(sigma)
    points = V.check_n_bins(points, "points")
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    smoother = _smoother(logits, labels, temperature, ignore_index, nonfinite, backend, input)
    sigma = smoother.fixed_point() if sigma is None else sigma
    t, accuracy, density = smoother.reliability(sigma, points)
    low, high = torch.aminmax(smoother.confidence)
    return SmoothReliability(t, accuracy, density, sigma, (float(low), float(high)))
