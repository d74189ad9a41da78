"""Fourier appearance transfer (Diffuse-UDA's ASCPlus, after FDA by Yang & Soatto).

An image's *amplitude* spectrum carries its appearance (contrast, brightness, smooth
shading) and its *phase* its structure. Replacing the low-frequency block of the source
amplitude by the target's, and keeping the source phase, renders the source anatomy in the
target's style.

Spectrum and block (exact indices). ``F = rfftn(x)`` over the spatial axes ``S = (N_1, ..., N_d)``
(the last axis is halved: ``N_d // 2 + 1`` entries of non-negative frequency). With the block
half-size ``b = floor(0.5 * beta * min(S))``, the block is the set of entries whose integer
frequency ``f`` satisfies ``|f| < b`` on every axis, i.e. the corners of the unshifted spectrum:

* on each full axis ``i < d``: indices ``0 .. b-1`` (frequencies ``0 .. b-1``) and
  ``N_i-b+1 .. N_i-1`` (frequencies ``-(b-1) .. -1``);
* on the halved last axis: indices ``0 .. b-1``.

The reference code (lhaof/DiffuseUDA, ``low_freq_mutate``) swaps ``[:b]`` and ``[-b:]`` on the
full axes, i.e. one more negative frequency (``-b``) than positive ones. That block is not
symmetric under ``f -> -f``, so in the zero-frequency plane of the last axis the modified
spectrum is no longer Hermitian and ``irfftn`` silently discards part of the change. The
symmetric block used here keeps the spectrum Hermitian, so the result's amplitude equals the
target's on the block and the source's elsewhere, and its phase equals the source phase,
exactly up to floating-point rounding. ``beta = 0`` (``b = 0``) returns the source.

Adaptive beta (reconciling the paper and the code; see :func:`adaptive_beta`). Paper:
``beta = max(0.1, d_hist / d_max * a)``, ``a ~ U(0.5, 1.5)``. Code: ``d`` = sum of squared
differences of the two normalised 256-bin histograms, ``L = d / (d + 1)``,
``L = max(L, 0.1) * a``, ``b = floor(0.5 * min(dims) * L)``. Here ``beta`` *is* the code's ``L``
(so the code's box formula applies unchanged and ``beta = 1`` swaps the whole spectrum), the
normalised distance ``d / d_max`` is the code's ``d / (d + 1)``, and the floor is applied after
the random factor as the paper writes it (the code applies it before, so its effective floor
is 0.05); the result is clipped to ``[0, 1]``. A fixed beta skips all of this.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError

ArrayLike = Union[np.ndarray, torch.Tensor]


def block_half_size(spatial_shape: Sequence[int], beta: float) -> int:
    """``b = floor(0.5 * beta * min(spatial_shape))``: the half-size of the swapped block.

    Raises:
        InputError: ``beta`` outside ``[0, 1]``.
    """
    if not 0.0 <= float(beta) <= 1.0:
        raise InputError(f"beta must be in [0, 1] (0 = no transfer, 1 = whole spectrum), got {beta}.")
    return int(math.floor(0.5 * float(beta) * min(int(s) for s in spatial_shape) + 1e-9))


def low_frequency_mask(spatial_shape: Sequence[int], half_size: int) -> torch.Tensor:
    """Boolean mask of the swapped block on the ``rfftn`` spectrum of ``spatial_shape``.

    Args:
        spatial_shape: ``(N_1, ..., N_d)``.
        half_size: ``b``; entries with ``|f| < b`` on every axis are selected.

    Returns:
        ``(N_1, ..., N_{d-1}, N_d // 2 + 1)`` bool tensor (all False when ``b = 0``).
    """
    shape = [int(s) for s in spatial_shape]
    mask = torch.ones([*shape[:-1], shape[-1] // 2 + 1], dtype=torch.bool)
    for axis, n in enumerate(shape):
        if axis == len(shape) - 1:
            frequencies = torch.arange(n // 2 + 1)
        else:
            frequencies = torch.fft.fftfreq(n, d=1.0 / n).round().long()
        view = [1] * len(shape)
        view[axis] = frequencies.numel()
        mask = mask & (frequencies.abs() < half_size).reshape(view)
    return mask


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise InputError(f"The {name} image must be a floating-point numpy array or tensor.")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"The {name} image has NaN/Inf values; replace them first.")
    return tensor


def fourier_amplitude_transfer(source: ArrayLike, target: ArrayLike, beta: float,
                               spatial_dims: Optional[int] = None) -> ArrayLike:
    """Render ``source`` in the appearance of ``target`` (low-frequency amplitude swap).

    Args:
        source: ``(*S)`` or ``(..., *S)`` (channels / batch first), numpy array or tensor.
        target: same spatial shape ``S``; leading axes broadcast against the source's.
        beta: in ``[0, 1]``; the block half-size is ``floor(0.5 * beta * min(S))`` (module
            docstring); 0 returns the source.
        spatial_dims: number of trailing spatial axes (``len(S)``); None means every axis is
            spatial. Pass it for channel-first arrays, e.g. 2 for ``(C, Y, X)``.

    Returns:
        The restyled image, same type, shape and dtype as ``source``; the inputs are not modified.

    Raises:
        InputError: different spatial shapes, non-float or non-finite input, beta out of range.
    """
    src, trg = _as_tensor(source, "source"), _as_tensor(target, "target")
    dims = src.ndim if spatial_dims is None else int(spatial_dims)
    if not 1 <= dims <= src.ndim or dims > trg.ndim:
        raise InputError(f"spatial_dims {spatial_dims} does not fit arrays of shapes {tuple(src.shape)} "
                         f"and {tuple(trg.shape)}.")
    spatial = tuple(src.shape[-dims:])
    if tuple(trg.shape[-dims:]) != spatial:
        raise InputError(f"Source spatial shape {spatial} and target {tuple(trg.shape[-dims:])} differ. "
                         "Crop or pad the target to the source's shape first.")
    half = block_half_size(spatial, beta)
    if half == 0:
        result = src.clone()
        return result.numpy() if isinstance(source, np.ndarray) else result
    axes = tuple(range(-dims, 0))
    spectrum = torch.fft.rfftn(src, dim=axes)
    target_amplitude = torch.fft.rfftn(trg.to(src.dtype), dim=axes).abs()
    mask = low_frequency_mask(spatial, half).to(src.device)
    amplitude = torch.where(mask, target_amplitude, spectrum.abs())
    mixed = torch.polar(amplitude, spectrum.angle())
    result = torch.fft.irfftn(mixed, s=spatial, dim=axes).to(src.dtype)
    return result.numpy() if isinstance(source, np.ndarray) else result


def histogram_distance(source: ArrayLike, target: ArrayLike, bins: int = 256) -> float:
    """``d = sum_k (h_s[k] - h_t[k])^2`` of the two normalised histograms.

    Both histograms use ``bins`` equal bins over the joint range ``[min, max]`` of the two
    images (the reference code bins ``[0, 1]`` images times 255 over ``[0, 256)``; normalised
    z-scores have no fixed range, so the joint range takes its place). Each histogram sums to
    1, so ``0 <= d <= 2``.
    """
    s = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source, dtype=np.float64)
    t = np.asarray(target.detach().cpu() if isinstance(target, torch.Tensor) else target, dtype=np.float64)
    lo, hi = min(s.min(), t.min()), max(s.max(), t.max())
    if hi <= lo:
        return 0.0
    h_s = np.histogram(s, bins=bins, range=(lo, hi))[0] / s.size
    h_t = np.histogram(t, bins=bins, range=(lo, hi))[0] / t.size
    return float(np.sum((h_s - h_t) ** 2))


def adaptive_beta(source: ArrayLike, target: ArrayLike, rng: np.random.Generator,
                  factor_range: tuple[float, float] = (0.5, 1.5), floor: float = 0.1,
                  bins: int = 256) -> float:
    """``beta = clip(max(floor, d / (d + 1) * a), 0, 1)`` with ``a ~ U(factor_range)``.

    ``d`` is :func:`histogram_distance`; see the module docstring for how this reconciles the
    paper's and the code's formulas.
    """
    d = histogram_distance(source, target, bins)
    factor = float(rng.uniform(*factor_range))
    return float(min(1.0, max(float(floor), d / (d + 1.0) * factor)))


def fourier_restyle_batch(source: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
                          fixed_beta: Optional[float] = None,
                          factor_range: tuple[float, float] = (0.5, 1.5), floor: float = 0.1,
                          bins: int = 256) -> torch.Tensor:
    """Restyle each ``source[i]`` towards ``target[i]`` with its own (adaptive or fixed) beta.

    Args:
        source, target: ``(B, C, *S)`` tensors of the same shape.
        rng: draws the random factor of the adaptive beta.
        fixed_beta: use this beta for every pair instead of :func:`adaptive_beta`.

    Returns:
        ``(B, C, *S)`` restyled batch (a new tensor).
    """
    if source.shape != target.shape or source.ndim < 3:
        raise InputError(f"Source batch {tuple(source.shape)} and target batch {tuple(target.shape)} "
                         "must both be (B, C, *spatial) of the same shape.")
    dims = source.ndim - 2
    out = []
    for s, t in zip(source, target):
        beta = fixed_beta if fixed_beta is not None else adaptive_beta(s, t, rng, factor_range, floor, bins)
        out.append(fourier_amplitude_transfer(s, t, beta, spatial_dims=dims))
    return torch.stack(out)
