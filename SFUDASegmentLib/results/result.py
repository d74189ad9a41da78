"""The one result object every method returns (no adaptation, HEAL, GMM).

The same object feeds the Slicer scene (``slicer_bridge/mrml.py``), the CLI's files (``cli.py``) and the tests.
All arrays are in the **input's** geometry and array convention (see ``geometry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..config import LabelClass
from ..data.geometry import Geometry


@dataclass
class Result:
    """Output of a segmentation / adaptation method.

    Attributes:
        method: ``"none"``, ``"heal"`` or ``"gmm"``.
        labels: final label map with the checkpoint's label values, ``(z, y, x)`` or ``(y, x)``,
            uint8/int16.
        classes: the foreground classes (value, name, colour) in network order.
        geometry: the input's geometry (so the arrays can be written back exactly).
        probabilities: class probabilities ``(C, z, y, x)`` with C = 1 + len(classes)
            (background first), float16 or float32; None when only labels were asked for.
        maps: float32 uncertainty maps on the input grid, e.g. ``"entropy"`` (every method),
            ``"nig_variance"`` (HEAL, GMM), ``"ensemble_entropy"`` (GMM); see
            ``uncertainty/maps.py``.
        label_maps: intermediate label maps on the input grid, e.g. ``"pseudo_labels"`` (Y_T),
            ``"entropy_labels"`` (Y_ent), ``"refined_labels"`` (Y*), ``"selected_segmentation"``
            (M_S(I_B)).
        candidates: HEAL's n candidate images ``(n, z, y, x)`` (or ``(n, y, x[, 3])``), float32 in
            the network's normalised intensity range, on the input grid.
        candidate_scores: edge score S_i of each candidate.
        selected_index: index of the selected candidate I_B.
        structure_stats: one dict per class: ``name``, ``value``, ``voxels``, ``volume_ml``
            (area mm^2 for 2D), ``mean_entropy`` and, when present, ``mean_nig_variance``.
        timings: per-stage seconds and peak memory (``StageTimer.to_dict()``).
        review_queue: the regions most likely to be wrong, best first (one dict per region,
            see ``uncertainty/review_queue.py``); empty without an uncertainty map.
        reliability: the map a reader should look at and how far to trust it (``map``,
            ``auroc``, ``text``, ``warnings``..., see ``uncertainty/reliability.py``); empty
            until :func:`~SFUDASegmentLib.uncertainty.review.review_uncertainty` ran.
        extra: method-specific report entries (SWD before/after, loss curve, ...).
    """

    method: str
    labels: np.ndarray
    classes: list[LabelClass]
    geometry: Geometry
    probabilities: Optional[np.ndarray] = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)
    candidates: Optional[np.ndarray] = None
    candidate_scores: list[float] = field(default_factory=list)
    selected_index: Optional[int] = None
    structure_stats: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    review_queue: list[dict[str, Any]] = field(default_factory=list)
    reliability: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays): what ``report.json`` holds."""
        return {
            "method": self.method,
            "classes": [{"value": c.value, "name": c.name, "color": list(c.color)}
                        for c in self.classes],
            "geometry": self.geometry.to_dict(),
            "shape": list(self.labels.shape),
            "maps": sorted(self.maps), "label_maps": sorted(self.label_maps),
            "candidates": 0 if self.candidates is None else int(self.candidates.shape[0]),
            "candidate_scores": [float(s) for s in self.candidate_scores],
            "selected_index": self.selected_index,
            "structure_stats": self.structure_stats,
            "timings": self.timings,
            "review_queue": self.review_queue,
            "reliability": self.reliability,
            **self.extra,
        }


def structure_statistics(labels: np.ndarray, classes: list[LabelClass], geometry: Geometry,
                         maps: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-structure volume and mean of every uncertainty map inside the structure.

    Args:
        labels: label map ``(z, y, x)`` / ``(y, x)`` with the classes' values.
        classes: the foreground classes.
        geometry: gives the voxel volume (mm^3; mm^2 in 2D).
        maps: name -> float map of the same shape as ``labels``.

    Returns:
        One dict per class: ``name``, ``value``, ``voxels``, ``volume_ml`` (3D, mL) or
        ``area_mm2`` (2D), and ``mean_<map>`` (NaN when the structure is empty).
    """
    voxel = geometry.voxel_volume_mm3()
    stats = []
    for c in classes:
        mask = labels == c.value
        n = int(mask.sum())
        entry: dict[str, Any] = {"name": c.name, "value": c.value, "voxels": n}
        if geometry.ndim == 3:
            entry["volume_ml"] = n * voxel / 1000.0
        else:
            entry["area_mm2"] = n * voxel
        for name, values in maps.items():
            entry[f"mean_{name}"] = float(values[mask].mean()) if n else float("nan")
        stats.append(entry)
    return stats
