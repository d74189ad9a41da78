"""HEAL: learning-free source-free adaptation (hierarchical denoising, edge-guided selection of
diffusion candidates, size-aware fusion).

Imports are lazy: the pipeline imports ``inference``, which uses this package's denoising."""

from ..utils.lazy import lazy_exports

_EXPORTS = {'heal_adapt': '.pipeline'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
