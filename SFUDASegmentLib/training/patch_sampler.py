"""Random training patches with class-balanced foreground oversampling (2D, 2.5D, 3D)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import InputSpec
from ..inference.sliding_window import slice_stack


def compact_label_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds class indices ``0 .. num_classes - 1``.

    ``uint8`` up to 256 classes, else ``int16``: a label map then costs a quarter (or half) of
    its float32 image instead of twice as much as int64 would.
    """
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16)


@dataclass
class TrainingCase:
    """One preprocessed training case on the network grid.

    Attributes:
        image: ``(C, Z, Y, X)`` normalised float32; a 2D image is a volume with ``Z = 1``.
        labels: ``(Z, Y, X)`` class indices, any integer type (the library stores ``uint8``, see
            :func:`compact_label_dtype`; batches are handed out as int64).
        foreground: body mask of the same spatial shape.
        name: case identifier for reports.
    """

    image: np.ndarray
    labels: np.ndarray
    foreground: np.ndarray
    name: str = ""


@dataclass(frozen=True)
class _Draw:
    """Where one batch element comes from: its case, its slice (2D/2.5D) and its window."""

    case: int
    z: int
    window: tuple[slice, ...]


class PatchSampler:
    """Draws ``(images, labels)`` batches from training cases.

    A share ``foreground_oversample`` of patches is centred on a voxel of a foreground class
    chosen uniformly among the classes present in the case (so small lesions are seen as often
    as large organs); the rest are centred uniformly at random. 2D/2.5D specs draw one slice
    (with its neighbours for 2.5D) and a 2D patch from it.

    The voxels of each class are kept as flat indices (int32 while a case has fewer than 2**31
    voxels): a third of the memory of their coordinates.

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
        self.class_voxels = [[self._flat_indices(c.labels == k) for k in np.unique(c.labels) if k > 0]
                             for c in self.cases]

    @staticmethod
    def _flat_indices(mask: np.ndarray) -> np.ndarray:
        indices = np.flatnonzero(mask)
        return indices.astype(np.int32) if mask.size < 2**31 else indices

    def _centre(self, index: int) -> np.ndarray:
        case, voxels = self.cases[index], self.class_voxels[index]
        if voxels and self.rng.random() < self.oversample:
            members = voxels[self.rng.integers(len(voxels))]
            return np.array(np.unravel_index(int(members[self.rng.integers(len(members))]), case.labels.shape))
        return np.array([self.rng.integers(s) for s in case.labels.shape])

    def _window(self, centre: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
        jitter = [int(self.rng.integers(-(p // 4), p // 4 + 1)) for p in self.patch]
        starts = [int(np.clip(c + j - p // 2, 0, s - p))
                  for c, j, p, s in zip(centre, jitter, self.patch, shape)]
        return tuple(slice(s, s + p) for s, p in zip(starts, self.patch))

    def _draw(self) -> _Draw:
        index = int(self.rng.integers(len(self.cases)))
        shape = self.cases[index].labels.shape
        centre = self._centre(index)
        if self.spec.dims == "3d":
            return _Draw(index, -1, self._window(centre, shape))
        return _Draw(index, int(centre[0]), self._window(centre[1:], shape[1:]))

    def _patch(self, draw: _Draw) -> tuple[np.ndarray, np.ndarray]:
        case = self.cases[draw.case]
        if self.spec.dims == "3d":
            return case.image[(slice(None),) + draw.window], case.labels[draw.window]
        context = self.spec.context_slices if self.spec.dims == "2.5d" else 0
        plane = slice_stack(case.image, draw.z, context)
        return plane[(slice(None),) + draw.window], case.labels[draw.z][draw.window]

    def sample(self, batch_size: int, part: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """A batch: images ``(B', C', *patch)`` float32 and labels ``(B', *patch)`` int64.

        Args:
            batch_size: B, the elements drawn (the random stream advances by B draws).
            part: the elements of the batch to cut out and return (default: all B). Processes
                that share a batch draw it whole with the same generator and each cuts its part,
                so together they see exactly the batch one process would.
        """
        draws = [self._draw() for _ in range(batch_size)][part]
        patches = [self._patch(d) for d in draws]
        return (np.stack([p[0] for p in patches]).astype(np.float32),
                np.stack([p[1] for p in patches]).astype(np.int64))
