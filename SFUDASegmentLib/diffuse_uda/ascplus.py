"""ASCPlus: appearance and structure consistency training on labelled source and unlabelled target.

One iteration (after the reference code ``train_asc_v2.py``), with ``B`` source patches
``x_s`` (labels ``y_s``) and ``B`` random target patches ``x_t``:

1. Appearance transfer (:mod:`.fourier`, adaptive beta per pair): ``x_s->t`` is source patch i
   in the style of target patch i, ``x_t->s`` target patch i in the style of source patch i.
2. Supervised: ``L_sup = DiceCE(f(x_s), y_s) + DiceCE(f(x_s->t), y_s)``.
3. Structure (CutMix): one box per item, side ``sqrt(p)`` of each axis with ``p ~ U(0.25, 0.5)``
   (the box covers about ``p^(d/2)`` of the patch), at a uniform position. Item i of a mix
   takes the box from item ``i+1 (mod B)``: ``mix(v) = v * (1 - M) + roll(v) * M``.
4. Consistency between two appearance views of the same targets, student against EMA
   teacher, crossed: ``L_cons = mean(MSE(softmax f(mix(x_t->s)), mix(softmax g(x_t))),
   MSE(softmax f(mix(x_t)), mix(softmax g(x_t->s))))``. The code sums the two terms; the mean
   here keeps the weight's meaning when the Fourier switch is off (then both views are
   ``x_t`` and the one term is the plain CutMix mean-teacher consistency).
5. ``L = L_sup + w(t) L_cons`` with the sigmoid ramp-up ``w(t) = w * exp(-5 (1 - t)^2)``,
   ``t = min(iteration / ramp-up length, 1)``; AdamW with the library's poly schedule.
6. Teacher ``g``: ``theta_g = a theta_g + (1 - a) theta_f`` with ``a = min(1 - 1/(n + 1), 0.99)``
   at update ``n`` (0-based; the first update copies the student), buffers copied.

With ``fourier=False`` (the ablation) steps 1 and the restyled supervised term are skipped.
The student's weights at the last ``K`` snapshot iterations are kept for the pseudo-label
ensemble (:mod:`.pseudo_labels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import InputSpec, SegNetConfig
from ..errors import InputError
from ..nets.unet import ResidualUNet
from ..training.augmentation import random_affine, random_flips, random_intensity
from ..training.losses import dice_ce_loss
from ..training.patch_sampler import PatchSampler, TrainingCase
from ..utils.device import autocast, resolve_device
from ..utils.progress import ProgressReporter, report
from .fourier import fourier_restyle_batch


@dataclass
class ASCPlusConfig:
    """ASCPlus settings.

    Attributes:
        iterations: optimisation steps.
        batch_size: source patches per step (and as many target patches).
        lr, weight_decay: AdamW, poly decay to 0 (code: Adam 1e-4 over 150 epochs).
        ema_decay: teacher decay (code 0.99).
        consistency_weight: ``w`` (code 300 for FeTA, paper 200 for MM-WHS, with a class-mean
            Dice loss; the default suits the library's Dice + CE).
        rampup_fraction: ramp-up length as a share of the iterations (code: 100 of 150 epochs).
        fourier: appearance transfer on (the paper) or off (ablation).
        fixed_beta: a fixed beta for the transfer instead of the adaptive one.
        beta_factor_range, beta_floor: the adaptive beta's random factor and floor.
        cutmix_range: ``p`` range of the CutMix box.
        snapshots: K, student snapshots kept for the pseudo-label ensemble.
        snapshot_spacing: snapshots at iterations ``T, T - s, T - 2s, ...`` with
            ``s = max(1, round(snapshot_spacing * T))``.
        foreground_oversample: share of source patches centred on a labelled voxel.
        augment: flips, intensity and small affine on the source batch, flips on the target.
        amp: mixed precision on GPU.
        seed, device.
    """

    iterations: int = 1000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.99
    consistency_weight: float = 10.0
    rampup_fraction: float = 2.0 / 3.0
    fourier: bool = True
    fixed_beta: Optional[float] = None
    beta_factor_range: tuple[float, float] = (0.5, 1.5)
    beta_floor: float = 0.1
    cutmix_range: tuple[float, float] = (0.25, 0.5)
    snapshots: int = 3
    snapshot_spacing: float = 0.05
    foreground_oversample: float = 0.5
    augment: bool = True
    amp: bool = True
    seed: int = 0
    device: str = "auto"


@dataclass
class ASCPlusOutcome:
    """What :func:`train_ascplus` returns.

    Attributes:
        student_state: final student weights (CPU).
        teacher_state: final teacher weights (CPU).
        snapshots: the last K student weight sets, oldest first (CPU).
        snapshot_iterations: their iteration numbers (1-based).
        history: per iteration: ``loss``, ``supervised``, ``consistency``, ``weight``.
    """

    student_state: dict[str, torch.Tensor]
    teacher_state: dict[str, torch.Tensor]
    snapshots: list[dict[str, torch.Tensor]]
    snapshot_iterations: list[int]
    history: list[dict[str, float]] = field(default_factory=list)


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)``; 1 when ``length <= 0``."""
    if length <= 0:
        return 1.0
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """EMA step ``theta_g = a theta_g + (1 - a) theta_f`` with ``a = min(1 - 1/(step+1), decay)``.

    Buffers are copied. Returns ``a``.
    """
    alpha = min(1.0 - 1.0 / (step + 1.0), float(decay))
    for t_param, s_param in zip(teacher.parameters(), student.parameters()):
        t_param.mul_(alpha).add_(s_param.detach(), alpha=1.0 - alpha)
    for t_buffer, s_buffer in zip(teacher.buffers(), student.buffers()):
        t_buffer.copy_(s_buffer)
    return alpha


def cutmix_masks(batch: int, spatial: Sequence[int], rng: np.random.Generator,
                 proportion: tuple[float, float] = (0.25, 0.5)) -> torch.Tensor:
    """One box mask per item: side ``round(sqrt(p) * N)`` per axis, ``p ~ U(proportion)``.

    Returns:
        ``(B, 1, *spatial)`` float32, 1 inside the box.
    """
    masks = torch.zeros(batch, 1, *spatial)
    for b in range(batch):
        side = math.sqrt(rng.uniform(*proportion))
        box = []
        for n in spatial:
            size = int(round(side * n))
            start = int(round((n - size) * rng.uniform()))
            box.append(slice(start, start + size))
        masks[(b, 0, *box)] = 1.0
    return masks


def cutmix(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``v * (1 - M) + roll(v, 1) * M``: item i receives the box from item ``i+1 (mod B)``."""
    masks = masks.to(values.device, values.dtype)
    return values * (1.0 - masks) + torch.roll(values, shifts=-1, dims=0) * masks


def _snapshot_iterations(config: ASCPlusConfig) -> list[int]:
    spacing = max(1, int(round(config.snapshot_spacing * config.iterations)))
    steps = {max(1, config.iterations - i * spacing) for i in range(max(1, config.snapshots))}
    return sorted(steps)


def _check(source: Sequence[TrainingCase], target: Sequence[TrainingCase], config: ASCPlusConfig,
           seg_config: SegNetConfig) -> None:
    if not source or not target:
        raise InputError(f"ASCPlus needs labelled source cases and unlabelled target cases, got "
                         f"{len(source)} and {len(target)}.")
    if config.iterations < 1 or config.batch_size < 1 or config.lr <= 0:
        raise InputError(f"ASCPlus needs iterations >= 1, batch_size >= 1 and lr > 0 (got "
                         f"{config.iterations}, {config.batch_size}, {config.lr}).")
    if not 0 < config.cutmix_range[0] <= config.cutmix_range[1] <= 1:
        raise InputError(f"cutmix_range must satisfy 0 < low <= high <= 1, got {config.cutmix_range}.")
    if any(int(c.labels.max()) >= seg_config.out_channels for c in source):
        raise InputError(f"A source case has a class index >= {seg_config.out_channels}, the network's "
                         "number of classes. Build the cases with the same class list.")


def train_ascplus(source: Sequence[TrainingCase], target: Sequence[TrainingCase], spec: InputSpec,
                  seg_config: SegNetConfig, config: ASCPlusConfig = ASCPlusConfig(),
                  progress: Optional[ProgressReporter] = None,
                  initial_state: Optional[dict[str, torch.Tensor]] = None) -> ASCPlusOutcome:
    """Train a segmentation network with ASCPlus.

    Args:
        source: labelled source cases on the network grid.
        target: target cases (their ``labels`` only steer patch centres: pass the body mask as
            class 1 so that half the target patches are centred inside the body).
        spec: input spec (patch size, dims).
        seg_config: the network.
        config: settings.
        progress: receives ``("ascplus", fraction, message)`` and may cancel.
        initial_state: start from these weights instead of a random initialisation.

    Returns:
        :class:`ASCPlusOutcome`.
    """
    _check(source, target, config, seg_config)
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student = ResidualUNet.from_config(seg_config)
    if initial_state is not None:
        student.load_state_dict(initial_state)
    student.to(device).train()
    teacher = ResidualUNet.from_config(seg_config).to(device).eval()
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())

    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    patch = tuple(spec.patch_size) if spec.dims == "3d" else tuple(spec.patch_size[-2:])
    source_sampler = PatchSampler(source, spec, patch, config.foreground_oversample, rng)
    target_sampler = PatchSampler(target, spec, patch, 0.5, rng)
    rampup = config.rampup_fraction * config.iterations
    keep = set(_snapshot_iterations(config))
    outcome = ASCPlusOutcome({}, {}, [], [])
    b = config.batch_size
    for step in range(config.iterations):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (1.0 - step / config.iterations) ** 0.9
        images_np, labels_np = source_sampler.sample(b)
        x_s, y_s = torch.from_numpy(images_np), torch.from_numpy(labels_np)
        x_t = torch.from_numpy(target_sampler.sample(b)[0])
        if config.augment:
            x_s, y_s = random_flips(x_s, y_s, generator)
            x_s = random_intensity(x_s, generator)
            x_s, y_s = random_affine(x_s, y_s, generator)
            x_t, _ = random_flips(x_t, torch.zeros(x_t.shape[0], *x_t.shape[2:], dtype=torch.long), generator)
        x_s, y_s, x_t = x_s.to(device), y_s.to(device), x_t.to(device)
        masks = cutmix_masks(b, x_t.shape[2:], rng, config.cutmix_range).to(device)
        if config.fourier:
            restyle = dict(fixed_beta=config.fixed_beta, factor_range=config.beta_factor_range,
                           floor=config.beta_floor)
            x_st = fourier_restyle_batch(x_s, x_t, rng, **restyle)
            x_ts = fourier_restyle_batch(x_t, x_s, rng, **restyle)
            student_input = torch.cat([x_s, x_st, cutmix(x_t, masks), cutmix(x_ts, masks)])
            teacher_input = torch.cat([x_t, x_ts])
        else:
            student_input = torch.cat([x_s, cutmix(x_t, masks)])
            teacher_input = x_t
        with torch.no_grad(), autocast(device, use_amp):
            teacher_probs = torch.softmax(teacher(teacher_input).float(), dim=1)
        with autocast(device, use_amp):
            logits = student(student_input).float()
        if config.fourier:
            logit_s, logit_st, logit_mix_t, logit_mix_ts = logits.split(b)
            supervised = dice_ce_loss(logit_s, y_s) + dice_ce_loss(logit_st, y_s)
            teacher_t, teacher_ts = teacher_probs.split(b)
            consistency = 0.5 * (F.mse_loss(torch.softmax(logit_mix_ts, 1), cutmix(teacher_t, masks))
                                 + F.mse_loss(torch.softmax(logit_mix_t, 1), cutmix(teacher_ts, masks)))
        else:
            logit_s, logit_mix_t = logits.split(b)
            supervised = dice_ce_loss(logit_s, y_s)
            consistency = F.mse_loss(torch.softmax(logit_mix_t, 1), cutmix(teacher_probs, masks))
        weight = config.consistency_weight * sigmoid_rampup(step, rampup)
        loss = supervised + weight * consistency
        if not torch.isfinite(loss):
            raise InputError("ASCPlus training diverged (loss is NaN/Inf). Lower the learning rate or "
                             "check the images for extreme values.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        update_teacher(teacher, student, config.ema_decay, step)
        outcome.history.append({"loss": float(loss.detach()), "supervised": float(supervised.detach()),
                                "consistency": float(consistency.detach()), "weight": weight})
        if step + 1 in keep:
            outcome.snapshots.append(_cpu_state(student))
            outcome.snapshot_iterations.append(step + 1)
        report(progress, "ascplus", (step + 1) / config.iterations,
               f"ASCPlus iteration {step + 1}/{config.iterations}, loss {outcome.history[-1]['loss']:.3f}",
               done=step + 1, total=config.iterations,
               unit="iterations")
    outcome.student_state = _cpu_state(student)
    outcome.teacher_state = _cpu_state(teacher)
    return outcome


def _cpu_state(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
