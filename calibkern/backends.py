"""Backend registry, availability probes and selection (docs/backends.md, docs/backends.md).

A backend is a module exposing the kernel contract of docs/backends.md. Selection order: the ``backend=``
argument of a call, else :func:`set_backend`, else ``CALIBKERN_BACKEND``, else ``"auto"`` — triton for
CUDA tensors, cpp for CPU tensors when the extension is built, torch otherwise. A backend asked for by
name that is missing is an error that says how to get it; there is no silent fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import NamedTuple

import torch

BACKENDS = ("torch", "cpp", "triton")
_MODULES = {"torch": "calibkern.reference", "cpp": "calibkern._cpp", "triton": "calibkern.ops.triton"}
_HOW_TO_GET = {
    "cpp": "build the C++ extension: calibkern compiles it at first use with a C++ compiler (g++ or clang++ with "
           "OpenMP) and ninja, or ahead of time in `pip install --no-build-isolation .`; `calibkern info` shows "
           "what failed",
    "triton": "install triton (`pip install triton`) and run on a CUDA device, or set TRITON_INTERPRET=1 "
              "before importing triton to run the kernels on CPU through the interpreter",
}

_selected: str | None = None
_deterministic: bool = False
_probe_cache: dict[str, ModuleType | Exception] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


def _check_name(name: str, allow_auto: bool = True) -> str:
    valid = BACKENDS + (("auto",) if allow_auto else ())
    if name not in valid:
        raise ValueError(f"backend must be one of {', '.join(map(repr, valid))}; got {name!r}")
    return name


def _triton_runs_here() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _why_triton_cannot_run() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return "triton is installed, but torch sees no CUDA device and TRITON_INTERPRET is not 1"


def _load(name: str) -> ModuleType | Exception:
    if name not in _probe_cache:
        try:
            if name == "triton" and not _triton_runs_here():
                raise ImportError(_why_triton_cannot_run())
            _probe_cache[name] = importlib.import_module(_MODULES[name])
        except (ImportError, OSError, RuntimeError) as exc:  # cpp's build at first use reports ImportError
            _probe_cache[name] = exc
    return _probe_cache[name]


class BackendStatus(NamedTuple):
    """One line of :func:`backend_report`: whether a backend runs here, and how or why not."""

    name: str
    available: bool
    detail: str


def backend_report() -> list[BackendStatus]:
    """Every backend, whether it can run in this process, and how (or why not); ``calibkern info`` prints it."""
    report = []
    for name in BACKENDS:
        loaded = _load(name)
        if isinstance(loaded, Exception):
            report.append(BackendStatus(name, False, str(loaded)))
        elif name == "torch":
            report.append(BackendStatus(name, True, f"the reference, plain PyTorch {torch.__version__}"))
        elif name == "cpp":
            report.append(BackendStatus(name, True, f"{loaded.HOW_BUILT}, for {loaded.BUILD_TARGET}; "
                                                    f"{loaded._C.max_threads()} OpenMP threads"))
        else:
            how = "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "CUDA"
            report.append(BackendStatus(name, True, f"triton {importlib.import_module('triton').__version__}, {how}"))
    return report


def format_backend_report(report: list[BackendStatus] | None = None) -> str:
    report = backend_report() if report is None else report
    width = max(len(status.name) for status in report)
    return "\n".join(f"{status.name:<{width}}  {'yes' if status.available else 'no ':<3}  {status.detail}"
                     for status in report)


def is_available(name: str) -> bool:
    return not isinstance(_load(_check_name(name, allow_auto=False)), Exception)


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, reference first."""
    return [name for name in BACKENDS if is_available(name)]


def set_backend(name: str | None) -> None:
    """Select the default backend for every op (``None`` or ``"auto"`` restores automatic choice)."""
    global _selected
    if name is not None:
        _check_name(name)
        if name != "auto":
            get_module(name)  # fail now, not at the first call
    _selected = None if name == "auto" else name


def get_backend() -> str:
    """The backend name in force when a call passes ``backend=None``."""
    if _selected is not None:
        return _selected
    name = os.environ.get("CALIBKERN_BACKEND", "auto") or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"CALIBKERN_BACKEND must be one of {', '.join(map(repr, BACKENDS + ('auto',)))}; got {name!r}")
    return name


def get_module(name: str) -> ModuleType:
    loaded = _load(_check_name(name, allow_auto=False))
    if isinstance(loaded, Exception):
        raise BackendUnavailableError(
            f"backend {name!r} is not available ({loaded}); to get it, {_HOW_TO_GET[name]}") from loaded
    return loaded


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, ModuleType]:
    """The (name, module) that runs an op on tensors of ``device`` (and ``dtype``).

    ``auto`` gives float64 inputs to the reference, the only backend that computes in float64.
    """
    name = get_backend() if backend is None else _check_name(backend)
    if name == "auto":
        if dtype == torch.float64:
            name = "torch"
        elif device.type == "cuda" and is_available("triton"):
            name = "triton"
        elif device.type == "cpu" and is_available("cpp"):
            name = "cpp"
        else:
            if device.type == "cpu":
                _warn_cpu_fallback()
            name = "torch"
    module = get_module(name)
    if name == "cpp" and device.type != "cpu":
        raise BackendUnavailableError(f"backend 'cpp' runs on CPU tensors; got tensors on {device}")
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    return name, module


_warned_fallback = False


def _warn_cpu_fallback() -> None:
    """Once per process: ``auto`` runs CPU tensors on the reference because the cpp backend is unusable."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"calibkern: the cpp backend is unavailable ({_load('cpp')}); CPU tensors run on the torch "
                      "reference, which is several times slower. `calibkern info` shows every backend.",
                      RuntimeWarning, stacklevel=3)


def set_deterministic(flag: bool) -> None:
    """Deprecated: every calibkern kernel is always bitwise reproducible (fixed-order reductions, no float
    atomics), so this switch changes no result. It only sets what :func:`is_deterministic` reports."""
    global _deterministic
    warnings.warn("calibkern.set_deterministic is deprecated and changes nothing: calibkern's kernels are always "
                  "deterministic (docs/reliability.md#determinism)", DeprecationWarning, stacklevel=2)
    _deterministic = bool(flag)


def is_deterministic() -> bool:
    """Deprecated with :func:`set_deterministic`: whether it was switched on, or torch's deterministic
    algorithms are."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()
