"""Shared test helpers: seeded inputs, every op's outputs by name, a free TCP port. Tests import from here
(conftest.py holds only fixtures), never from each other."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import calibkern as ck
from calibkern.ops import custom_ops
from calibkern.ops.row_metrics import metric_sums_tensors


# Tolerances follow the arithmetic (docs/reliability.md#what-is-bitwise-equal-to-what): a float64 value built from
# float32 kernel arithmetic (sums of float32 confidences, E-step statistics, M-step parameters, losses) is equal
# to float32 rounding only, since the summation order and the fused multiply-adds of a cpp build depend on the
# instruction set it was compiled for — never at float64's default tolerance (rtol 1e-7).
FLOAT32_EPS = torch.finfo(torch.float32).eps


def float32_tolerance(terms: int = 1) -> dict:
    """``assert_close`` tolerances for a float32 computation summing ``terms`` values: rtol ``8·eps·√terms`` (the
    rounding of a reordered float32 sum grows as √terms), atol ``eps`` for values near 0."""
    return {"rtol": 8 * FLOAT32_EPS * max(terms, 1) ** 0.5, "atol": FLOAT32_EPS}


def random_logits(n, k, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


def random_labels(n, k, ignore_frac=0.0, seed=1, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    if ignore_frac:
        y[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return y


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def em_params(m: int = 7, seed: int = 1, device="cpu"):
    """A mixture's kernel parameters (log π, μ, σ, θ; float32, [m]) with components near their bin centres."""
    gen = torch.Generator().manual_seed(seed)
    log_pi = torch.log_softmax(torch.randn(m, generator=gen), dim=0)
    mu = (torch.arange(m) + 0.5) / m + 0.02 * torch.randn(m, generator=gen)
    sigma = torch.rand(m, generator=gen) * 0.1 + 1.0 / (4 * m)
    theta = torch.rand(m, generator=gen)
    return tuple(t.float().to(device) for t in (log_pi, mu, sigma, theta))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a gloo rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_ranks(worker, out_dir, world: int) -> list:
    """Run ``worker(rank, port, out_dir)`` in ``world`` spawned processes and load the ``rank{r}.pt`` each saved."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def torchrun_ranks(script: str, out_dir, world: int) -> list:
    """Run ``script out_dir`` under ``torchrun --nproc_per_node world`` (one thread per rank) and load the
    ``rank{r}.pt`` each rank saved in ``out_dir``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}", script, str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def assert_same_training_state(ours: dict, theirs: dict) -> None:
    """Equal ``weights`` (full tensors, max abs difference ≤ 1e-5, float32) and ``em`` (an EMState dict or None)."""
    assert ours["weights"].keys() == theirs["weights"].keys()
    for key, value in theirs["weights"].items():
        assert (ours["weights"][key] - value).abs().max() <= 1e-5, key
    assert (ours["em"] is None) == (theirs["em"] is None)
    for key, value in (theirs["em"] or {}).items():
        torch.testing.assert_close(ours["em"][key], value, rtol=1e-5, atol=1e-7, msg=key)


def assert_trained(weights: dict, tokenizer) -> None:
    """Some parameter of ``weights`` is more than 1e-3 from the initial model of tests/hf_tiny.py (seed 0): the
    run trained, so runs that agree do not agree by doing nothing."""
    from hf_tiny import make_model

    initial = make_model(tokenizer).state_dict()
    assert any((weights[key] - value).abs().max() > 1e-3 for key, value in initial.items()), "no parameter moved"


def skip_unsupported_dtype(backend: str, dtype: torch.dtype) -> None:
    """Skip a case the backend cannot run in the tests: the Triton interpreter has no bfloat16 arithmetic."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")


M = 10
IGNORE = -100
# the keys of calibkern.hf.calibration_metrics (evaluate's metrics.json, each demo stage)
METRIC_KEYS = {"ece", "ece_debiased", "smece", "smece_sigma", "ece_l2", "mce", "cw_ece", "accuracy",
               "mean_confidence", "nll", "brier", "n", "ece_ci"}
ACCURACY = torch.linspace(0.0, 1.0, M)  # includes a = 0 and a = 1 (no non-max target mass)


def em_state():
    state = ck.EMState(M)
    g = torch.Generator().manual_seed(4)
    state.pi = torch.softmax(torch.randn(M, generator=g, dtype=torch.float64), 0)
    state.theta = torch.rand(M, generator=g, dtype=torch.float64)
    return state


def outputs(logits, labels, backend):
    """Statistics, losses (sum reduction), gradients and E-step statistics of every op, the metric sums, the rows'
    top-1 confidences and a bootstrap of them, by name (also the outputs that tests/test_robustness.py and
    tests/test_determinism.py compare)."""
    out = {}
    for mode in ("top1", "classwise"):
        stats = ck.binned_stats(logits, labels, M, mode=mode, backend=backend)
        out.update({f"{mode}.counts": stats.counts, f"{mode}.sum_conf": stats.sum_conf,
                    f"{mode}.sum_correct": stats.sum_correct})
    for name, loss_of in {
        "hard_bin": lambda z, st: ck.calibration_loss(z, labels, ACCURACY, reduction="sum", backend=backend),
        "em_target": lambda z, st: ck.em_regularizer(z, labels, st, reduction="sum", accumulate=True,
                                                     backend=backend),
        "em_ece": lambda z, st: ck.em_regularizer(z, labels, st, form="ece", accumulate=True, backend=backend),
    }.items():
        state = em_state()
        z = logits.clone().requires_grad_(True)
        loss = loss_of(z, state)
        loss.backward()
        out.update({f"{name}.loss": loss.detach(), f"{name}.grad": z.grad, f"{name}.stats": state.accum})
    sums = metric_sums_tensors(logits, labels, M, classwise=True, backend=backend)
    out.update({f"metric_sums.{part}": value for part, value in zip(METRIC_SUMS_PARTS, sums, strict=True)})
    rows = ck.top1_rows(logits, labels, backend=backend)
    out.update({"top1_rows.confidence": rows.confidence, "top1_rows.correct": rows.correct})
    kept = rows.confidence[rows.kept], rows.correct[rows.kept]
    boot = custom_ops.bootstrap_stats(*kept, M, 8, 3, ck.backends.resolve(backend, logits.device, logits.dtype)[0])
    out.update({f"bootstrap.{part}": value for part, value in zip(("counts", "sum_conf", "sum_correct"), boot,
                                                                   strict=True)})
    return out


METRIC_SUMS_PARTS = ("counts", "sum_conf", "sum_correct", "n_skipped", "scores", "class_counts", "class_sum_conf",
                     "class_sum_correct")


def run_without(packages: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (torch backend) where importing any of the top-level ``packages`` raises
    ImportError, as on a machine without them."""
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               f"        if name.split('.')[0] in {tuple(packages)!r}:\n"
               "            raise ImportError('blocked ' + name)\n"
               "sys.meta_path.insert(0, Block())\n")
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CALIBKERN_BACKEND": "torch"})
