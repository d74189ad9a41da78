"""Batches of network inputs over a whole image, for embedding collection and adaptation.

2D / 2.5D networks see batches of slices (with neighbours for 2.5D); 3D networks see
non-overlapping patches of the spec's patch size (the image is edge-padded to a multiple).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from ..config import InputSpec
from ..inference.sliding_window import slice_stack


def input_batches(image: np.ndarray, spec: InputSpec, batch_size: int,
                  labels: Optional[np.ndarray] = None
                  ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(inputs, labels)`` covering ``image`` once.

    Args:
        image: ``(C, Z, Y, X)`` normalised image on the network grid.
        spec: dims, context slices, patch size.
        batch_size: slices or patches per batch.
        labels: optional ``(Z, Y, X)`` class indices cut the same way.

    Yields:
        ``(B, C', *P)`` float32 inputs and ``(B, *P)`` int64 labels (or None).
    """
    if spec.dims != "3d":
        context = spec.context_slices if spec.dims == "2.5d" else 0
        depth = image.shape[1]
        for z0 in range(0, depth, batch_size):
            zs = range(z0, min(depth, z0 + batch_size))
            x = torch.from_numpy(np.stack([slice_stack(image, z, context) for z in zs]))
            y = None if labels is None else torch.from_numpy(labels[z0:z0 + len(zs)].astype(np.int64))
            yield x, y
        return
    patch = spec.patch_size
    pads = [(0, -s % p) for s, p in zip(image.shape[1:], patch)]
    padded = np.pad(image, [(0, 0)] + pads, mode="edge")
    padded_labels = None if labels is None else np.pad(labels, pads)
    corners = [(z, y, x) for z in range(0, padded.shape[1], patch[0])
               for y in range(0, padded.shape[2], patch[1]) for x in range(0, padded.shape[3], patch[2])]
    for i in range(0, len(corners), batch_size):
        window = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in corners[i:i + batch_size]]
        x = torch.from_numpy(np.stack([padded[(slice(None),) + w] for w in window]))
        y = None if padded_labels is None else torch.from_numpy(
            np.stack([padded_labels[w] for w in window]).astype(np.int64))
        yield x, y


def random_input_batch(image: np.ndarray, spec: InputSpec, batch_size: int, rng: np.random.Generator
                       ) -> torch.Tensor:
    """A random batch of slices (2D/2.5D) or patches (3D) from ``image`` ``(C, Z, Y, X)``.

    Returns:
        ``(B, C', *P)`` float32 (2D slices are whole slices).
    """
    if spec.dims != "3d":
        context = spec.context_slices if spec.dims == "2.5d" else 0
        zs = rng.integers(0, image.shape[1], size=batch_size)
        return torch.from_numpy(np.stack([slice_stack(image, int(z), context) for z in zs]))
    patch = [min(p, s) for p, s in zip(spec.patch_size, image.shape[1:])]
    out = []
    for _ in range(batch_size):
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch)]
        out.append(image[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, patch))])
    return torch.from_numpy(np.stack(out))


def flatten_embedding(z: torch.Tensor) -> torch.Tensor:
    """``(B, D, *S)`` -> ``(B * prod(S), D)``."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])
