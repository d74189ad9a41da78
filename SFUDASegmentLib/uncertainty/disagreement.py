"""Disagreement between the source model's prediction and an adapted one.

An adaptation changes the prediction where the target looked unlike the source; where it
changes it, one of the two is wrong. Unlike the adapted model's own entropy, this signal does
not vanish when the adapted model becomes confident.

``*S`` is ``(y, x)`` or ``(z, y, x)``; probabilities are ``(C, *S)``, background first.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .entropy import check_probabilities, spatial_chunks


def probability_disagreement(source: np.ndarray, adapted: np.ndarray,
                             chunk_elements: int = 1 << 24) -> np.ndarray:
    """Total variation distance between two class distributions at every voxel.

    ``D(v) = 1/2 sum_c |P_source(c|v) - P_adapted(c|v)|``: 0 where the two agree exactly, 1
    where they put their mass on different classes. Computed in float32, chunk by chunk along
    spatial axis 0.

    Args:
        source: ``(C, *S)`` probabilities of the source model.
        adapted: ``(C, *S)`` probabilities of the adapted model (same shape).
        chunk_elements: about how many values of each input are converted at once.

    Returns:
        ``(*S)`` float32 in ``[0, 1]``.

    Raises:
        InputError: arrays that are not probabilities or do not have the same shape.
    """
    check_probabilities(source)
    check_probabilities(adapted)
    if source.shape != adapted.shape:
        raise InputError(f"Source probabilities {source.shape} and adapted probabilities "
                         f"{adapted.shape} must have the same shape (C, *S) on one grid.")
    out = np.empty(source.shape[1:], dtype=np.float32)
    for rows in spatial_chunks(source.shape[1:], source.shape[0], chunk_elements):
        difference = source[:, rows].astype(np.float32) - adapted[:, rows].astype(np.float32)
        out[rows] = 0.5 * np.abs(difference).sum(axis=0)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def label_disagreement(source: np.ndarray, adapted: np.ndarray) -> np.ndarray:
    """Where two label maps differ: 1.0, elsewhere 0.0.

    For methods whose adapted result has labels but no probabilities (HEAL's Y*, M_S(I_B) and
    fused labels against the source pseudo-labels Y_T).

    Args:
        source: ``(*S)`` label map (class indices or label values).
        adapted: ``(*S)`` label map of the same kind.

    Returns:
        ``(*S)`` float32, 0 or 1.

    Raises:
        InputError: the shapes differ.
    """
    if np.shape(source) != np.shape(adapted):
        raise InputError(f"Label maps {np.shape(source)} and {np.shape(adapted)} must have the "
                         "same shape to compare them.")
    return (np.asarray(source) != np.asarray(adapted)).astype(np.float32)
