"""Smooth ECE: ``calibkern.smooth_ece`` from logits against the ``relplot`` package's ``smECE`` given the
top-1 confidences and correctness (so relplot does not pay for the softmax).

Rows of K = 4 logits ~ N(0, 2²); labels drawn from the model's own softmax ("calibrated": a small smooth ECE,
so the bandwidth search goes below σ = 0.01 and builds several grids) or from its softmax at temperature 3
("overconfident": σ ≥ 0.01 throughout, one grid). Goal: ≥ 10× relplot at N = 10⁶. Both give the same number
(checked here to 1e-6 before timing).
"""

from __future__ import annotations

import torch

import timing

SOURCE = "smooth_ece"
N_CLASSES = 4


def _rows(n: int, tempered: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, N_CLASSES, generator=generator) * 2.0
    probs = torch.softmax(logits.double() / tempered, 1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    confidence, predicted = torch.softmax(logits, 1).max(1)
    return logits, labels, confidence.double().numpy(), (predicted == labels).double().numpy()


def rows(quick: bool = False) -> list[dict]:
    import relplot

    import calibkern

    out = []
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    for predictor, tempered in (("calibrated", 1.0), ("overconfident", 3.0)):
        for n in sizes:
            logits, labels, confidence, correct = _rows(n, tempered)
            ours, theirs = float(calibkern.smooth_ece(logits, labels)), float(relplot.smECE(confidence, correct))
            if abs(ours - theirs) > 1e-6:
                raise AssertionError(f"smooth_ece {ours} differs from relplot's smECE {theirs} at N = {n}")
            times = timing.median_times({"calibkern": lambda: calibkern.smooth_ece(logits, labels),
                                         "relplot": lambda: relplot.smECE(confidence, correct)},
                                        repeats=3 if quick else 5)
            goal = "≥ 10× relplot" if n == 1_000_000 else ""
            out.append(timing.ratio_row(
                source=SOURCE, name=f"smooth ECE, {predictor}, N={n:,}, K={N_CLASSES} (smECE {ours:.4f})",
                candidate="calibkern.smooth_ece (from logits)", baseline="relplot.smECE (from confidences)",
                candidate_value=times["calibkern"]["median_s"], baseline_value=times["relplot"]["median_s"],
                goal=goal, min_gain=10.0 if goal else None))
    return out


if __name__ == "__main__":
    for row in rows():
        print(f"{row['name']}: calibkern {row['candidate_value'] * 1e3:.1f} ms, relplot "
              f"{row['baseline_value'] * 1e3:.1f} ms, {row['gain']:.1f}×")
