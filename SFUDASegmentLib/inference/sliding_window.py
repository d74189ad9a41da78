"""Network-grid inference: 3D sliding window with Gaussian weighting, 2D / 2.5D slice-wise.

Both paths stream along the first spatial axis (z) so that only a slab of float32 class
probabilities is ever held: when the caller asks for labels, no float32 map of every class at
full resolution exists; when it asks for probabilities they are stored as float16 by default.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..config import InferenceConfig, InputSpec
from ..errors import InputError
from ..utils.device import autocast, map_in_chunks
from ..utils.progress import ProgressReporter, report


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Gaussian window weight, 1 at the centre, floored at 1e-3 so edges still count.

    Args:
        patch: window size per axis.
        sigma_scale: sigma as a fraction of the window size.

    Returns:
        ``(*patch)`` float32 tensor.
    """
    axes = []
    for size in patch:
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weight = axes[0]
    for axis in axes[1:]:
        weight = weight[..., None] * axis
    return torch.clamp(weight / weight.max(), min=1e-3)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``patch`` covering ``[0, size)`` with ``overlap``.

    ``size >= patch`` is assumed (the caller pads). The last window ends exactly at ``size``.
    """
    step = max(1, int(round(patch * (1.0 - overlap))))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


class _Output:
    """Receives finished z-slabs of probabilities and stores labels and/or float16 probabilities."""

    def __init__(self, classes: int, spatial: Sequence[int], want_probabilities: bool, dtype: str) -> None:
        self.labels = np.zeros(tuple(spatial), dtype=np.uint8 if classes < 256 else np.int16)
        self.probabilities = (np.zeros((classes, *spatial), dtype=np.dtype(dtype))
                              if want_probabilities else None)

    def write(self, z0: int, z1: int, probs: torch.Tensor) -> None:
        """Store slab ``[z0, z1)``; ``probs`` is ``(C, z1 - z0, ...)`` float32."""
        self.labels[z0:z1] = probs.argmax(0).cpu().numpy()
        if self.probabilities is not None:
            self.probabilities[:, z0:z1] = probs.cpu().numpy()


def _forward_probabilities(model: torch.nn.Module, batch: torch.Tensor, device: torch.device,
                           amp: bool) -> torch.Tensor:
    """Softmax of the model's logits, float32, on ``device``."""
    with autocast(device, amp):
        logits = model(batch.to(device))
    return torch.softmax(logits.float(), dim=1)


@torch.no_grad()
def sliding_window_3d(model: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int],
                      num_classes: int, config: InferenceConfig, device: torch.device,
                      want_probabilities: bool, progress: Optional[ProgressReporter] = None
                      ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Gaussian-weighted sliding window over a 3D image, streamed along z.

    Args:
        model: 3D network, ``(B, C, pz, py, px) -> (B, K, pz, py, px)`` logits.
        image: ``(C, Z, Y, X)`` float32 normalised image on the network grid.
        patch_size: ``(pz, py, px)`` window.
        num_classes: K.
        config: overlap, batch size, sigma, probability dtype, AMP.
        device: compute device.
        want_probabilities: also return ``(K, Z, Y, X)`` probabilities (config dtype).

    Returns:
        ``(labels (Z, Y, X) class indices, probabilities or None)``.
    """
    if image.ndim != 4:
        raise InputError(f"3D inference needs a (C, Z, Y, X) array, got shape {image.shape}.")
    spatial = image.shape[1:]
    patch = [int(p) for p in patch_size]
    padded_shape = [max(s, p) for s, p in zip(spatial, patch)]
    pads = [(0, ps - s) for s, ps in zip(spatial, padded_shape)]
    tensor = torch.from_numpy(np.pad(image, [(0, 0)] + pads, mode="edge"))
    weight = gaussian_importance(patch, config.gaussian_sigma_scale).to(device)
    zs, ys, xs = (window_starts(s, p, config.overlap) for s, p in zip(padded_shape, patch))
    out = _Output(num_classes, padded_shape, want_probabilities, config.probabilities_dtype)
    pz = patch[0]
    acc = torch.zeros((num_classes, pz, *padded_shape[1:]), device=device)
    wsum = torch.zeros((pz, *padded_shape[1:]), device=device)
    buf_start = 0
    in_plane = [(y, x) for y in ys for x in xs]
    for k, z in enumerate(zs):
        shift = z - buf_start
        if shift:
            acc = torch.roll(acc, -shift, dims=1)
            wsum = torch.roll(wsum, -shift, dims=0)
            acc[:, pz - shift:] = 0
            wsum[pz - shift:] = 0
            buf_start = z

        def run(chunk: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
            batch = torch.stack([tensor[:, z:z + pz, y:y + patch[1], x:x + patch[2]] for y, x in chunk])
            return list(_forward_probabilities(model, batch, device, config.amp))

        probs = map_in_chunks(run, in_plane, config.batch_size, device, "window batch")
        for (y, x), p in zip(in_plane, probs):
            acc[:, :, y:y + patch[1], x:x + patch[2]] += p * weight
            wsum[:, y:y + patch[1], x:x + patch[2]] += weight
        z_end = zs[k + 1] if k + 1 < len(zs) else z + pz
        n = z_end - z
        out.write(z, z_end, acc[:, :n] / wsum[:n].clamp_min(1e-8))
        report(progress, "inference", (k + 1) / len(zs), f"sliding window slab {k + 1}/{len(zs)}",
               done=(k + 1) * len(in_plane), total=len(zs) * len(in_plane), unit="windows")
    crop = tuple(slice(0, s) for s in spatial)
    labels = out.labels[crop]
    probabilities = None if out.probabilities is None else out.probabilities[(slice(None),) + crop]
    return labels, probabilities


def slice_stack(image: np.ndarray, index: int, context: int) -> np.ndarray:
    """2.5D input for slice ``index``: neighbouring slices as channels (edges replicated).

    Args:
        image: ``(C, Z, Y, X)``.
        index: centre slice.
        context: slices on each side.

    Returns:
        ``(C * (2 * context + 1), Y, X)``; slice order is outer, channel inner.
    """
    zs = np.clip(np.arange(index - context, index + context + 1), 0, image.shape[1] - 1)
    return image[:, zs].transpose(1, 0, 2, 3).reshape(-1, *image.shape[2:])


@torch.no_grad()
def slicewise_2d(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, num_classes: int,
                 config: InferenceConfig, device: torch.device, want_probabilities: bool,
                 progress: Optional[ProgressReporter] = None
                 ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Slice-by-slice (2D) or neighbouring-slice (2.5D) inference along z, batched.

    Args:
        model: 2D network ``(B, C', Y, X) -> (B, K, Y, X)``.
        image: ``(C, Z, Y, X)`` for a volume, or ``(C, Y, X)`` for a single 2D image.
        spec: ``dims`` ("2d" or "2.5d") and ``context_slices``.

    Returns:
        ``(labels (Z, Y, X) or (Y, X), probabilities (K, ...) or None)``.
    """
    single = image.ndim == 3
    volume = image[:, None] if single else image
    context = spec.context_slices if spec.dims == "2.5d" else 0
    depth = volume.shape[1]
    out = _Output(num_classes, volume.shape[1:], want_probabilities, config.probabilities_dtype)
    starts = list(range(0, depth, max(1, config.batch_size)))
    for i, z0 in enumerate(starts):
        z1 = min(depth, z0 + config.batch_size)

        def run(indices: Sequence[int]) -> list[torch.Tensor]:
            batch = torch.from_numpy(np.stack([slice_stack(volume, z, context) for z in indices]))
            return list(_forward_probabilities(model, batch, device, config.amp))

        probs = map_in_chunks(run, list(range(z0, z1)), config.batch_size, device, "slice batch")
        out.write(z0, z1, torch.stack(probs, dim=1))
        report(progress, "inference", (i + 1) / len(starts), f"slices {z1}/{depth}",
               done=z1, total=depth, unit="slices")
    if single:
        return out.labels[0], None if out.probabilities is None else out.probabilities[:, 0]
    return out.labels, out.probabilities
