"""Preprocessing transforms, each with its inverse.

===============================  ====================================
transform                        inverse
===============================  ====================================
:func:`normalize_intensity`      :func:`denormalize_intensity`
:func:`resample_to_spacing`      :func:`resample_to_shape` (original shape)
:func:`crop_to_box`              :func:`paste_from_box`
:func:`pad_to_multiple`,         :func:`unpad`
:func:`pad_to_min_size`
:func:`stack_neighbour_slices`   :func:`center_slice_of_stack`
===============================  ====================================

:func:`resampled_geometry` and :func:`cropped_geometry` give the physical placement of a
resampled or cropped grid, so intermediate arrays can be written with the right geometry.

Array convention (``geometry.py``): 3D ``(z, y, x)``, 2D ``(y, x)``, RGB ``(y, x, 3)``; spacing
per array axis in mm. No function changes its input array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from ..errors import InputError
from .geometry import Geometry

IntOrSeq = Union[int, Sequence[int]]

#: share of the image that one exact (dark) value must fill to be taken as a constant background
EXACT_BACKGROUND_FRACTION = 0.05


# --------------------------------------------------------------------------- helpers


def _is_rgb(image: np.ndarray, rgb: Optional[bool]) -> bool:
    """Channel-last colour image? ``rgb=None`` detects ``(y, x, 3)``."""
    if rgb is None:
        return image.ndim == 3 and image.shape[-1] == 3
    return bool(rgb)


def _per_axis(value: Union[float, Sequence[float]], n: int, name: str) -> tuple:
    """Broadcast a scalar or check a sequence of length ``n``."""
    if np.ndim(value) == 0:
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise InputError(f"{name} needs {n} values (one per spatial axis), got {value}.")
    return value


def _spatial_start(shape: tuple[int, ...], spatial_shape: tuple[int, ...]) -> int:
    """Index of the first spatial axis: 0 for ``(*S)`` / channel-last, else channel-first."""
    n = len(spatial_shape)
    if tuple(shape[:n]) == tuple(spatial_shape):
        return 0
    if tuple(shape[-n:]) == tuple(spatial_shape):
        return len(shape) - n
    raise InputError(f"Array of shape {shape} does not contain the spatial shape {spatial_shape} "
                     "as its leading (channel-last) or trailing (channel-first) axes.")


# --------------------------------------------------------------------------- foreground


def foreground_mask(image: np.ndarray, *, rgb: Optional[bool] = None, smoothing_sigma: float = 1.0,
                    min_component_fraction: float = 0.1) -> np.ndarray:
    """Body / foreground mask of an image.

    Two regimes:

    * exact background: when the most frequent value fills at least 5 % of the image and is not
      above the median (skull-stripped MRI, zero-padded scans), the foreground is every voxel
      above that value;
    * noisy background (phantoms, raw scans): Otsu's threshold on the image smoothed with a
      Gaussian of ``smoothing_sigma`` voxels.

    Then connected components smaller than ``min_component_fraction`` of the largest are
    dropped and enclosed holes filled. An empty result returns the whole image.

    Args:
        image: ``(z, y, x)``, ``(y, x)`` or RGB ``(y, x, 3)`` (converted to BT.601 luma).
        rgb: force (True) or refuse (False) the channel-last colour reading; None detects it.

    Returns:
        ``bool`` array of the spatial shape.
    """
    image = np.asarray(image)
    gray = image.astype(np.float32)
    if _is_rgb(image, rgb):
        gray = gray[..., 0] * 0.299 + gray[..., 1] * 0.587 + gray[..., 2] * 0.114
    if gray.ndim not in (2, 3) or gray.size == 0:
        raise InputError(f"foreground_mask needs a 2D or 3D image, got shape {image.shape}.")
    if not np.isfinite(gray).all():
        raise InputError("The image has NaN/Inf voxels; replace them before computing a foreground mask.")
    if gray.max() == gray.min():
        return np.ones(gray.shape, dtype=bool)
    background = _exact_background_value(gray)
    if background is not None:
        mask = gray > background
    else:
        smooth = ndimage.gaussian_filter(gray, smoothing_sigma) if smoothing_sigma > 0 else gray
        mask = smooth > threshold_otsu(smooth)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1
        mask = np.isin(labels, keep)
    mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        return np.ones(gray.shape, dtype=bool)
    return mask


def _exact_background_value(gray: np.ndarray) -> Optional[float]:
    """The most frequent value when it fills >= 5 % of the image and is not above the median.

    That is the constant background of skull-stripped or zero-padded scans (a few voxels may
    still lie below it, e.g. interpolation ringing). None for a noisy background.
    """
    step = max(1, gray.size // 1_000_000)
    values, counts = np.unique(gray.ravel()[::step], return_counts=True)
    candidate = values[np.argmax(counts)]
    if np.mean(gray == candidate) < EXACT_BACKGROUND_FRACTION or candidate > np.median(gray):
        return None
    return float(candidate)


# --------------------------------------------------------------------------- intensity


def normalize_intensity(image: np.ndarray, mask: Optional[np.ndarray] = None,
                        clip_percentiles: tuple[float, float] = (0.5, 99.5), *,
                        rgb: Optional[bool] = None) -> tuple[np.ndarray, dict]:
    """Clip to foreground percentiles, then z-score with the foreground mean and std.

    For each channel: ``lower, upper`` = the ``clip_percentiles`` of the voxels inside ``mask``;
    ``c = clip(x, lower, upper)``; ``mean, std`` of ``c`` inside the mask;
    ``out = (c - mean) / std``. Voxels outside the mask are set to ``(lower - mean) / std``,
    the normalised value of the lower clip, so the background is the darkest value.

    Args:
        image: ``(z, y, x)``, ``(y, x)`` or channel-last RGB ``(y, x, 3)`` (each channel on its own).
        mask: ``bool`` foreground of the spatial shape; None computes :func:`foreground_mask`.
        clip_percentiles: lower and upper percentile in [0, 100].
        rgb: force/refuse the channel-last reading; None detects ``(y, x, 3)``.

    Returns:
        ``(normalised float32 array of the input's shape, stats)``. ``stats`` has ``lower``,
        ``upper``, ``mean``, ``std``, ``background`` (floats, or lists per channel for RGB),
        ``clip_percentiles`` and ``foreground_fraction``; :func:`denormalize_intensity` inverts.

    Raises:
        InputError: NaN/Inf, a mask of another shape or an empty mask, bad percentiles, or an
            image that is constant inside the foreground (nothing to normalise).
    """
    image = np.asarray(image)
    is_rgb = _is_rgb(image, rgb)
    spatial = image.shape[:-1] if is_rgb else image.shape
    lo_p, hi_p = (float(p) for p in clip_percentiles)
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise InputError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {clip_percentiles}.")
    if not np.isfinite(image).all():
        raise InputError("The image has NaN/Inf voxels; replace them before normalising "
                         "(e.g. np.nan_to_num).")
    if mask is None:
        mask = foreground_mask(image, rgb=is_rgb)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != spatial:
        raise InputError(f"The mask shape {mask.shape} differs from the image's spatial shape {spatial}.")
    if not mask.any():
        raise InputError("The foreground mask is empty; pass a mask with foreground voxels or mask=None.")
    channels = [image[..., c] for c in range(image.shape[-1])] if is_rgb else [image]
    out = np.empty(image.shape, dtype=np.float32)
    keys = ("lower", "upper", "mean", "std", "background")
    stats: dict = {k: [] for k in keys}
    for c, channel in enumerate(channels):
        inside = channel[mask].astype(np.float64)
        lower, upper = np.percentile(inside, [lo_p, hi_p])
        clipped_inside = np.clip(inside, lower, upper)
        mean = float(clipped_inside.mean())
        std = float(clipped_inside.std())
        if upper <= lower or std == 0.0:
            raise InputError(
                "The image is constant inside the foreground (value "
                f"{float(lower):g}), so it cannot be normalised. Check that the right volume "
                "was selected, or give a foreground mask that covers the anatomy.")
        std = max(std, 1e-8)
        normalised = ((np.clip(channel.astype(np.float64), lower, upper) - mean) / std)
        background = (float(lower) - mean) / std
        normalised[~mask] = background
        if is_rgb:
            out[..., c] = normalised
        else:
            out[...] = normalised
        for k, v in zip(keys, (float(lower), float(upper), mean, std, background)):
            stats[k].append(v)
    if not is_rgb:
        stats = {k: v[0] for k, v in stats.items()}
    stats["clip_percentiles"] = [lo_p, hi_p]
    stats["foreground_fraction"] = float(mask.mean())
    return out, stats


def denormalize_intensity(normalized: np.ndarray, stats: dict) -> np.ndarray:
    """Inverse of :func:`normalize_intensity`: ``x = out * std + mean`` (per channel for RGB).

    Returns a ``float32`` array in the original intensity units; inside the mask it equals the
    clipped input, outside it equals the lower clip.
    """
    mean = np.asarray(stats["mean"], dtype=np.float64)
    std = np.asarray(stats["std"], dtype=np.float64)
    return (np.asarray(normalized, dtype=np.float64) * std + mean).astype(np.float32)


# --------------------------------------------------------------------------- resampling


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Grid size covering the same extent at ``target_spacing``: ``round(n * s / t)``, at least 1."""
    if len(shape) != len(spacing) or len(spacing) != len(target_spacing):
        raise InputError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target spacing "
                         f"{tuple(target_spacing)} need one value per spatial axis.")
    for name, values in (("spacing", spacing), ("target spacing", target_spacing)):
        if not all(np.isfinite(v) and v > 0 for v in values):
            raise InputError(f"The {name} {tuple(values)} must be positive (mm per axis).")
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample_to_shape(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resample the last ``len(shape)`` axes of ``array`` to ``shape``.

    Voxel centres are aligned as cell centres of the same physical box (the half-voxel
    convention of ``align_corners=False``), so the physical extent is unchanged; edge values
    are extended (``mode='nearest'``).

    Args:
        array: ``(*S)`` or ``(C, *S)`` (leading axes resampled independently).
        shape: new spatial shape.
        order: 0 nearest (label maps: values and dtype kept), 1 linear, 3 cubic spline (may
            overshoot the input range slightly).

    Returns:
        ``(*shape)`` or ``(C, *shape)``; order 0 keeps the dtype, otherwise floats keep theirs and
        other types become ``float32``.
    """
    array = np.asarray(array)
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    if n == 0 or array.ndim < n or any(s < 1 for s in shape):
        raise InputError(f"Cannot resample an array of shape {array.shape} to shape {shape}.")
    if order not in (0, 1, 2, 3, 4, 5):
        raise InputError(f"Interpolation order must be 0 (nearest) to 5, got {order}.")
    out_dtype = array.dtype if order == 0 or np.issubdtype(array.dtype, np.floating) else np.float32
    lead = array.shape[:-n]
    old = array.shape[-n:]
    flat = array.reshape((-1,) + old)
    out = np.empty((flat.shape[0],) + shape, dtype=out_dtype)
    scale = np.array(old, dtype=np.float64) / np.array(shape, dtype=np.float64)
    offset = 0.5 * scale - 0.5
    for i in range(flat.shape[0]):
        if old == shape:
            out[i] = flat[i]
            continue
        src = flat[i] if order == 0 or flat.dtype == out_dtype else flat[i].astype(out_dtype)
        out[i] = ndimage.affine_transform(src, scale, offset=offset, output_shape=shape, order=order,
                                          mode="nearest", prefilter=order > 1)
    return out.reshape(lead + shape)


def resample_to_spacing(array: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
                        order: int = 1) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resample ``array`` (``(*S)`` or ``(C, *S)``) from ``spacing`` to about ``target_spacing``.

    The new shape is :func:`target_shape`; the returned spacing is the exact one of that grid,
    ``old_shape * spacing / new_shape``, so the physical extent is preserved. Invert with
    ``resample_to_shape(resampled, original_spatial_shape, order)``.

    Returns:
        ``(resampled array, new spacing per spatial axis)``.
    """
    array = np.asarray(array)
    n = len(spacing)
    old = array.shape[-n:]
    new = target_shape(old, spacing, target_spacing)
    new_spacing = tuple(float(o * s / m) for o, s, m in zip(old, spacing, new))
    return resample_to_shape(array, new, order), new_spacing


def resample_probabilities(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample class probabilities ``(C, *S)`` to ``(C, *shape)`` with linear interpolation.

    Linear interpolation is a convex combination, so every voxel still sums to 1; the result is
    clipped to [0, 1] and renormalised against rounding. Cheaper in memory than one-hot labels
    for many classes and smoother than nearest-neighbour labels.

    Returns:
        ``float32`` ``(C, *shape)``.
    """
    probs = np.asarray(probs)
    if probs.ndim != len(tuple(shape)) + 1:
        raise InputError(f"Probabilities must be (C, *S) with {len(tuple(shape))} spatial axes, got "
                         f"shape {probs.shape}.")
    out = resample_to_shape(probs.astype(np.float32, copy=False), shape, order=1)
    np.clip(out, 0.0, 1.0, out=out)
    total = out.sum(axis=0, keepdims=True)
    np.divide(out, total, out=out, where=total > 0)
    return out


def resampled_geometry(geometry: Geometry, old_shape: Sequence[int], new_shape: Sequence[int]) -> Geometry:
    """Geometry of ``old_shape`` resampled to ``new_shape`` by :func:`resample_to_shape`.

    The voxel box is unchanged: ``new_spacing = spacing * old / new`` and the origin (centre of
    the first voxel) moves by half the spacing difference along each axis direction.
    """
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    new_spacing = spacing * np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    shift_xyz = ((new_spacing - spacing) / 2.0)[::-1]
    return Geometry(tuple(new_spacing), _moved_origin(geometry, shift_xyz), geometry.direction)


def _moved_origin(geometry: Geometry, shift_xyz: np.ndarray) -> tuple[float, ...]:
    """Origin moved by ``shift_xyz`` mm along the image axes (ITK x, y, z order)."""
    n = geometry.ndim
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(n, n)
    return tuple(np.asarray(geometry.origin, dtype=np.float64) + direction @ shift_xyz)


# --------------------------------------------------------------------------- crop


@dataclass(frozen=True)
class CropBox:
    """A box inside an image grid.

    Attributes:
        slices: one ``slice(start, stop)`` per spatial axis.
        original_shape: spatial shape of the uncropped grid.
    """

    slices: tuple[slice, ...]
    original_shape: tuple[int, ...]

    @property
    def start(self) -> tuple[int, ...]:
        """First voxel index of the box per spatial axis."""
        return tuple(s.start for s in self.slices)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the box."""
        return tuple(s.stop - s.start for s in self.slices)


def bounding_box(mask: np.ndarray, margin: IntOrSeq = 0) -> CropBox:
    """Smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels per side.

    The box is clipped to the grid; an empty mask gives the whole grid.
    """
    mask = np.asarray(mask, dtype=bool)
    margins = _per_axis(margin, mask.ndim, "margin")
    if any(int(m) < 0 for m in margins):
        raise InputError(f"margin must be >= 0 voxels, got {margin}.")
    if not mask.any():
        return CropBox(tuple(slice(0, n) for n in mask.shape), tuple(mask.shape))
    slices = []
    for axis, (n, m) in enumerate(zip(mask.shape, margins)):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(0, int(hits[0]) - int(m)), min(n, int(hits[-1]) + 1 + int(m))))
    return CropBox(tuple(slices), tuple(mask.shape))


def crop_with_box(array: np.ndarray, box: CropBox) -> np.ndarray:
    """Crop ``array`` (``(*S)``, ``(C, *S)`` or channel-last ``(*S, C)``) to ``box`` (a copy)."""
    array = np.asarray(array)
    start = _spatial_start(array.shape, box.original_shape)
    index = (slice(None),) * start + box.slices
    return array[index].copy()


def crop_to_box(array: np.ndarray, mask: np.ndarray, margin: IntOrSeq = 0) -> tuple[np.ndarray, CropBox]:
    """Crop ``array`` to the bounding box of ``mask`` plus ``margin`` voxels.

    Args:
        array: ``(*S)``, ``(C, *S)`` or channel-last ``(*S, C)`` with ``S = mask.shape``.
        mask: ``bool`` spatial mask.
        margin: voxels added on each side (one int, or one per spatial axis).

    Returns:
        ``(cropped copy, box)``; :func:`paste_from_box` puts it back.
    """
    box = bounding_box(mask, margin)
    return crop_with_box(array, box), box


def paste_from_box(cropped: np.ndarray, box: CropBox, fill: float = 0) -> np.ndarray:
    """Inverse of :func:`crop_to_box`: an array of the original shape, ``fill`` outside the box."""
    cropped = np.asarray(cropped)
    start = _spatial_start(cropped.shape, box.shape)
    n = len(box.shape)
    full_shape = cropped.shape[:start] + tuple(box.original_shape) + cropped.shape[start + n:]
    out = np.full(full_shape, fill, dtype=cropped.dtype)
    out[(slice(None),) * start + box.slices] = cropped
    return out


def cropped_geometry(geometry: Geometry, box: CropBox) -> Geometry:
    """Geometry of the cropped grid: same spacing and direction, origin at the box's first voxel."""
    shift_xyz = (np.asarray(box.start, dtype=np.float64) * np.asarray(geometry.spacing))[::-1]
    return Geometry(geometry.spacing, _moved_origin(geometry, shift_xyz), geometry.direction)


# --------------------------------------------------------------------------- padding

Pads = tuple[tuple[int, int], ...]


def _pad(array: np.ndarray, pads: Pads, mode: str, value: float) -> np.ndarray:
    full = ((0, 0),) * (array.ndim - len(pads)) + tuple(pads)
    if mode == "constant":
        return np.pad(array, full, mode="constant", constant_values=value)
    return np.pad(array, full, mode=mode)


def _centred_pads(old: Sequence[int], new: Sequence[int]) -> Pads:
    """Split each ``new - old`` into ``(before, after)`` with ``before = total // 2``."""
    return tuple(((n - o) // 2, (n - o) - (n - o) // 2) for o, n in zip(old, new))


def pad_to_multiple(array: np.ndarray, multiple: IntOrSeq, mode: str = "constant", *,
                    value: float = 0, spatial_dims: Optional[int] = None) -> tuple[np.ndarray, Pads]:
    """Pad the spatial axes so that each size is a multiple of ``multiple`` (centred padding).

    Args:
        array: ``(*S)`` or ``(C, *S)``; the spatial axes are the last ``spatial_dims``.
        multiple: one int, or one per spatial axis.
        mode: ``numpy.pad`` mode (``"constant"`` with ``value``, ``"edge"``, ``"reflect"``, ...).
        spatial_dims: number of trailing spatial axes; default ``len(multiple)`` for a sequence,
            else every axis of ``array`` (pass it for channel-first arrays with an int multiple).

    Returns:
        ``(padded array, pads)`` with ``pads`` = ``(before, after)`` per spatial axis;
        :func:`unpad` inverts.
    """
    array = np.asarray(array)
    if spatial_dims is None:
        spatial_dims = array.ndim if np.ndim(multiple) == 0 else len(tuple(multiple))
    if not 1 <= spatial_dims <= array.ndim:
        raise InputError(f"spatial_dims must be 1..{array.ndim} for shape {array.shape}, got {spatial_dims}.")
    mults = _per_axis(multiple, spatial_dims, "multiple")
    if any(int(m) < 1 for m in mults):
        raise InputError(f"multiple must be >= 1, got {multiple}.")
    old = array.shape[array.ndim - spatial_dims:]
    new = tuple(-(-n // int(m)) * int(m) for n, m in zip(old, mults))
    pads = _centred_pads(old, new)
    return _pad(array, pads, mode, value), pads


def pad_to_min_size(array: np.ndarray, min_size: Sequence[int], mode: str = "constant", *,
                    value: float = 0) -> tuple[np.ndarray, Pads]:
    """Pad the last ``len(min_size)`` axes (centred) so each is at least ``min_size``.

    Returns:
        ``(padded array, pads)``; :func:`unpad` inverts.
    """
    array = np.asarray(array)
    min_size = tuple(int(s) for s in min_size)
    if not 1 <= len(min_size) <= array.ndim:
        raise InputError(f"min_size {min_size} does not fit an array of shape {array.shape}.")
    old = array.shape[array.ndim - len(min_size):]
    pads = _centred_pads(old, tuple(max(o, m) for o, m in zip(old, min_size)))
    return _pad(array, pads, mode, value), pads


def unpad(array: np.ndarray, pads: Pads) -> np.ndarray:
    """Remove ``pads`` (from :func:`pad_to_multiple` / :func:`pad_to_min_size`) from the last axes.

    Works on any array whose trailing axes carry the padding, e.g. the network's ``(C, *S)``
    output for a padded ``(*S)`` input. Returns a copy.
    """
    array = np.asarray(array)
    if len(pads) > array.ndim:
        raise InputError(f"{len(pads)} padded axes do not fit an array of shape {array.shape}.")
    index = tuple(slice(b, n - a) for (b, a), n in zip(pads, array.shape[array.ndim - len(pads):]))
    return array[(slice(None),) * (array.ndim - len(pads)) + index].copy()


# --------------------------------------------------------------------------- 2.5D


def stack_neighbour_slices(volume: np.ndarray, context: int) -> np.ndarray:
    """2.5D input: each slice with ``context`` neighbours on either side as channels.

    Args:
        volume: ``(z, y, x)`` or channel-last ``(z, y, x, c)``.
        context: slices taken on each side; beyond the first/last slice the edge slice is
            replicated.

    Returns:
        ``(z, (2 * context + 1) * c, y, x)`` with channel index ``k * c + ch`` for slice offset
        ``k - context`` and image channel ``ch`` (``c = 1`` for ``(z, y, x)``); the middle
        ``c`` channels are the slice itself.
    """
    volume = np.asarray(volume)
    if volume.ndim not in (3, 4) or volume.shape[0] == 0:
        raise InputError(f"stack_neighbour_slices needs (z, y, x) or (z, y, x, c), got shape {volume.shape}.")
    if context < 0:
        raise InputError(f"context must be >= 0 slices, got {context}.")
    vol = volume if volume.ndim == 4 else volume[..., None]
    z, y, x, c = vol.shape
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.arange(z)[:, None] + offsets[None, :], 0, z - 1)  # (z, 2k+1)
    stack = vol[index]  # (z, 2k+1, y, x, c)
    return np.ascontiguousarray(stack.transpose(0, 1, 4, 2, 3).reshape(z, len(offsets) * c, y, x))


def center_slice_of_stack(stack: np.ndarray, context: int, channels: int = 1) -> np.ndarray:
    """Inverse of :func:`stack_neighbour_slices`: the middle slice of every stack.

    Args:
        stack: ``(z, (2 * context + 1) * channels, y, x)``.
        channels: image channels per slice.

    Returns:
        ``(z, y, x)`` for ``channels == 1``, else channel-last ``(z, y, x, channels)``.
    """
    stack = np.asarray(stack)
    if stack.ndim != 4 or stack.shape[1] != (2 * context + 1) * channels:
        raise InputError(f"A stack with context {context} and {channels} channel(s) must be "
                         f"(z, {(2 * context + 1) * channels}, y, x), got shape {stack.shape}.")
    middle = stack[:, context * channels:(context + 1) * channels]
    if channels == 1:
        return middle[:, 0].copy()
    return np.ascontiguousarray(middle.transpose(0, 2, 3, 1))
