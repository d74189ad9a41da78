"""From a user's image (any geometry) to the network grid and back.

``prepare_input`` validates the image against the checkpoint's input spec, puts channels first
(a 2D image becomes a one-slice volume ``(C, 1, Y, X)``), computes the body mask, normalises
intensities and resamples to the training spacing when the spec has one.
``PreparedInput.to_input_grid`` maps any network-grid result back to the input's exact grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import InferenceConfig, InputSpec, LabelClass
from ..data.geometry import Geometry, Volume
from ..data.io import check_same_geometry, validate_image, with_model_channels
from ..data.labels import values_to_indices
from ..data.preprocess import foreground_mask, normalize_intensity, resample_probabilities, resample_to_shape
from ..errors import InputError
from ..training.patch_sampler import TrainingCase, compact_label_dtype
from ..utils.progress import ProgressReporter
from .sliding_window import sliding_window_3d, slicewise_2d


@dataclass
class PreparedInput:
    """An image on the network grid, with what is needed to go back.

    Attributes:
        image: ``(C, Z, Y, X)`` normalised float32 (``Z = 1`` for a 2D image).
        foreground: ``(Z, Y, X)`` body mask.
        input_geometry: geometry of the user's image.
        input_shape: spatial shape of the user's image (``(Y, X)`` for 2D).
        network_spacing: spacing of the network grid, per axis of ``image[0]``.
    """

    image: np.ndarray
    foreground: np.ndarray
    input_geometry: Geometry
    input_shape: tuple[int, ...]
    network_spacing: tuple[float, ...]

    @property
    def is_2d(self) -> bool:
        """The user's image was a single 2D image."""
        return len(self.input_shape) == 2

    @property
    def volume_shape(self) -> tuple[int, ...]:
        """The user's grid as a volume, ``(1, Y, X)`` for a 2D image."""
        return (1, *self.input_shape) if self.is_2d else tuple(self.input_shape)

    def to_input_grid(self, array: np.ndarray, is_label: bool) -> np.ndarray:
        """Map a network-grid array back onto the user's grid.

        Args:
            array: ``(Z, Y, X)`` map or ``(K, Z, Y, X)`` stack on the network grid.
            is_label: nearest-neighbour (labels) or linear (intensities, probabilities).

        Returns:
            ``(*input_shape)`` or ``(K, *input_shape)``.
        """
        spatial = array.shape[-3:]
        if tuple(spatial) != tuple(self.volume_shape):
            if array.ndim == 4 and not is_label:
                array = resample_probabilities(array, self.volume_shape)
            elif array.ndim == 4:
                array = np.stack([resample_to_shape(a, self.volume_shape, order=0) for a in array])
            else:
                array = resample_to_shape(array, self.volume_shape, order=0 if is_label else 1)
        if self.is_2d:
            array = array[..., 0, :, :]
        return array


def _check_spec(volume: Volume, spec: InputSpec, name: str) -> None:
    """Raise when the image cannot go through a network of this spec."""
    ndim = volume.geometry.ndim
    if spec.dims == "3d" and ndim != 3:
        raise InputError(
            f"The {name} is a 2D image but the checkpoint holds a 3D model. Use a 2D or 2.5D "
            "checkpoint for 2D images, or load the 3D volume.")
    channels = 3 if volume.is_rgb else 1
    if channels != spec.image_channels:
        raise InputError(
            f"The {name} has {channels} channel(s) but the checkpoint expects "
            f"{spec.image_channels} ({'RGB colour' if spec.image_channels == 3 else 'grey'}). "
            "Use a checkpoint trained on this kind of image, or convert the image first.")


def prepare_input(volume: Volume, spec: InputSpec, name: str = "image") -> PreparedInput:
    """Validate and bring a user's image onto the network grid (the input is not modified).

    Args:
        volume: ``(Z, Y, X)``, ``(Y, X)`` or ``(Y, X, 3)`` image with its geometry (an RGB image
            with three equal channels is grey for a grey model).
        spec: the checkpoint's input spec.
        name: used in error messages.

    Raises:
        InputError: wrong dimensionality or channels, NaN/Inf, constant image...
    """
    volume = with_model_channels(volume, spec.image_channels)
    validate_image(volume, name)
    _check_spec(volume, spec, name)
    array = np.asarray(volume.array, dtype=np.float32)
    if volume.is_rgb:
        channels_first = np.moveaxis(array, -1, 0)[:, None]
    elif volume.geometry.ndim == 2:
        channels_first = array[None, None]
    else:
        channels_first = array[None]
    spacing = tuple(volume.spacing) if volume.geometry.ndim == 3 else (1.0, *volume.spacing)
    if spec.target_spacing is not None:
        target = tuple(spec.target_spacing)
        target = (spacing[0], *target[-2:]) if spec.dims != "3d" or len(target) == 2 else target
        shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(channels_first.shape[1:], spacing, target))
        if shape != channels_first.shape[1:]:
            channels_first = np.stack([resample_to_shape(c, shape, order=1) for c in channels_first])
            spacing = target
    if volume.is_rgb:  # (3, 1, Y, X) -> the (Y, X, 3) colour reading, mask back to (1, Y, X)
        mask = foreground_mask(np.moveaxis(channels_first[:, 0], 0, -1), rgb=True)[None]
    else:
        mask = foreground_mask(channels_first[0])
    normalised = np.stack([normalize_intensity(c, mask, spec.clip_percentiles)[0]
                           for c in channels_first]).astype(np.float32)
    return PreparedInput(normalised, mask.astype(bool), volume.geometry,
                         tuple(volume.array.shape[:2] if volume.is_rgb else volume.array.shape),
                         tuple(float(s) for s in spacing))


def labels_on_network_grid(labels: Volume, classes: list[LabelClass], prepared: PreparedInput,
                           name: str) -> np.ndarray:
    """Label values -> class indices ``(Z, Y, X)`` on ``prepared``'s network grid (nearest).

    Returns:
        Class indices in the compact type of :func:`compact_label_dtype` (``uint8`` for up to
        256 classes).

    Raises:
        InputError: label values that are not 0 or a class value.
    """
    indices = values_to_indices(np.asarray(labels.array), classes, f"label map of {name}")
    indices = indices.astype(compact_label_dtype(1 + len(classes)))
    indices = indices[None] if indices.ndim == 2 else indices
    if indices.shape != prepared.image.shape[1:]:
        indices = resample_to_shape(indices, prepared.image.shape[1:], order=0)
    return indices


def pad_training_case(image: np.ndarray, labels: np.ndarray, foreground: np.ndarray, spec: InputSpec,
                      name: str) -> TrainingCase:
    """A training case padded at the far end to at least the patch size (the origin stays put).

    Args:
        image: ``(C, Z, Y, X)``; labels, foreground: ``(Z, Y, X)``; labels keep their integer
            type (no copy when nothing needs padding).
    """
    patch = list(spec.patch_size) if spec.dims == "3d" else [1, *spec.patch_size[-2:]]
    pads = [(0, max(0, p - s)) for p, s in zip(patch, labels.shape)]
    if not any(after for _, after in pads):
        return TrainingCase(image, labels, foreground, name)
    return TrainingCase(np.pad(image, [(0, 0)] + pads, mode="edge"), np.pad(labels, pads),
                        np.pad(foreground, pads), name)


def prepare_training_case(image: Volume, labels: Volume, classes: list[LabelClass], spec: InputSpec,
                          name: str) -> TrainingCase:
    """A validated training case on the network grid, padded to at least the patch size.

    Raises:
        InputError: geometry mismatch between image and labels, unknown label values, bad image.
    """
    check_same_geometry(image, labels)
    prepared = prepare_input(image, spec, name)
    return pad_training_case(prepared.image, labels_on_network_grid(labels, classes, prepared, name),
                             prepared.foreground, spec, name)


def predict_indices(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, num_classes: int,
                    config: InferenceConfig, device: torch.device, want_probabilities: bool = False,
                    progress: Optional[ProgressReporter] = None
                    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Network-grid prediction: class indices ``(Z, Y, X)`` and, when asked, probabilities.

    Args:
        model: segmentation network in eval mode on ``device``.
        image: ``(C, Z, Y, X)`` normalised image.
        want_probabilities: also return ``(K, Z, Y, X)`` probabilities (``config`` dtype).

    Returns:
        ``(indices, probabilities)``; probabilities is None unless ``want_probabilities``.
    """
    if spec.dims == "3d":
        labels, probs = sliding_window_3d(model, image, spec.patch_size, num_classes, config, device,
                                          want_probabilities, progress)
    else:
        labels, probs = slicewise_2d(model, image, spec, num_classes, config, device,
                                     want_probabilities, progress)
    return labels, probs

