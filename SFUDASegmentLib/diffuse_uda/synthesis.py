"""Synthesis of image-label pairs with the conditional diffusion model, and their NIfTI dataset.

A *template* is a label map (class indices) with its body mask in the diffusion network's
dimensionality (``(Y, X)`` for a 2D network, ``(Z, Y, X)`` for a 3D one). Pair ``i`` is drawn
from template ``i mod len(templates)``: the template is optionally deformed (:mod:`.deformation`,
nearest neighbour for the labels and the body), turned into the condition (one-hot classes +
body channel, :func:`~SFUDASegmentLib.diffusion.training.make_condition`) and an image is
sampled for it (DDIM or DDPM, batched over pairs of the same shape, halving the batch on
out-of-memory). Images come back in the library's normalised (z-score) units.

The dataset on disk (:func:`write_synthetic_dataset`)::

    out_dir/manifest.json
    out_dir/images/synthetic_0000.nii.gz   float32, normalised intensities
    out_dir/labels/synthetic_0000.nii.gz   label values (not indices) of the class list
    out_dir/body/synthetic_0000.nii.gz     uint8 body mask (the condition's body channel)

``manifest.json`` holds ``format`` (``"sfuda-synthetic-dataset"``), ``version``, ``classes``
(value, name, colour), ``intensity`` (a note on the units), ``provenance`` and ``cases``: one
``{"image", "label", "body", "shape", "spacing"}`` entry per pair, paths relative to the
manifest's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from ..checkpoint import DiffusionPart, SourceCheckpoint
from ..config import LabelClass
from ..data.geometry import Geometry, Volume
from ..data.io import read_image, write_image
from ..data.labels import indices_to_values, values_to_indices
from ..data.preprocess import resample_to_shape, resampled_geometry
from ..diffusion.sampling import DDIMSampler, DDPMSampler, NoiseSchedule
from ..diffusion.training import make_condition, unit_range_to_image
from ..errors import InputError
from ..inference.preparation import prepare_input
from ..nets.diffusion_unet import ConditionalDiffusionUNet
from ..utils.device import free_memory, inference_layout, map_in_chunks, resolve_device
from ..utils.progress import ProgressReporter, report
from .deformation import DeformationSettings, settings_field, warp_labels

SAMPLERS = ("ddim", "ddpm")
MANIFEST = "manifest.json"
DATASET_FORMAT = "sfuda-synthetic-dataset"
DATASET_VERSION = 1


@dataclass
class LabelTemplate:
    """A condition to synthesize from.

    Attributes:
        labels: ``(*S)`` integer class indices (0 background), ``S`` in the network's dims.
        foreground: ``(*S)`` bool body mask.
        name: where it came from (for reports).
    """

    labels: np.ndarray
    foreground: np.ndarray
    name: str = ""


class SyntheticPair(NamedTuple):
    """One synthesized pair.

    Attributes:
        image: ``(C, *S)`` float32 normalised (z-score) intensities.
        labels: ``(*S)`` int64 class indices (the deformed template when deformation is on).
        foreground: ``(*S)`` bool body mask (deformed likewise).
        template: index of the template it was drawn from.
    """

    image: np.ndarray
    labels: np.ndarray
    foreground: np.ndarray
    template: int


def _diffusion_part(model: Union[SourceCheckpoint, DiffusionPart]) -> DiffusionPart:
    if isinstance(model, SourceCheckpoint):
        if model.diffusion is None:
            raise InputError("This checkpoint has no diffusion model, so it cannot synthesize images. "
                             "Train one with `sfuda train-source ... --diffusion` or `sfuda diffuse-uda`.")
        return model.diffusion
    if isinstance(model, DiffusionPart):
        return model
    raise InputError("Pass a SourceCheckpoint with a diffusion model or a DiffusionPart.")


def _check_templates(templates: Sequence[LabelTemplate], dims: int, num_classes: int) -> None:
    if not templates:
        raise InputError("No label maps were given to synthesize from; pass at least one.")
    for i, t in enumerate(templates):
        labels, body = np.asarray(t.labels), np.asarray(t.foreground)
        if labels.ndim != dims or body.shape != labels.shape:
            raise InputError(f"Template {i} ({t.name}): labels {labels.shape} and body {body.shape} must "
                             f"be {dims}D arrays of the same shape for this {dims}D diffusion network.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"Template {i} ({t.name}): labels must be integer class indices.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise InputError(f"Template {i} ({t.name}): class indices {labels.min()}..{labels.max()} "
                             f"outside 0..{num_classes - 1}. Map label values to class indices first.")


def _conditions(templates: Sequence[LabelTemplate], n: int, deform: bool,
                settings: DeformationSettings, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (labels, body) of every pair, deformed with a field seeded by ``(seed, i)``."""
    out = []
    for i in range(n):
        template = templates[i % len(templates)]
        labels = np.asarray(template.labels).astype(np.int64)
        body = np.asarray(template.foreground).astype(bool)
        if deform:
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            grid = settings_field(settings, labels.shape, generator)
            labels = warp_labels(torch.from_numpy(labels)[None], grid)[0].numpy()
            body = warp_labels(torch.from_numpy(body)[None], grid)[0].numpy()
        out.append((labels, body))
    return out


def synthesize_pairs(model: Union[SourceCheckpoint, DiffusionPart], templates: Sequence[LabelTemplate],
                     n: int, deform: bool = True, sampler: str = "ddim", steps: int = 50,
                     seed: int = 0, device: Union[str, torch.device] = "auto", batch_size: int = 4,
                     deformation: Optional[DeformationSettings] = None, eta: float = 0.0,
                     amp: bool = True, progress: Optional[ProgressReporter] = None) -> list[SyntheticPair]:
    """Synthesize ``n`` image-label pairs from label templates.

    Args:
        model: a checkpoint with a diffusion model, or the :class:`DiffusionPart` itself
            (network config, schedule, EMA weights and intensity scale).
        templates: label maps with body masks (see :class:`LabelTemplate`); pair ``i`` uses
            template ``i mod len(templates)``.
        n: number of pairs (>= 1).
        deform: deform each template first (labels and body nearest-neighbour).
        sampler: ``"ddim"`` (``steps`` steps, ``eta``) or ``"ddpm"`` (all T steps).
        steps: DDIM steps (1..T).
        seed: seeds the deformations and the sampling noise (deterministic for a given
            ``batch_size``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: pairs per sampler call (halved on out-of-memory).
        deformation: deformation parameters (default :meth:`DeformationSettings.for_dims`).
        eta: DDIM stochasticity.
        amp: mixed precision on GPU.
        progress: receives ``("synthesis", fraction, message)`` and may cancel.

    Returns:
        ``n`` :class:`SyntheticPair` (image in normalised units, labels, body, template index).

    Raises:
        InputError: bad templates, sampler or steps; a checkpoint without a diffusion model.
    """
    part = _diffusion_part(model)
    cfg = part.net_config
    num_classes = cfg.cond_channels - 1
    _check_templates(templates, cfg.spatial_dims, num_classes)
    if int(n) < 1 or int(batch_size) < 1:
        raise InputError(f"n and batch_size must be >= 1, got {n} and {batch_size}.")
    if sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {SAMPLERS}, got '{sampler}'.")
    schedule = NoiseSchedule.from_config(part.schedule)
    rule = DDPMSampler(schedule) if sampler == "ddpm" else DDIMSampler(schedule, steps=steps, eta=eta)
    device = resolve_device(device)
    net = ConditionalDiffusionUNet.from_config(cfg)
    net.load_state_dict(part.state_dict)
    inference_layout(net.to(device).eval(), device, cfg.spatial_dims)
    settings = deformation or DeformationSettings.for_dims(cfg.spatial_dims)
    conditions = _conditions(templates, int(n), deform, settings, seed)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (labels, _) in enumerate(conditions):
        by_shape.setdefault(labels.shape, []).append(i)
    images: dict[int, np.ndarray] = {}

    def run(chunk: Sequence[int]) -> list[int]:
        labels = torch.from_numpy(np.stack([conditions[i][0] for i in chunk]))
        body = torch.from_numpy(np.stack([conditions[i][1] for i in chunk]))
        cond = make_condition(labels, body, num_classes).to(device)
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 + chunk[0])
        samples = rule.sample(net, cond, cfg.image_channels, generator, None, amp)
        for i, sample in zip(chunk, samples.cpu().numpy()):
            images[i] = unit_range_to_image(sample, part.intensity_scale).astype(np.float32)
        report(progress, "synthesis", len(images) / n, f"synthesized {len(images)}/{n} pairs",
               done=len(images), total=n, unit="pairs")
        return list(chunk)

    for items in by_shape.values():
        map_in_chunks(run, items, int(batch_size), device, "synthesis batch")
    net.cpu()
    free_memory(device)
    return [SyntheticPair(images[i], conditions[i][0], conditions[i][1], i % len(templates))
            for i in range(int(n))]


def _array_for_geometry(array: np.ndarray, geometry: Geometry, what: str) -> np.ndarray:
    """Fit ``(*S)`` to the geometry: add a leading slice axis (2D array, 3D geometry) or drop a
    single one (one-slice array, 2D geometry)."""
    if array.ndim == geometry.ndim:
        return array
    if array.ndim == 2 and geometry.ndim == 3:
        return array[None]
    if array.ndim == 3 and array.shape[0] == 1 and geometry.ndim == 2:
        return array[0]
    raise InputError(f"The {what} of shape {array.shape} does not fit a {geometry.ndim}D geometry.")


def write_synthetic_dataset(pairs: Sequence[Union[SyntheticPair, tuple]],
                            geometry: Union[Geometry, Sequence[Geometry]], out_dir: Union[str, Path],
                            classes: list[LabelClass], provenance: Optional[dict] = None) -> Path:
    """Write pairs as NIfTI files plus ``manifest.json`` (layout in the module docstring).

    Args:
        pairs: :class:`SyntheticPair` or ``(image (C, *S), labels (*S))`` tuples (class indices).
        geometry: one geometry for every pair, or one per pair. A 2D pair with a 3D geometry is
            written as a one-slice volume; a one-slice pair with a 2D geometry as a 2D image.
        out_dir: output folder (created).
        classes: the class list (indices -> label values).
        provenance: free JSON-friendly description stored in the manifest.

    Returns:
        The manifest's path.
    """
    out = Path(out_dir)
    geometries = [geometry] * len(pairs) if isinstance(geometry, Geometry) else list(geometry)
    if len(geometries) != len(pairs) or not pairs:
        raise InputError(f"Got {len(pairs)} pairs and {len(geometries)} geometries; give at least one "
                         "pair and one geometry for all of them or one per pair.")
    cases = []
    for i, (pair, geom) in enumerate(zip(pairs, geometries)):
        image, labels = np.asarray(pair[0], dtype=np.float32), np.asarray(pair[1])
        if image.ndim != labels.ndim + 1 or image.shape[1:] != labels.shape:
            raise InputError(f"Pair {i}: image {image.shape} must be (C, *S) for labels {labels.shape}.")
        name = f"synthetic_{i:04d}.nii.gz"
        if image.shape[0] == 1:
            pixels = _array_for_geometry(image[0], geom, "image")
        elif image.shape[0] == 3 and labels.ndim == 2 and geom.ndim == 2:
            pixels = np.moveaxis(image, 0, -1)
        else:
            raise InputError(f"Pair {i}: {image.shape[0]}-channel images can only be written as 2D RGB.")
        entry = {"image": f"images/{name}", "label": f"labels/{name}", "body": None,
                 "shape": list(labels.shape), "spacing": list(geom.spacing)}
        write_image(Volume(pixels, geom), out / entry["image"])
        values = indices_to_values(labels.astype(np.int64), classes)
        write_image(Volume(_array_for_geometry(values, geom, "label map"), geom), out / entry["label"])
        if isinstance(pair, SyntheticPair):
            entry["body"] = f"body/{name}"
            body = _array_for_geometry(pair.foreground.astype(np.uint8), geom, "body mask")
            write_image(Volume(body, geom), out / entry["body"])
        cases.append(entry)
    manifest = {"format": DATASET_FORMAT, "version": DATASET_VERSION,
                "classes": [{"value": c.value, "name": c.name, "color": list(c.color)} for c in classes],
                "intensity": "normalised (z-score) units of the checkpoint's input spec",
                "provenance": provenance or {}, "cases": cases}
    path = out / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def read_synthetic_dataset(manifest_path: Union[str, Path]
                           ) -> tuple[list[LabelClass], list[tuple[Volume, Volume, Optional[Volume]]]]:
    """Read a dataset written by :func:`write_synthetic_dataset`.

    Returns:
        ``(classes, [(image, label values, body or None), ...])`` as :class:`Volume` objects.

    Raises:
        InputError: a missing or foreign manifest, or missing files.
    """
    path = Path(manifest_path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot read the synthetic dataset manifest '{path}' ({error}). Point to the "
                         f"{MANIFEST} written by `sfuda synthesize` or `sfuda diffuse-uda`.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise InputError(f"'{path}' is not a synthetic dataset manifest (format '{DATASET_FORMAT}').")
    classes = [LabelClass(int(c["value"]), str(c["name"]), tuple(c["color"])) for c in manifest["classes"]]
    folder = path.parent
    cases = []
    for entry in manifest["cases"]:
        body = read_image(folder / entry["body"]) if entry.get("body") else None
        cases.append((read_image(folder / entry["image"]), read_image(folder / entry["label"]), body))
    return classes, cases


def templates_from_label_maps(checkpoint: SourceCheckpoint, label_maps: Sequence[Volume],
                              images: Optional[Sequence[Volume]] = None
                              ) -> tuple[list[LabelTemplate], list[Geometry]]:
    """Templates (and their geometries) from user label maps, for :func:`synthesize_pairs`.

    With an image per label map, the template lies on the image's network grid (the
    checkpoint's spacing) and its body is the image's foreground mask; the label map is
    resampled there (nearest). Without images, the label map's own grid is used and the body is
    the whole grid (the model then renders body tissue up to the edges: give the image for a
    realistic outline). A 2D network gets one template per slice that holds a foreground label
    (every slice when none does), written back as one-slice volumes.

    Raises:
        InputError: label values outside the checkpoint's classes, a geometry mismatch.
    """
    if images is not None and len(images) != len(label_maps):
        raise InputError(f"Got {len(label_maps)} label maps and {len(images)} images; give one image "
                         "per label map or none.")
    part = _diffusion_part(checkpoint)
    templates: list[LabelTemplate] = []
    geometries: list[Geometry] = []
    for i, volume in enumerate(label_maps):
        indices = values_to_indices(np.asarray(volume.array), checkpoint.classes, f"label map {i}")
        geometry = volume.geometry
        grid = indices[None] if indices.ndim == 2 else indices
        body = np.ones(grid.shape, dtype=bool)
        if images is not None:
            prepared = prepare_input(images[i], checkpoint.input_spec, f"image {i}")
            shape = prepared.image.shape[1:]
            if grid.shape != prepared.volume_shape:
                raise InputError(f"Label map {i} {volume.array.shape} and its image {images[i].array.shape} "
                                 "have different shapes; pass the image the label map was drawn on.")
            if grid.shape != shape:
                grid = resample_to_shape(grid, shape, order=0)
                geometry = resampled_geometry(geometry, volume.array.shape[-geometry.ndim:],
                                              shape[-geometry.ndim:])
            body = prepared.foreground
        if part.net_config.spatial_dims == 3:
            templates.append(LabelTemplate(grid, body, f"label map {i}"))
            geometries.append(geometry)
            continue
        occupied = [z for z in range(grid.shape[0]) if grid[z].any()] or list(range(grid.shape[0]))
        for z in occupied:
            templates.append(LabelTemplate(grid[z], body[z], f"label map {i} slice {z}"))
            geometries.append(slice_geometry(geometry, z))
    return templates, geometries


def slice_geometry(geometry: Geometry, z: int) -> Geometry:
    """Geometry of slice ``z`` of a 3D grid as a one-slice volume (a 2D geometry is returned as is)."""
    if geometry.ndim == 2:
        return geometry
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(geometry.origin, dtype=np.float64) + direction[:, 2] * geometry.spacing[0] * z
    return Geometry(geometry.spacing, tuple(origin), geometry.direction)


def synthesize_from_label_maps(checkpoint: SourceCheckpoint, label_maps: Sequence[Volume], n: int,
                               out_dir: Union[str, Path], deform: bool = True,
                               images: Optional[Sequence[Volume]] = None, sampler: str = "ddim",
                               steps: int = 50, seed: int = 0, device: str = "auto",
                               batch_size: int = 4, progress: Optional[ProgressReporter] = None) -> Path:
    """The ``sfuda synthesize`` command: ``n`` pairs from user label maps, written as a dataset.

    Args:
        checkpoint: a checkpoint with a diffusion model.
        label_maps: label maps (label values of the checkpoint's classes).
        n: number of pairs.
        out_dir: dataset folder.
        deform: deform the label maps before conditioning.
        images: optional images of the label maps (network grid and body mask, see
            :func:`templates_from_label_maps`).
        sampler, steps, seed, device, batch_size, progress: see :func:`synthesize_pairs`.

    Returns:
        The manifest's path.
    """
    templates, geometries = templates_from_label_maps(checkpoint, label_maps, images)
    pairs = synthesize_pairs(checkpoint, templates, n, deform, sampler, steps, seed, device, batch_size,
                             progress=progress)
    return write_synthetic_dataset(
        pairs, [geometries[p.template] for p in pairs], out_dir, checkpoint.classes,
        {"method": "diffusion synthesis", "deform": deform, "sampler": sampler,
         "steps": steps if sampler == "ddim" else checkpoint.diffusion.schedule.timesteps,
         "seed": seed, "templates": [templates[p.template].name for p in pairs]})
