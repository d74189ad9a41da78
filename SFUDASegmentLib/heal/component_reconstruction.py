"""Boundary-preserving denoising: keep whole connected components of the pseudo-labels ``Y_T``
that the hierarchical denoising confirms, instead of keeping only the confirmed voxels.

HEAL's hierarchical denoising (``denoising.py``) can only remove voxels, and with the paper's
constants its NIG stage removes every voxel within one to a few voxels of an uncertain boundary:
it erodes every structure. Component reconstruction uses the denoised labels as *markers*
(morphological reconstruction by connected components): a connected component of ``Y_T`` is
kept whole, with its own boundary, when it holds at least one marker voxel, and removed
otherwise. Spurious detections without a confident core still go; the eroded boundaries come
back.

Groupings:
    ``"class"``: components of each class ``k`` separately (``Y_T == k``), confirmed by marker
    voxels of the same class.
    ``"foreground"``: components of the whole foreground (``Y_T > 0``, e.g. the whole tumour),
    confirmed by a marker voxel of any foreground class; a kept component keeps every class
    ``Y_T`` gives its voxels.

Connectivity is by faces (4-neighbours in 2D, 6 in 3D).

Rule for a class that loses every marker (``orphan``): with ``"class"`` grouping, a class that
is present in ``Y_T`` but has no marker voxel anywhere in the image is *kept as Y_T has it*
(``orphan="keep"``, the default): the denoising then holds no confident voxel of that class to
tell its true components from its spurious ones, and removing them all would erase a structure
that the source model found (the failure that made the paper's mode lose on real scans). With
``orphan="drop"`` such a class is removed like any unconfirmed component. Either way the class
is reported in :attr:`ComponentReconstruction.orphan_classes`.

Label maps hold class indices ``0..K-1`` (0 = background); ``*S`` is ``(y, x)`` or ``(z, y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError

GROUPINGS = ("class", "foreground")
ORPHAN_RULES = ("keep", "drop")


@dataclass
class ComponentReconstruction:
    """Outcome of :func:`reconstruct_components`.

    Attributes:
        labels: ``(*S)`` reconstructed class indices (dtype of the pseudo-labels).
        components: per foreground class ``k``: ``{"components": n, "kept_components": m,
            "voxels": v, "kept_voxels": w}`` counted in ``Y_T`` (with ``"foreground"`` grouping
            the counts of components are of whole-foreground components touching class ``k``).
        orphan_classes: classes present in ``Y_T`` without any marker voxel (``"class"``
            grouping only).
    """

    labels: np.ndarray
    components: dict[int, dict[str, int]] = field(default_factory=dict)
    orphan_classes: list[int] = field(default_factory=list)


def _structure(ndim: int) -> np.ndarray:
    """Face connectivity for ``ndim`` axes."""
    return ndimage.generate_binary_structure(ndim, 1)


def _confirmed(mask: np.ndarray, markers: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Components of ``mask`` holding a ``markers`` voxel: ``(kept mask, components, kept)``."""
    components, count = ndimage.label(mask, structure=_structure(mask.ndim))
    if count == 0:
        return np.zeros(mask.shape, dtype=bool), 0, 0
    hit = np.unique(components[markers & mask])
    hit = hit[hit > 0]
    keep = np.zeros(count + 1, dtype=bool)
    keep[hit] = True
    return keep[components], count, int(hit.size)


def reconstruct_components(pseudo: np.ndarray, markers: np.ndarray, num_classes: int,
                           grouping: str = "class", orphan: str = "keep") -> ComponentReconstruction:
    """Keep the connected components of ``Y_T`` that hold a marker voxel.

    Args:
        pseudo: ``(*S)`` ``Y_T`` class indices.
        markers: ``(*S)`` confirmed labels (``Y_ent`` or ``Y*``), class indices; a voxel is a
            marker of class ``k`` where ``markers == k`` (``"class"``) or of the foreground
            where ``markers > 0`` (``"foreground"``).
        num_classes: K, background included.
        grouping: ``"class"`` or ``"foreground"`` (see the module docstring).
        orphan: ``"keep"`` or ``"drop"``: what happens to a class without any marker voxel.

    Returns:
        :class:`ComponentReconstruction`; the inputs are not modified. Every kept voxel has its
        ``Y_T`` class; the result is a subset of ``Y_T`` and a superset of the markers' voxels
        that agree with ``Y_T``.

    Raises:
        InputError: shapes differ, values outside ``0..K-1``, unknown grouping or rule.
    """
    if grouping not in GROUPINGS:
        raise InputError(f"Unknown component grouping '{grouping}'; use one of {GROUPINGS}.")
    if orphan not in ORPHAN_RULES:
        raise InputError(f"Unknown rule for classes without markers '{orphan}'; use one of {ORPHAN_RULES}.")
    y = np.asarray(pseudo)
    m = np.asarray(markers)
    if y.shape != m.shape:
        raise InputError(f"Pseudo-labels {y.shape} and markers {m.shape} must have the same shape.")
    for name, values in (("pseudo-labels", y), ("markers", m)):
        if values.size and (values.min() < 0 or values.max() > num_classes - 1):
            raise InputError(f"The {name} hold values outside 0..{num_classes - 1}; pass class indices.")
    out = np.zeros_like(y)
    stats: dict[int, dict[str, int]] = {}
    orphans: list[int] = []
    if grouping == "foreground":
        kept, _, _ = _confirmed(y > 0, m > 0)
        out[kept] = y[kept]
        components, _ = ndimage.label(y > 0, structure=_structure(y.ndim))
        for k in range(1, num_classes):
            of_class = y == k
            touching = np.unique(components[of_class])
            stats[k] = {"components": int(touching.size),
                        "kept_components": int(np.unique(components[of_class & kept]).size),
                        "voxels": int(of_class.sum()), "kept_voxels": int((of_class & kept).sum())}
        return ComponentReconstruction(out, stats, orphans)
    for k in range(1, num_classes):
        of_class = y == k
        marks = m == k
        kept, count, kept_count = _confirmed(of_class, marks)
        if count and not marks.any():
            orphans.append(k)
            if orphan == "keep":
                kept, kept_count = of_class, count
        out[kept] = k
        stats[k] = {"components": count, "kept_components": kept_count,
                    "voxels": int(of_class.sum()), "kept_voxels": int(kept.sum())}
    return ComponentReconstruction(out, stats, orphans)
