"""calibkern.plot: the diagrams' drawn data are the metrics' numbers; matplotlib objects come back."""

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import calibkern as ck  # noqa: E402
from calibkern import plot  # noqa: E402


def _data(n=400, k=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(logits / 2, 1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_reliability_diagram_draws_the_bins_and_the_curve(tmp_path):
    logits, labels = _data()
    fig, (ax, counts_ax) = plot.reliability_diagram(logits, labels, n_bins=10, sigma=0.05)
    rel = ck.binned_stats(logits, labels, 10).reliability()
    filled = rel.counts > 0
    accuracy_bars = ax.patches[:int(filled.sum())]  # the accuracy bars come first, then the gaps
    torch.testing.assert_close(torch.tensor([p.get_height() for p in accuracy_bars], dtype=torch.float64),
                               rel.accuracy[filled])
    assert [p.get_height() for p in counts_ax.patches] == rel.counts.tolist()
    curve = ck.smooth_reliability(logits, labels, sigma=0.05)
    x, y = (torch.tensor(v, dtype=torch.float64) for v in (ax.lines[0].get_xdata(), ax.lines[0].get_ydata()))
    low, high = curve.support
    assert float(x[0]) == low and float(x[-1]) == high  # the curve over the rows' confidences only
    inside = (curve.points > low) & (curve.points < high)
    torch.testing.assert_close(y[1:-1], curve.accuracy[inside])
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    plt.close(fig)


def test_from_bin_stats_probs_and_given_axes():
    logits, labels = _data()
    stats = ck.binned_stats(logits, labels, 15)
    fig, (ax, counts_ax) = plot.reliability_diagram(stats=stats)
    assert len(ax.lines) == 1  # the diagonal only: BinStats hold no rows for a curve
    assert sum(p.get_height() for p in counts_ax.patches) == len(labels)
    plt.close(fig)
    fig, grid = plot.diagram_axes(2)
    out, _ = plot.reliability_diagram(logits.softmax(1), labels, input="probs", axes=(grid[0, 1], grid[1, 1]))
    assert out is fig and len(grid[0, 1].lines) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="either logits and labels or stats"):
        plot.reliability_diagram(logits, labels, stats=stats)
    with pytest.raises(ValueError, match="top-1"):
        plot.reliability_diagram(stats=ck.binned_stats(logits, labels, 10, mode="classwise"))


def test_smooth_diagram():
    logits, labels = _data()
    fig, ax = plot.smooth_diagram(logits, labels, sigma=0.1)
    curve = ck.smooth_reliability(logits, labels, sigma=0.1)
    assert ax.get_title() == f"smECE {float(ck.smooth_ece(logits, labels, sigma=0.1)):.3f}"
    assert ax.lines[0].get_xdata()[0] == curve.support[0] and ax.lines[0].get_xdata()[-1] == curve.support[1]
    plt.close(fig)
