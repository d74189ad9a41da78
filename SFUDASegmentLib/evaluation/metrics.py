"""Segmentation metrics in physical units: Dice, IoU, ASD, ASSD, HD95, NSD, per label and region.

Masks are 2D ``(y, x)`` or 3D ``(z, y, x)`` arrays; every non-zero element is foreground.
``spacing`` gives millimetres per array axis (``(sz, sy, sx)`` in 3D, see
:mod:`SFUDASegmentLib.data.geometry`), so every distance is in mm.

Surfaces (voxel method, the default of every distance metric)
    The border of a mask is the mask minus its binary erosion with *face* connectivity
    (``scipy.ndimage.generate_binary_structure(ndim, 1)``), outside of the array counting as
    background, so an object cut by the image edge has a border there. Distances run from each
    border voxel of one mask to the nearest border voxel of the other (Euclidean distance
    transform with ``sampling=spacing``). This is MedPy's definition (``medpy.metric.binary``
    with its default ``connectivity=1``), which the tests reproduce to 1e-6.

    - ``asd(pred, ref)``: mean of the pred -> ref distances (one direction).
    - ``assd``: mean over the union of both directions' distances (MedPy's ``assd``).
    - ``hd95``: 95th percentile (numpy linear interpolation) of the union of both directions'
      distances (MedPy's ``hd95``). ``mode="max"`` gives the other common definition, the larger
      of the two directed 95th percentiles (MONAI, DeepMind ``compute_robust_hausdorff``).
    - ``nsd(..., method="voxel")``: normalised surface Dice approximated on border voxels: the
      share of border voxels of both masks whose distance to the other border is at most
      ``tolerance_mm`` (each voxel weighs 1, whatever its surface area).
    - ``nsd(..., method="surfel")``: the surfel-area-weighted definition of Nikolov et al. (the
      DeepMind ``surface-distance`` package): the surface is made of marching-squares contour
      segments (2D) or marching-cubes triangles (3D) in the cells between voxel centres; each
      cell weighs its contour length / surface area in mm and distances run between cell
      centres. Triangles come from scikit-image's classic (Lorensen) marching cubes run on each
      of the 256 cell configurations; a cell with more than four inside corners is triangulated
      as its complement, so a cell and its complement have the same area. This reproduces the
      ``surface-distance`` package to 1e-9 (tested).

Empty masks (one table for every function here)

    =================  =====  =====  =======================  =====
    pred / ref          Dice   IoU    ASD, ASSD, HD95 (mm)     NSD
    =================  =====  =====  =======================  =====
    both empty          1      1      0                        1
    exactly one empty   0      0      inf                      0
    =================  =====  =====  =======================  =====

An empty reference scored against a non-empty prediction is a failure (Dice 0), never Dice 1.
Python results keep ``float('inf')``; :func:`to_jsonable` turns inf and nan into ``None``
(JSON ``null``) for reports.
"""

from __future__ import annotations

import itertools
import math
import re
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..utils.progress import ProgressReporter, report

BRATS_REGIONS: dict[str, list[int]] = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
"""BraTS 2017-2021 regions (labels 1 necrosis/non-enhancing core, 2 oedema, 4 enhancing)."""

BRATS_2023_REGIONS: dict[str, list[int]] = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
"""BraTS 2023+ regions (labels 1 non-enhancing core, 2 oedema, 3 enhancing)."""

NSDMethod = Literal["voxel", "surfel"]
HausdorffMode = Literal["pooled", "max"]

_NSD_METHODS = ("voxel", "surfel")
_HAUSDORFF_MODES = ("pooled", "max")


# --------------------------------------------------------------------------- input checks

def _as_mask(array: Any, name: str) -> np.ndarray:
    """A boolean array (non-zero is foreground) from a 2D or 3D ``array``; never written to."""
    a = np.asarray(array)
    if a.ndim not in (2, 3):
        raise InputError(f"{name} must be a 2D (y, x) or 3D (z, y, x) mask, got {a.ndim} "
                         f"dimensions with shape {a.shape}; squeeze or slice it first.")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or infinite values; a mask must hold 0 and 1 "
                         "(threshold or clean it before scoring).")
    if not (a.dtype == bool or np.issubdtype(a.dtype, np.number)):
        raise InputError(f"{name} has dtype {a.dtype}; pass a boolean or numeric mask.")
    return a if a.dtype == bool else a != 0


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """``spacing`` as a tuple of ``ndim`` positive finite floats."""
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError as exc:
        raise InputError(f"spacing must be a sequence of {ndim} numbers (mm per array axis), "
                         f"got {spacing!r}.") from exc
    if len(values) != ndim:
        axes = "(sz, sy, sx)" if ndim == 3 else "(sy, sx)"
        raise InputError(f"spacing {values} has {len(values)} values but the masks have {ndim} "
                         f"dimensions; give one spacing per array axis {axes}.")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(f"spacing {values} must be positive and finite (mm per array axis).")
    return values


def _check_shapes(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise :class:`InputError` naming both shapes when they differ."""
    if a.shape != b.shape:
        raise InputError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
                         "resample the prediction onto the reference grid (same size) "
                         "before scoring.")


def _mask_pair(pred: Any, ref: Any, spacing: Sequence[float]
               ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Validated boolean forms of ``pred`` and ``ref`` (read only) and their spacing."""
    p = _as_mask(pred, "pred")
    r = _as_mask(ref, "ref")
    _check_shapes(p, r, "pred", "ref")
    return p, r, _check_spacing(spacing, p.ndim)


def _crop_to_union(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks (views) cropped to the bounding box of their union plus one voxel (clipped).

    The margin keeps every border voxel and every erosion exact; Euclidean distances between
    border voxels and voxel counts do not depend on the crop. Two empty masks come back whole.
    """
    union = p | r
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        if hits.size == 0:
            return p, r
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    return p[tuple(box)], r[tuple(box)]


def _distance_to(border: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) of every element to the nearest ``True`` of ``border``; inf when none."""
    if not border.any():
        return np.full(border.shape, np.inf)
    return ndimage.distance_transform_edt(~border, sampling=spacing)


# --------------------------------------------------------------------------- overlap

def dice(pred: Any, ref: Any) -> float:
    """Dice coefficient ``2|P & R| / (|P| + |R|)``; 1 when both are empty.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
    """
    p = _as_mask(pred, "pred")
    r = _as_mask(ref, "ref")
    _check_shapes(p, r, "pred", "ref")
    return _dice(p, r)


def _dice(p: np.ndarray, r: np.ndarray) -> float:
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & r)) / total


def iou(pred: Any, ref: Any) -> float:
    """Intersection over union (Jaccard) ``|P & R| / |P | R|``; 1 when both are empty.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
    """
    p = _as_mask(pred, "pred")
    r = _as_mask(ref, "ref")
    _check_shapes(p, r, "pred", "ref")
    return _iou(p, r)


def _iou(p: np.ndarray, r: np.ndarray) -> float:
    union = int(np.count_nonzero(p | r))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & r)) / union


# --------------------------------------------------------------------------- voxel surfaces

def _border(mask: np.ndarray) -> np.ndarray:
    """Border voxels: ``mask`` minus its erosion with face connectivity (outside = background)."""
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=footprint, border_value=0)


def _voxel_distances(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Directed border distances of validated masks (see :func:`surface_distances`)."""
    p, r = _crop_to_union(p, r)
    if not (p.any() or r.any()):
        return np.zeros(0), np.zeros(0)
    border_p, border_r = _border(p), _border(r)
    return _distance_to(border_r, spacing)[border_p], _distance_to(border_p, spacing)[border_r]


def surface_distances(pred: Any, ref: Any, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) between the border voxels of two masks, in both directions.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred)``: 1D arrays of shape ``(n_pred_border,)`` and
        ``(n_ref_border,)``, in the order of ``np.nonzero`` of each border. When the other
        mask is empty its distances are all ``inf``; an empty mask gives an empty array.
    """
    return _voxel_distances(*_mask_pair(pred, ref, spacing))


def _empty_case(p: np.ndarray, r: np.ndarray) -> Optional[str]:
    """``"both"``, ``"one"`` or ``None`` (neither mask is empty)."""
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return "both"
    if p_any != r_any:
        return "one"
    return None


_EMPTY_DISTANCE = {"both": 0.0, "one": math.inf}


def _mean(distances: np.ndarray) -> float:
    return float(np.mean(distances))


def _hausdorff_from(d_pr: np.ndarray, d_rp: np.ndarray, percentile: float, mode: str) -> float:
    if mode == "pooled":
        return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def asd(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """Average surface distance (mm) from ``pred``'s border to ``ref``'s border (one direction).

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.
    """
    p, r, sp = _mask_pair(pred, ref, spacing)
    case = _empty_case(p, r)
    if case is not None:
        return _EMPTY_DISTANCE[case]
    return _mean(_voxel_distances(p, r, sp)[0])


def assd(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (mm): mean over both directions' distances together.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.
    """
    p, r, sp = _mask_pair(pred, ref, spacing)
    case = _empty_case(p, r)
    if case is not None:
        return _EMPTY_DISTANCE[case]
    return _mean(np.concatenate(_voxel_distances(p, r, sp)))


def hausdorff(pred: Any, ref: Any, spacing: Sequence[float], percentile: float = 100.0,
              mode: HausdorffMode = "pooled") -> float:
    """Hausdorff distance (mm) at a percentile of the border distances.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.
        percentile: in ``[0, 100]``; 100 is the classic (maximum) Hausdorff distance.
        mode: ``"pooled"``: percentile of both directions' distances together (MedPy);
            ``"max"``: larger of the two directed percentiles (MONAI, DeepMind).
    """
    if mode not in _HAUSDORFF_MODES:
        raise InputError(f"Hausdorff mode {mode!r} is unknown; use one of {_HAUSDORFF_MODES}.")
    if not 0.0 <= float(percentile) <= 100.0:
        raise InputError(f"percentile {percentile} must lie in [0, 100].")
    p, r, sp = _mask_pair(pred, ref, spacing)
    case = _empty_case(p, r)
    if case is not None:
        return _EMPTY_DISTANCE[case]
    return _hausdorff_from(*_voxel_distances(p, r, sp), float(percentile), mode)


def hd95(pred: Any, ref: Any, spacing: Sequence[float], mode: HausdorffMode = "pooled") -> float:
    """95th-percentile Hausdorff distance (mm); ``mode`` as in :func:`hausdorff`.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.
    """
    return hausdorff(pred, ref, spacing, 95.0, mode)


# --------------------------------------------------------------------------- surfel surfaces

def _corner_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Corner offsets of a cell in ``itertools.product`` order; corner k is bit k of a code."""
    return list(itertools.product((0, 1), repeat=ndim))


def _cell_of_code(code: int, ndim: int) -> np.ndarray:
    """The ``(2,) * ndim`` float cell whose inside corners are the set bits of ``code``."""
    cell = np.zeros((2,) * ndim)
    for bit, corner in enumerate(_corner_offsets(ndim)):
        cell[corner] = (code >> bit) & 1
    return cell


@lru_cache(maxsize=2)
def _unit_cell_pieces(ndim: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per cell code, the surface pieces in index units.

    2D: for each of the 16 codes, a tuple of contour polylines ``(n_points, 2)`` (marching
    squares). 3D: for each of the 256 codes, one array ``(n_triangles, 3, 3)`` of triangle
    vertices (classic Lorensen marching cubes; more than four inside corners -> complement).
    """
    from skimage import measure  # scikit-image is a runtime dependency; imported when needed

    n_codes = 2 ** (2 ** ndim)
    pieces: list[tuple[np.ndarray, ...]] = []
    for code in range(n_codes):
        if code in (0, n_codes - 1):
            pieces.append(())
            continue
        cell = _cell_of_code(code, ndim)
        if ndim == 2:
            pieces.append(tuple(measure.find_contours(cell, 0.5)))
        else:
            if cell.sum() > 4:
                cell = 1.0 - cell
            verts, faces, _, _ = measure.marching_cubes(cell, 0.5, method="lorensen")
            pieces.append((verts.astype(np.float64)[faces],))
    return tuple(pieces)


def _cell_measure_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Contour length (2D, mm) or surface area (3D, mm^2) per cell code, shape ``(n_codes,)``."""
    ndim = len(spacing)
    scale = np.asarray(spacing, dtype=np.float64)
    table = []
    for code_pieces in _unit_cell_pieces(ndim):
        total = 0.0
        for piece in code_pieces:
            scaled = piece * scale
            if ndim == 2:
                total += float(np.linalg.norm(np.diff(scaled, axis=0), axis=1).sum())
            else:
                cross = np.cross(scaled[:, 1] - scaled[:, 0], scaled[:, 2] - scaled[:, 0])
                total += float(0.5 * np.linalg.norm(cross, axis=1).sum())
        table.append(total)
    return np.asarray(table)


def _cell_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every cell between voxel centres of the zero-padded mask, shape ``mask.shape + 1``.

    Cell ``i`` has the voxels ``i - 1`` and ``i`` (per axis) of ``mask`` as its corners.
    """
    padded = np.pad(mask, 1).astype(np.uint8)
    out_shape = tuple(n + 1 for n in mask.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    for bit, corner in enumerate(_corner_offsets(mask.ndim)):
        window = tuple(slice(o, o + n) for o, n in zip(corner, out_shape))
        codes |= padded[window] << bit
    return codes


def _surfel_distances(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surface cells of two non-empty validated masks.

    Returns:
        ``(d_pred_to_ref, area_pred, d_ref_to_pred, area_ref)``: per surface cell of each mask,
        the distance (mm) to the nearest surface cell of the other, and its length/area.
    """
    p, r = _crop_to_union(p, r)
    table = _cell_measure_table(spacing)
    full = 2 ** (2 ** p.ndim) - 1
    codes_p, codes_r = _cell_codes(p), _cell_codes(r)
    surf_p = (codes_p != 0) & (codes_p != full)
    surf_r = (codes_r != 0) & (codes_r != full)
    return (_distance_to(surf_r, spacing)[surf_p], table[codes_p[surf_p]],
            _distance_to(surf_p, spacing)[surf_r], table[codes_r[surf_r]])


def _nsd_from(d_pr: np.ndarray, w_p: np.ndarray, d_rp: np.ndarray, w_r: np.ndarray,
              tolerance_mm: float) -> float:
    within = w_p[d_pr <= tolerance_mm].sum() + w_r[d_rp <= tolerance_mm].sum()
    return float(within / (w_p.sum() + w_r.sum()))


def _check_nsd_args(tolerance_mm: float, method: str) -> float:
    if method not in _NSD_METHODS:
        raise InputError(f"NSD method {method!r} is unknown; use one of {_NSD_METHODS}.")
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise InputError(f"NSD tolerance {tolerance_mm} must be a finite distance >= 0 in mm.")
    return tol


def nsd(pred: Any, ref: Any, spacing: Sequence[float], tolerance_mm: float,
        method: NSDMethod = "voxel") -> float:
    """Normalised surface Dice at ``tolerance_mm``: share of both surfaces within tolerance.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.
        tolerance_mm: largest distance (inclusive) at which a surface element counts as matched.
        method: ``"voxel"`` (border voxels, each weighs 1) or ``"surfel"`` (cell contour
            length / surface area weights, DeepMind's definition); see the module docstring.
    """
    tol = _check_nsd_args(tolerance_mm, method)
    p, r, sp = _mask_pair(pred, ref, spacing)
    case = _empty_case(p, r)
    if case is not None:
        return 1.0 if case == "both" else 0.0
    if method == "surfel":
        return _nsd_from(*_surfel_distances(p, r, sp), tol)
    d_pr, d_rp = _voxel_distances(p, r, sp)
    return _nsd_from(d_pr, np.ones(d_pr.shape), d_rp, np.ones(d_rp.shape), tol)


# --------------------------------------------------------------------------- per structure

def structure_metrics(pred: Any, ref: Any, spacing: Sequence[float],
                      nsd_tolerance_mm: float = 1.0, nsd_method: NSDMethod = "voxel"
                      ) -> dict[str, Union[float, int]]:
    """Every metric of one binary structure, sharing one distance computation.

    Args:
        pred, ref: masks of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``.
        spacing: mm per array axis.
        nsd_tolerance_mm, nsd_method: as in :func:`nsd`.

    Returns:
        ``{"dice", "iou", "asd", "assd", "hd95", "nsd", "pred_voxels", "ref_voxels"}``; the
        distances in mm (``hd95`` pooled, as :func:`hd95`), voxel counts as ints.
    """
    tol = _check_nsd_args(nsd_tolerance_mm, nsd_method)
    p, r, sp = _mask_pair(pred, ref, spacing)
    p, r = _crop_to_union(p, r)
    out: dict[str, Union[float, int]] = {"dice": _dice(p, r), "iou": _iou(p, r)}
    case = _empty_case(p, r)
    if case is not None:
        distance = _EMPTY_DISTANCE[case]
        out.update(asd=distance, assd=distance, hd95=distance, nsd=1.0 if case == "both" else 0.0)
    else:
        d_pr, d_rp = _voxel_distances(p, r, sp)
        if nsd_method == "surfel":
            nsd_value = _nsd_from(*_surfel_distances(p, r, sp), tol)
        else:
            nsd_value = _nsd_from(d_pr, np.ones(d_pr.shape), d_rp, np.ones(d_rp.shape), tol)
        out.update(asd=_mean(d_pr), assd=_mean(np.concatenate([d_pr, d_rp])),
                   hd95=_hausdorff_from(d_pr, d_rp, 95.0, "pooled"), nsd=nsd_value)
    out.update(pred_voxels=int(np.count_nonzero(p)), ref_voxels=int(np.count_nonzero(r)))
    return out


# --------------------------------------------------------------------------- multi-label

def _as_label_map(array: Any, name: str) -> np.ndarray:
    """``array`` as a 2D/3D integer label map (a view when already integer)."""
    a = np.asarray(array)
    if a.ndim not in (2, 3):
        raise InputError(f"{name} must be a 2D (y, x) or 3D (z, y, x) label map, got shape "
                         f"{a.shape}; squeeze or slice it first.")
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise InputError(f"{name} holds non-integer or non-finite values; a label map must "
                             "hold integer labels (round it or take the argmax first).")
        return a.astype(np.int64)
    raise InputError(f"{name} has dtype {a.dtype}; pass an integer label map.")


def _check_label_value(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: label {value!r} is not an integer; labels are integer values "
                         "of the label map.")
    if int(value) < 0:
        raise InputError(f"{where}: label {value} is negative; labels are integers >= 0.")
    return int(value)


def _normalise_labels(labels: Union[Mapping[str, int], Sequence[int], None],
                      p: np.ndarray, r: np.ndarray) -> dict[str, int]:
    """``{name: value}`` from a dict, a list (names are the values) or None (labels present)."""
    if labels is None:
        present = np.union1d(np.unique(p), np.unique(r))
        found = {str(int(v)): int(v) for v in present if v != 0}
        if not found:
            raise InputError("Both label maps are empty and no labels were given; pass labels "
                             "explicitly (e.g. labels=[1, 2, 4]) to score empty maps.")
        return found
    if isinstance(labels, Mapping):
        out = {str(k): _check_label_value(v, f"labels[{k!r}]") for k, v in labels.items()}
    else:
        out = {}
        for v in labels:
            value = _check_label_value(v, "labels")
            out[str(value)] = value
    if not out:
        raise InputError("labels is empty; give at least one label value to score.")
    return out


def _normalise_regions(regions: Optional[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    if regions is None:
        return {}
    out: dict[str, list[int]] = {}
    for name, values in regions.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise InputError(f"region {name!r} must be a non-empty list of labels, got {values!r}.")
        out[str(name)] = sorted({_check_label_value(v, f"region {name!r}") for v in values})
    return out


def evaluate(pred_labels: Any, ref_labels: Any, spacing: Sequence[float],
             labels: Union[Mapping[str, int], Sequence[int], None] = None,
             regions: Optional[Mapping[str, Sequence[int]]] = None,
             nsd_tolerance_mm: float = 1.0, nsd_method: NSDMethod = "voxel",
             progress: Optional[ProgressReporter] = None) -> dict[str, Any]:
    """Metrics of every label and every region (union of labels) of two label maps.

    Args:
        pred_labels, ref_labels: integer label maps of one shape, ``(y, x)`` or ``(z, y, x)``.
        spacing: mm per array axis.
        labels: ``{name: value}``, a list of values (named by their value), or None for every
            non-zero value present in either map.
        regions: ``{name: [values]}`` scored as the union of the values (e.g.
            :data:`BRATS_REGIONS`), or None.
        nsd_tolerance_mm, nsd_method: as in :func:`nsd`.
        progress: optional reporter, stage ``"metrics"``.

    Returns:
        ``{"spacing_mm", "nsd_tolerance_mm", "nsd_method", "labels": {name: {"label", **m}},
        "regions": {name: {"labels", **m}}, "mean_dice"}`` with ``m`` as in
        :func:`structure_metrics` and ``mean_dice`` the mean Dice over the labels. Distances may
        be ``inf`` (see the module docstring); use :func:`to_jsonable` before ``json.dump``.
    """
    tol = _check_nsd_args(nsd_tolerance_mm, nsd_method)
    p = _as_label_map(pred_labels, "pred_labels")
    r = _as_label_map(ref_labels, "ref_labels")
    _check_shapes(p, r, "pred_labels", "ref_labels")
    sp = _check_spacing(spacing, p.ndim)
    label_map = _normalise_labels(labels, p, r)
    region_map = _normalise_regions(regions)

    jobs = [("labels", name, [value]) for name, value in label_map.items()]
    jobs += [("regions", name, values) for name, values in region_map.items()]
    result: dict[str, Any] = {"spacing_mm": list(sp), "nsd_tolerance_mm": tol,
                              "nsd_method": nsd_method, "labels": {}, "regions": {}}
    for index, (kind, name, values) in enumerate(jobs):
        report(progress, "metrics", index / len(jobs), f"scoring {kind[:-1]} {name}",
               done=index, total=len(jobs), unit="structures")
        pred_mask = p == values[0] if len(values) == 1 else np.isin(p, values)
        ref_mask = r == values[0] if len(values) == 1 else np.isin(r, values)
        scores = structure_metrics(pred_mask, ref_mask, sp, tol, nsd_method)
        key = {"label": values[0]} if kind == "labels" else {"labels": list(values)}
        result[kind][name] = {**key, **scores}
    report(progress, "metrics", 1.0, "metrics done", done=len(jobs), total=len(jobs), unit="structures")
    result["mean_dice"] = float(np.mean([m["dice"] for m in result["labels"].values()]))
    return result


_REGION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def parse_regions(text: str) -> dict[str, list[int]]:
    """Parse ``"WT=1,2,4;TC=1,4;ET=4"`` into ``{"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}``.

    Regions are separated by ``;``, labels by ``,``; spaces are ignored, as is a trailing ``;``.
    Labels are sorted and deduplicated.

    Raises:
        InputError: empty text, a part without ``=``, a bad or repeated name, a missing or
            non-integer label.
    """
    example = "e.g. 'WT=1,2,4;TC=1,4;ET=4'"
    parts = [part.strip() for part in str(text).split(";") if part.strip()]
    if not parts:
        raise InputError(f"No region in {text!r}; write name=label,label;... ({example}).")
    regions: dict[str, list[int]] = {}
    for part in parts:
        name, sep, values_text = (s.strip() for s in part.partition("="))
        if not sep:
            raise InputError(f"Region {part!r} has no '='; write name=label,label ({example}).")
        if not _REGION_NAME.match(name):
            raise InputError(f"Region name {name!r} in {part!r} must start with a letter and hold "
                             f"only letters, digits, '_' or '-' ({example}).")
        if name in regions:
            raise InputError(f"Region {name!r} is given twice in {text!r}; give each region once.")
        values: set[int] = set()
        for item in values_text.split(","):
            item = item.strip()
            if not re.fullmatch(r"\d+", item):
                raise InputError(f"Region {name!r} has label {item!r}, not a non-negative integer "
                                 f"({example}).")
            values.add(int(item))
        regions[name] = sorted(values)
    return regions


# --------------------------------------------------------------------------- JSON

def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dump(..., allow_nan=False)`` accepts.

    Dicts (keys become strings), lists, tuples and numpy arrays are converted recursively;
    numpy scalars become Python scalars; ``inf``, ``-inf`` and ``nan`` become ``None``. Other
    objects are returned unchanged.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
