"""SFUDASegmentLib: source-free unsupervised domain adaptation for medical image segmentation.

Public API (arrays are ``(z, y, x)`` with spacing per array axis; see ``geometry``):

- :class:`SourceCheckpoint` (``checkpoint``): the ``*.sfuda`` model file.
- :func:`read_image`, :func:`write_image` (``data.io``); :class:`Volume`, :class:`Geometry`
  (``data.geometry``).
- :func:`train_source` (``training``), :func:`segment` (``inference``: no adaptation).
- :func:`heal_adapt` (``heal``), :func:`gmm_adapt` and :func:`fit_prototypes` (``gmm``),
  :func:`run_diffuse_uda` (``diffuse_uda``).
- :class:`Result` (``results``): what every method returns; :func:`write_result` /
  :func:`read_result`.
- :func:`evaluate` (``evaluation``), :func:`make_phantom` (``data.synthetic``).

Imports are lazy so that ``import SFUDASegmentLib`` does not load PyTorch (the Slicer module
checks its dependencies first).
"""

from .utils.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "SourceCheckpoint": ".checkpoint", "read_image": ".data.io", "write_image": ".data.io",
    "read_label": ".data.io", "Volume": ".data.geometry", "Geometry": ".data.geometry",
    "train_source": ".training.segmentation", "segment": ".inference.segment",
    "heal_adapt": ".heal", "gmm_adapt": ".gmm", "fit_prototypes": ".gmm", "run_diffuse_uda": ".diffuse_uda",
    "Result": ".results.result", "write_result": ".results.files", "read_result": ".results.files",
    "evaluate": ".evaluation.metrics", "make_phantom": ".data.synthetic",
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__ = lazy_exports(__name__, _EXPORTS)
