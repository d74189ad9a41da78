"""SFUDASegmentLib: source-free unsupervised domain adaptation for medical image segmentation.

Public API (arrays are ``(z, y, x)`` with spacing per array axis; see ``geometry``):

- :class:`SourceCheckpoint` (``checkpoint``): the ``*.sfuda`` model file.
- :func:`read_image`, :func:`write_image` (``io``); :class:`Volume`, :class:`Geometry`.
- :func:`train_source` (``training``), :func:`segment` (``inference``: no adaptation).
- :func:`heal_adapt` (``heal``), :func:`gmm_adapt` (``gmm``): the adaptation methods.
- :class:`Result`: what every method returns; :func:`write_result` writes it as files.
- :func:`evaluate` (``metrics``), :func:`make_phantom` (``synthetic``).
"""

__version__ = "0.1.0"
