"""What produced a result: versions, commit, backend, threads, seed and CPU, recorded in every results and metrics
JSON that ``calibkern`` writes (docs/demo.md#provenance)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout calibkern runs from (``+dirty`` with uncommitted changes to tracked files),
    or ``None`` for an installed copy or without git."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(seed: int | None = None) -> dict:
    """``{"calibkern", "commit", "python", "torch", "transformers", "backend", "available_backends", "threads",
    "seed", "cpu", "platform"}``."""
    import torch

    import calibkern

    return {"calibkern": calibkern.__version__, "commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "backend": calibkern.get_backend(),
            "available_backends": calibkern.available_backends(), "threads": torch.get_num_threads(), "seed": seed,
            "cpu": cpu_model(), "platform": platform.platform()}
