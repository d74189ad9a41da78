"""Voxel entropy of class probabilities: the basic uncertainty measure of a segmentation.

``P`` is ``(C, *S)`` class probabilities, background first; ``*S`` is ``(y, x)`` or
``(z, y, x)``. Used by no-adaptation segmentation (the entropy map) and HEAL's denoising.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError

#: Largest allowed deviation of ``sum_c P(c|v)`` from 1 (float16 probabilities round).
SUM_TOLERANCE = 1e-2


def check_probabilities(probs: np.ndarray) -> None:
    """Raise :class:`InputError` unless ``probs`` is a float ``(C, *S)`` array with C >= 2."""
    if not isinstance(probs, np.ndarray) or not np.issubdtype(probs.dtype, np.floating):
        raise InputError(
            "Class probabilities must be a floating-point numpy array shaped (C, *S); got "
            f"{type(probs).__name__} {getattr(probs, 'dtype', '')}. Pass the softmax output "
            "of the source model.")
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise InputError(
            f"Class probabilities must be shaped (C, *S) with C >= 2 classes (background "
            f"first); got shape {probs.shape}. For a single sigmoid output p, stack "
            "[1 - p, p] along a new first axis.")
    if probs.size == 0:
        raise InputError(f"Class probabilities are empty (shape {probs.shape}).")


def spatial_chunks(spatial_shape: Sequence[int], num_channels: int,
                   chunk_elements: int) -> list[slice]:
    """Slices along spatial axis 0 so that one chunk of ``(C, rows, ...)`` has about
    ``chunk_elements`` elements (at least one row)."""
    per_row = num_channels * int(np.prod(spatial_shape[1:], dtype=np.int64))
    rows = max(1, int(chunk_elements // max(per_row, 1)))
    return [slice(start, min(start + rows, spatial_shape[0]))
            for start in range(0, spatial_shape[0], rows)]


def voxel_entropy(probs: np.ndarray, base: float = 2.0, clip: float = 1e-7,
                  chunk_elements: int = 1 << 24) -> np.ndarray:
    """Shannon entropy of the class distribution at every voxel.

    ``H(v) = -sum_c p_c log_base p_c`` with ``p`` clipped to ``[clip, 1]`` (the public code
    clips at 1e-7 so that ``0 log 0`` is finite). Computed in float32 even for float16 input,
    chunk by chunk along spatial axis 0 so that memory stays bounded on large volumes
    (e.g. ``(4, 155, 240, 240)``).

    Args:
        probs: ``(C, *S)`` class probabilities, float16/32/64, summing to 1 over C
            (within ``SUM_TOLERANCE``).
        base: logarithm base: 2 (HEAL paper, bits) or ``e`` (public code, nats).
        clip: lower clip of the probabilities.
        chunk_elements: about how many probability values are converted to float32 at once.

    Returns:
        ``(*S)`` float32 entropy, in ``[0, log_base C]`` (up to the clipping).

    Raises:
        InputError: wrong shape or dtype, NaN/inf, values outside [0, 1] or not summing to 1
            (e.g. logits instead of probabilities), or an invalid base.
    """
    check_probabilities(probs)
    if not base > 0 or base == 1.0:
        raise InputError(f"Entropy base must be positive and not 1 (2 or e); got {base}.")
    if not 0 < clip < 1:
        raise InputError(f"Probability clip must be in (0, 1); got {clip}.")
    spatial = probs.shape[1:]
    out = np.empty(spatial, dtype=np.float32)
    log_base = np.float32(np.log(base))
    for rows in spatial_chunks(spatial, probs.shape[0], chunk_elements):
        p = probs[:, rows].astype(np.float32)
        if not np.all(np.isfinite(p)):
            raise InputError("Class probabilities contain NaN or infinite values; check the "
                             "source model's output (e.g. a corrupt checkpoint or input).")
        total = p.sum(axis=0)
        if p.min() < -SUM_TOLERANCE or p.max() > 1 + SUM_TOLERANCE or \
                np.abs(total - 1).max() > SUM_TOLERANCE:
            raise InputError(
                "Values along the class axis are not probabilities (each in [0, 1], summing "
                f"to 1; found range [{p.min():.3g}, {p.max():.3g}], sums up to "
                f"{total.max():.3g}). Apply softmax over the class axis (axis 0) first.")
        np.clip(p, clip, 1.0, out=p)
        out[rows] = -(p * np.log(p)).sum(axis=0) / log_base
    return out
