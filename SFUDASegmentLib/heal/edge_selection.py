"""HEAL edge-guided selection: pick the diffusion candidate whose edges match the condition's.

For every candidate image ``I_i`` and the denoised pseudo-labels ``Y*`` (the diffusion
condition), Canny edges are extracted and scored

    ``S_i = |E(I_i) AND E(Y*)| / |E(Y*)|``

(HEAL paper); the candidate with the largest ``S_i`` is selected. Edges come from OpenCV's
Canny applied slice by slice along axis 0 (axial for ``(z, y, x)`` volumes), as the public
code does with scikit-image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
from scipy.ndimage import binary_dilation

from ..config import HEALConfig
from ..errors import InputError
from ..utils.progress import ProgressReporter, report

#: ITU-R BT.601 luma weights, used to turn RGB candidates (n, y, x, 3) into grey images.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class SelectionResult:
    """Outcome of :func:`select_candidate`.

    Attributes:
        scores: edge score ``S_i`` of every candidate, in candidate order.
        selected_index: index of the best candidate (lowest index among ties).
        reference_edges_empty: True when ``Y*`` has no edges at all (e.g. no foreground); then
            every score is 0.0 and candidate 0 is selected.
    """

    scores: list[float]
    selected_index: int
    reference_edges_empty: bool


def _gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma (scikit-image's ``truncate=4``)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def _canny_slice(unit_slice: np.ndarray, low: float, high: float, sigma: float) -> np.ndarray:
    """Canny edges of one 2D float slice already scaled to [0, 1] (by the whole image)."""
    work = np.ascontiguousarray(unit_slice, dtype=np.float32)
    if sigma > 0:
        k = _gaussian_kernel_size(sigma)
        work = cv2.GaussianBlur(work, (k, k), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT_101)
    grey = np.clip(np.rint(work * 255.0), 0, 255).astype(np.uint8)
    if grey.min() == grey.max():
        return np.zeros(grey.shape, dtype=bool)
    edges = cv2.Canny(grey, low * 255.0, high * 255.0, apertureSize=3, L2gradient=True)
    return edges > 0


def canny_edges(image: np.ndarray, low: float = 0.1, high: float = 0.2,
                sigma: float = 1.0) -> np.ndarray:
    """Canny edge map of a 2D image or, slice by slice along axis 0, of a 3D volume.

    Steps: min-max scale the **whole** image/volume to [0, 1] (one scale for all slices, so a
    faint slice is not amplified); per 2D slice, Gaussian blur with ``sigma`` (kernel
    ``2 * round(4 sigma) + 1``, reflected border) when ``sigma > 0``; quantise to uint8
    0..255; ``cv2.Canny`` with hysteresis thresholds ``low * 255`` and ``high * 255`` on the
    Sobel (3x3) gradient magnitude. ``L2gradient=True`` (Euclidean magnitude) matches the
    scikit-image Canny of the public code, whose default thresholds 0.1 / 0.2 on a [0, 1]
    image are the same relative thresholds. A constant image or slice has no edges.

    Args:
        image: ``(y, x)`` or ``(z, y, x)`` float (or integer) array, finite.
        low, high: hysteresis thresholds as fractions of the [0, 1] range, ``low <= high``.
        sigma: Gaussian smoothing in pixels; 0 disables it.

    Returns:
        bool array of ``image``'s shape.
    """
    values = np.asarray(image)
    if values.ndim not in (2, 3):
        raise InputError(f"Canny edges need a 2D (y, x) or 3D (z, y, x) array; got shape "
                         f"{values.shape}. Convert RGB images to grey first.")
    if not 0 <= low <= high:
        raise InputError(f"Canny thresholds must satisfy 0 <= low <= high; got low={low}, "
                         f"high={high}.")
    if sigma < 0:
        raise InputError(f"Canny sigma must be >= 0; got {sigma}.")
    values = values.astype(np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise InputError("Canny edges need a non-empty image without NaN or infinite values.")
    lo, hi = values.min(), values.max()
    if hi == lo:
        return np.zeros(values.shape, dtype=bool)
    unit = (values - lo) / (hi - lo)
    if unit.ndim == 2:
        return _canny_slice(unit, low, high, sigma)
    return np.stack([_canny_slice(s, low, high, sigma) for s in unit])


def label_edges(labels: np.ndarray, low: float = 0.1, high: float = 0.2,
                sigma: float = 1.0) -> np.ndarray:
    """Boundaries of a label map by Canny, as the paper does for the condition ``Y*``.

    The class-index map is treated as an image: min-max scaled to [0, 1] and passed through
    :func:`canny_edges` with the same settings as the candidates, so a candidate equal to the
    label map scores exactly 1. (Morphological class-boundary extraction was not used: it
    would place the boundary on different pixels than Canny does on the images.)

    Args:
        labels: ``(y, x)`` or ``(z, y, x)`` integer class indices.
        low, high, sigma: as in :func:`canny_edges`.

    Returns:
        bool edge map of ``labels``' shape.
    """
    values = np.asarray(labels)
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise InputError(f"label_edges expects an integer label map; got dtype {values.dtype}.")
    return canny_edges(values, low=low, high=high, sigma=sigma)


def dilate_in_slice(edges: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a 2D or 3D bool map by ``radius`` pixels within each slice (axis 0 of 3D).

    The structuring element is a ``(2r+1) x (2r+1)`` square (chessboard distance <= r).
    ``radius = 0`` returns a copy.
    """
    mask = np.asarray(edges, dtype=bool)
    if radius < 0:
        raise InputError(f"Edge tolerance must be >= 0 pixels; got {radius}.")
    if radius == 0:
        return mask.copy()
    footprint = np.ones((2 * radius + 1,) * 2, dtype=bool)
    if mask.ndim == 3:
        footprint = footprint[None]
    return binary_dilation(mask, structure=footprint)


def edge_score(candidate_edges: np.ndarray, reference_edges: np.ndarray,
               tolerance: int = 0) -> float:
    """Share of the reference edge pixels that the candidate reproduces.

    ``S = |dilate_r(E_i) AND E_ref| / |E_ref|``, in [0, 1]. With ``tolerance`` r = 0 this is
    the paper's ``|E_i AND E_ref| / |E_ref|`` (exact voxel overlap). With r > 0 a reference
    edge pixel counts as matched when a candidate edge lies within r pixels in the same slice;
    the tolerance is applied to the candidate's edges so that the denominator stays the
    reference's own edge count (a dilated reference could never be covered by a thin edge).
    An empty reference gives 0.0 (see :func:`select_candidate` for the flag).

    Args:
        candidate_edges: bool ``(*S)`` edges of candidate ``I_i``.
        reference_edges: bool ``(*S)`` edges of the condition ``Y*``.
        tolerance: r in pixels (``HEALConfig.edge_tolerance``).

    Returns:
        The score as a Python float.
    """
    candidate = np.asarray(candidate_edges, dtype=bool)
    reference = np.asarray(reference_edges, dtype=bool)
    if candidate.shape != reference.shape:
        raise InputError(f"Edge maps differ in shape: candidate {candidate.shape}, reference "
                         f"{reference.shape}. Candidates must be on the label map's grid.")
    total = int(reference.sum())
    if total == 0:
        return 0.0
    matched = int(np.logical_and(dilate_in_slice(candidate, tolerance), reference).sum())
    return matched / total


def _grey_candidates(candidates: np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """``(n, *S)`` grey candidates; RGB ``(n, y, x, 3)`` is converted with BT.601 luma."""
    if candidates.shape[1:] == spatial_shape:
        return candidates
    if len(spatial_shape) == 2 and candidates.shape[1:] == (*spatial_shape, 3):
        return np.tensordot(candidates.astype(np.float32), LUMA_WEIGHTS, axes=([-1], [0]))
    raise InputError(f"Candidates must be shaped (n, *S) (or (n, y, x, 3) for RGB) with S the "
                     f"label map's shape {spatial_shape}; got {candidates.shape}.")


def select_candidate(candidates: np.ndarray, refined_labels: np.ndarray, config: HEALConfig,
                     progress: Optional[ProgressReporter] = None) -> SelectionResult:
    """Edge-guided selection of the best diffusion candidate ``I_B``.

    Args:
        candidates: ``(n, *S)`` candidate images (float), or ``(n, y, x, 3)`` RGB for 2D.
        refined_labels: ``(*S)`` class indices ``Y*`` (the diffusion condition).
        config: ``canny_low``, ``canny_high``, ``canny_sigma`` and ``edge_tolerance``.
        progress: optional reporter (stage ``"selection"``).

    Returns:
        :class:`SelectionResult`. Ties go to the lowest index; when ``Y*`` has no edges every
        score is 0.0, candidate 0 is selected and ``reference_edges_empty`` is True.
    """
    labels = np.asarray(refined_labels)
    images = np.asarray(candidates)
    if images.ndim < 3 or images.shape[0] < 1:
        raise InputError(f"Candidates must be shaped (n, *S) with n >= 1; got {images.shape}.")
    images = _grey_candidates(images, labels.shape)
    settings = dict(low=config.canny_low, high=config.canny_high, sigma=config.canny_sigma)
    reference = label_edges(labels, **settings)
    empty = not reference.any()
    scores: list[float] = []
    for i, image in enumerate(images):
        report(progress, "selection", i / len(images), f"Edges of candidate {i + 1}",
               done=i, total=len(images), unit="candidates")
        edges = canny_edges(image, **settings)
        scores.append(edge_score(edges, reference, tolerance=config.edge_tolerance))
    report(progress, "selection", 1.0, "Candidate selected", done=len(images), total=len(images),
           unit="candidates")
    return SelectionResult(scores=scores, selected_index=int(np.argmax(scores)),
                           reference_edges_empty=empty)
