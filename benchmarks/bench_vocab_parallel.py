"""The vocabulary-parallel fused loss on 2 gloo ranks against the single-process fused loss, on CPU.

Both compute ``CE + hard-bin calibration term`` (fp32, forward + backward, gradients for hidden and weight) with
``calibkern.fused_linear_calibration_loss`` on ``hidden [N, D]`` and ``weight [V, D]``: one process on the whole
weight, or 2 processes (``torch.multiprocessing``, gloo, one thread each) each holding ``V / 2`` rows of it and
passing ``vocab_parallel_group`` (docs/distributed.md#vocabulary-parallel-loss). The single process runs on one
thread too, so the 2 ranks use twice its cores.

* Time: after a warm-up step, the median over ``repeats`` steps of the wall time and of the process's CPU time
  (``time.process_time``: what the step costs a core, whatever else shares the machine), per process; a rank's
  step includes its all-reduces (per chunk the row max, the sums of exponentials and target logits; once the
  option logits and, in backward, the hidden gradient).
* Peak memory above the inputs, per process: one step with glibc's allocator cache off
  (``timing.UNCACHED_MALLOC``), ``VmHWM`` reset after the inputs exist; the gradient of the process's weight rows
  (``V × D`` or ``V/2 × D``) counts.

``python benchmarks/bench_vocab_parallel.py [--n N --dim D --vocab V]`` prints the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from statistics import median

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from timing import UNCACHED_MALLOC, current_rss_mib, in_subprocess, peak_rss_mib, reset_peak_rss  # noqa: E402

OPTIONS = [10, 11, 12, 13]


def _problem(n: int, dim: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * dim ** -0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = torch.tensor(OPTIONS).repeat(n // 28 + 1)[: labels[::7].shape[0]]
    return hidden, weight, labels


def _measure(hidden, weight, labels, repeats: int, group=None) -> dict:
    """Median time of a forward + backward step and the peak memory of one step above the inputs."""
    import calibkern as ck

    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def step():
        hidden.grad = weight.grad = None
        out = ck.fused_linear_calibration_loss(hidden, weight, labels, option_ids=OPTIONS, shift=False,
                                               bin_accuracy=torch.full((10,), 0.5), vocab_parallel_group=group)
        out.loss.backward()

    step()
    hidden.grad = weight.grad = None
    before = current_rss_mib()
    reset_peak_rss()
    step()
    peak = peak_rss_mib() - before
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": median(wall), "cpu_s": median(cpu), "peak_mib": peak}


def single(n: int, dim: int, vocab: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    return _measure(*_problem(n, dim, vocab), repeats)


def _rank(rank: int, port: int, out_dir: str, n: int, dim: int, vocab: int, repeats: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hidden, weight, labels = _problem(n, dim, vocab)
    rows = slice(0, (vocab + 1) // 2) if rank == 0 else slice((vocab + 1) // 2, vocab)
    weight = weight[rows].clone()
    result = _measure(hidden, weight, labels, repeats, group=dist.group.WORLD)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def two_ranks(n: int, dim: int, vocab: int, repeats: int) -> list[dict]:
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import free_port

    for key, value in UNCACHED_MALLOC.items():  # the children inherit it
        os.environ[key] = value
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(free_port(), out_dir, n, dim, vocab, repeats), nprocs=2, join=True)
        return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = dict(n=args.n, dim=args.dim, vocab=args.vocab, repeats=args.repeats)
    one = in_subprocess("bench_vocab_parallel", "single", env=UNCACHED_MALLOC, **shape)
    ranks = two_ranks(**shape)
    name = f"N={args.n} D={args.dim} V={args.vocab} fp32 fwd+bwd, CE + hard_bin"
    print("| problem | process | wall time | CPU time | peak memory above inputs |")
    for label, result in [("one process, whole weight", one)] + [(f"rank {r} of 2, V/2 rows", ranks[r])
                                                                 for r in range(2)]:
        print(f"| {name} | {label} | {result['median_s'] * 1e3:.0f} ms | {result['cpu_s'] * 1e3:.0f} ms | "
              f"{result['peak_mib']:.1f} MiB |")
    for key in ("median_s", "cpu_s"):
        print(f"{key}: slower rank ÷ one process = {max(r[key] for r in ranks) / one[key]:.2f}")


if __name__ == "__main__":
    main()
