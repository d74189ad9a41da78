"""Flip test-time augmentation: the model's probabilities over mirrored copies of the image.

A structure the model really sees is segmented the same way in a mirrored image; where the
mirrored predictions differ, the prediction rests on the model's orientation habits rather
than on the image. Every combination of flips along the chosen axes is run (identity
included: 4 passes for the two in-plane axes), each prediction is flipped back, and the mean
and the spread of the probabilities are kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import InferenceConfig, InputSpec
from ..errors import InputError
from ..inference.preparation import predict_indices
from ..utils.progress import ProgressReporter, report
from .entropy import voxel_entropy

#: Spatial axes of a network-grid image ``(C, Z, Y, X)`` by name.
AXES = {"z": 1, "y": 2, "x": 3}


@dataclass
class FlipTTA:
    """Flip test-time augmentation of one image on the network grid.

    Attributes:
        mean: ``(K, Z, Y, X)`` float32, mean class probabilities over the passes.
        variance: ``(Z, Y, X)`` float32, the across-pass variance of each class probability,
            averaged over the K classes (0 when all passes agree; at most 0.25).
        passes: the flips of each pass, e.g. ``[(), ("y",), ("x",), ("y", "x")]``.
    """

    mean: np.ndarray
    variance: np.ndarray
    passes: list[tuple[str, ...]]

    @property
    def entropy(self) -> np.ndarray:
        """``(Z, Y, X)`` float32 entropy (bits) of the mean probabilities."""
        return voxel_entropy(self.mean)


def flip_combinations(axes: Sequence[str]) -> list[tuple[str, ...]]:
    """Every subset of ``axes`` (identity first), e.g. ``("y", "x")`` -> 4 flips.

    Raises:
        InputError: an unknown or repeated axis name.
    """
    axes = tuple(axes)
    if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
        raise InputError(f"Flip axes must be distinct names among {sorted(AXES)}; got {list(axes)}.")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def flip_tta(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, num_classes: int,
             config: InferenceConfig, device: torch.device, axes: Sequence[str] = ("y", "x"),
             progress: Optional[ProgressReporter] = None, unflipped: Optional[np.ndarray] = None) -> FlipTTA:
    """Run the model on every flip of ``image`` and average the flipped-back probabilities.

    Args:
        model: segmentation network in eval mode on ``device``.
        image: ``(C, Z, Y, X)`` normalised image on the network grid.
        spec: the checkpoint's input spec (2D / 2.5D slice-wise or 3D sliding window).
        num_classes: K.
        config: inference settings (each pass is a full inference).
        device: compute device.
        axes: axes to flip: ``"y"`` and ``"x"`` (in-plane, default) and ``"z"``.
        progress: progress reporter (stage ``"flip_tta"``).
        unflipped: ``(K, Z, Y, X)`` probabilities the model already gave ``image`` with the
            same ``config``; the identity pass reuses them instead of running again.

    Returns:
        :class:`FlipTTA` on the network grid. Costs ``2 ** len(axes)`` inferences (one fewer
        with ``unflipped``) and two
        float32 ``(K, Z, Y, X)`` accumulators (Welford's running mean and squared deviations,
        so that passes that agree give a variance of exactly 0).
    """
    if image.ndim != 4:
        raise InputError(f"Flip TTA needs a (C, Z, Y, X) network-grid image, got shape {image.shape}.")
    passes = flip_combinations(axes)
    mean = np.zeros((num_classes, *image.shape[1:]), dtype=np.float32)
    squared_deviations = np.zeros_like(mean)  # Welford's running sum of squared deviations
    for i, combo in enumerate(passes):
        flip_axes = tuple(AXES[a] for a in combo)
        if combo or unflipped is None:
            flipped = np.ascontiguousarray(np.flip(image, flip_axes)) if combo else image
            _, probs = predict_indices(model, flipped, spec, num_classes, config, device, True)
            assert probs is not None
        else:
            if unflipped.shape != mean.shape:
                raise InputError(f"The unflipped probabilities {unflipped.shape} do not match the image: "
                                 f"expected {mean.shape}.")
            probs = unflipped
        probs = probs.astype(np.float32)
        if combo:
            probs = np.flip(probs, flip_axes)  # image axis a is probability axis a (C <-> K first)
        delta = probs - mean
        mean += delta / np.float32(i + 1)
        squared_deviations += delta * (probs - mean)
        report(progress, "flip_tta", (i + 1) / len(passes), f"flip pass {i + 1}/{len(passes)}")
    variance = (squared_deviations / np.float32(len(passes))).mean(axis=0).astype(np.float32)
    return FlipTTA(mean, variance, passes)
