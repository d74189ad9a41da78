"""Random training patches with class-balanced foreground oversampling (2D, 2.5D, 3D)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import InputSpec
from ..inference.sliding_window import slice_stack


@dataclass
class TrainingCase:
    """One preprocessed training case on the network grid.

    Attributes:
        image: ``(C, Z, Y, X)`` normalised float32; a 2D image is a volume with ``Z = 1``.
        labels: ``(Z, Y, X)`` class indices (int64).
        foreground: body mask of the same spatial shape.
        name: case identifier for reports.
    """

    image: np.ndarray
    labels: np.ndarray
    foreground: np.ndarray
    name: str = ""


class PatchSampler:
    """Draws ``(images, labels)`` batches from training cases.

    A share ``foreground_oversample`` of patches is centred on a voxel of a foreground class
    chosen uniformly among the classes present in the case (so small lesions are seen as often
    as large organs); the rest are centred uniformly at random. 2D/2.5D specs draw one slice
    (with its neighbours for 2.5D) and a 2D patch from it.

    Args:
        cases: training cases (images at least as large as the patch: pad beforehand).
        spec: input spec (dims, context slices).
        patch_size: ``(pz, py, px)`` for 3D, ``(py, px)`` for 2D/2.5D.
        foreground_oversample: share of foreground-centred patches.
        rng: random generator.
    """

    def __init__(self, cases: Sequence[TrainingCase], spec: InputSpec, patch_size: Sequence[int],
                 foreground_oversample: float, rng: np.random.Generator) -> None:
        self.cases = list(cases)
        self.spec = spec
        self.patch = tuple(int(p) for p in patch_size)
        self.oversample = foreground_oversample
        self.rng = rng
        self.class_voxels = [
            [np.argwhere(c.labels == k) for k in np.unique(c.labels) if k > 0] for c in self.cases]

    def _centre(self, index: int) -> np.ndarray:
        case, voxels = self.cases[index], self.class_voxels[index]
        if voxels and self.rng.random() < self.oversample:
            members = voxels[self.rng.integers(len(voxels))]
            return members[self.rng.integers(len(members))]
        return np.array([self.rng.integers(s) for s in case.labels.shape])

    def _window(self, centre: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
        jitter = [int(self.rng.integers(-(p // 4), p // 4 + 1)) for p in self.patch]
        starts = [int(np.clip(c + j - p // 2, 0, s - p))
                  for c, j, p, s in zip(centre, jitter, self.patch, shape)]
        return tuple(slice(s, s + p) for s, p in zip(starts, self.patch))

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch: images ``(B, C', *patch)`` float32 and labels ``(B, *patch)`` int64."""
        images, labels = [], []
        for _ in range(batch_size):
            index = int(self.rng.integers(len(self.cases)))
            case = self.cases[index]
            centre = self._centre(index)
            if self.spec.dims == "3d":
                window = self._window(centre, case.labels.shape)
                images.append(case.image[(slice(None),) + window])
                labels.append(case.labels[window])
                continue
            z = int(centre[0])
            context = self.spec.context_slices if self.spec.dims == "2.5d" else 0
            plane, plane_labels = slice_stack(case.image, z, context), case.labels[z]
            window = self._window(centre[1:], plane_labels.shape)
            images.append(plane[(slice(None),) + window])
            labels.append(plane_labels[window])
        return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64)
