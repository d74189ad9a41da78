"""Source training: segmentation network (Dice + CE) and, optionally, the conditional diffusion
model, written into one :class:`SourceCheckpoint`.

Patch sampling with class-balanced foreground oversampling, flips, intensity and small affine
augmentation, AdamW/Adam with a poly or cosine schedule, validation on held-out cases with
best-checkpoint keeping, seeds, AMP on GPU, progress reporting and resumable epochs.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import DiffusionPart, SourceCheckpoint
from ..config import (DiffusionNetConfig, DiffusionTrainingConfig, InferenceConfig, InputSpec,
                     LabelClass, ScheduleConfig, SegNetConfig, TrainingConfig, to_dict)
from ..data.geometry import Volume
from ..errors import CheckpointError, InputError
from ..inference.preparation import prepare_training_case, predict_indices
from ..nets.unet import ResidualUNet
from ..utils.device import autocast, resolve_device
from ..utils.progress import ProgressReporter, report
from .augmentation import random_affine, random_flips, random_intensity
from .losses import dice_ce_loss
from .patch_sampler import PatchSampler, TrainingCase


@dataclass
class TrainingOutcome:
    """What :func:`train_source` returns.

    Attributes:
        checkpoint: the source checkpoint (best validation weights).
        history: one dict per epoch: ``epoch``, ``loss``, ``val_dice`` (per class and mean).
        best_epoch: epoch of the kept weights.
        best_val_dice: their mean foreground Dice on the validation cases.
        validation_cases: names of the cases used for validation.
    """

    checkpoint: SourceCheckpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_dice: float = 0.0
    validation_cases: list[str] = field(default_factory=list)


def default_seg_config(spec: InputSpec, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128)
                       ) -> SegNetConfig:
    """The residual U-Net config for an input spec and class count."""
    return SegNetConfig(spatial_dims=spec.spatial_dims, in_channels=spec.network_channels,
                        out_channels=num_classes, channels=tuple(channels))


def default_diffusion_config(spec: InputSpec, num_classes: int, base_channels: int = 32,
                             channel_mults: Sequence[int] = (1, 2, 2, 4)) -> DiffusionNetConfig:
    """A diffusion U-Net config sized for the spec (2D nets for 2D/2.5D checkpoints)."""
    return DiffusionNetConfig(spatial_dims=spec.spatial_dims, image_channels=spec.image_channels,
                              cond_channels=num_classes + 1, base_channels=base_channels,
                              channel_mults=tuple(channel_mults), num_res_blocks=2,
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


def _validation_dice(model: ResidualUNet, cases: Sequence[TrainingCase], spec: InputSpec,
                     num_classes: int, device: torch.device) -> list[float]:
    """Mean Dice per foreground class over ``cases`` (whole-case inference)."""
    scores = np.zeros(num_classes - 1)
    counts = np.zeros(num_classes - 1)
    model.eval()
    for case in cases:
        pred, _ = predict_indices(model, case.image, spec, num_classes, InferenceConfig(amp=True), device)
        for k in range(1, num_classes):
            p, r = pred == k, case.labels == k
            if r.sum() == 0 and p.sum() == 0:
                continue
            scores[k - 1] += 2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum())
            counts[k - 1] += 1
    model.train()
    return [float(s / c) if c else float("nan") for s, c in zip(scores, counts)]


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


def train_segmentation(cases: list[TrainingCase], spec: InputSpec, seg_config: SegNetConfig,
                       config: TrainingConfig, progress: Optional[ProgressReporter] = None,
                       resume_path: Optional[Path] = None, validation_eligible: Optional[Sequence[bool]] = None
                       ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], int, float, list[str]]:
    """Train the segmentation network on preprocessed cases.

    Args:
        cases: training cases on the network grid (see :class:`TrainingCase`).
        spec: input spec (dims, patch size).
        seg_config: network architecture.
        config: optimisation settings.
        progress: progress/cancel reporter (stage ``"training"``).
        resume_path: a training-state file: loaded when it exists, rewritten after every epoch.
        validation_eligible: per case, whether it may be held out for validation (None: all);
            see :func:`_split_cases`.

    Returns:
        ``(best_state_dict, history, best_epoch, best_val_dice, validation_case_names)``.
    """
    device = resolve_device(config.device)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_cases, val_cases = _split_cases(cases, config.val_fraction, rng, validation_eligible)
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
    total_steps = config.epochs * config.iterations_per_epoch
    patch = spec.patch_size if spec.dims == "3d" else spec.patch_size[-2:]
    for epoch in range(start_epoch, config.epochs):
        epoch_rng = np.random.default_rng([config.seed, epoch])
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        sampler = PatchSampler(train_cases, spec, patch, config.foreground_oversample, epoch_rng)
        losses = []
        for it in range(config.iterations_per_epoch):
            step = epoch * config.iterations_per_epoch + it
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, total_steps)
            images_np, labels_np = sampler.sample(config.batch_size)
            images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np)
            if config.augment:
                images, labels = random_flips(images, labels, generator)
                images = random_intensity(images, generator)
                images, labels = random_affine(images, labels, generator)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, use_amp):
                logits = model(images)
            loss = dice_ce_loss(logits, labels)
            if not torch.isfinite(loss):
                raise InputError(
                    "Training diverged (loss is NaN/Inf). Lower the learning rate (--lr) or check "
                    "the images for extreme values.")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            report(progress, "training", (step + 1) / total_steps,
                   f"epoch {epoch + 1}/{config.epochs} loss {np.mean(losses):.3f}")
        val = _validation_dice(model, val_cases, spec, seg_config.out_channels, device)
        mean_val = float(np.nanmean(val)) if not all(np.isnan(val)) else 0.0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val,
                        "val_mean_dice": mean_val})
        if mean_val > best_score:
            best_score, best_epoch = mean_val, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        report(progress, "training", (epoch + 1) * config.iterations_per_epoch / total_steps,
               f"epoch {epoch + 1}: loss {np.mean(losses):.3f}, validation Dice {mean_val:.3f}")
        if resume_path is not None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "best_state": best_state, "best_score": best_score, "best_epoch": best_epoch,
                        "epoch": epoch + 1, "history": history}, resume_path)
    return best_state, history, best_epoch, best_score, [c.name for c in val_cases]


def train_source(images: Sequence[Volume], labels: Sequence[Volume], classes: list[LabelClass],
                 spec: InputSpec, config: TrainingConfig = TrainingConfig(),
                 seg_config: Optional[SegNetConfig] = None,
                 diffusion: Optional[DiffusionTrainingConfig] = None,
                 diffusion_config: Optional[DiffusionNetConfig] = None,
                 schedule: ScheduleConfig = ScheduleConfig(),
                 progress: Optional[ProgressReporter] = None,
                 resume_path: Optional[Path] = None,
                 case_names: Optional[Sequence[str]] = None,
                 data_description: str = "") -> TrainingOutcome:
    """Train a source model (and optionally its diffusion model) and build the checkpoint.

    Args:
        images: source images (3D volumes or 2D images), each validated.
        labels: their label maps (same geometry; values 0 or a class value).
        classes: foreground classes.
        spec: input spec: dims, modality, channels, patch size...
        config: segmentation training settings.
        seg_config: network architecture (default: :func:`default_seg_config`).
        diffusion: when given, also train the conditional diffusion model with these settings.
        diffusion_config: its architecture (default: :func:`default_diffusion_config`).
        schedule: its noise schedule.
        progress: progress/cancel reporter.
        resume_path: training-state file for resuming the segmentation training.
        case_names: names for reports (default: case_000, ...).
        data_description: free text stored in the provenance.

    Raises:
        InputError: mismatched lists, bad images or labels (see ``preparation``).
    """
    if len(images) != len(labels) or not images:
        raise InputError(f"Got {len(images)} images and {len(labels)} label maps; give one label "
                         "map per image (at least one pair).")
    names = list(case_names or [f"case_{i:03d}" for i in range(len(images))])
    cases = [prepare_training_case(img, lab, classes, spec, name)
             for img, lab, name in zip(images, labels, names)]
    num_classes = 1 + len(classes)
    seg_config = seg_config or default_seg_config(spec, num_classes)
    state, history, best_epoch, best_score, val_names = train_segmentation(
        cases, spec, seg_config, config, progress, resume_path)
    part = None
    diffusion_losses: list[float] = []
    if diffusion is not None:
        from ..diffusion.training import image_to_unit_range, train_diffusion

        net_config = diffusion_config or default_diffusion_config(spec, num_classes)
        scale = 3.0
        samples = [(image_to_unit_range(c.image, scale), c.labels, c.foreground) for c in cases]
        if spec.dims == "3d":
            patch = tuple(spec.patch_size)
        else:
            samples = [(img[:, 0], lab[0], fg[0]) if lab.shape[0] == 1 else (img, lab, fg)
                       for img, lab, fg in samples]
            patch = tuple(spec.patch_size[-2:])
        trained = train_diffusion(samples, net_config, schedule, diffusion, patch, progress)
        part = DiffusionPart(trained.net_config, trained.schedule_config, trained.ema_state_dict, scale)
        diffusion_losses = trained.losses
    provenance = {
        "data": data_description or f"{len(cases)} case(s): {', '.join(names)}",
        "cases": names,
        "validation_cases": val_names,
        "best_epoch": best_epoch,
        "validation_mean_dice": best_score,
        "training": to_dict(config),
        "diffusion_training": None if diffusion is None else {
            **to_dict(diffusion), "final_loss": float(np.mean(diffusion_losses[-50:])) if diffusion_losses else None},
        "versions": {"sfudasegment": _version(), "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    checkpoint = SourceCheckpoint(classes, spec, seg_config, state, part, None, provenance)
    return TrainingOutcome(checkpoint, history, best_epoch, best_score, val_names)


def _version() -> str:
    from .. import __version__

    return __version__
