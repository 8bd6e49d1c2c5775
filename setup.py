"""Builds the optional C++ CPU backend ``calibkern._C``.

The package works without it (the ``torch`` reference backend is always there), so a failed compile
prints a warning instead of failing the install.  Environment switches:

* ``CALIBKERN_NO_EXT=1``   — skip the extension entirely.
* ``CALIBKERN_PORTABLE=1`` — do not tune for the build machine (no ``-march=native``).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    if os.environ.get("CALIBKERN_PORTABLE") != "1":
        cxx.append("-march=native")
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
