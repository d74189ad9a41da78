"""Diffuse-UDA end to end, resumable stage by stage.

Stages (each writes its output into ``workdir`` and is skipped when that output is present):

1. ``ascplus``: ASCPlus training on labelled source and unlabelled target (:mod:`.ascplus`).
2. ``pseudo_labels``: target pseudo-labels from the last K student snapshots (:mod:`.pseudo_labels`).
3. ``diffusion``: the conditional diffusion model trained on source pairs (plus deformed copies
   when ``deform``) and target (image, pseudo-label) pairs.
4. ``synthesis``: ``N = round(synthetic_scale * U)`` pairs from source labels and target
   pseudo-labels (deformed when ``deform``), ``U`` = source slices holding body voxels (2D /
   2.5D; a 2D image is one slice) or source cases (3D),
   written as a NIfTI dataset with a manifest (:mod:`.synthesis`).
5. ``retrain``: the segmentation network trained from scratch on source + synthetic (+ the
   source restyled towards random targets when ``fourier``) -> the final checkpoint, which also
   carries the diffusion model.

Ablation switches: ``fourier`` (stage 1's appearance transfer and stage 5's restyled copies),
``deform`` (stages 3 and 4), ``synthetic_scale = 0`` (skips stages 3 and 4: no synthetic data
and no diffusion model in the checkpoint).

Stage files are named by a digest of the data and of every setting the stage depends on
(its own and its upstream stages'): a rerun with the same inputs reuses them, a changed setting
recomputes only the stages it affects, and runs that share a prefix of stages (ablations) can
share one workdir. Deformation of the diffusion training pairs is done up front:
``deform_copies`` copies of every source pair, the first undeformed, the rest deformed (without
``deform``, undeformed copies), and as many plain copies of every target pair (the paper deforms
source pairs only), so the source/target mix stays that of the case counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import DiffusionPart, SourceCheckpoint
from ..config import (DiffusionTrainingConfig, InputSpec, LabelClass, ScheduleConfig, TrainingConfig,
                      to_dict)
from ..data.geometry import Geometry, Volume
from ..data.io import check_same_geometry
from ..data.labels import values_to_indices
from ..data.preprocess import resampled_geometry
from ..diffusion.training import image_to_unit_range, train_diffusion
from ..errors import InputError
from ..inference.preparation import PreparedInput, labels_on_network_grid, pad_training_case, prepare_input
from ..training.patch_sampler import TrainingCase
from ..training.segmentation import (VALIDATION_HELD_OUT, VALIDATION_ON_TRAINING, default_diffusion_config,
                                     default_seg_config, train_segmentation)
from ..utils.device import StageTimer, resolve_device
from ..utils.progress import ProgressReporter, report
from .ascplus import ASCPlusConfig, train_ascplus
from .deformation import DeformationSettings, settings_field, warp_image, warp_labels
from .fourier import adaptive_beta, fourier_amplitude_transfer
from .pseudo_labels import target_pseudo_labels
from .synthesis import (LabelTemplate, MANIFEST, read_synthetic_dataset, slice_geometry,
                        synthesize_pairs, write_synthetic_dataset)

STAGES = ("ascplus", "pseudo_labels", "diffusion", "synthesis", "retrain")
INTENSITY_SCALE = 3.0


@dataclass
class DiffuseUDAConfig:
    """Diffuse-UDA settings (ablation switches first).

    Attributes:
        fourier: Fourier appearance transfer in ASCPlus and restyled source in the retraining.
        deform: deformable augmentation of the diffusion training pairs and of the synthesis
            conditions.
        synthetic_scale: ``N = round(scale * U)`` synthetic pairs (U: source slices holding
            body voxels for 2D / 2.5D, source cases for 3D); 0 disables the diffusion model and
            synthesis.
        ascplus_iterations, retrain_iterations, diffusion_iterations: the three budgets.
        retrain_epochs: the retraining's iterations are split into this many epochs (a
            validation and best-weights check after each).
        batch_size, lr: segmentation batch and learning rate (ASCPlus and retraining).
        consistency_weight: ASCPlus consistency weight (after the sigmoid ramp-up).
        checkpoints: K, student snapshots in the pseudo-label ensemble.
        confidence: pseudo-label confidence threshold (rejected voxels become background).
        deform_copies: copies of each source pair (and of each target pair) in the diffusion
            training set.
        restyled_copies: Fourier-restyled copies of each source case in the retraining.
        diffusion_batch_size, diffusion_lr: diffusion training.
        diffusion_base_channels, diffusion_channel_mults, timesteps: the diffusion model.
        sampler, steps, synthesis_batch_size: synthesis (``"ddim"`` with ``steps`` or ``"ddpm"``).
        seg_channels: widths of the segmentation U-Net.
        val_fraction: share of the retraining cases held out for best-weights selection.
        seed, device, amp: reproducibility, ``auto | cpu | cuda``, mixed precision on GPU.
    """

    fourier: bool = True
    deform: bool = True
    synthetic_scale: float = 2.0
    ascplus_iterations: int = 1000
    diffusion_iterations: int = 2000
    retrain_iterations: int = 1000
    retrain_epochs: int = 10
    batch_size: int = 4
    lr: float = 2e-3
    consistency_weight: float = 10.0
    checkpoints: int = 3
    confidence: float = 0.7
    deform_copies: int = 4
    restyled_copies: int = 1
    diffusion_batch_size: int = 8
    diffusion_lr: float = 2e-4
    diffusion_base_channels: int = 32
    diffusion_channel_mults: tuple[int, ...] = (1, 2, 2, 4)
    timesteps: int = 250
    sampler: str = "ddim"
    steps: int = 50
    synthesis_batch_size: int = 8
    seg_channels: tuple[int, ...] = (16, 32, 64, 128)
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    amp: bool = True


@dataclass
class DiffuseUDAOutcome:
    """What :func:`run_diffuse_uda` returns.

    Attributes:
        checkpoint: the final segmentation network plus the diffusion model (none when
            ``synthetic_scale == 0``).
        ascplus_checkpoint: the stage-1 student (no diffusion model), for comparison.
        stages: per stage ``"ran"``, ``"loaded"`` (found in the workdir) or ``"disabled"``.
        timings: :meth:`StageTimer.to_dict` (seconds and peak memory per stage).
        manifest_path: the synthetic dataset's manifest (None without a workdir or synthesis).
        pseudo_labels: target pseudo-labels ``(Z, Y, X)`` (class indices) on the network grid,
            padded at the far end to at least the patch size.
        provenance: the description stored in the checkpoint.
    """

    checkpoint: SourceCheckpoint
    ascplus_checkpoint: SourceCheckpoint
    stages: dict[str, str]
    timings: dict[str, Any]
    manifest_path: Optional[Path]
    pseudo_labels: list[np.ndarray] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Case:
    """A case on the network grid with the geometry of that grid."""

    case: TrainingCase
    geometry: Geometry


# --------------------------------------------------------------------------- preparation


def _network_geometry(volume: Volume, prepared: PreparedInput) -> Geometry:
    """Geometry of the (unpadded) network grid; padding at the far end does not move it."""
    grid_shape = prepared.image.shape[1:]
    if tuple(grid_shape) == tuple(prepared.volume_shape):
        return volume.geometry
    n = volume.geometry.ndim
    return resampled_geometry(volume.geometry, prepared.volume_shape[-n:], grid_shape[-n:])


def _source_case(image: Volume, labels: Volume, classes: list[LabelClass], spec: InputSpec,
                 name: str) -> _Case:
    """Like ``prepare_training_case``, keeping the network grid's geometry."""
    check_same_geometry(image, labels)
    prepared = prepare_input(image, spec, name)
    case = pad_training_case(prepared.image, labels_on_network_grid(labels, classes, prepared, name),
                             prepared.foreground, spec, name)
    return _Case(case, _network_geometry(image, prepared))


def _target_case(image: Volume, spec: InputSpec, name: str) -> _Case:
    """A target case whose ``labels`` are the body mask (class 1), to centre patches in the body."""
    prepared = prepare_input(image, spec, name)
    case = pad_training_case(prepared.image, prepared.foreground.astype(np.int64), prepared.foreground, spec,
                             name)
    return _Case(case, _network_geometry(image, prepared))


# --------------------------------------------------------------------------- stage store


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _data_digest(images: Sequence[Volume], labels: Sequence[Volume], targets: Sequence[Volume],
                 classes: list[LabelClass], spec: InputSpec) -> str:
    h = hashlib.sha1()
    for volume in (*images, *labels, *targets):
        array = np.ascontiguousarray(volume.array)
        h.update(str((array.shape, array.dtype.str, volume.geometry.to_dict())).encode())
        h.update(array.tobytes())
    h.update(json.dumps([[c.value, c.name] for c in classes]).encode())
    h.update(json.dumps(to_dict(spec), sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


class _StageStore:
    """Stage outputs in ``workdir`` (nothing is stored without one)."""

    def __init__(self, workdir: Optional[Path]) -> None:
        self.root = None if workdir is None else Path(workdir)
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Optional[Path]:
        return None if self.root is None else self.root / name

    def load(self, name: str) -> Optional[Any]:
        path = self.path(name)
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, name: str, value: Any) -> None:
        path = self.path(name)
        if path is None:
            return
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# --------------------------------------------------------------------------- helpers


def _net_sample(case: TrainingCase, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image in [-1, 1], labels, body)`` in the diffusion network's layout: ``(C, Y, X)`` for a
    one-slice 2D case, ``(C, Z, Y, X)`` otherwise (a 2D network then trains on its slices)."""
    image = image_to_unit_range(case.image, INTENSITY_SCALE)
    if spec.dims != "3d" and case.labels.shape[0] == 1:
        return image[:, 0], case.labels[0], case.foreground[0]
    return image, case.labels, case.foreground


def _deform_sample(sample: tuple[np.ndarray, np.ndarray, np.ndarray], net_dims: int,
                   settings: DeformationSettings, generator: torch.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deform one diffusion sample (a 2D network deforms every slice of a volume on its own)."""
    image, labels, body = (torch.from_numpy(np.ascontiguousarray(a)) for a in sample)
    slices = labels.ndim > net_dims
    image_b = image.movedim(1, 0) if slices else image[None]
    labels_b, body_b = (labels, body) if slices else (labels[None], body[None])
    grid = settings_field(settings, labels_b.shape[1:], generator, batch=labels_b.shape[0])
    image_b, labels_b, body_b = warp_image(image_b, grid), warp_labels(labels_b, grid), warp_labels(body_b, grid)
    if slices:
        return image_b.movedim(0, 1).numpy(), labels_b.numpy(), body_b.numpy()
    return image_b[0].numpy(), labels_b[0].numpy(), body_b[0].numpy()


def _templates(cases: Sequence[TrainingCase], labels: Sequence[np.ndarray], geometries: Sequence[Geometry],
               spec: InputSpec, kind: str) -> list[tuple[LabelTemplate, Geometry]]:
    """Synthesis templates: whole cases for 3D, slices holding body voxels for 2D / 2.5D."""
    out = []
    for case, lab, geometry in zip(cases, labels, geometries):
        if spec.dims == "3d":
            out.append((LabelTemplate(lab, case.foreground, f"{kind} {case.name}"), geometry))
            continue
        for z in range(lab.shape[0]):
            if case.foreground[z].any() or lab.shape[0] == 1:
                out.append((LabelTemplate(lab[z], case.foreground[z], f"{kind} {case.name} slice {z}"),
                            slice_geometry(geometry, z)))
    return out


def _crop_or_pad(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre-crop or edge-pad the trailing axes of ``(C, *S)`` to ``shape``."""
    out = image
    for axis, size in enumerate(shape, start=image.ndim - len(shape)):
        current = out.shape[axis]
        if current > size:
            start = (current - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif current < size:
            pads = [(0, 0)] * out.ndim
            pads[axis] = ((size - current) // 2, size - current - (size - current) // 2)
            out = np.pad(out, pads, mode="edge")
    return out


def _restyled_cases(source: Sequence[TrainingCase], target: Sequence[TrainingCase], spec: InputSpec,
                    copies: int, rng: np.random.Generator) -> list[TrainingCase]:
    """Source cases rendered in the style of random target cases (adaptive beta): whole volumes
    for 3D, slice by slice (each with a random target slice) for 2D / 2.5D."""
    out = []
    for copy in range(copies):
        for case in source:
            if spec.dims == "3d":
                other = target[int(rng.integers(len(target)))].image
                style = _crop_or_pad(other, case.image.shape[1:])
                beta = adaptive_beta(case.image, style, rng)
                image = fourier_amplitude_transfer(case.image, style, beta, spatial_dims=3)
            else:
                planes = []
                for z in range(case.image.shape[1]):
                    other = target[int(rng.integers(len(target)))]
                    occupied = np.flatnonzero(other.foreground.any(axis=(1, 2)))
                    zt = int(rng.choice(occupied)) if occupied.size else int(rng.integers(other.image.shape[1]))
                    style = _crop_or_pad(other.image[:, zt], case.image.shape[2:])
                    beta = adaptive_beta(case.image[:, z], style, rng)
                    planes.append(fourier_amplitude_transfer(case.image[:, z], style, beta, spatial_dims=2))
                image = np.stack(planes, axis=1)
            out.append(TrainingCase(image.astype(np.float32), case.labels, case.foreground,
                                    f"{case.name} restyled {copy}"))
    return out


def _case_from_files(image: Volume, labels: Volume, body: Optional[Volume], classes: list[LabelClass],
                     name: str) -> TrainingCase:
    """A synthetic pair read back from the dataset as a training case ``(C, Z, Y, X)``."""
    array = np.asarray(image.array, dtype=np.float32)
    if image.is_rgb:
        pixels = np.moveaxis(array, -1, 0)[:, None]
    else:
        pixels = array[None, None] if array.ndim == 2 else array[None]
    indices = values_to_indices(np.asarray(labels.array), classes, name)
    indices = indices[None] if indices.ndim == 2 else indices
    mask = np.ones(indices.shape, bool) if body is None else np.asarray(body.array).astype(bool).reshape(indices.shape)
    return TrainingCase(pixels, indices.astype(np.int64), mask, name)


# --------------------------------------------------------------------------- pipeline


def run_diffuse_uda(source_images: Sequence[Volume], source_labels: Sequence[Volume],
                    target_images: Sequence[Volume], classes: list[LabelClass], spec: InputSpec,
                    config: DiffuseUDAConfig = DiffuseUDAConfig(), workdir: Optional[Path] = None,
                    progress: Optional[ProgressReporter] = None,
                    source_names: Optional[Sequence[str]] = None,
                    target_names: Optional[Sequence[str]] = None) -> DiffuseUDAOutcome:
    """Run Diffuse-UDA: ASCPlus, pseudo-labels, diffusion, synthesis, retraining.

    Args:
        source_images, source_labels: labelled source scans (label values of ``classes``).
        target_images: unlabelled target scans of the same kind (2D or 3D, channels).
        classes: foreground classes.
        spec: input spec of the segmentation network (dims, patch size, spacing...).
        config: settings and ablation switches.
        workdir: stage outputs, the synthetic dataset and the final checkpoint go here; a rerun
            with the same workdir skips finished stages. None keeps everything in memory.
        progress: receives ``("diffuse-uda", fraction, "stage ...")`` at stage boundaries and
            the stages' own events; may cancel.
        source_names, target_names: case names for reports.

    Returns:
        :class:`DiffuseUDAOutcome`.

    Raises:
        InputError: mismatched lists, bad images or labels, bad settings.
    """
    if not source_images or len(source_images) != len(source_labels):
        raise InputError(f"Got {len(source_images)} source images and {len(source_labels)} label maps; "
                         "give one label map per source image (at least one pair).")
    if not target_images:
        raise InputError("Diffuse-UDA needs at least one unlabelled target image.")
    if config.synthetic_scale < 0 or config.checkpoints < 1 or config.deform_copies < 1:
        raise InputError(f"synthetic_scale must be >= 0, checkpoints and deform_copies >= 1 (got "
                         f"{config.synthetic_scale}, {config.checkpoints}, {config.deform_copies}).")
    device = resolve_device(config.device)
    timer = StageTimer(device)
    store = _StageStore(workdir)
    stages: dict[str, str] = {}
    s_names = list(source_names or [f"source_{i:03d}" for i in range(len(source_images))])
    t_names = list(target_names or [f"target_{i:03d}" for i in range(len(target_images))])

    def begin(index: int, name: str, state: str) -> None:
        stages[name] = state
        report(progress, "diffuse-uda", index / len(STAGES), f"stage {name}: {state}",
               done=index, total=len(STAGES), unit="stages")

    with timer.stage("prepare"):
        source = [_source_case(i, l, classes, spec, n) for i, l, n in zip(source_images, source_labels, s_names)]
        target = [_target_case(i, spec, n) for i, n in zip(target_images, t_names)]
    num_classes = 1 + len(classes)
    seg_config = default_seg_config(spec, num_classes, config.seg_channels)
    data_key = _data_digest(source_images, source_labels, target_images, classes, spec)

    # 1. ASCPlus -----------------------------------------------------------------------
    asc_config = ASCPlusConfig(iterations=config.ascplus_iterations, batch_size=config.batch_size,
                               lr=config.lr, consistency_weight=config.consistency_weight,
                               fourier=config.fourier, snapshots=config.checkpoints, amp=config.amp,
                               seed=config.seed, device=config.device)
    asc_key = _digest(data_key, {k: v for k, v in to_dict(asc_config).items() if k not in ("amp", "device")},
                      config.seg_channels)
    asc_name = f"ascplus-{asc_key}.pt"
    asc = store.load(asc_name)
    with timer.stage("ascplus"):
        if asc is None:
            begin(0, "ascplus", "ran")
            trained = train_ascplus([c.case for c in source], [c.case for c in target], spec, seg_config,
                                    asc_config, progress)
            asc = {"student": trained.student_state, "snapshots": trained.snapshots,
                   "snapshot_iterations": trained.snapshot_iterations,
                   "losses": [h["loss"] for h in trained.history]}
            store.save(asc_name, asc)
        else:
            begin(0, "ascplus", "loaded")

    # 2. pseudo-labels -----------------------------------------------------------------
    pl_key = _digest(asc_key, config.confidence)
    pl_name = f"pseudo_labels-{pl_key}.pt"
    stored = store.load(pl_name)
    with timer.stage("pseudo_labels"):
        if stored is None:
            begin(1, "pseudo_labels", "ran")
            pseudo = target_pseudo_labels(asc["snapshots"], seg_config, [c.case.image for c in target], spec,
                                          config.confidence, device, progress=progress)
            store.save(pl_name, {"labels": [torch.from_numpy(p) for p in pseudo]})
        else:
            begin(1, "pseudo_labels", "loaded")
            pseudo = [t.numpy() for t in stored["labels"]]

    # 3. diffusion ---------------------------------------------------------------------
    part: Optional[DiffusionPart] = None
    synthetic: list[TrainingCase] = []
    manifest_path: Optional[Path] = None
    syn_key: Optional[str] = None
    net_dims = spec.spatial_dims
    if config.synthetic_scale > 0:
        net_config = default_diffusion_config(spec, num_classes, config.diffusion_base_channels,
                                              config.diffusion_channel_mults)
        schedule = ScheduleConfig(timesteps=config.timesteps)
        diff_config = DiffusionTrainingConfig(iterations=config.diffusion_iterations,
                                              batch_size=config.diffusion_batch_size, lr=config.diffusion_lr,
                                              amp=config.amp, seed=config.seed, device=config.device)
        diff_key = _digest(pl_key, config.deform, config.deform_copies, to_dict(net_config), to_dict(schedule),
                           {k: v for k, v in to_dict(diff_config).items() if k not in ("amp", "device")})
        diff_name = f"diffusion-{diff_key}.pt"
        stored = store.load(diff_name)
        with timer.stage("diffusion"):
            if stored is None:
                begin(2, "diffusion", "ran")
                settings = DeformationSettings.for_dims(net_dims)
                generator = torch.Generator().manual_seed(config.seed)
                samples = []
                for c in source:
                    sample = _net_sample(c.case, spec)
                    samples.append(sample)
                    for _ in range(config.deform_copies - 1):
                        samples.append(_deform_sample(sample, net_dims, settings, generator)
                                       if config.deform else sample)
                for c, labels in zip(target, pseudo):
                    sample = _net_sample(TrainingCase(c.case.image, labels, c.case.foreground), spec)
                    samples.extend([sample] * config.deform_copies)
                patch = tuple(spec.patch_size) if spec.dims == "3d" else tuple(spec.patch_size[-2:])
                result = train_diffusion(samples, net_config, schedule, diff_config, patch, progress)
                stored = {"state": result.ema_state_dict, "losses": result.losses}
                store.save(diff_name, stored)
            else:
                begin(2, "diffusion", "loaded")
        part = DiffusionPart(net_config, schedule, stored["state"], INTENSITY_SCALE)

        # 4. synthesis -----------------------------------------------------------------
        syn_key = _digest(diff_key, config.synthetic_scale, config.sampler, config.steps)
        syn_dir = store.path(f"synthetic-{syn_key}")
        with timer.stage("synthesis"):
            if syn_dir is not None and (syn_dir / MANIFEST).is_file():
                begin(3, "synthesis", "loaded")
                manifest_path = syn_dir / MANIFEST
                _, files = read_synthetic_dataset(manifest_path)
                synthetic = [_case_from_files(img, lab, body, classes, f"synthetic_{i:04d}")
                             for i, (img, lab, body) in enumerate(files)]
            else:
                begin(3, "synthesis", "ran")
                templates = (_templates([c.case for c in source], [c.case.labels for c in source],
                                        [c.geometry for c in source], spec, "source")
                             + _templates([c.case for c in target], pseudo, [c.geometry for c in target],
                                          spec, "target"))
                units = (len(source) if spec.dims == "3d"
                         else sum(1 for t, _ in templates if t.name.startswith("source")))
                n = max(1, int(round(config.synthetic_scale * units)))
                order = np.random.default_rng(config.seed).permutation(len(templates))
                templates = [templates[i] for i in order]
                pairs = synthesize_pairs(part, [t for t, _ in templates], n, config.deform, config.sampler,
                                         config.steps, config.seed, device, config.synthesis_batch_size,
                                         amp=config.amp, progress=progress)
                for i, pair in enumerate(pairs):
                    image = pair.image if net_dims == 3 else pair.image[:, None]
                    labels = pair.labels if net_dims == 3 else pair.labels[None]
                    body = pair.foreground if net_dims == 3 else pair.foreground[None]
                    synthetic.append(TrainingCase(image, labels, body, f"synthetic_{i:04d}"))
                if syn_dir is not None:
                    manifest_path = write_synthetic_dataset(
                        pairs, [templates[p.template][1] for p in pairs], syn_dir, classes,
                        {"method": "diffuse-uda", "deform": config.deform, "sampler": config.sampler,
                         "steps": config.steps, "seed": config.seed,
                         "templates": [templates[p.template][0].name for p in pairs]})
    else:
        stages["diffusion"] = stages["synthesis"] = "disabled"

    # 5. retraining --------------------------------------------------------------------
    epochs = max(1, int(config.retrain_epochs))
    per_epoch = max(1, math.ceil(config.retrain_iterations / epochs))
    train_config = TrainingConfig(epochs=epochs, iterations_per_epoch=per_epoch, batch_size=config.batch_size, lr=config.lr, val_fraction=config.val_fraction,
                                  amp=config.amp, seed=config.seed, device=config.device)
    re_key = _digest(asc_key, syn_key, config.fourier, config.restyled_copies, "validation: source cases",
                     {k: v for k, v in to_dict(train_config).items() if k not in ("amp", "device")})
    final_name = f"diffuse_uda-{re_key}.sfuda"
    final_path = store.path(final_name)
    student = SourceCheckpoint(classes, spec, seg_config, asc["student"], None, None,
                               {"method": "diffuse-uda stage 1 (ASCPlus student)"})
    with timer.stage("retrain"):
        if final_path is not None and final_path.is_file():
            begin(4, "retrain", "loaded")
            checkpoint = SourceCheckpoint.load(final_path)
        else:
            begin(4, "retrain", "ran")
            cases = [c.case for c in source] + synthetic
            if config.fourier and config.restyled_copies > 0:
                cases += _restyled_cases([c.case for c in source], [c.case for c in target], spec,
                                         config.restyled_copies, np.random.default_rng([config.seed, 5]))
            # only real labelled scans validate: the synthetic labels are what is being tested
            real = [True] * len(source) + [False] * (len(cases) - len(source))
            run = train_segmentation(cases, spec, seg_config, train_config, progress,
                                     store.path(f"retrain-{re_key}.state"), validation_eligible=real)
            provenance = {
                "method": "diffuse-uda",
                "data": f"{len(source)} labelled source case(s), {len(target)} unlabelled target case(s)",
                "source_cases": s_names, "target_cases": t_names,
                "config": to_dict(config),
                "synthetic_pairs": len(synthetic),
                "restyled_cases": len(cases) - len(source) - len(synthetic),
                "ascplus": {"snapshot_iterations": list(asc["snapshot_iterations"]),
                            "final_loss": float(np.mean(asc["losses"][-20:]))},
                "validation_cases": run.validation_cases,
                "validation": VALIDATION_HELD_OUT if run.validation_held_out else VALIDATION_ON_TRAINING,
                "best_epoch": run.best_epoch, "validation_mean_dice": run.best_val_dice,
                "history": run.history, "timings": run.timings(),
                "versions": {"torch": torch.__version__, "numpy": np.__version__,
                             "python": platform.python_version()},
            }
            checkpoint = SourceCheckpoint(classes, spec, seg_config, run.state, part, None, provenance)
            if final_path is not None:
                checkpoint.save(final_path)
    report(progress, "diffuse-uda", 1.0, "Diffuse-UDA finished", done=len(STAGES), total=len(STAGES),
           unit="stages")
    return DiffuseUDAOutcome(checkpoint, student, stages, timer.to_dict(), manifest_path, pseudo,
                             checkpoint.provenance)
