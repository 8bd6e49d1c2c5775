"""How the C++ extension is built, ahead of time by setup.py or at first use against the running torch.

One recipe for both: the C++ sources (:data:`CSRC`: the repository's top-level ``csrc/``, shipped in a wheel
as ``calibkern/csrc/``), ``-O3 -fopenmp -ffp-contract=fast`` and ``-march`` from the environment —
``CALIBKERN_MARCH=ARCH`` (default ``native``) or ``CALIBKERN_PORTABLE=1`` (no ``-march``: the compiler's
baseline). The C++ standard is left to torch's own extension tooling, which passes the one its headers need
(C++17 for older releases, C++20 for newer).

An ahead-of-time build records what it was built for in ``calibkern/_build_config.py``: the CPU flags it
needs (/proc/cpuinfo names), its ``-march`` target, the torch version and its C++ ABI. :func:`mismatch`
compares such a record with the running process (and with a target the environment names explicitly, so
that ``CALIBKERN_MARCH=x86-64-v3`` runs an AVX2 build beside a native one); calibkern._cpp then builds the
extension again at first use into the per-user cache of :func:`cache_root` (calibkern/_jit.py).

Standard library at import: setup.py loads this file by path, before the package is importable.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources_root() -> str:
    """``calibkern/csrc`` in an installed wheel (setup.py maps the top-level ``csrc/`` there), else the
    top-level ``csrc/`` of the source tree (an editable install, setup.py itself)."""
    packaged = os.path.join(HERE, "csrc")
    if os.path.isfile(os.path.join(packaged, "bindings.cpp")):
        return packaged
    return os.path.join(os.path.dirname(HERE), "csrc")


CSRC = _sources_root()
LINK_FLAGS = ["-fopenmp"]

# x86 compiler macros of instruction-set extensions -> their /proc/cpuinfo flag names
CPU_FLAG_MACROS = {
    "SSE3": "pni", "SSSE3": "ssse3", "SSE4_1": "sse4_1", "SSE4_2": "sse4_2", "POPCNT": "popcnt", "AVX": "avx",
    "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI": "bmi1", "BMI2": "bmi2", "AVX512F": "avx512f",
    "AVX512CD": "avx512cd", "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
    "AVX512IFMA": "avx512ifma", "AVX512VBMI": "avx512vbmi", "AVX512VBMI2": "avx512_vbmi2",
    "AVX512VNNI": "avx512_vnni", "AVX512BITALG": "avx512_bitalg", "AVX512VPOPCNTDQ": "avx512_vpopcntdq",
    "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16", "AVX512VP2INTERSECT": "avx512_vp2intersect",
    "GFNI": "gfni", "VAES": "vaes", "VPCLMULQDQ": "vpclmulqdq", "AVXVNNI": "avx_vnni",
}


def _cpu_flags_module():
    try:
        from . import _cpu_flags
    except ImportError:  # loaded by path from setup.py: no parent package
        spec = importlib.util.spec_from_file_location("_cpu_flags", os.path.join(HERE, "_cpu_flags.py"))
        _cpu_flags = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_cpu_flags)
    return _cpu_flags


def sources(root: str | None = None) -> list[str]:
    """The pybind11 module and the CPU kernels under ``root`` (default :data:`CSRC`), as absolute paths."""
    root = root or CSRC
    return [os.path.join(root, "bindings.cpp")] + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))


def env_switch(name: str) -> bool | None:
    """An on/off environment variable: ``1`` on, ``0`` off, unset or empty None; ValueError naming it otherwise."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1; got {value!r}")
    return None if value == "" else value == "1"


def march() -> str | None:
    """The ``-march`` target: None for a portable build."""
    if env_switch("CALIBKERN_PORTABLE"):
        return None
    return os.environ.get("CALIBKERN_MARCH", "native")


def requested_march() -> tuple[bool, str | None]:
    """(whether the environment names a target — ``CALIBKERN_MARCH`` or ``CALIBKERN_PORTABLE=1`` —, that target)."""
    named = bool(env_switch("CALIBKERN_PORTABLE")) or bool(os.environ.get("CALIBKERN_MARCH"))
    return named, march()


def describe_target(target: str | None, cpu_flags) -> str:
    """``-march=<target>`` (or ``portable``) and the widest vector extension among its CPU flags."""
    flags = set(cpu_flags or ())
    widest = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags),
                  "SSE2")
    return f"{'-march=' + target if target else 'portable (no -march)'}, {widest}"


def cxx_flags(target: str | None) -> list[str]:
    return ["-O3", "-fopenmp", "-ffp-contract=fast"] + ([f"-march={target}"] if target else [])


def target_cpu_flags(target: str | None) -> list[str]:
    """The /proc/cpuinfo names of the instruction-set extensions that ``-march=<target>`` enables; for
    ``native``, less any that this machine's /proc/cpuinfo does not list (an older kernel may not name a
    newer extension, and what the build machine cannot check is not required)."""
    if not target:
        return []
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        macros = subprocess.run([*compiler, f"-march={target}", "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    defined = set(re.findall(r"^#define __(\w+)__ 1$", macros, flags=re.MULTILINE))
    here = _cpu_flags_module().cpu_flags() if target == "native" else None
    return sorted(flag for macro, flag in CPU_FLAG_MACROS.items()
                  if macro in defined and (here is None or flag in here))


def torch_identity() -> tuple[str, bool]:
    """(torch version, whether it uses the C++11 ABI) of the running torch."""
    import torch

    return torch.__version__, bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def build_config(target: str | None) -> dict:
    version, abi = torch_identity()
    return {"CPP_CPU_FLAGS": tuple(target_cpu_flags(target)), "TORCH_VERSION": version, "CXX11_ABI": abi,
            "MARCH": target}


def write_build_config(path: str, config: dict) -> None:
    lines = ['"""Written by setup.py: what the compiled extension calibkern._C was built for."""', ""]
    lines += [f"{name} = {value!r}" for name, value in config.items()]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def mismatch(config: dict, torch_version: str, cxx11_abi: bool, cpu_flags) -> str | None:
    """Why an extension built for ``config`` cannot run in this process, or None when it can.

    ``cpu_flags`` is this CPU's flag set (None when unknown: then no flag is required)."""
    built_for = config.get("TORCH_VERSION")
    if built_for is not None and built_for != torch_version:
        return f"built for torch {built_for}, but torch {torch_version} is running"
    if "CXX11_ABI" in config and bool(config["CXX11_ABI"]) != cxx11_abi:
        return f"built with _GLIBCXX_USE_CXX11_ABI={int(config['CXX11_ABI'])}, torch uses {int(cxx11_abi)}"
    missing = _cpu_flags_module().missing_cpu_flags(config.get("CPP_CPU_FLAGS", ()), cpu_flags)
    if missing:
        return (f"compiled for CPU instructions this CPU lacks ({', '.join(missing)}); rebuild it on this machine, "
                "or build a portable one with CALIBKERN_PORTABLE=1")
    named, target = requested_march()
    if named and "MARCH" in config and config["MARCH"] != target:
        return (f"built for {describe_target(config['MARCH'], config.get('CPP_CPU_FLAGS'))}, but the environment asks "
                f"for {'-march=' + target if target else 'a portable build'}")
    return None


def cache_root() -> str:
    """``CALIBKERN_CACHE``, else ``$XDG_CACHE_HOME/calibkern``, else ``~/.cache/calibkern``."""
    if os.environ.get("CALIBKERN_CACHE"):
        return os.environ["CALIBKERN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "calibkern")
