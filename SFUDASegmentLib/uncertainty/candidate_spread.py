"""Spread of the source model's segmentations of HEAL's n diffusion candidates.

HEAL renders n source-style images from the denoised labels and segments only the selected
one. Segmenting all n gives an ensemble that HEAL has already paid for: where the n
segmentations disagree, the structure is not carried reliably by the rendered images.

``*S`` is ``(y, x)`` or ``(z, y, x)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..config import InferenceConfig, InputSpec
from ..errors import InputError
from ..inference.preparation import predict_indices


def candidate_votes(segmentations: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the n segmentations that give each class, per voxel.

    Args:
        segmentations: ``(n, *S)`` class indices ``0..num_classes - 1``, n >= 1.
        num_classes: C, background included.

    Returns:
        ``(C, *S)`` float32, summing to 1 over C.

    Raises:
        InputError: no segmentation, or class indices outside ``0..C - 1``.
    """
    segmentations = np.asarray(segmentations)
    if segmentations.ndim < 2 or segmentations.shape[0] < 1:
        raise InputError(f"Candidate segmentations must be shaped (n, *S) with n >= 1; got "
                         f"{segmentations.shape}.")
    if segmentations.size and (segmentations.min() < 0 or segmentations.max() >= num_classes):
        raise InputError(f"Candidate segmentations must hold class indices 0..{num_classes - 1}; found "
                         f"{segmentations.min()}..{segmentations.max()}.")
    votes = np.zeros((num_classes, *segmentations.shape[1:]), dtype=np.float32)
    for segmentation in segmentations:
        for c in range(num_classes):
            votes[c] += segmentation == c
    return votes / np.float32(segmentations.shape[0])


def candidate_spread(segmentations: np.ndarray, num_classes: int) -> np.ndarray:
    """Variation ratio of the candidates' segmentations: ``1 - (share of the commonest class)``.

    0 where all n segmentations agree; at most ``1 - 1/min(n, C)`` where they are spread evenly.

    Args:
        segmentations: ``(n, *S)`` class indices.
        num_classes: C, background included.

    Returns:
        ``(*S)`` float32 in ``[0, 1)``.
    """
    return (1.0 - candidate_votes(segmentations, num_classes).max(axis=0)).astype(np.float32)


def segment_candidates(model: torch.nn.Module, candidates: np.ndarray, spec: InputSpec, num_classes: int,
                       inference: InferenceConfig, device: torch.device, rendered: Sequence[int]) -> np.ndarray:
    """The source model's segmentation of each candidate image, on the network grid.

    A 2D network segments only the rendered slices (the cost follows the rendering's); a 2.5D
    or 3D network, which looks across slices, segments the whole candidate.

    Args:
        model: the source segmentation network (eval mode, on ``device``).
        candidates: ``(n, C, Z, Y, X)`` normalised candidate images on the network grid.
        spec: the checkpoint's input spec.
        num_classes: K.
        inference: batch and device settings.
        device: compute device.
        rendered: the axial slices the candidates were rendered on; every other slice is
            background, as HEAL makes it for the selected candidate.

    Returns:
        ``(n, Z, Y, X)`` class indices.
    """
    rendered = sorted(int(z) for z in rendered)
    segmentations = np.zeros((candidates.shape[0], *candidates.shape[2:]), dtype=np.int64)
    if not rendered:
        return segmentations
    for i, candidate in enumerate(candidates):
        if spec.dims == "2d":
            segmentations[i, rendered] = predict_indices(model, candidate[:, rendered], spec, num_classes,
                                                         inference, device)[0]
        else:
            segmentations[i, rendered] = predict_indices(model, candidate, spec, num_classes, inference,
                                                         device)[0][rendered]
    return segmentations
