"""Segment an image with a source checkpoint (method "none": no adaptation).

Returns the library's :class:`~SFUDASegmentLib.results.result.Result` in the input's geometry: labels,
optionally class probabilities (float16 by default) and their voxel entropy, and per-structure
statistics. With ``output="labels"`` no probability map of every class is ever held in float32.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..checkpoint import SourceCheckpoint
from ..config import InferenceConfig
from ..data.geometry import Volume
from ..data.labels import indices_to_values
from ..errors import InputError
from ..results.result import Result, structure_statistics
from ..uncertainty.entropy import voxel_entropy
from ..uncertainty.review import review_uncertainty
from ..uncertainty.temperature import apply_temperature
from ..utils.device import StageTimer, free_memory, resolve_device
from ..utils.progress import ProgressReporter
from .preparation import PreparedInput, predict_indices, prepare_input

OUTPUTS = ("labels", "probabilities")


def segment(checkpoint: SourceCheckpoint, volume: Volume, config: InferenceConfig = InferenceConfig(),
            output: str = "probabilities", progress: Optional[ProgressReporter] = None,
            model: Optional[torch.nn.Module] = None) -> Result:
    """Segment ``volume`` with the checkpoint's network, no adaptation.

    Args:
        checkpoint: source checkpoint.
        volume: ``(Z, Y, X)`` volume or ``(Y, X)`` / ``(Y, X, 3)`` 2D image.
        config: inference settings (device, batch, overlap, probability dtype).
        output: ``"labels"`` (least memory) or ``"probabilities"`` (adds probabilities and the
            entropy map).
        progress: progress/cancel reporter.
        model: an already built network to use instead of the checkpoint's (e.g. GMM-adapted).

    Returns:
        Result with method ``"none"``; timings under ``timings``.
    """
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {OUTPUTS}, got '{output}'.")
    device = resolve_device(config.device)
    timer = StageTimer(device)
    with timer.stage("preprocess"):
        prepared = prepare_input(volume, checkpoint.input_spec)
    with timer.stage("inference"):
        net = model if model is not None else checkpoint.build_segmentation_net(device)
        indices, probs = predict_indices(net, prepared.image, checkpoint.input_spec,
                                         checkpoint.num_classes, config, device,
                                         want_probabilities=output == "probabilities", progress=progress)
    free_memory(device)
    with timer.stage("postprocess"):
        result = result_from_prediction("none", checkpoint, prepared, indices, probs)
        review_uncertainty(result, checkpoint.input_spec.modality, prepared.to_input_grid(prepared.foreground, True))
    result.timings = timer.to_dict()
    return result


def result_from_prediction(method: str, checkpoint: SourceCheckpoint, prepared: PreparedInput,
                           indices: np.ndarray, probabilities: Optional[np.ndarray]) -> Result:
    """Build a Result on the input grid from network-grid class indices and probabilities.

    Maps (with probabilities): ``entropy`` and, when the checkpoint has a fitted temperature,
    ``calibrated_entropy`` (the entropy of the temperature-scaled probabilities).

    Args:
        indices: ``(Z, Y, X)`` class indices on the network grid.
        probabilities: ``(K, Z, Y, X)`` on the network grid, or None.
    """
    maps: dict[str, np.ndarray] = {}
    input_probs = None
    if probabilities is not None:
        input_probs = prepared.to_input_grid(probabilities, is_label=False).astype(probabilities.dtype)
        maps["entropy"] = prepared.to_input_grid(voxel_entropy(probabilities), is_label=False).astype(np.float32)
        if checkpoint.temperature is not None:
            calibrated = voxel_entropy(apply_temperature(probabilities, checkpoint.temperature))
            maps["calibrated_entropy"] = prepared.to_input_grid(calibrated, is_label=False).astype(np.float32)
    labels = indices_to_values(prepared.to_input_grid(indices, is_label=True), checkpoint.classes)
    return Result(method=method, labels=labels, classes=list(checkpoint.classes),
                  geometry=prepared.input_geometry, probabilities=input_probs, maps=maps,
                  structure_stats=structure_statistics(labels, checkpoint.classes,
                                                       prepared.input_geometry, maps))
