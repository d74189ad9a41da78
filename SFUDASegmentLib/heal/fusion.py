"""HEAL size-aware fusion of the denoised pseudo-labels and the selected sample's segmentation.

The smallest structure is the one the diffusion round trip (render a source-style image from
``Y*``, segment it with the source model) is most likely to lose, so it is taken from ``Y*``;
every other class comes from ``M_S(I_B)``, the source model's segmentation of the selected
candidate. Label maps hold class indices ``0..K-1`` (0 = background).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputError


@dataclass
class FusionResult:
    """Outcome of :func:`size_aware_fusion`.

    Attributes:
        labels: ``(*S)`` fused class indices (dtype of the selected segmentation).
        smallest_class: the class taken from ``Y*``; None when nothing was fused.
        weights: ``lambda_k`` per foreground class (see :func:`fusion_weights`).
        fused: False for single-class tasks and when ``Y*`` has no foreground; ``labels`` is
            then ``M_S(I_B)`` unchanged.
    """

    labels: np.ndarray
    smallest_class: Optional[int]
    weights: dict[int, float]
    fused: bool


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """``labels`` as an integer array with values in ``0..num_classes-1``."""
    values = np.asarray(labels)
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise InputError(f"{name} must be an integer class-index map; got dtype {values.dtype}.")
    if num_classes < 2:
        raise InputError(f"num_classes counts the background too and must be >= 2; got "
                         f"{num_classes}.")
    if values.size and (values.min() < 0 or values.max() > num_classes - 1):
        raise InputError(f"{name} holds values outside 0..{num_classes - 1} ([{values.min()}, "
                         f"{values.max()}]); pass class indices, not label values.")
    return values


def class_sizes(refined: np.ndarray, num_classes: int) -> dict[int, int]:
    """Voxel count ``v_k`` of every foreground class ``k = 1..K-1`` in ``Y*``.

    Args:
        refined: ``(*S)`` class indices.
        num_classes: K, background included.

    Returns:
        ``{k: v_k}`` for every foreground class (0 for absent classes).
    """
    values = _check_labels(refined, num_classes, "The refined label map")
    counts = np.bincount(values.ravel().astype(np.int64), minlength=num_classes)
    return {k: int(counts[k]) for k in range(1, num_classes)}


def fusion_weights(sizes: dict[int, int]) -> dict[int, float]:
    """``lambda_k = (1 / v_k) / sum_i (1 / v_i)`` over the classes present (``v_i > 0``).

    Smaller structures get larger weights; the weights of present classes sum to 1, absent
    classes get 0. No class present: all weights 0.

    Args:
        sizes: ``{k: v_k}`` as from :func:`class_sizes`.

    Returns:
        ``{k: lambda_k}`` with the same keys.
    """
    if any(v < 0 for v in sizes.values()):
        raise InputError(f"Class sizes must be >= 0; got {sizes}.")
    total = sum(1.0 / v for v in sizes.values() if v > 0)
    return {k: (1.0 / v) / total if v > 0 else 0.0 for k, v in sizes.items()}


def size_aware_fusion(refined: np.ndarray, selected_segmentation: np.ndarray,
                      num_classes: int) -> FusionResult:
    """Fuse ``Y*`` and ``M_S(I_B)``: the smallest class of ``Y*`` from ``Y*``, the rest from
    ``M_S(I_B)``.

    Precisely, with ``s`` the foreground class with the fewest voxels in ``Y*`` (classes
    absent from ``Y*`` are ignored; ties go to the smaller class index):
    start from ``M_S(I_B)``, set its voxels of class ``s`` to background, then paint the voxels
    of class ``s`` in ``Y*`` with ``s`` (overwriting whatever ``M_S(I_B)`` had there).

    No fusion (``fused=False``, result = a copy of ``M_S(I_B)``) when ``num_classes == 2`` (a
    single foreground class, e.g. polyps, as in the paper) or when ``Y*`` has no foreground.

    Args:
        refined: ``(*S)`` class indices ``Y*``.
        selected_segmentation: ``(*S)`` class indices ``M_S(I_B)``.
        num_classes: K, background included.

    Returns:
        :class:`FusionResult`. Inputs are not modified.
    """
    y_star = _check_labels(refined, num_classes, "The refined label map")
    selected = _check_labels(selected_segmentation, num_classes, "The selected segmentation")
    if y_star.shape != selected.shape:
        raise InputError(f"Refined labels {y_star.shape} and the selected segmentation "
                         f"{selected.shape} must have the same shape.")
    sizes = class_sizes(y_star, num_classes)
    weights = fusion_weights(sizes)
    fused = selected.copy()
    present = [k for k, v in sizes.items() if v > 0]
    if num_classes == 2 or not present:
        return FusionResult(labels=fused, smallest_class=None, weights=weights, fused=False)
    smallest = min(present, key=lambda k: (sizes[k], k))
    fused[fused == smallest] = 0
    fused[y_star == smallest] = smallest
    return FusionResult(labels=fused, smallest_class=smallest, weights=weights, fused=True)
