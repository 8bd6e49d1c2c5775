"""Builds the C++ CPU backend ``calibkern._C`` ahead of time, when torch is importable at build time.

The recipe (the sources in the top-level ``csrc/``, flags, ``-march``) is calibkern/_build.py's, shared with the
build at first use. A plain ``pip install`` builds in an isolated environment that holds no torch (pyproject.toml does not ask for
one, so no second torch is downloaded): the package is then pure Python, and calibkern._cpp compiles the
extension against the user's torch at first use. ``pip install --no-build-isolation`` (what ``make`` runs)
compiles it here, against the installed torch, and records what it was built for in
``calibkern/_build_config.py`` (not tracked).

The library goes into the per-user build cache of the build at first use (calibkern/_jit.py), keyed by the
sources' contents, torch, its ABI, Python and the CPU target; an install that finds its key there (a reinstall
of the same sources, another venv with the same torch) copies the library from the cache instead of compiling,
and says so on stderr, as it says why when it compiles.

A failed compile prints a warning and leaves the package usable (first use tries again), except under
``CI=true``, where it fails the build. Environment switches:

* ``CALIBKERN_NO_EXT=1``   — skip the ahead-of-time build.
* ``CALIBKERN_MARCH=ARCH`` — compile for ``-march=ARCH`` (default ``native``: the build machine), e.g.
  ``x86-64-v3`` (AVX2) for a cluster whose nodes differ.
* ``CALIBKERN_PORTABLE=1`` — no ``-march`` at all (the compiler's baseline, SSE2 on x86-64).
"""

import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The C++ sources live in the top-level csrc/ and ship inside the package as calibkern/csrc/, where the build at
# first use finds them (calibkern/_build.py, CSRC).
SOURCE_PACKAGES = {"calibkern.csrc": "csrc", "calibkern.csrc.cpu": "csrc/cpu"}
PACKAGES = dict(
    packages=find_packages(include=["calibkern*"]) + list(SOURCE_PACKAGES),
    package_dir=SOURCE_PACKAGES,
    package_data={name: ["*.cpp", "*.h"] for name in SOURCE_PACKAGES},
)
BUILD_CONFIG = os.path.join(ROOT, "calibkern", "_build_config.py")


def _recipe():
    spec = importlib.util.spec_from_file_location("_build", os.path.join(ROOT, "calibkern", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def _cache():
    """calibkern/_jit.py, imported from this tree (the package's __init__ imports nothing heavy)."""
    sys.path.insert(0, ROOT)
    from calibkern import _jit

    return _jit


def _extensions():
    if os.environ.get("CALIBKERN_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build: no torch here, calibkern._cpp builds at first use
        return [], {}
    build = _recipe()
    target = build.march()
    build.write_build_config(BUILD_CONFIG, build.build_config(target))
    ext = CppExtension(
        name="calibkern._C",
        sources=[os.path.relpath(path, ROOT) for path in build.sources()],
        include_dirs=[build.CSRC],
        extra_compile_args={"cxx": build.cxx_flags(target)},
        extra_link_args=build.LINK_FLAGS,
    )

    class OptionalBuildExtension(BuildExtension):
        """Take the extension from the build cache, else compile it (and put it there); a compile error is a
        warning (a failure under CI=true)."""

        def build_extension(self, extension):
            cache = _cache()
            entry, output = cache.cache_entry(), self.get_ext_fullpath(extension.name)
            try:
                cached = cache.cached_library(entry)
            except ImportError as exc:  # a cache that is not the user's: compile, and leave it alone
                print(f"calibkern: {exc}", file=sys.stderr)
                cached = None
            if cached is not None:
                print(f"calibkern: calibkern._C taken from the build cache {entry.directory} (the same sources, "
                      "torch, ABI, Python and CPU target; nothing to compile)", file=sys.stderr)
                os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
                shutil.copyfile(cached, output)
                return
            print(f"calibkern: compiling calibkern._C ({cache.rebuild_reason(entry)})", file=sys.stderr)
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no ahead-of-time build"
                if os.environ.get("CI") == "true":
                    raise
                if os.path.exists(BUILD_CONFIG):
                    os.remove(BUILD_CONFIG)
                print(f"WARNING: calibkern._C was not built ({exc}); calibkern will try to compile it at first "
                      "use, and `calibkern info` says why the cpp backend is unavailable.", file=sys.stderr)
                return
            try:
                cache.store(entry, output, "built ahead of time by setup.py")
            except (ImportError, OSError) as exc:
                print(f"calibkern: the build was not put into the cache ({exc})", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **PACKAGES)
