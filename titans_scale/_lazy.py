"""Lazy package exports: a package names what it offers without importing heavy submodules up front."""

from __future__ import annotations

import importlib
import sys


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports ``exports[name]`` (a submodule of ``package``) on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
