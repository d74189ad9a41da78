"""GMM-adapted inference (SFS): class prototypes of the source embedding and sliced-Wasserstein
alignment of the target embedding to them.

Imports are lazy: the adaptation imports ``inference`` and the training code."""

from ..utils.lazy import lazy_exports

_EXPORTS = {'gmm_adapt': '.adaptation', 'fit_prototypes': '.fitting'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
