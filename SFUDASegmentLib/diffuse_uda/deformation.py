"""Deformable augmentation of (image, label) pairs: a random affine plus a smooth elastic field.

Follows Diffuse-UDA's public code (``deformable_aug.py``): rotation +-8 degrees about every
axis, per-axis scale U(0.95, 1.0), shift +-0.02 (normalised coordinates), and an elastic
displacement drawn as uniform noise in ``[-m, m]`` (m = 3) on a coarse control grid (10 per
axis), smoothed ``4`` times with a ``5``-wide box filter (edges replicated), upsampled
(bi/trilinear) to the image and added to the affine sampling grid. Images are resampled
linearly, labels and masks by nearest neighbour, all through one ``grid_sample`` field, so
image and labels stay aligned; it runs batched on CPU or GPU.

Units. The grid is in ``grid_sample``'s normalised coordinates (``[-1, 1]`` across each axis,
``align_corners=False``), so every displacement is a fraction of the half-extent of its axis.
Smoothing shrinks the noise: with the defaults the root-mean-square elastic displacement is
about 0.064 half-extents in 3D but about 0.19 in 2D (fewer control points are averaged), so
2D callers usually pass a smaller ``elastic_magnitude`` (see :data:`ELASTIC_MAGNITUDE_2D`).

Out-of-grid samples repeat the border (``padding_mode="border"``) for images and labels alike,
so labels never take a value that the input did not hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

ELASTIC_MAGNITUDE_2D = 1.0
"""2D magnitude whose RMS displacement (about 0.065 half-extents) matches the 3D default's."""


@dataclass(frozen=True)
class DeformationSettings:
    """Parameters of :func:`random_deformation_field` (defaults: Diffuse-UDA's code, 3D).

    Attributes:
        rotation_deg: rotation drawn from ``U(-r, r)`` degrees in every coordinate plane.
        scale: per-axis scale of the sampling grid drawn from ``U(*scale)`` (< 1 zooms in).
        shift: per-axis translation from ``U(-shift, shift)``, normalised coordinates.
        elastic_magnitude: half-width of the uniform control-grid noise (normalised units).
        control_grid: control points per axis.
        smoothing_passes: box-filter passes over the control noise.
        box: width of the box filter (odd).
    """

    rotation_deg: float = 8.0
    scale: tuple[float, float] = (0.95, 1.0)
    shift: float = 0.02
    elastic_magnitude: float = 3.0
    control_grid: int = 10
    smoothing_passes: int = 4
    box: int = 5

    @classmethod
    def for_dims(cls, spatial_dims: int) -> "DeformationSettings":
        """The code's defaults, with :data:`ELASTIC_MAGNITUDE_2D` in 2D."""
        return cls() if spatial_dims == 3 else cls(elastic_magnitude=ELASTIC_MAGNITUDE_2D)


def _uniform(batch: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)


def _affine_matrices(batch: int, ndim: int, generator: torch.Generator, rotation_deg: float,
                     scale: tuple[float, float], shift: float) -> torch.Tensor:
    """``(B, ndim, ndim + 1)`` matrices ``[R diag(s) | t]`` for ``affine_grid``."""
    planes = [(0, 1)] if ndim == 2 else [(0, 1), (0, 2), (1, 2)]
    angles = [_uniform(batch, -rotation_deg, rotation_deg, generator) * math.pi / 180 for _ in planes]
    scales = torch.stack([_uniform(batch, scale[0], scale[1], generator) for _ in range(ndim)], dim=1)
    shifts = torch.stack([_uniform(batch, -shift, shift, generator) for _ in range(ndim)], dim=1)
    theta = torch.zeros(batch, ndim, ndim + 1, dtype=torch.float64)
    for b in range(batch):
        rotation = torch.eye(ndim, dtype=torch.float64)
        for (i, j), angle in zip(planes, angles):
            plane = torch.eye(ndim, dtype=torch.float64)
            c, s = torch.cos(angle[b]), torch.sin(angle[b])
            plane[i, i], plane[i, j], plane[j, i], plane[j, j] = c, -s, s, c
            rotation = rotation @ plane
        theta[b, :, :ndim] = rotation @ torch.diag(scales[b])
        theta[b, :, ndim] = shifts[b]
    return theta


def _elastic_displacement(batch: int, shape: tuple[int, ...], generator: torch.Generator,
                          magnitude: float, control_grid: int, passes: int, box: int) -> torch.Tensor:
    """Smoothed control-grid noise upsampled to ``shape``: ``(B, ndim, *shape)`` float64."""
    ndim = len(shape)
    pad = box // 2
    size = [control_grid + 2 * pad] * ndim
    noise = (torch.rand(batch, ndim, *size, generator=generator, dtype=torch.float64) * 2 - 1) * magnitude
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    for _ in range(passes):
        noise = pool(F.pad(noise, [pad] * (2 * ndim), mode="replicate"), kernel_size=box, stride=1)
    noise = noise[(slice(None), slice(None)) + (slice(pad, pad + control_grid),) * ndim]
    mode = "bilinear" if ndim == 2 else "trilinear"
    return F.interpolate(noise, size=shape, mode=mode, align_corners=False)


def random_deformation_field(shape: Sequence[int], generator: torch.Generator, batch: int = 1,
                             rotation_deg: float = 8.0, scale: tuple[float, float] = (0.95, 1.0),
                             shift: float = 0.02, elastic_magnitude: float = 3.0,
                             control_grid: int = 10, smoothing_passes: int = 4, box: int = 5,
                             device: torch.device | str = "cpu") -> torch.Tensor:
    """Random sampling grids for ``grid_sample`` (affine + elastic), one per batch item.

    Args:
        shape: spatial shape ``(Y, X)`` or ``(Z, Y, X)``.
        generator: CPU generator; every random number is drawn from it (seeded, identical on
            every device).
        batch: number of independent fields.
        rotation_deg, scale, shift, elastic_magnitude, control_grid, smoothing_passes, box:
            see :class:`DeformationSettings`. ``0, (1, 1), 0, 0`` gives the identity grid.
        device: where the returned grid lives.

    Returns:
        ``(B, *shape, ndim)`` float32 grid, last axis ordered ``(x, y[, z])`` as ``grid_sample``
        expects.

    Raises:
        InputError: a shape that is not 2D/3D, or parameters out of range.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3) or min(shape) < 1:
        raise InputError(f"The deformation needs a 2D (y, x) or 3D (z, y, x) shape, got {shape}.")
    if batch < 1 or control_grid < 1 or box < 1 or box % 2 == 0 or smoothing_passes < 0:
        raise InputError(f"Invalid deformation settings: batch {batch}, control_grid {control_grid}, "
                         f"box {box} (odd, >= 1), smoothing_passes {smoothing_passes} (>= 0).")
    if rotation_deg < 0 or shift < 0 or elastic_magnitude < 0 or not 0 < scale[0] <= scale[1]:
        raise InputError(f"rotation_deg, shift and elastic_magnitude must be >= 0 and scale a range "
                         f"0 < low <= high, got {rotation_deg}, {shift}, {elastic_magnitude}, {scale}.")
    if generator.device.type != "cpu":
        raise InputError("Pass a CPU torch.Generator (random numbers are drawn on CPU so that a seed "
                         "gives the same deformation on every device).")
    theta = _affine_matrices(batch, ndim, generator, rotation_deg, scale, shift)
    grid = F.affine_grid(theta, [batch, 1, *shape], align_corners=False)
    if elastic_magnitude > 0:
        displacement = _elastic_displacement(batch, shape, generator, elastic_magnitude, control_grid,
                                             smoothing_passes, box)
        grid = grid + displacement.movedim(1, -1)
    return grid.to(device=device, dtype=torch.float32)


def settings_field(settings: DeformationSettings, shape: Sequence[int], generator: torch.Generator,
                   batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`random_deformation_field` with the parameters of ``settings``."""
    return random_deformation_field(shape, generator, batch, device=device, **asdict(settings))


def _check_grid(spatial: tuple[int, ...], batch: int, grid: torch.Tensor) -> None:
    expected = (batch, *spatial, len(spatial))
    if tuple(grid.shape) != expected:
        raise InputError(f"The deformation grid has shape {tuple(grid.shape)}, expected {expected}. "
                         "Draw it with random_deformation_field for this shape and batch.")


def warp_image(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample ``(B, C, *S)`` images linearly (bi/trilinear) along ``grid``; keeps the dtype."""
    _check_grid(tuple(image.shape[2:]), image.shape[0], grid)
    warped = F.grid_sample(image.float(), grid.to(image.device), mode="bilinear", padding_mode="border",
                           align_corners=False)
    return warped.to(image.dtype)


def warp_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample ``(B, *S)`` integer labels (or bool masks) by nearest neighbour along ``grid``.

    Returns:
        ``(B, *S)`` of the input's dtype; every value is one the input held.
    """
    _check_grid(tuple(labels.shape[1:]), labels.shape[0], grid)
    if labels.is_floating_point():
        raise InputError("Labels must be integer class indices or a bool mask, not floats.")
    values = labels[:, None].to(torch.float64)
    warped = F.grid_sample(values, grid.to(labels.device, torch.float64), mode="nearest",
                           padding_mode="border", align_corners=False)
    return warped[:, 0].round().to(labels.dtype)


def apply_deformation(image: torch.Tensor, labels: torch.Tensor,
                      grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deform images (linear) and their labels (nearest) with one field.

    Args:
        image: ``(B, C, *S)`` float.
        labels: ``(B, *S)`` integer class indices (or bool).
        grid: ``(B, *S, ndim)`` from :func:`random_deformation_field`.

    Returns:
        ``(image, labels)``, new tensors of the input shapes and dtypes.
    """
    if tuple(image.shape[2:]) != tuple(labels.shape[1:]) or image.shape[0] != labels.shape[0]:
        raise InputError(f"Image {tuple(image.shape)} and labels {tuple(labels.shape)} must be "
                         "(B, C, *S) and (B, *S) with the same batch and spatial size.")
    return warp_image(image, grid), warp_labels(labels, grid)
