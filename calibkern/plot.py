"""Reliability diagrams with matplotlib (optional: ``pip install 'calibkern[plot]'``; docs/integrations.md#plots).

* :func:`reliability_diagram` — per equal-width bin, the accuracy (bar) and the gap to the mean confidence
  (shaded bar on top), the diagonal, the smooth reliability curve (calibkern.smooth_reliability) over its
  ``support`` (the rows' smallest to largest confidence; no data's elsewhere), and below, the rows per bin. From
  logits and labels, or from a :class:`~calibkern.BinStats` (plus a :class:`~calibkern.SmoothReliability` for the
  curve).
* :func:`smooth_diagram` — the smooth reliability curve alone over the confidences' density.

Both return matplotlib objects, ``(figure, axes)``, and draw into given axes when passed. :func:`draw_reliability`
draws one diagram from plain arrays (the reports' JSON).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .metrics import BinStats, binned_stats
from .smooth import SmoothReliability, smooth_reliability


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # matplotlib is an optional dependency
        raise ImportError("calibkern.plot needs matplotlib: pip install 'calibkern[plot]'") from error
    return plt


def curve_over_rows(curve: dict) -> tuple[list[float], list[float]]:
    """The smooth curve from the smallest to the largest confidence of the rows (its ``support``; the ends read
    by linear interpolation): elsewhere it is no data's."""
    low, high = curve["support"]
    confidence = [low] + [t for t in curve["confidence"] if low < t < high] + [high]
    return confidence, np.interp(confidence, curve["confidence"], curve["accuracy"]).tolist()


def _curve_lists(curve: SmoothReliability | dict | None) -> dict | None:
    return curve if curve is None or isinstance(curve, dict) else curve.as_lists()


def draw_reliability(ax, counts_ax, accuracy: Sequence[float], confidence: Sequence[float], counts: Sequence[int],
                     curve: SmoothReliability | dict | None = None, title: str | None = None) -> None:
    """One diagram into ``ax`` (bars, diagonal, curve) and ``counts_ax`` (rows per bin; None: not drawn).
    ``curve``: a SmoothReliability or its ``{"confidence", "accuracy", "density", "sigma", "support"}`` lists
    (drawn over its support; a curve without one is not drawn)."""
    n_bins = len(counts)
    width = 1.0 / n_bins
    centres = [(k + 0.5) * width for k in range(n_bins)]
    filled = [k for k in range(n_bins) if counts[k] > 0]
    ax.bar([centres[k] for k in filled], [accuracy[k] for k in filled], width=width * 0.95,
           color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar([centres[k] for k in filled], [confidence[k] - accuracy[k] for k in filled],
           bottom=[accuracy[k] for k in filled], width=width * 0.95, color="tab:red", alpha=0.35,
           label="gap to confidence")
    curve = _curve_lists(curve)
    if curve is not None and "support" in curve:
        points, values = curve_over_rows(curve)
        ax.plot(points, values, color="tab:orange", linewidth=1.5, marker="o" if len(points) == 2 else None,
                markersize=3, label=f"smooth (σ {curve['sigma']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    if title is not None:
        ax.set_title(title, fontsize=9)
    if counts_ax is None:
        ax.set_xlabel("confidence")
        return
    ax.tick_params(labelbottom=False)
    counts_ax.bar(centres, list(counts), width=width * 0.95, color="0.6", edgecolor="black", linewidth=0.5)
    counts_ax.set_xlim(0, 1)
    counts_ax.set_xlabel("confidence")
    counts_ax.set_ylabel("rows", fontsize=8)
    counts_ax.tick_params(labelsize=7)


def diagram_axes(n_columns: int = 1):
    """A figure of ``n_columns`` diagrams over their count histograms: ``(figure, axes [2, n_columns])``."""
    return _pyplot().subplots(2, n_columns, figsize=(3.2 * n_columns, 4.4), squeeze=False,
                              gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})


def reliability_diagram(logits=None, labels=None, *, stats: BinStats | None = None, n_bins: int = 10,
                        curve: SmoothReliability | bool | None = True, sigma: float | None = None,
                        input: str = "logits", temperature: float = 1.0, ignore_index: int = -100,
                        title: str | None = None, axes=None):
    """The reliability diagram of ``logits`` and ``labels`` (``input`` as for every metric) or of ``stats``
    (top-1 BinStats). ``curve``: True draws the smooth reliability curve of the rows (at ``sigma``, default the
    smooth ECE's bandwidth), a SmoothReliability draws that one, False/None none (with ``stats`` alone there are no
    rows, so no curve unless one is given). ``axes``: ``(ax, counts_ax)`` to draw into. Returns
    ``(figure, (ax, counts_ax))``."""
    if (stats is None) == (logits is None):
        raise ValueError("pass either logits and labels or stats")
    if stats is None:
        stats = binned_stats(logits, labels, n_bins, temperature=temperature, ignore_index=ignore_index, input=input)
        if curve is True:
            curve = smooth_reliability(logits, labels, sigma=sigma, temperature=temperature,
                                       ignore_index=ignore_index, input=input)
    elif curve is True:
        curve = None
    if not isinstance(stats, BinStats):
        raise TypeError(f"stats must be a calibkern.BinStats, got {type(stats).__name__}")
    rel = stats.reliability()  # raises for classwise statistics
    if axes is None:
        fig, grid = diagram_axes(1)
        ax, counts_ax = grid[0, 0], grid[1, 0]
    else:
        ax, counts_ax = axes
        fig = ax.figure
    if title is None:
        title = f"ECE {float(stats.ece()):.3f}, accuracy {float(stats.accuracy()):.3f}"
    draw_reliability(ax, counts_ax, rel.accuracy.tolist(), rel.confidence.tolist(), rel.counts.tolist(),
                     curve or None, title)
    ax.legend(loc="upper left", fontsize=7)
    return fig, (ax, counts_ax)


def smooth_diagram(logits, labels, *, sigma: float | None = None, points: int = 200, input: str = "logits",
                   temperature: float = 1.0, ignore_index: int = -100, ax=None):
    """The smooth reliability curve (calibkern.smooth_reliability) over the shaded density of the confidences,
    with the diagonal and the smooth ECE in the title. Returns ``(figure, ax)``."""
    from .smooth import smooth_ece

    curve = smooth_reliability(logits, labels, sigma=sigma, points=points, temperature=temperature,
                               ignore_index=ignore_index, input=input)
    value = smooth_ece(logits, labels, sigma=curve.sigma, temperature=temperature, ignore_index=ignore_index,
                       input=input)
    fig, ax = _pyplot().subplots(figsize=(3.6, 3.4)) if ax is None else (ax.figure, ax)
    lists = _curve_lists(curve)
    density = torch.as_tensor(lists["density"])
    ax.fill_between(lists["confidence"], 0, (density / density.max().clamp_min(1e-12) * 0.25).tolist(),
                    color="0.85", label="density of confidences")
    points, values = curve_over_rows(lists)
    ax.plot(points, values, color="tab:orange", linewidth=1.5, label=f"smooth (σ {curve.sigma:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"smECE {float(value):.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    return fig, ax
