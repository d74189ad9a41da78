"""Validation Dice during source training on a fixed sample of slices (2D, 2.5D) or windows (3D).

Whole-volume validation of ten BraTS cases took longer than an epoch of training. A
:class:`ValidationSample` is drawn once per run (seeded) from the validation cases: half of
the items where the labels have foreground, the other half anywhere in the body, spread evenly
over the cases. Every validation predicts the same items, so epochs are compared on equal terms,
and costs a fixed, small number of forward passes. The Dice of a case pools its items (sums of
intersections and sizes over the items); the score is the mean over cases per class, exactly
as for whole cases. With ``size = 0`` the items are whole cases (every slice, or a sliding
window over the whole volume).

Under ``torchrun`` each process predicts every world_size-th item and the sums are added up
over the processes, so the score equals the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import InferenceConfig, InputSpec
from ..errors import InputError
from ..inference.preparation import predict_indices
from ..inference.sliding_window import slice_stack
from ..utils.device import autocast
from ..utils.distributed import SINGLE_PROCESS, DistributedContext
from ..utils.progress import ProgressReporter, report
from .patch_sampler import TrainingCase


@dataclass(frozen=True)
class ValidationItem:
    """One unit of validation work.

    Attributes:
        case: index into the validation cases.
        z: the slice (2D, 2.5D); -1 for 3D.
        start: 3D window corner ``(z, y, x)``; None for a slice, or for a whole 3D case.
    """

    case: int
    z: int = -1
    start: Optional[tuple[int, int, int]] = None


@dataclass(frozen=True)
class ValidationSample:
    """The fixed validation items of a run and what they are called in reports.

    Attributes:
        items: the work, in a fixed order.
        unit: ``"slices"``, ``"windows"`` or ``"cases"`` (whole 3D cases).
    """

    items: tuple[ValidationItem, ...]
    unit: str

    @classmethod
    def draw(cls, cases: Sequence[TrainingCase], spec: InputSpec, size: int,
             rng: np.random.Generator) -> "ValidationSample":
        """Draw ``size`` items over ``cases`` (0: whole cases).

        Args:
            cases: the validation cases (padded to at least the patch size).
            spec: dims and patch size.
            size: slices (2D, 2.5D) or windows (3D) in all; a case gets ``size / len(cases)``
                (the first ones one more when it does not divide), and a 2D case at most its
                number of slices.
            rng: draws the items.
        """
        if size < 0:
            raise InputError(f"The validation sample size must be >= 0 (0: whole cases), got {size}.")
        dims3 = spec.dims == "3d"
        if size == 0:
            if dims3:
                return cls(tuple(ValidationItem(c) for c in range(len(cases))), "cases")
            return cls(tuple(ValidationItem(c, z) for c, case in enumerate(cases)
                             for z in range(case.labels.shape[0])), "slices")
        shares = [size // len(cases) + (1 if i < size % len(cases) else 0) for i in range(len(cases))]
        items: list[ValidationItem] = []
        for index, (case, share) in enumerate(zip(cases, shares)):
            if dims3:
                items += [ValidationItem(index, -1, start) for start in _windows(case, spec.patch_size, share, rng)]
            else:
                items += [ValidationItem(index, z) for z in _slices(case, share, rng)]
        return cls(tuple(items), "windows" if dims3 else "slices")


def _slices(case: TrainingCase, count: int, rng: np.random.Generator) -> list[int]:
    """Up to ``count`` distinct slices of a case, sorted: half of them with labelled foreground,
    the rest with body (any slice when the case has no body)."""
    depth = case.labels.shape[0]
    labelled = np.flatnonzero(case.labels.reshape(depth, -1).any(axis=1))
    body = np.flatnonzero(case.foreground.reshape(depth, -1).any(axis=1))
    chosen: list[int] = []
    for pool, want in ((labelled, (count + 1) // 2), (body if body.size else np.arange(depth), count)):
        pool = np.setdiff1d(pool, chosen)
        take = min(want - len(chosen), len(pool))
        if take > 0:
            chosen += [int(z) for z in rng.choice(pool, take, replace=False)]
    return sorted(chosen)


def _windows(case: TrainingCase, patch: Sequence[int], count: int, rng: np.random.Generator
             ) -> list[tuple[int, int, int]]:
    """``count`` window corners of a 3D case: half centred on labelled voxels, the rest on body
    voxels (anywhere when the case has neither), each window inside the case."""
    shape = case.labels.shape
    labelled = np.flatnonzero(case.labels)
    body = np.flatnonzero(case.foreground)
    body = body if body.size else np.arange(case.labels.size)
    on_labels = (count + 1) // 2 if labelled.size else 0
    centres = np.concatenate([rng.choice(labelled, on_labels) if on_labels else labelled[:0],
                              rng.choice(body, count - on_labels)])
    corners = []
    for flat in centres:
        centre = np.unravel_index(int(flat), shape)
        corners.append(tuple(int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape)))
    return corners


def validation_dice(model: torch.nn.Module, cases: Sequence[TrainingCase], sample: ValidationSample,
                    spec: InputSpec, num_classes: int, device: torch.device, amp: bool = True,
                    batch_size: int = 4, distributed: DistributedContext = SINGLE_PROCESS,
                    progress: Optional[ProgressReporter] = None) -> list[float]:
    """Mean Dice per foreground class over the validation cases, on the sample's items.

    Per case and class, a Dice is counted unless both the prediction and the reference are
    empty on the case's items; a class never counted scores NaN.

    Args:
        model: the segmentation network (switched to eval mode and back to train mode).
        cases: the validation cases.
        sample: the items to predict.
        spec: input spec (dims, context, patch size).
        num_classes: K, background included.
        device: where the model is.
        amp: mixed precision on GPU.
        batch_size: slices or windows per forward pass.
        distributed: this process's share of the items; the sums are added over the processes.
        progress: receives ``("validation", fraction, ..., done, total, unit)``.

    Returns:
        K - 1 Dice values.
    """
    mine = [sample.items[i] for i in distributed.items(len(sample.items))]
    counts = np.zeros((len(cases), num_classes - 1, 3))  # intersection, predicted, reference voxels
    report(progress, "validation", 0.0, f"validation on {len(mine)} {sample.unit}", done=0,
           total=len(mine), unit=sample.unit)
    was_training = model.training
    model.eval()
    done = 0
    for case_index in sorted({item.case for item in mine}):
        items = [item for item in mine if item.case == case_index]
        for first in range(0, len(items), max(1, batch_size)):
            chunk = items[first:first + max(1, batch_size)]
            predicted, reference = _predict(model, cases[case_index], chunk, spec, num_classes, device, amp, batch_size)
            for k in range(1, num_classes):
                p, r = predicted == k, reference == k
                counts[case_index, k - 1] += (np.logical_and(p, r).sum(), p.sum(), r.sum())
            done += len(chunk)
            report(progress, "validation", done / max(len(mine), 1),
                   f"validation {done}/{len(mine)} {sample.unit}", done=done, total=len(mine), unit=sample.unit)
    if was_training:
        model.train()
    counts = distributed.sum(torch.from_numpy(counts)).numpy()
    sizes = counts[..., 1] + counts[..., 2]
    counted = sizes > 0
    dice = np.where(counted, 2.0 * counts[..., 0] / np.maximum(sizes, 1), 0.0)
    return [float(dice[:, k].sum() / counted[:, k].sum()) if counted[:, k].any() else float("nan")
            for k in range(num_classes - 1)]


@torch.no_grad()
def _predict(model: torch.nn.Module, case: TrainingCase, items: Sequence[ValidationItem], spec: InputSpec,
             num_classes: int, device: torch.device, amp: bool, batch_size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and reference class indices of items of one case, stacked (any shape alike)."""
    if spec.dims == "3d" and items[0].start is None:  # the whole case, one item
        predicted = predict_indices(model, case.image, spec, num_classes,
                                    InferenceConfig(amp=amp, batch_size=batch_size), device)[0]
        return predicted[None], case.labels[None]
    if spec.dims == "3d":
        windows = [tuple(slice(s, s + p) for s, p in zip(item.start, spec.patch_size)) for item in items]
        batch = np.stack([case.image[(slice(None),) + w] for w in windows])
        reference = np.stack([case.labels[w] for w in windows])
    else:
        context = spec.context_slices if spec.dims == "2.5d" else 0
        batch = np.stack([slice_stack(case.image, item.z, context) for item in items])
        reference = np.stack([case.labels[item.z] for item in items])
    with autocast(device, amp):
        logits = model(torch.from_numpy(batch).to(device))
    return logits.argmax(1).cpu().numpy(), reference
