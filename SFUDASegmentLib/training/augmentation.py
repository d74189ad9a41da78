"""Training-time augmentation of (image, label) patch batches: flips, intensity, small affine."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_flips(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip every spatial axis with probability 0.5 (same flips for image and label).

    Args:
        images: ``(B, C, *S)``; labels: ``(B, *S)``.
    """
    spatial = images.ndim - 2
    for axis in range(spatial):
        if torch.rand((), generator=generator) < 0.5:
            images = images.flip(2 + axis)
            labels = labels.flip(1 + axis)
    return images, labels


def random_intensity(images: torch.Tensor, generator: torch.Generator, scale: float = 0.1,
                     shift: float = 0.1) -> torch.Tensor:
    """Per-sample ``x * U(1-scale, 1+scale) + U(-shift, shift)`` on ``(B, C, *S)`` images."""
    shape = (images.shape[0],) + (1,) * (images.ndim - 1)
    a = 1.0 + (torch.rand(shape, generator=generator) * 2 - 1) * scale
    b = (torch.rand(shape, generator=generator) * 2 - 1) * shift
    return images * a.to(images.device) + b.to(images.device)


def random_affine_matrices(batch: int, spatial: int, generator: torch.Generator,
                           max_rotation_deg: float, scale_range: tuple[float, float]) -> torch.Tensor:
    """Random rotation + isotropic scale matrices for ``affine_grid``.

    Returns:
        ``(B, spatial, spatial + 1)`` float32 (no translation). 3D rotates about each axis.
    """
    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    scale = u(*scale_range)
    angles = [u(-max_rotation_deg, max_rotation_deg) * math.pi / 180 for _ in range(1 if spatial == 2 else 3)]
    mats = torch.zeros(batch, spatial, spatial + 1)
    for b in range(batch):
        rot = torch.eye(spatial)
        planes = [(0, 1)] if spatial == 2 else [(0, 1), (0, 2), (1, 2)]
        for (i, j), angle in zip(planes, angles):
            r = torch.eye(spatial)
            c, s = torch.cos(angle[b]), torch.sin(angle[b])
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            rot = rot @ r
        mats[b, :, :spatial] = rot / scale[b]
    return mats


def random_affine(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  probability: float = 0.3, max_rotation_deg: float = 10.0,
                  scale_range: tuple[float, float] = (0.9, 1.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Small rotation/scale of a share of the batch: image bilinear, label nearest.

    Args:
        images: ``(B, C, *S)`` float; labels: ``(B, *S)`` integer class indices.
    """
    batch, spatial = images.shape[0], images.ndim - 2
    chosen = torch.rand(batch, generator=generator) < probability
    if not bool(chosen.any()):
        return images, labels
    theta = random_affine_matrices(batch, spatial, generator, max_rotation_deg, scale_range)
    identity = torch.eye(spatial, spatial + 1)
    theta[~chosen] = identity
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return images, warped[:, 0].round().long()
