"""Lazy re-exports (PEP 562): a package names its public objects without importing the modules that define
them, so ``import calibkern`` and ``calibkern --help`` load neither torch nor transformers until a name is
used (docs/architecture.md). This module imports nothing from calibkern."""

from __future__ import annotations

import importlib
import importlib.util
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module that defines
    it (relative, e.g. ``".metrics"``), imported on first use and then cached on the package; any other name
    that is one of the package's submodules is imported as such."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
