"""Target pseudo-labels from an ensemble of checkpoints (Diffuse-UDA, after ASCPlus training).

The class probabilities of the target are the mean softmax of the last ``K`` checkpoints of the
student (the reference code's ``test_asc_ensemble``). A voxel keeps its arg-max class only when
that mean probability reaches ``confidence``; then only the largest connected component of
each foreground class is kept (face connectivity). Voxels dropped by either rule get
``fill_value``: 0 (background, the default: the pseudo-labels condition the diffusion model,
whose condition has no "unknown" class) or an ignore index such as -1 for a loss that skips
them. The confidence threshold is this implementation's choice (the paper names a threshold
but not its value); 0.7 is the default of the pipeline.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..config import InferenceConfig, InputSpec, SegNetConfig
from ..errors import InputError
from ..inference.preparation import predict_indices
from ..nets.unet import ResidualUNet
from ..utils.progress import ProgressReporter, report


def ensemble_probabilities(state_dicts: Sequence[dict[str, torch.Tensor]], seg_config: SegNetConfig,
                           image: np.ndarray, spec: InputSpec, device: torch.device,
                           inference: Optional[InferenceConfig] = None) -> np.ndarray:
    """Mean softmax of several weight sets of one network on one image.

    Args:
        state_dicts: ``K >= 1`` state dicts of the network ``seg_config`` describes.
        image: ``(C, Z, Y, X)`` normalised image on the network grid.
        spec: input spec (2D slice-wise, 2.5D or 3D sliding window).
        device: where to compute.
        inference: batch size / overlap (probabilities are computed in float32 regardless).

    Returns:
        ``(K_classes, Z, Y, X)`` float32 mean probabilities.
    """
    if not state_dicts:
        raise InputError("No checkpoints were given for the pseudo-label ensemble; pass at least one.")
    base = inference or InferenceConfig()
    config = InferenceConfig(overlap=base.overlap, batch_size=base.batch_size,
                             gaussian_sigma_scale=base.gaussian_sigma_scale,
                             probabilities_dtype="float32", amp=base.amp, device=base.device)
    model = ResidualUNet.from_config(seg_config).to(device).eval()
    total: Optional[np.ndarray] = None
    for state in state_dicts:
        model.load_state_dict(state)
        _, probs = predict_indices(model, image, spec, seg_config.out_channels, config, device, True)
        total = probs.astype(np.float32) if total is None else total + probs
    assert total is not None
    return total / np.float32(len(state_dicts))


def largest_component_per_class(labels: np.ndarray, fill_value: int = 0) -> np.ndarray:
    """Keep only the largest connected component (face connectivity) of every foreground class.

    Args:
        labels: ``(*S)`` integer class indices; values <= 0 are not treated as classes.
        fill_value: value given to the voxels of the smaller components.

    Returns:
        A new ``(*S)`` int64 array.
    """
    out = np.asarray(labels).astype(np.int64, copy=True)
    for k in np.unique(out):
        if k <= 0:
            continue
        components, count = ndimage.label(out == k)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != int(np.argmax(sizes)) + 1)] = fill_value
    return out


def refine_pseudo_labels(probabilities: np.ndarray, confidence: float, fill_value: int = 0) -> np.ndarray:
    """Arg-max labels, confidence-thresholded, largest component per class.

    Args:
        probabilities: ``(K, *S)`` class probabilities (e.g. :func:`ensemble_probabilities`).
        confidence: a voxel keeps its arg-max class when its probability is ``>= confidence``.
        fill_value: label of the rejected voxels (0 background, or an ignore index).

    Returns:
        ``(*S)`` int64 pseudo-labels.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 2:
        raise InputError(f"Probabilities must be (K, *spatial), got shape {probabilities.shape}.")
    if not 0.0 <= confidence <= 1.0:
        raise InputError(f"confidence must be in [0, 1], got {confidence}.")
    labels = probabilities.argmax(axis=0).astype(np.int64)
    labels[probabilities.max(axis=0) < confidence] = fill_value
    return largest_component_per_class(labels, fill_value)


def target_pseudo_labels(state_dicts: Sequence[dict[str, torch.Tensor]], seg_config: SegNetConfig,
                         images: Sequence[np.ndarray], spec: InputSpec, confidence: float,
                         device: torch.device, fill_value: int = 0,
                         inference: Optional[InferenceConfig] = None,
                         progress: Optional[ProgressReporter] = None) -> list[np.ndarray]:
    """Pseudo-labels of every target image (ensemble, threshold, largest components).

    Args:
        images: ``(C, Z, Y, X)`` normalised target images on the network grid.

    Returns:
        One ``(Z, Y, X)`` int64 label map per image.
    """
    out = []
    for i, image in enumerate(images):
        probs = ensemble_probabilities(state_dicts, seg_config, image, spec, device, inference)
        out.append(refine_pseudo_labels(probs, confidence, fill_value))
        report(progress, "pseudo-labels", (i + 1) / len(images), f"target pseudo-labels {i + 1}/{len(images)}",
               done=i + 1, total=len(images), unit="cases")
    return out
