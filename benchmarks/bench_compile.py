"""A CFT training step compiled with ``torch.compile`` (inductor) against the same step in eager mode, on CPU.

The step: a two-layer MLP on token states ``[N, D]`` (the trainable part of a head), then
``calibkern.fused_linear_calibration_loss`` (CE + hard-bin term) against a ``[V, D]`` output weight, forward
and backward. The compiled candidate is ``torch.compile(loss_fn, fullgraph=True)`` with backward outside; both
run on the default backend (cpp when built). Compile time is excluded (warm-up).

``python benchmarks/bench_compile.py [--quick]`` prints the rows.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import timing  # noqa: E402

import calibkern  # noqa: E402

OPTION_IDS = [10, 11, 12, 13]


def _step(n_tok, dim, vocab, supervised_every):
    g = torch.Generator().manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
    states = torch.randn(n_tok, dim, generator=g)
    weight = (torch.randn(vocab, dim, generator=g) * dim ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n_tok,), generator=g)
    if supervised_every > 1:
        labels[torch.arange(n_tok) % supervised_every != 0] = -100
    labels[::64] = OPTION_IDS[0]
    accuracy = torch.linspace(0.1, 0.9, 10)

    def loss_fn(states):
        return calibkern.fused_linear_calibration_loss(mlp(states), weight, labels, option_ids=OPTION_IDS,
                                                       bin_accuracy=accuracy, shift=True).loss
    return loss_fn, states, list(mlp.parameters()) + [weight]


def rows(quick=False) -> list[dict]:
    """Two cases: every position supervised (the compiler's own effect), and one in two (under compile the
    fused loss multiplies every position, since the supervised count would be a data-dependent size)."""
    n_tok, dim, vocab = (512, 128, 8000) if quick else (2048, 256, 32000)
    out = []
    for every in (1, 2):
        torch._dynamo.reset()
        loss_fn, states, parameters = _step(n_tok, dim, vocab, every)
        compiled = torch.compile(loss_fn, fullgraph=True)

        def run(fn):
            def step():
                for p in parameters:
                    p.grad = None
                fn(states).backward()
            return step

        times = timing.median_times({"compiled": run(compiled), "eager": run(loss_fn)},
                                    repeats=3 if quick else 7, warmup=2)
        supervised = "all rows" if every == 1 else f"1 in {every} rows"
        name = f"CFT step (MLP + fused CE + hard-bin) N={n_tok} D={dim} V={vocab} fwd+bwd, {supervised} supervised"
        out.append(timing.ratio_row(source="compile", name=name, candidate="torch.compile(fullgraph=True), inductor",
                                    baseline="eager", candidate_value=times["compiled"]["median_s"],
                                    baseline_value=times["eager"]["median_s"], goal="report"))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    for row in rows(parser.parse_args().quick):
        compiled_ms, eager_ms = row["candidate_value"] * 1e3, row["baseline_value"] * 1e3
        print(f"{row['name']}: compiled {compiled_ms:.1f} ms, eager {eager_ms:.1f} ms, gain {row['gain']:.2f}×")
