"""Label smoothing and the z-loss in the fused linear cross-entropy: their cost against the plain fused CE.

``calibkern.nn.FusedLinearCrossEntropyLoss`` forward + backward on ``[N, D]`` float32 hidden states and a
``[V, D]`` weight (every row supervised), plain (ε = λ = 0) against ``label_smoothing=0.1,
lse_square_scale=1e-4``: the same chunk loop and matrix products, the options inside the cross-entropy kernel
(one more add per logit in its gradient pass). The same pair again with ``token_stats=True`` (what
``CalibrationTrainer`` runs by default), where the statistics read the softmax back from the smoothed gradient
(docs/math.md#token-level-calibration). Goal: time ≤ 1.1× the plain fused CE. Then ``reduction="none"`` (the
per-row losses, backward with per-row weights) against "mean", with the lm_head trained and frozen (the frozen
case keeps ``g W`` from forward; the trained one computes the chunks' logits again in backward). Median of alternated rounds
(timing.median_times); one torch thread by default (``BENCH_THREADS``), the ``cpp`` backend.

    python benchmarks/bench_nn.py
"""

from __future__ import annotations

import json
import os

import torch

import timing

SOURCE = "nn"
N, DIM, VOCAB = 1024, 256, 32000


def rows(quick: bool = False) -> list[dict]:
    from calibkern.nn import FusedLinearCrossEntropyLoss

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, DIM, generator=generator) * 0.05).requires_grad_()
    frozen = weight.detach()
    target = torch.randint(0, VOCAB, (N,), generator=generator)
    upstream = torch.rand(N, generator=generator)  # per-row weights for reduction="none"
    smoothing = dict(label_smoothing=0.1, lse_square_scale=1e-4)
    losses = {(options, stats): FusedLinearCrossEntropyLoss(backend="cpp", token_stats=stats,
                                                            **(smoothing if options else {}))
              for options in (False, True) for stats in (False, True)}
    per_row = FusedLinearCrossEntropyLoss(backend="cpp", reduction="none")

    def step(loss_fn, lm_head=weight):
        x.grad = weight.grad = None
        loss = loss_fn(lm_head, x, target)
        (loss if loss.dim() == 0 else loss @ upstream).backward()

    candidates = {key: (lambda f=loss_fn: step(f)) for key, loss_fn in losses.items()}
    candidates.update({("none", "trained"): lambda: step(per_row), ("none", "frozen"): lambda: step(per_row, frozen),
                       ("mean", "frozen"): lambda: step(losses[(False, False)], frozen)})
    times = timing.median_times(candidates, repeats=3 if quick else 7)
    notes = f"{torch.get_num_threads()} torch thread(s), cpp backend"
    result = []
    for stats in (False, True):
        name = f"fused linear CE fwd+bwd N={N} D={DIM} V={VOCAB} fp32{', token_stats' if stats else ''}"
        result.append(timing.ratio_row(
            source=SOURCE, name=name, candidate="label_smoothing=0.1 + lse_square_scale=1e-4",
            baseline="plain fused CE", candidate_value=times[(True, stats)]["median_s"],
            baseline_value=times[(False, stats)]["median_s"], goal="time ≤ 1.1×", min_gain=1 / 1.1, notes=notes))
    for head, baseline in (("trained", (False, False)), ("frozen", ("mean", "frozen"))):
        name = f"fused linear CE fwd+bwd N={N} D={DIM} V={VOCAB} fp32, lm_head {head}"
        result.append(timing.ratio_row(
            source=SOURCE, name=name, candidate='reduction="none" (per-row weights)', baseline='reduction="mean"',
            candidate_value=times[("none", head)]["median_s"], baseline_value=times[baseline]["median_s"],
            goal="report", notes=notes))
    return result


if __name__ == "__main__":
    for row in rows():
        print(json.dumps(row))
