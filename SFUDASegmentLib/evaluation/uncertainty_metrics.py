"""How well an uncertainty map finds a segmentation's errors, and how calibrated its
probabilities are.

All functions take arrays of one shape (``(y, x)``, ``(z, y, x)`` or flat) and an optional
boolean ``mask`` (e.g. the body) that selects the voxels scored; everything outside it is
ignored.

- :func:`voxel_auroc`: the probability that a wrong voxel scores higher than a correct one,
  ties counting one half (the Mann-Whitney U statistic divided by ``n_wrong * n_right``, with
  mid-ranks). A constant map gives exactly 0.5. Undefined (NaN) when the mask holds no wrong
  voxel or no correct one.
- :func:`voxel_auprc`: average precision, ``sum_j (R_j - R_{j-1}) P_j`` over the distinct map
  values ``t_j`` taken as thresholds from the highest down (voxels ``>= t_j`` flagged; tied
  voxels enter together), the step-wise area of scikit-learn's ``average_precision_score``. A
  constant map gives the error prevalence. NaN when the mask holds no wrong voxel.
- :func:`expected_calibration_error`: top-label ECE (Guo et al. 2017) with ``bins`` equal-width
  confidence bins ``((b - 1) / B, b / B]`` (a confidence of exactly 0 falls in the first):
  ``sum_b n_b / N |accuracy_b - mean confidence_b|``. NaN on an empty mask.
- :func:`spearman`: Spearman's rank correlation (Pearson correlation of mid-ranks). Pairs with
  a NaN or infinite value on either side (e.g. a structure absent from a case) are left out;
  NaN with fewer than two pairs left or when either side is constant.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy.stats import rankdata

from ..errors import InputError


def _selected(name: str, values: Any, mask: Optional[np.ndarray], shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    """``values[mask]`` flattened, with shape checks."""
    values = np.asarray(values)
    if shape is not None and values.shape != shape:
        raise InputError(f"The {name} has shape {values.shape}; expected {shape} (one value per voxel).")
    if mask is None:
        return values.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != values.shape:
        raise InputError(f"The mask {mask.shape} must have the shape of the {name} {values.shape}.")
    return values[mask]


def _scores_and_errors(scores: Any, errors: Any, mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 scores and bool errors inside ``mask``; InputError on NaN or mismatch."""
    shape = np.shape(scores)
    s = _selected("uncertainty map", scores, mask).astype(np.float64)
    e = _selected("error mask", errors, mask, shape).astype(bool)
    if not np.all(np.isfinite(s)):
        raise InputError("The uncertainty map contains NaN or infinite values inside the mask.")
    return s, e


def voxel_auroc(scores: Any, errors: Any, mask: Optional[np.ndarray] = None) -> float:
    """AUROC of ``scores`` for the binary ``errors`` (see the module docstring).

    Args:
        scores: uncertainty map; higher should mean more likely wrong.
        errors: bool map of the wrong voxels, same shape.
        mask: voxels to score (None: all).

    Returns:
        AUROC in [0, 1]; NaN without wrong or without correct voxels in the mask.
    """
    s, e = _scores_and_errors(scores, errors, mask)
    wrong = int(e.sum())
    right = e.size - wrong
    if wrong == 0 or right == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    u = float(ranks[e].sum()) - wrong * (wrong + 1) / 2.0
    return u / (float(wrong) * float(right))


def voxel_auprc(scores: Any, errors: Any, mask: Optional[np.ndarray] = None) -> float:
    """Average precision of ``scores`` for the binary ``errors`` (see the module docstring).

    Returns:
        AUPRC in [0, 1]; NaN without wrong voxels in the mask.
    """
    s, e = _scores_and_errors(scores, errors, mask)
    wrong = int(e.sum())
    if wrong == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, e = s[order], e[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    true_positives = np.cumsum(e)[last_of_run].astype(np.float64)
    flagged = (last_of_run + 1).astype(np.float64)
    recall = true_positives / wrong
    precision = true_positives / flagged
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(probabilities: Any, labels: Any, mask: Optional[np.ndarray] = None,
                               bins: int = 15) -> float:
    """Top-label expected calibration error (see the module docstring).

    Args:
        probabilities: ``(C, *S)`` class probabilities.
        labels: ``(*S)`` true class indices ``0..C-1``.
        mask: ``(*S)`` voxels to score (None: all).
        bins: number of equal-width confidence bins (15, Guo et al.).

    Returns:
        ECE in [0, 1]; NaN when the mask is empty.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 2 or probabilities.shape[1:] != np.shape(labels):
        raise InputError(f"Probabilities {probabilities.shape} must be (C, *S) for labels {np.shape(labels)}.")
    if int(bins) < 1:
        raise InputError(f"The number of bins must be at least 1, got {bins}.")
    confidence = _selected("confidence", probabilities.max(axis=0), mask).astype(np.float64)
    correct = _selected("prediction", probabilities.argmax(axis=0) == np.asarray(labels), mask)
    if confidence.size == 0:
        return float("nan")
    edges = np.arange(bins + 1, dtype=np.float64) / bins  # b / B correctly rounded
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    return float(np.abs(correct_sum - confidence_sum).sum() / confidence.size)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of two equally long sequences (NaN when undefined)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"Spearman's correlation needs two sequences of one length, got {x.size} and {y.size}.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    rx, ry = rankdata(x) - (x.size + 1) / 2.0, rankdata(y) - (y.size + 1) / 2.0
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))
