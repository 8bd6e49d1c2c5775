"""Builds the optional C++ CPU backend ``calibkern._C``.

The package works without it (the ``torch`` reference backend is always there), so a failed compile
prints a warning instead of failing the install.  Environment switches:

* ``CALIBKERN_NO_EXT=1``   — skip the extension entirely.
* ``CALIBKERN_MARCH=ARCH`` — compile for ``-march=ARCH`` (default ``native``: the build machine), e.g.
  ``x86-64-v3`` (AVX2) for a cluster whose nodes differ.
* ``CALIBKERN_PORTABLE=1`` — no ``-march`` at all (the compiler's baseline, SSE2 on x86-64).

A build runs only on CPUs with the instruction-set extensions it was compiled for. ``calibkern/_build_config.py``
(written here, not tracked) lists them as /proc/cpuinfo names, and ``calibkern._cpp`` refuses to load the
extension on a CPU that lacks one (the ``cpp`` backend is then unavailable) instead of dying of an illegal
instruction.
"""

import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_CONFIG = os.path.join(ROOT, "calibkern", "_build_config.py")

# x86 compiler macros of instruction-set extensions -> their /proc/cpuinfo flag names
_CPU_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "SSE4_1": "sse4_1", "SSE4_2": "sse4_2", "POPCNT": "popcnt", "AVX": "avx",
    "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI": "bmi1", "BMI2": "bmi2", "AVX512F": "avx512f",
    "AVX512CD": "avx512cd", "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
    "AVX512IFMA": "avx512ifma", "AVX512VBMI": "avx512vbmi", "AVX512VBMI2": "avx512_vbmi2",
    "AVX512VNNI": "avx512_vnni", "AVX512BITALG": "avx512_bitalg", "AVX512VPOPCNTDQ": "avx512_vpopcntdq",
    "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16", "AVX512VP2INTERSECT": "avx512_vp2intersect",
    "GFNI": "gfni", "VAES": "vaes", "VPCLMULQDQ": "vpclmulqdq", "AVXVNNI": "avx_vnni",
}


def _target_cpu_flags(march: str) -> list[str]:
    """The /proc/cpuinfo names of the instruction-set extensions that ``-march=<march>`` enables; for
    ``native``, less any that this machine's /proc/cpuinfo does not list (an older kernel may not name a
    newer extension, and what the build machine cannot check is not required)."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        macros = subprocess.run([*compiler, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    defined = set(re.findall(r"^#define __(\w+)__ 1$", macros, flags=re.MULTILINE))
    spec = importlib.util.spec_from_file_location("_cpu_flags", os.path.join(ROOT, "calibkern", "_cpu_flags.py"))
    cpu_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_flags)
    here = cpu_flags.cpu_flags() if march == "native" else None
    return sorted(flag for macro, flag in _CPU_FLAGS.items() if macro in defined and (here is None or flag in here))


def _write_build_config(cpu_flags: list[str]) -> None:
    text = ('"""Written by setup.py: the /proc/cpuinfo flags the compiled extension calibkern._C needs."""\n\n'
            f"CPP_CPU_FLAGS = {tuple(cpu_flags)!r}\n")
    with open(BUILD_CONFIG, "w") as config:
        config.write(text)


def _extensions():
    if os.environ.get("CALIBKERN_NO_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    bindings = os.path.join("csrc", "bindings.cpp")
    if not sources or not os.path.exists(bindings):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch is needed to build; without it we ship the pure-Python package
        return [], {}

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    march = None if os.environ.get("CALIBKERN_PORTABLE") == "1" else os.environ.get("CALIBKERN_MARCH", "native")
    if march:
        cxx.append(f"-march={march}")
    _write_build_config(_target_cpu_flags(march) if march else [])
    ext = CppExtension(
        name="calibkern._C",
        sources=[bindings] + sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """Compile the extension, but never let a compile error break the install."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no cpp backend"
                print(f"WARNING: calibkern._C was not built ({exc}); the cpp backend is unavailable.",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
