"""Lazy re-exports for subpackages whose modules import heavy or mutually dependent code."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``name`` from ``exports[name]`` on first use.

    Args:
        package: the package's ``__name__``.
        exports: public name -> relative module (e.g. ``{"heal_adapt": ".pipeline"}``).
    """
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
