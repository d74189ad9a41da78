"""SFUDASegmentLib: source-free unsupervised domain adaptation for medical image segmentation.

Public API (arrays are ``(z, y, x)`` with spacing per array axis; see ``geometry``):

- :class:`SourceCheckpoint` (``checkpoint``): the ``*.sfuda`` model file.
- :func:`read_image`, :func:`write_image` (``io``); :class:`Volume`, :class:`Geometry`.
- :func:`train_source` (``training``), :func:`segment` (``inference``: no adaptation).
- :func:`heal_adapt` (``heal``), :func:`gmm_adapt` and :func:`fit_prototypes` (``gmm``),
  :func:`run_diffuse_uda` (``diffuse_uda``).
- :class:`Result`: what every method returns; :func:`write_result` / :func:`read_result`.
- :func:`evaluate` (``metrics``), :func:`make_phantom` (``synthetic``).

Imports are lazy so that ``import SFUDASegmentLib`` does not load PyTorch (the Slicer module
checks its dependencies first).
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "SourceCheckpoint": ".checkpoint", "read_image": ".io", "write_image": ".io", "read_label": ".io",
    "Volume": ".geometry", "Geometry": ".geometry", "train_source": ".training", "segment": ".inference",
    "heal_adapt": ".heal", "gmm_adapt": ".gmm", "fit_prototypes": ".gmm", "run_diffuse_uda": ".diffuse_uda",
    "Result": ".result", "write_result": ".result_files", "read_result": ".result_files",
    "evaluate": ".metrics", "make_phantom": ".synthetic",
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__ = lazy_exports(__name__, _EXPORTS)
