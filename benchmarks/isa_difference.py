"""How far apart two builds of the cpp backend for different instruction sets are, on the same inputs.

Runs one child process per build — the ahead-of-time build for this CPU (``-march=native``) and a first-use
build for ``--march`` (default ``x86-64-v3``: AVX2, no AVX-512, compiled into ``--cache``) — each computing the
same seeded outputs on the ``cpp`` backend (bin statistics, metrics, both loss terms with their gradients, the
E-step and M-step, the fused linear loss); then prints, per output, whether the two builds agree bitwise and
their largest absolute and relative difference. docs/reliability.md#what-is-bitwise-equal-to-what quotes it.

    python benchmarks/isa_difference.py [--march x86-64-v3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outputs() -> dict[str, torch.Tensor]:
    """Every output compared, from seeded inputs, on the ``cpp`` backend."""
    import calibkern as ck

    ck.set_backend("cpp")
    generator = torch.Generator().manual_seed(0)
    n, k = 100_003, 4
    logits = torch.randn(n, k, generator=generator) * 3
    labels = torch.randint(0, k, (n,), generator=generator)
    labels[::97] = -100
    out = {}
    stats = ck.binned_stats(logits, labels, 15)
    out["binned_stats sum_conf"], out["binned_stats sum_correct"] = stats.sum_conf, stats.sum_correct
    out["ece l1"], out["ece l2"] = ck.ece(logits, labels, 15), ck.ece(logits, labels, 15, "l2")
    out["nll"], out["brier"] = ck.nll(logits, labels), ck.brier(logits, labels)
    wide = torch.randn(2048, 1000, generator=generator) * 2
    wide_labels = torch.randint(0, 1000, (2048,), generator=generator)
    out["classwise_ece K=1000"] = ck.classwise_ece(wide, wide_labels, 15)

    z = logits[:20_000].clone().requires_grad_()
    loss = ck.calibration_loss(z, labels[:20_000], stats.bin_accuracy(), n_bins=15)
    loss.backward()
    out["calibration_loss"], out["calibration_loss grad"] = loss.detach(), z.grad

    state = ck.EMState(n_components=10)
    state.estep(logits, labels)
    state.mstep()
    for name in ("pi", "mu", "sigma", "theta"):
        out[f"EM mstep {name}"] = getattr(state, name)
    z = logits[:20_000].clone().requires_grad_()
    reg = ck.em_regularizer(z, labels[:20_000], state, form="target")
    reg.backward()
    out["em_regularizer"], out["em_regularizer grad"] = reg.detach(), z.grad

    hidden = torch.randn(512, 64, generator=generator, requires_grad=True)
    weight = (torch.randn(3000, 64, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, 3000, (512,), generator=generator)
    fused = ck.fused_linear_calibration_loss(hidden, weight, targets, option_ids=[10, 20, 30, 40],
                                             calibration=None, shift=False)
    fused.loss.backward()
    out["fused linear CE"], out["fused linear hidden grad"] = fused.loss.detach(), hidden.grad
    out["fused linear weight grad"] = weight.grad
    return {name: value.detach().double() for name, value in out.items()}


def _child(path: str) -> None:
    import calibkern as ck

    status = {entry.name: entry for entry in ck.backend_report()}["cpp"]
    torch.save({"build": status.detail, "outputs": outputs()}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", default="x86-64-v3", help="the second build's -march target (default: %(default)s)")
    parser.add_argument("--cache", default=os.path.join(REPO, ".venv", "calibkern-cache"),
                        help="where the second build is compiled at first use (default: %(default)s)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for index, env in enumerate(({}, {"CALIBKERN_MARCH": args.march, "CALIBKERN_CACHE": args.cache})):
            path = os.path.join(folder, f"{index}.pt")
            environment = {key: value for key, value in os.environ.items()
                           if key not in ("CALIBKERN_MARCH", "CALIBKERN_PORTABLE", "CALIBKERN_BACKEND")}
            code = f"import sys; sys.path.insert(0, {REPO + '/benchmarks'!r}); import isa_difference as m; m._child({path!r})"
            subprocess.run([sys.executable, "-c", code], env={**environment, **env}, check=True)
            results.append(torch.load(path, weights_only=True))
    print(f"A: {results[0]['build']}\nB: {results[1]['build']}\n")
    print(f"| output | bitwise | max abs difference | max relative difference |\n|---|---|---|---|")
    for name, a in results[0]["outputs"].items():
        b = results[1]["outputs"][name]
        diff = (a - b).abs()
        rel = (diff / b.abs().clamp_min(1e-30)).max()
        print(f"| {name} | {'yes' if torch.equal(a, b) else 'no'} | {float(diff.max()):.3g} | {float(rel):.3g} |")


if __name__ == "__main__":
    main()
