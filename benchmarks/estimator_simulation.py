"""Bias of the ECE estimators and coverage of the ECE intervals, simulated (docs/math.md#debiased-ece).

    python benchmarks/estimator_simulation.py [--repetitions 200] > table.md

Predictors with a known probability of being right: logits ~ N(0, 1.5²) over K options, labels drawn from
the softmax itself ("calibrated", true ECE 0) or from the softmax at temperature 2 ("overconfident"). The
truth is the population's binned ECE, from 400,000 rows with the known probabilities (no label noise).
Prints Markdown tables: mean estimate and root-mean-square error per estimator, and how often each interval
method (95 %) contains the truth.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calibkern as ck  # noqa: E402

M = 10


def sample(n, k, kind, generator):
    logits = torch.randn(n, k, generator=generator, dtype=torch.float64) * 1.5
    truth = torch.softmax(logits / (1.0 if kind == "calibrated" else 2.0), dim=1)
    labels = torch.multinomial(truth, 1, generator=generator).squeeze(1)
    q = truth.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    return logits.float(), labels, q


def population(k, kind, norm):
    logits, _, q = sample(400_000, k, kind, torch.Generator().manual_seed(99))
    c = torch.softmax(logits.double(), dim=1).amax(1)
    bins = torch.clamp((c.float() * M).floor().long(), max=M - 1)
    counts, gap = torch.bincount(bins, minlength=M).double(), torch.bincount(bins, q - c, minlength=M)
    if norm == "l1":
        return float(gap.abs().sum() / len(c))
    return math.sqrt(float((gap * gap / counts.clamp_min(1)).sum() / len(c)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=200)
    args = parser.parse_args()
    reps = args.repetitions
    print(f"### Bias (K = 4, M = {M}, {reps} repetitions)\n")
    print("| predictor | norm | N | truth | plug-in mean (RMSE) | debiased mean (RMSE) |\n|---|---|---|---|---|---|")
    for kind in ("calibrated", "overconfident"):
        for norm in ("l1", "l2"):
            truth = population(4, kind, norm)
            for n in (500, 2000, 10000):
                g = torch.Generator().manual_seed(n)
                plugin, debiased = [], []
                for _ in range(reps):
                    stats = ck.binned_stats(*sample(n, 4, kind, g)[:2], M)
                    plugin.append(float(stats.ece(norm)))
                    debiased.append(float(stats.ece(norm, "debiased")))
                cells = []
                for values in (plugin, debiased):
                    mean = sum(values) / reps
                    rmse = math.sqrt(sum((v - truth) ** 2 for v in values) / reps)
                    cells.append(f"{mean:.4f} ({rmse:.4f})")
                print(f"| {kind} | {norm} | {n} | {truth:.4f} | {cells[0]} | {cells[1]} |", flush=True)
    print(f"\n### Coverage of 95 % intervals ({reps} repetitions, 1000 resamples each)\n")
    print("| predictor | K | norm | N | truth | debiased (default) | percentile |\n|---|---|---|---|---|---|---|")
    for kind in ("calibrated", "overconfident"):
        for k in (2, 4, 10):
            for norm in ("l1", "l2"):
                truth = population(k, kind, norm)
                for n in (500, 2000, 10000):
                    g = torch.Generator().manual_seed(n + k)
                    hits = {"debiased": 0, "percentile": 0}
                    for rep in range(reps):
                        logits, labels, _ = sample(n, k, kind, g)
                        for method in hits:
                            interval = ck.ece_confidence_interval(logits, labels, M, norm, method=method, seed=rep)
                            hits[method] += interval.low <= truth <= interval.high
                    print(f"| {kind} | {k} | {norm} | {n} | {truth:.4f} | {hits['debiased'] / reps:.2f} | "
                          f"{hits['percentile'] / reps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
