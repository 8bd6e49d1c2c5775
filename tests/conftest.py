"""Shared test set-up.

The Triton interpreter must be switched on before anything imports triton, so it is set here, first:
the whole suite then runs the triton backend's kernels on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import calibkern  # noqa: E402


def pytest_report_header(config):
    """Which build of the cpp backend this run tests (the instruction-set target, how it was obtained)."""
    status = {entry.name: entry for entry in calibkern.backend_report()}["cpp"]
    return f"calibkern cpp backend: {status.detail if status.available else 'unavailable: ' + status.detail}"


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    torch.manual_seed(0)
    yield
    calibkern.set_backend(None)
    calibkern.backends._deterministic = False  # what the deprecated set_deterministic(True) of a test set


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a loaded 2-core machine spend their time in thread hand-offs: one thread (restored).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
