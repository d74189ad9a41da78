"""GMM-adapted inference (SFS): class prototypes of the source embedding and sliced-Wasserstein
alignment of the target embedding to them."""

from importlib import import_module
from typing import Any

_EXPORTS = {'gmm_adapt': '.adaptation', 'fit_prototypes': '.fitting'}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the pipeline lazily (it imports ``inference``, which uses this package's
    denoising functions: eager import would be circular)."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
