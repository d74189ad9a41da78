"""The review queue: the connected regions of a result most likely to be wrong, ranked.

A region is a connected component (face, edge and corner neighbours) of the *suspect* voxels,
those whose uncertainty exceeds a threshold (inside the body mask when one is given). Each
region is named after the structure it lies in or around: the class with the most predicted
voxels in the region grown by ``margin_voxels`` (ties: the lower label value), or
``"outside structures"`` (label value 0) when no structure is that close, a place where the
model may have missed something.

Ranking: by *uncertainty mass*, the sum of the map over the region's voxels times the voxel
volume, so a large region of moderate doubt can outrank a speck of high doubt; where the
map is an error probability the mass is the expected wrong volume. Ties: the higher maximum
first, then the region whose centre comes first in array order (z, then y, then x).

Centre: the region's voxel nearest to its centroid weighted by how far each voxel exceeds the
threshold (always a voxel of the region, also for a ring around a structure), as an array
index and as a physical point in LPS (ITK, the library's geometry) and RAS (Slicer).

Empty results: a map with no voxel above the threshold (an all-zero map, a confident model)
gives an empty queue; a map above the threshold everywhere gives one region, the whole body.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

from ..config import LabelClass
from ..data.geometry import Geometry, lps_to_ras
from ..errors import InputError

OUTSIDE = "outside structures"

#: Suspect-voxel thresholds of the library's maps, in each map's units. Entropies (bits): 0.5
#: bit is a two-class voxel whose top class has about 0.89 probability. NIG variance (min-max
#: normalised): HEAL's tau2. Candidate spread: at least 2 of 6 candidates disagree.
#: Disagreements: the prediction more likely changed than not. Flip variance: a standard
#: deviation of 0.1 of the class probabilities across flips.
SUSPECT_THRESHOLDS: dict[str, float] = {
    "entropy": 0.5, "calibrated_entropy": 0.5, "flip_entropy": 0.5, "ensemble_entropy": 0.5, "nig_variance": 0.2,
    "candidate_spread": 0.25, "disagreement": 0.5, "label_disagreement": 0.5, "flip_variance": 0.01,
}
#: Other maps (e.g. the Mahalanobis distance, unbounded): this share of the map's 99th
#: percentile inside the body.
RELATIVE_THRESHOLD = 0.5


def suspect_threshold(name: str, values: np.ndarray, body: Optional[np.ndarray] = None) -> float:
    """The suspect-voxel threshold of map ``name``: :data:`SUSPECT_THRESHOLDS`, else
    :data:`RELATIVE_THRESHOLD` times the 99th percentile of ``values`` (inside ``body``)."""
    if name in SUSPECT_THRESHOLDS:
        return SUSPECT_THRESHOLDS[name]
    inside = np.asarray(values)[body] if body is not None else np.asarray(values)
    return float(RELATIVE_THRESHOLD * np.percentile(inside, 99)) if inside.size else 0.0


def _check_inputs(labels: np.ndarray, uncertainty: np.ndarray, geometry: Geometry,
                  body: Optional[np.ndarray], threshold: float) -> None:
    """Raise InputError for arrays the queue cannot be built from."""
    if labels.shape != uncertainty.shape:
        raise InputError(f"The uncertainty map {uncertainty.shape} and the label map {labels.shape} must "
                         "have the same shape (both on the input's grid).")
    if labels.ndim != geometry.ndim:
        raise InputError(f"A {labels.ndim}D label map does not fit a {geometry.ndim}D geometry.")
    if body is not None and body.shape != labels.shape:
        raise InputError(f"The body mask {body.shape} must have the label map's shape {labels.shape}.")
    if not np.all(np.isfinite(uncertainty)):
        raise InputError("The uncertainty map contains NaN or infinite values.")
    if not np.isfinite(threshold):
        raise InputError(f"The review threshold must be finite, got {threshold}.")


def _centre(region: np.ndarray, weights: np.ndarray) -> tuple[int, ...]:
    """Index (in the region's box) of the region voxel nearest its weighted centroid."""
    coords = np.argwhere(region)
    w = weights[region].astype(np.float64)
    centroid = (coords * w[:, None]).sum(axis=0) / w.sum()
    distance = ((coords - centroid) ** 2).sum(axis=1)
    return tuple(int(v) for v in coords[int(np.argmin(distance))])  # argmin: first in array order


def _structure(labels: np.ndarray, region: np.ndarray, classes: Sequence[LabelClass],
               margin_voxels: int) -> LabelClass | None:
    """The class with the most predicted voxels in the region grown by the margin, or None."""
    zone = ndimage.binary_dilation(region, ndimage.generate_binary_structure(region.ndim, region.ndim),
                                   iterations=margin_voxels) if margin_voxels > 0 else region
    counts = [(int(np.count_nonzero(labels[zone] == c.value)), -c.value, c) for c in classes]
    best = max(counts, key=lambda item: item[:2], default=None)
    return best[2] if best is not None and best[0] > 0 else None


def review_queue(labels: np.ndarray, uncertainty: np.ndarray, geometry: Geometry,
                 classes: Sequence[LabelClass], threshold: float, body: Optional[np.ndarray] = None,
                 margin_voxels: int = 2, max_regions: Optional[int] = 10) -> list[dict[str, Any]]:
    """Rank the connected regions of suspect voxels (see the module docstring).

    Args:
        labels: ``(z, y, x)`` or ``(y, x)`` label map with the classes' values.
        uncertainty: float map of the same shape (any units; higher = less trustworthy).
        geometry: the grid's geometry (voxel volume, physical centres).
        classes: the foreground classes.
        threshold: a voxel is suspect when its value is strictly above this.
        body: optional bool mask; voxels outside it are never suspect.
        margin_voxels: how far around a region a structure still names it.
        max_regions: keep the first this many regions (None: all).

    Returns:
        One dict per region, best first: ``rank`` (1-based), ``structure``, ``label_value`` (0
        outside structures), ``voxels``, ``volume_ml`` (3D) or ``area_mm2`` (2D),
        ``uncertainty_mass`` (sum of the map times the voxel volume, in ml in 3D and mm^2 in
        2D), ``mean_uncertainty``, ``max_uncertainty``, ``center_index`` (array order),
        ``center_lps`` and ``center_ras`` (mm).

    Raises:
        InputError: shapes that differ, NaN/inf in the map, a non-finite threshold.
    """
    labels, uncertainty = np.asarray(labels), np.asarray(uncertainty)
    body = None if body is None else np.asarray(body, dtype=bool)
    _check_inputs(labels, uncertainty, geometry, body, threshold)
    suspect = uncertainty > threshold
    if body is not None:
        suspect &= body
    components, count = ndimage.label(suspect, ndimage.generate_binary_structure(labels.ndim, labels.ndim))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sums = np.asarray(ndimage.sum_labels(uncertainty, components, index), dtype=np.float64)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    maxima = np.asarray(ndimage.maximum(uncertainty, components, index), dtype=np.float64)
    boxes = ndimage.find_objects(components)
    centres: dict[int, tuple[int, ...]] = {}

    def centre(i: int) -> tuple[int, ...]:
        if i not in centres:
            box = boxes[i]
            local = _centre(components[box] == i + 1, uncertainty[box].astype(np.float64) - float(threshold))
            centres[i] = tuple(int(s.start) + v for s, v in zip(box, local))
        return centres[i]

    order = _ranked(sums, maxima, centre)
    voxel = geometry.voxel_volume_mm3()
    unit = voxel / 1000.0 if geometry.ndim == 3 else voxel
    rows = []
    for rank, i in enumerate(order[:max_regions] if max_regions is not None else order, start=1):
        box = boxes[i]
        grown = tuple(slice(max(0, s.start - margin_voxels), s.stop + margin_voxels) for s in box)
        structure = _structure(labels[grown], components[grown] == i + 1, classes, margin_voxels)
        point = centre(i)
        lps = geometry.index_to_lps(point)
        row: dict[str, Any] = {"rank": rank, "structure": structure.name if structure else OUTSIDE,
                               "label_value": structure.value if structure else 0, "voxels": int(sizes[i])}
        row["volume_ml" if geometry.ndim == 3 else "area_mm2"] = float(sizes[i] * unit)
        row.update(uncertainty_mass=float(sums[i] * unit), mean_uncertainty=float(sums[i] / sizes[i]),
                   max_uncertainty=float(maxima[i]), center_index=list(point), center_lps=list(lps),
                   center_ras=list(lps_to_ras(lps)))
        rows.append(row)
    return rows


def _ranked(sums: np.ndarray, maxima: np.ndarray, centre: Callable[[int], tuple[int, ...]]) -> list[int]:
    """Region indices by mass, then maximum, descending; regions tied on both by their centre
    in array order (centres are computed for tied regions only)."""
    order = sorted(range(len(sums)), key=lambda i: (-sums[i], -maxima[i]))
    ranked: list[int] = []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (sums[order[stop]], maxima[order[stop]]) == (sums[order[start]], maxima[order[start]]):
            stop += 1
        run = order[start:stop]
        ranked.extend(sorted(run, key=centre) if len(run) > 1 else run)
        start = stop
    return ranked
