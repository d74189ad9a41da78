"""The diffusion round trip: how much of a label map survives being rendered by the diffusion
model and segmented again by the source model.

For labelled cases (held-out source cases at training time; the ground truth or the source
prediction of target cases in the benchmark's audit) HEAL's edge-guided stage runs with the
labels as the condition: ``n`` candidates are rendered, the one whose Canny edges match the
labels' best is selected and segmented by the source model. The Dice of that segmentation
against the labels (``round_trip_dice``) is compared with the source model's Dice on the real
images of the same slices (``source_dice``). Figures are the mean foreground Dice: per class the
mean over cases (cases where both masks are empty skipped), then the mean over classes.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Optional, Sequence

import numpy as np

from ..checkpoint import SourceCheckpoint
from ..config import HEALConfig, InferenceConfig
from ..data.geometry import Volume
from ..errors import CheckpointError, InputError
from ..inference.preparation import PreparedInput, labels_on_network_grid, predict_indices, prepare_input
from ..utils.device import free_memory, resolve_device
from ..utils.progress import ProgressReporter, report
from .diffusion_quality import ROUND_TRIP_KEY
from .pipeline import edge_guided_segmentation


def _slices_with_labels(labels: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` evenly spaced axial slices of ``(Z, Y, X)`` labels that hold foreground."""
    present = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if present.size <= count:
        return present
    return present[np.round(np.linspace(0, present.size - 1, count)).astype(int)]


def _class_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of every foreground class (NaN when both masks are empty)."""
    out = []
    for k in range(1, num_classes):
        p, r = pred == k, truth == k
        total = int(p.sum()) + int(r.sum())
        out.append(2.0 * int((p & r).sum()) / total if total else float("nan"))
    return out


def diffusion_round_trip(checkpoint: SourceCheckpoint, images: Sequence[Volume], labels: Sequence[Volume],
                         config: HEALConfig = HEALConfig(), inference: InferenceConfig = InferenceConfig(),
                         max_slices: int = 16, case_names: Optional[Sequence[str]] = None,
                         progress: Optional[ProgressReporter] = None) -> dict[str, Any]:
    """Render from the labels, select by edges, segment, and score against the labels.

    Args:
        checkpoint: source checkpoint with a diffusion model.
        images, labels: labelled cases (label values of the checkpoint's classes).
        config: HEAL settings of the rendering (candidates, sampler, steps, Canny, seed).
        inference: device and batch size of the source model.
        max_slices: with a 2D model, axial slices rendered in all (spread evenly over the cases
            and over each case's slices with foreground); a 3D model renders whole volumes.
        case_names: names for the record.
        progress: progress/cancel reporter (stage ``"round-trip"``).

    Returns:
        ``{"round_trip_dice", "source_dice", "per_class": {name: {"round_trip", "source"}},
        "slices", "cases", "candidates", "sampler", "steps"}``.

    Raises:
        CheckpointError: no diffusion model. InputError: no cases, or no foreground anywhere.
    """
    if checkpoint.diffusion is None:
        raise CheckpointError("The round trip needs the checkpoint's diffusion model; this one has none.")
    if not images or len(images) != len(labels):
        raise InputError(f"Give one label map per image (got {len(images)} images, {len(labels)} label maps).")
    names = list(case_names or [f"case_{i:03d}" for i in range(len(images))])
    device = resolve_device(inference.device)
    spec, k = checkpoint.input_spec, checkpoint.num_classes
    model = checkpoint.build_segmentation_net(device)
    per_case = max(1, max_slices // len(images))
    round_trip, source, slices = [], [], 0
    for i, (image, label, name) in enumerate(zip(images, labels, names)):
        prepared = prepare_input(image, spec, name)
        truth = labels_on_network_grid(label, checkpoint.classes, prepared, name)
        if spec.spatial_dims == 2 and truth.shape[0] > 1:
            chosen = _slices_with_labels(truth, per_case)
            prepared = PreparedInput(prepared.image[:, chosen], prepared.foreground[chosen],
                                     prepared.input_geometry, prepared.input_shape, prepared.network_spacing)
            truth = truth[chosen]
        if not truth.any():
            continue
        slices += truth.shape[0]
        real, _ = predict_indices(model, prepared.image, spec, k, inference, device)
        rendered = edge_guided_segmentation(checkpoint, prepared, truth.astype(np.int64), config, inference,
                                            device, model).segmentation
        round_trip.append(_class_dice(rendered, truth, k))
        source.append(_class_dice(real, truth, k))
        report(progress, "round-trip", (i + 1) / len(images), f"case {i + 1}/{len(images)}",
               done=i + 1, total=len(images), unit="cases")
    del model
    free_memory(device)
    if not round_trip:
        raise InputError("None of the cases has a labelled voxel; the round trip needs labelled cases.")
    with warnings.catch_warnings():  # a class absent from every case keeps a NaN mean
        warnings.simplefilter("ignore", RuntimeWarning)
        trip_class = np.nanmean(np.array(round_trip), axis=0)
        source_class = np.nanmean(np.array(source), axis=0)
    return {
        "round_trip_dice": float(np.nanmean(trip_class)), "source_dice": float(np.nanmean(source_class)),
        "per_class": {c.name: {"round_trip": float(t), "source": float(s)}
                      for c, t, s in zip(checkpoint.classes, trip_class, source_class)},
        "slices": slices, "cases": names, "candidates": config.candidates, "sampler": config.sampler,
        "steps": config.steps,
    }


def with_round_trip(checkpoint: SourceCheckpoint, images: Sequence[Volume], labels: Sequence[Volume],
                    config: HEALConfig = HEALConfig(), inference: InferenceConfig = InferenceConfig(),
                    max_slices: int = 16, case_names: Optional[Sequence[str]] = None,
                    progress: Optional[ProgressReporter] = None) -> SourceCheckpoint:
    """A copy of ``checkpoint`` whose card records the round trip on these labelled cases
    (provenance ``diffusion_round_trip``; see :func:`diffusion_round_trip`). The cases should be
    source cases the diffusion model was not trained on."""
    figure = diffusion_round_trip(checkpoint, images, labels, config, inference, max_slices, case_names, progress)
    return replace(checkpoint, provenance={**checkpoint.provenance, ROUND_TRIP_KEY: figure})
