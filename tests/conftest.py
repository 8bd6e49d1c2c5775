"""Shared test set-up.

The Triton interpreter must be switched on before anything imports triton, so it is set here, first:
the whole suite then runs the triton backend's kernels on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import calibkern  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    torch.manual_seed(0)
    yield
    calibkern.set_backend(None)
    calibkern.set_deterministic(False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a loaded 2-core machine spend their time in thread hand-offs: one thread (restored).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_logits(n, k, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


def random_labels(n, k, ignore_frac=0.0, seed=1, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    if ignore_frac:
        y[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return y
