"""Source training: segmentation network (Dice + CE) and, optionally, the conditional diffusion
model, written into one :class:`SourceCheckpoint`.

Patch sampling with class-balanced foreground oversampling, flips, intensity and small affine
augmentation, AdamW/Adam with a poly or cosine schedule, validation of held-out cases on a fixed
sample of slices or windows with best-checkpoint keeping, seeds, AMP on GPU, progress with
counts and rates, resumable epochs, and data parallelism over torchrun's processes.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import DiffusionPart, SourceCheckpoint
from ..config import (DiffusionNetConfig, DiffusionTrainingConfig, InputSpec, LabelClass, ScheduleConfig,
                      SegNetConfig, TrainingConfig, to_dict)
from ..data.geometry import Volume
from ..errors import CheckpointError, InputError
from ..inference.preparation import prepare_training_case
from ..nets.unet import ResidualUNet
from ..utils.device import autocast
from ..utils.distributed import SINGLE_PROCESS, DistributedContext
from ..utils.progress import ProgressReporter, report
from .augmentation import random_affine, random_flips, random_intensity
from .losses import dice_ce_loss
from .patch_sampler import PatchSampler, TrainingCase
from .validation import ValidationSample, validation_dice


@dataclass
class TrainingOutcome:
    """What :func:`train_source` returns.

    Attributes:
        checkpoint: the source checkpoint (best validation weights).
        history: one dict per epoch: ``epoch``, ``loss``, ``val_dice`` (per class and mean).
        best_epoch: epoch of the kept weights.
        best_val_dice: their mean foreground Dice on the validation sample.
        validation_cases: names of the cases used for validation.
        validation_held_out: False when those cases were trained on too (a single case):
            ``best_val_dice`` then says nothing about unseen scans.
        warnings: sentences for the user (e.g. the validation on a training case).
        timings: ``{"segmentation": {...}, "diffusion": {...}}`` seconds and rates (see
            :meth:`SegmentationTraining.timings`).
    """

    checkpoint: SourceCheckpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_dice: float = 0.0
    validation_cases: list[str] = field(default_factory=list)
    validation_held_out: bool = True
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)


def default_seg_config(spec: InputSpec, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128)
                       ) -> SegNetConfig:
    """The residual U-Net config for an input spec and class count."""
    return SegNetConfig(spatial_dims=spec.spatial_dims, in_channels=spec.network_channels,
                        out_channels=num_classes, channels=tuple(channels))


def default_diffusion_config(spec: InputSpec, num_classes: int, base_channels: int = 32,
                             channel_mults: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2
                             ) -> DiffusionNetConfig:
    """A diffusion U-Net config sized for the spec (2D nets for 2D/2.5D checkpoints)."""
    return DiffusionNetConfig(spatial_dims=spec.spatial_dims, image_channels=spec.image_channels,
                              cond_channels=num_classes + 1, base_channels=base_channels,
                              channel_mults=tuple(channel_mults), num_res_blocks=num_res_blocks,
                              groups=min(32, base_channels // 2 or 1))


def _split_cases(cases: list[TrainingCase], val_fraction: float, rng: np.random.Generator,
                 eligible: Optional[Sequence[bool]] = None) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Hold out ``val_fraction`` of the eligible cases (at least one when two or more are eligible).

    Args:
        cases: all training cases.
        val_fraction: share of the eligible cases held out.
        rng: generator of the split.
        eligible: per case, whether it may be held out for validation (e.g. only real labelled
            scans, not synthetic ones); None: every case. With fewer than two eligible cases,
            nothing is held out and the eligible cases (all cases when none is eligible) are
            validated on while they stay in the training set.

    Returns:
        ``(train, validation)`` case lists.
    """
    flags = [True] * len(cases) if eligible is None else [bool(e) for e in eligible]
    if len(flags) != len(cases):
        raise InputError(f"{len(flags)} validation flags for {len(cases)} training cases.")
    pool = [i for i, ok in enumerate(flags) if ok]
    if len(pool) < 2 or val_fraction <= 0:
        return cases, ([cases[i] for i in pool] or cases)
    n_val = min(len(pool) - 1, max(1, int(round(len(pool) * val_fraction))))
    held = {pool[i] for i in rng.permutation(len(pool))[:n_val]}
    val = [cases[i] for i in sorted(held)]
    train = [c for i, c in enumerate(cases) if i not in held]
    return train, val


def _learning_rate(config: TrainingConfig, step: int, total: int) -> float:
    fraction = min(step / max(total, 1), 1.0)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * fraction))
    return config.lr * (1 - fraction) ** 0.9


def _make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise InputError(f"Unknown optimizer '{config.optimizer}'. Use 'adamw' or 'adam'.")


@dataclass
class SegmentationTraining:
    """What :func:`train_segmentation` returns.

    Attributes:
        state: the kept weights (best validation epoch), CPU tensors.
        history: one dict per epoch: ``epoch``, ``loss`` (mean over the epoch's global batches),
            ``seconds`` and ``iterations_per_second`` of its training iterations, and
            ``val_dice`` (per foreground class), ``val_mean_dice`` and ``validation_seconds``
            (None for epochs that were not validated).
        best_epoch: epoch of the kept weights.
        best_val_dice: their mean foreground Dice on the validation sample.
        validation_cases: names of the validation cases.
        validation_held_out: False when the validation cases are also trained on (one case, or
            fewer than two cases eligible for validation): the validation Dice then measures the
            fit to the training data, not how the model does on unseen cases.
        validation_items: slices or windows (or whole cases) predicted per validation.
        validation_unit: what they are: ``"slices"``, ``"windows"`` or ``"cases"``.
        validation_indices: positions of the validation cases in the list trained on.
    """

    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_dice: float
    validation_cases: list[str]
    validation_held_out: bool = True
    validation_items: int = 0
    validation_unit: str = "slices"
    validation_indices: list[int] = field(default_factory=list)

    def timings(self) -> dict[str, Any]:
        """Seconds and rates over every epoch of the run (resumed epochs included).

        Returns:
            ``training_seconds``, ``iterations``, ``iterations_per_second``,
            ``validation_seconds``, ``validations``, ``validation_items`` and
            ``validation_unit``, ``validation_items_per_second``.
        """
        timed = [h for h in self.history if "seconds" in h]
        seconds = sum(h["seconds"] for h in timed)
        iterations = sum(h["seconds"] * h["iterations_per_second"] for h in timed)
        validations = [h["validation_seconds"] for h in timed if h.get("validation_seconds") is not None]
        validation_seconds = sum(validations)
        return {"training_seconds": seconds, "iterations": int(round(iterations)),
                "iterations_per_second": iterations / seconds if seconds > 0 else None,
                "validation_seconds": validation_seconds, "validations": len(validations),
                "validation_items": self.validation_items, "validation_unit": self.validation_unit,
                "validation_items_per_second": (len(validations) * self.validation_items / validation_seconds
                                                if validation_seconds > 0 else None)}


def validation_warning(case_names: Sequence[str]) -> str:
    """The warning given when the validation cases are training cases."""
    return (f"validation runs on training case(s) {', '.join(case_names)} because no case is held out: "
            "the validation Dice measures the fit to the training data, not how the model does on "
            "unseen scans. Give two or more labelled cases to hold one out.")


def _augment(images: torch.Tensor, labels: torch.Tensor, seeds: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, intensity and affine augmentation, each sample drawn from its own seed.

    Seeding per sample (from the run's seed, the step and the sample's place in the global
    batch) makes a sample's augmentation independent of which process handles it.

    Args:
        images: ``(B, C, *S)``; labels: ``(B, *S)``; seeds: B seeds.
    """
    out_images, out_labels = [], []
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        image, label = random_flips(images[i:i + 1], labels[i:i + 1], generator)
        image = random_intensity(image, generator)
        image, label = random_affine(image, label, generator)
        out_images.append(image)
        out_labels.append(label)
    return torch.cat(out_images), torch.cat(out_labels)


def _sample_seeds(seed: int, step: int, part: slice) -> list[int]:
    """Augmentation seeds of the global batch elements ``part`` at ``step``."""
    return [int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0])
            for i in range(part.start, part.stop)]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state through a temporary file, so that a kill never leaves half a file."""
    partial = Path(path).with_name(Path(path).name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def train_segmentation(cases: list[TrainingCase], spec: InputSpec, seg_config: SegNetConfig,
                       config: TrainingConfig, progress: Optional[ProgressReporter] = None,
                       resume_path: Optional[Path] = None, validation_eligible: Optional[Sequence[bool]] = None,
                       distributed: DistributedContext = SINGLE_PROCESS) -> SegmentationTraining:
    """Train the segmentation network on preprocessed cases.

    Every epoch runs ``config.iterations_per_epoch`` iterations; every
    ``config.validation_interval`` epochs (and after the last) the network is scored on a fixed
    validation sample (:class:`~SFUDASegmentLib.training.validation.ValidationSample`) and the
    best weights are kept.

    Args:
        cases: training cases on the network grid (see :class:`TrainingCase`).
        spec: input spec (dims, patch size).
        seg_config: network architecture.
        config: optimisation settings.
        progress: progress/cancel reporter: stage ``"training"`` counts iterations, stage
            ``"validation"`` slices or windows; a warning is reported when nothing is held out.
        resume_path: a training-state file: loaded when it exists, rewritten after every epoch
            (by rank 0 only).
        validation_eligible: per case, whether it may be held out for validation (None: all);
            see :func:`_split_cases`.
        distributed: this process's place in a torchrun group: the network is wrapped in
            DistributedDataParallel, each process trains on its share of every global batch
            and validates its share of the items; the result equals one process's up to float
            rounding.

    Returns:
        :class:`SegmentationTraining`.

    Raises:
        InputError: a global batch that does not split over the processes, a bad validation
            setting, divergence.
        CheckpointError: a training-state file that does not fit.
    """
    if config.validation_interval < 1:
        raise InputError(f"validation_interval must be >= 1 epoch, got {config.validation_interval}.")
    device = distributed.device(config.device)
    part = distributed.batch_part(config.batch_size)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_cases, val_cases = _split_cases(cases, config.val_fraction, rng, validation_eligible)
    held_out = not {id(c) for c in val_cases} & {id(c) for c in train_cases}
    sample = ValidationSample.draw(val_cases, spec, config.validation_samples, np.random.default_rng([config.seed, 1]))
    model = ResidualUNet.from_config(seg_config).to(device).train()
    optimizer = _make_optimizer(model, config)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    history: list[dict[str, Any]] = []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_score, best_epoch, start_epoch = -1.0, 0, 0
    if resume_path is not None and Path(resume_path).is_file():
        try:
            state = torch.load(resume_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except Exception as error:  # noqa: BLE001 - any failure means the state file is unusable
            raise CheckpointError(
                f"Cannot resume from '{resume_path}' ({type(error).__name__}: {error}). Delete the "
                "file to start over, or pass the same network settings as the interrupted run.") from error
        best_state, best_score = state["best_state"], float(state["best_score"])
        best_epoch, start_epoch, history = int(state["best_epoch"]), int(state["epoch"]), state["history"]
    network = distributed.wrap(model, device)
    sum_over = distributed.sum_with_gradient if distributed.is_distributed else None
    total_steps = config.epochs * config.iterations_per_epoch
    first_step = start_epoch * config.iterations_per_epoch
    patch = spec.patch_size if spec.dims == "3d" else spec.patch_size[-2:]
    counts = {"total": total_steps - first_step, "unit": "iterations"}
    report(progress, "training", first_step / max(total_steps, 1),
           f"training from epoch {start_epoch + 1}/{config.epochs}", done=0, **counts)
    if not held_out:
        report(progress, "training", first_step / max(total_steps, 1),
               "warning: " + validation_warning([c.name for c in val_cases]), done=0, **counts)
    for epoch in range(start_epoch, config.epochs):
        sampler = PatchSampler(train_cases, spec, patch, config.foreground_oversample,
                               np.random.default_rng([config.seed, epoch]))
        losses = []
        started = time.perf_counter()
        for it in range(config.iterations_per_epoch):
            step = epoch * config.iterations_per_epoch + it
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, total_steps)
            images_np, labels_np = sampler.sample(config.batch_size, part)
            images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np)
            if config.augment:
                images, labels = _augment(images, labels, _sample_seeds(config.seed, step, part))
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, use_amp):
                logits = network(images)
            loss = dice_ce_loss(logits, labels, sum_over)
            value = distributed.mean(float(loss.detach()))
            if not math.isfinite(value):
                raise InputError(
                    "Training diverged (loss is NaN/Inf). Lower the learning rate (--lr) or check "
                    "the images for extreme values.")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(value)
            report(progress, "training", (step + 1) / total_steps,
                   f"epoch {epoch + 1}/{config.epochs} loss {np.mean(losses):.3f}",
                   done=step + 1 - first_step, **counts)
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": seconds,
                                  "iterations_per_second": config.iterations_per_epoch / seconds,
                                  "val_dice": None, "val_mean_dice": None, "validation_seconds": None}
        message = f"epoch {epoch + 1}: loss {record['loss']:.3f}"
        if (epoch + 1) % config.validation_interval == 0 or epoch + 1 == config.epochs:
            started = time.perf_counter()
            val = validation_dice(model, val_cases, sample, spec, seg_config.out_channels, device, use_amp,
                                  distributed=distributed, progress=progress)
            mean_val = float(np.nanmean(val)) if not all(np.isnan(val)) else 0.0
            record.update(val_dice=val, val_mean_dice=mean_val, validation_seconds=time.perf_counter() - started)
            message += f", validation Dice {mean_val:.3f}"
            if mean_val > best_score:
                best_score, best_epoch = mean_val, epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.append(record)
        report(progress, "training", (epoch + 1) * config.iterations_per_epoch / total_steps, message,
               done=(epoch + 1 - start_epoch) * config.iterations_per_epoch, **counts)
        if resume_path is not None and distributed.is_main:
            _save_state(Path(resume_path), {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "best_state": best_state, "best_score": best_score,
                                            "best_epoch": best_epoch, "epoch": epoch + 1, "history": history})
    validation_ids = {id(c) for c in val_cases}
    return SegmentationTraining(best_state, history, best_epoch, best_score, [c.name for c in val_cases],
                                held_out, len(sample.items), sample.unit,
                                [i for i, c in enumerate(cases) if id(c) in validation_ids])


VALIDATION_HELD_OUT = "held-out case(s)"
VALIDATION_ON_TRAINING = "training case (no held-out case)"
"""What ``provenance["validation"]`` says the validation Dice was measured on."""


def train_source(images: Sequence[Volume], labels: Sequence[Volume], classes: list[LabelClass],
                 spec: InputSpec, config: TrainingConfig = TrainingConfig(),
                 seg_config: Optional[SegNetConfig] = None,
                 diffusion: Optional[DiffusionTrainingConfig] = None,
                 diffusion_config: Optional[DiffusionNetConfig] = None,
                 schedule: ScheduleConfig = ScheduleConfig(),
                 progress: Optional[ProgressReporter] = None,
                 resume_path: Optional[Path] = None,
                 case_names: Optional[Sequence[str]] = None,
                 data_description: str = "",
                 distributed: DistributedContext = SINGLE_PROCESS,
                 round_trip_slices: int = 8) -> TrainingOutcome:
    """Train a source model (and optionally its diffusion model) and build the checkpoint.

    Args:
        images: source images (3D volumes or 2D images), each validated.
        labels: their label maps (same geometry; values 0 or a class value).
        classes: foreground classes.
        spec: input spec: dims, modality, channels, patch size, network spacing...
        config: segmentation training settings.
        seg_config: network architecture (default: :func:`default_seg_config`).
        diffusion: when given, also train the conditional diffusion model with these settings.
        diffusion_config: its architecture (default: the network of
            :func:`~SFUDASegmentLib.diffusion.training.diffusion_defaults` for the device).
        schedule: its noise schedule.
        progress: progress/cancel reporter.
        resume_path: training-state file for resuming the segmentation training.
        case_names: names for reports (default: case_000, ...).
        data_description: free text stored in the provenance.
        distributed: this process's place in a torchrun group (see :func:`train_segmentation`);
            every process returns the same checkpoint, rank 0 alone should write it.
        round_trip_slices: with ``diffusion`` and held-out validation cases, the diffusion model
            is trained without those cases and its round trip (``heal/round_trip.py``) is measured
            on up to this many of their slices (2D; a 3D model renders the cases whole) and
            recorded in the card; 0 skips it (the diffusion model then trains on every case).

    Returns:
        :class:`TrainingOutcome`; its provenance records seconds and rates
        (``provenance["timings"]``), what the validation ran on (``provenance["validation"]``)
        and, when measured, the diffusion round trip (``provenance["diffusion_round_trip"]``,
        on rank 0 only under torchrun).

    Raises:
        InputError: mismatched lists, bad images or labels (see ``preparation``).
    """
    if len(images) != len(labels) or not images:
        raise InputError(f"Got {len(images)} images and {len(labels)} label maps; give one label "
                         "map per image (at least one pair).")
    if round_trip_slices < 0:
        raise InputError(f"--round-trip-slices must be 0 (skip the round trip) or more, got {round_trip_slices}.")
    names = list(case_names or [f"case_{i:03d}" for i in range(len(images))])
    cases = [prepare_training_case(img, lab, classes, spec, name)
             for img, lab, name in zip(images, labels, names)]
    num_classes = 1 + len(classes)
    seg_config = seg_config or default_seg_config(spec, num_classes)
    run = train_segmentation(cases, spec, seg_config, config, progress, resume_path, distributed=distributed)
    timings: dict[str, Any] = {"segmentation": run.timings()}
    part = None
    diffusion_record = None
    round_trip_cases: list[int] = []
    if diffusion is not None:
        from ..diffusion.training import (diffusion_defaults, image_to_unit_range, train_diffusion,
                                          widths_to_base_and_multipliers)

        if diffusion_config is None:
            defaults = diffusion_defaults(distributed.device(diffusion.device))
            diffusion_config = default_diffusion_config(spec, num_classes, *widths_to_base_and_multipliers(defaults.widths),
                                                        defaults.num_res_blocks)
        scale = 3.0
        round_trip_cases = run.validation_indices if run.validation_held_out and round_trip_slices > 0 else []
        samples = []
        for i in range(len(cases)):  # each case's image is released once its [-1, 1] copy exists
            case, cases[i] = cases[i], None
            if i not in round_trip_cases:
                samples.append((image_to_unit_range(case.image, scale), case.labels, case.foreground))
        if spec.dims == "3d":
            patch = tuple(spec.patch_size)
        else:
            samples = [(img[:, 0], lab[0], fg[0]) if lab.shape[0] == 1 else (img, lab, fg)
                       for img, lab, fg in samples]
            patch = tuple(spec.patch_size[-2:])
        trained = train_diffusion(samples, diffusion_config, schedule, diffusion, patch, progress, distributed)
        part = DiffusionPart(trained.net_config, trained.schedule_config, trained.ema_state_dict, scale)
        timings["diffusion"] = {"training_seconds": trained.seconds, "iterations": len(trained.losses),
                                "iterations_per_second": trained.iterations_per_second}
        diffusion_record = {**to_dict(diffusion),
                            "final_loss": float(np.mean(trained.losses[-50:])) if trained.losses else None}
    warnings = [] if run.validation_held_out else [validation_warning(run.validation_cases)]
    provenance = {
        "data": data_description or f"{len(names)} case(s): {', '.join(names)}",
        "cases": names,
        "validation_cases": run.validation_cases,
        "validation": VALIDATION_HELD_OUT if run.validation_held_out else VALIDATION_ON_TRAINING,
        "best_epoch": run.best_epoch,
        "validation_mean_dice": run.best_val_dice,
        "training": to_dict(config),
        "diffusion_training": diffusion_record,
        "timings": timings,
        "processes": distributed.world_size,
        "versions": {"sfudasegment": _version(), "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    checkpoint = SourceCheckpoint(classes, spec, seg_config, run.state, part, None, provenance)
    if part is not None and round_trip_cases and distributed.is_main:
        started = time.perf_counter()
        checkpoint = _with_held_out_round_trip(checkpoint, [images[i] for i in round_trip_cases],
                                               [labels[i] for i in round_trip_cases],
                                               [names[i] for i in round_trip_cases], round_trip_slices,
                                               diffusion.device, progress)
        timings["round_trip_seconds"] = time.perf_counter() - started
    return TrainingOutcome(checkpoint, run.history, run.best_epoch, run.best_val_dice, run.validation_cases,
                           run.validation_held_out, warnings, timings)


def _with_held_out_round_trip(checkpoint: SourceCheckpoint, images: list[Volume], labels: list[Volume],
                              names: list[str], slices: int, device: str,
                              progress: Optional[ProgressReporter]) -> SourceCheckpoint:
    """The checkpoint with its diffusion round trip on held-out cases in the card.

    The rendering uses HEAL's default sampler and steps with fewer candidates (4) than an
    adaptation, to keep the training's extra time small; ``sfuda round-trip`` measures it again
    with any setting."""
    from ..config import HEALConfig, InferenceConfig
    from ..heal.round_trip import with_round_trip

    return with_round_trip(checkpoint, images, labels, HEALConfig(candidates=4), InferenceConfig(device=device),
                           slices, names, progress)


def _version() -> str:
    from .. import __version__

    return __version__
