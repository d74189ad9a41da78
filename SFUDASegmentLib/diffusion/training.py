"""Training of the conditional diffusion model on (image, label map) pairs.

The model (Med-DDPM style) learns to turn noise into an image whose anatomy follows a given
label map. Its condition is built by :func:`make_condition`; images are brought from the
library's z-scored intensities into the diffusion's ``[-1, 1]`` range by
:func:`image_to_unit_range`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..config import DiffusionNetConfig, DiffusionTrainingConfig, ScheduleConfig
from ..errors import InputError
from ..nets.diffusion_unet import ConditionalDiffusionUNet
from ..training.ema import ExponentialMovingAverage
from ..utils.device import autocast, resolve_device
from ..utils.progress import ProgressReporter, report
from .sampling import NoiseSchedule, diffusion_loss

ArrayLike = Union[np.ndarray, torch.Tensor]
Sample = tuple[np.ndarray, np.ndarray, np.ndarray]

# Value given to padded image voxels: the darkest value of the diffusion's range.
PAD_INTENSITY = -1.0


def make_condition(labels: torch.Tensor, foreground: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Condition of the diffusion model: one-hot classes plus a body channel.

    Channels ``0 .. num_classes-1`` are the one-hot encoding of the class indices (channel 0 is
    the background). Channel ``num_classes`` is the *body* channel: 1 where the voxel is inside
    the foreground (body, brain...) AND labelled background, 0 elsewhere. It is Med-DDPM's
    BraTS "brain" channel (label where the brain is and the tumour is not): without it the
    model does not know where the anatomy ends and its samples are poor.

    Args:
        labels: ``(B, *S)`` integer class indices in ``0 .. num_classes-1``.
        foreground: ``(B, *S)`` bool, the body / organ-of-interest mask.
        num_classes: K, the number of classes including the background.

    Returns:
        ``(B, num_classes + 1, *S)`` float32 on ``labels.device``.

    Raises:
        InputError: mismatched shapes, or class indices outside ``0 .. num_classes-1``.
    """
    if num_classes < 1:
        raise InputError(f"num_classes must be >= 1 (background included), got {num_classes}.")
    if tuple(labels.shape) != tuple(foreground.shape):
        raise InputError(f"labels {tuple(labels.shape)} and foreground {tuple(foreground.shape)} must "
                         "have the same shape (B, *spatial). Pass the mask of the same image.")
    if labels.is_floating_point() or labels.is_complex():
        raise InputError("labels must hold integer class indices, not floating-point values. Map the "
                         "label values to indices 0..K-1 first.")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(
            f"Class indices must be in 0..{num_classes - 1}, found {int(labels.min())}.."
            f"{int(labels.max())}. Map label values to class indices (0 = background) and pass the "
            "number of classes including the background.")
    one_hot = torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1)
    body = (foreground.to(torch.bool) & (labels == 0)).unsqueeze(1)
    return torch.cat([one_hot, body], dim=1).to(torch.float32)


def image_to_unit_range(z: ArrayLike, scale: float = 3.0) -> ArrayLike:
    """Map z-scored intensities to the diffusion's range: ``clip(z / scale, -1, 1)``.

    Args:
        z: normalised image (any shape), numpy array or tensor; not modified.
        scale: the z-score that maps to +-1 (3 keeps 99.7 % of a Gaussian unclipped).

    Returns:
        A new array / tensor of the same type and shape, in ``[-1, 1]``.
    """
    if scale <= 0:
        raise InputError(f"scale must be > 0, got {scale}. Use e.g. 3.0 (z = +-3 maps to +-1).")
    if isinstance(z, torch.Tensor):
        return torch.clamp(z / scale, -1.0, 1.0)
    return np.clip(np.asarray(z, dtype=np.float32) / np.float32(scale), -1.0, 1.0)


def unit_range_to_image(u: ArrayLike, scale: float = 3.0) -> ArrayLike:
    """Inverse of :func:`image_to_unit_range` (up to its clipping): ``u * scale``."""
    if scale <= 0:
        raise InputError(f"scale must be > 0, got {scale}. Use the scale used for the forward mapping.")
    if isinstance(u, torch.Tensor):
        return u * scale
    return np.asarray(u, dtype=np.float32) * np.float32(scale)


@dataclass
class DiffusionTrainingResult:
    """What :func:`train_diffusion` returns (everything a checkpoint needs for the diffusion).

    Attributes:
        net_config: the network configuration.
        schedule_config: the noise schedule.
        ema_state_dict: EMA weights (CPU tensors); load with
            ``ConditionalDiffusionUNet.from_config(net_config).load_state_dict(...)``.
        losses: training loss of every iteration.
    """

    net_config: DiffusionNetConfig
    schedule_config: ScheduleConfig
    ema_state_dict: dict[str, torch.Tensor]
    losses: list[float]


class _PatchSampler:
    """Draws random, randomly flipped patches (or slices of 3D volumes) from the samples."""

    def __init__(self, samples: Sequence[Sample], net_config: DiffusionNetConfig,
                 patch_size: Optional[tuple[int, ...]], rng: np.random.Generator) -> None:
        self.samples = samples
        self.rng = rng
        dims = net_config.spatial_dims
        self.slice_mode = samples[0][1].ndim == 3 and dims == 2
        shapes = [lab.shape[1:] if self.slice_mode else lab.shape for _, lab, _ in samples]
        if patch_size is None:
            self.patch = tuple(int(max(s[a] for s in shapes)) for a in range(dims))
        else:
            self.patch = tuple(int(p) for p in patch_size)

    def draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``batch_size`` patches: images ``(B, C, *P)`` float32, labels ``(B, *P)`` int64,
        foreground ``(B, *P)`` bool."""
        images, labels, masks = [], [], []
        for _ in range(batch_size):
            image, label, mask = self.samples[int(self.rng.integers(len(self.samples)))]
            if self.slice_mode:
                z = int(self.rng.integers(label.shape[0]))
                image, label, mask = image[:, z], label[z], mask[z]
            image, label, mask = self._crop(image, label, mask)
            for axis in range(label.ndim):
                if self.rng.random() < 0.5:
                    image, label, mask = (np.flip(image, axis + 1), np.flip(label, axis),
                                          np.flip(mask, axis))
            images.append(image)
            labels.append(label)
            masks.append(mask)
        return (np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64),
                np.stack(masks).astype(bool))

    def _crop(self, image: np.ndarray, label: np.ndarray,
              mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pad (centred) to at least the patch size, then cut a random patch."""
        pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
                for p, s in zip(self.patch, label.shape)]
        if any(sum(pad) for pad in pads):
            image = np.pad(image, [(0, 0)] + pads, constant_values=PAD_INTENSITY)
            label = np.pad(label, pads, constant_values=0)
            mask = np.pad(mask, pads, constant_values=False)
        starts = [int(self.rng.integers(s - p + 1)) for p, s in zip(self.patch, label.shape)]
        region = tuple(slice(a, a + p) for a, p in zip(starts, self.patch))
        return image[(slice(None),) + region], label[region], mask[region]


def _validate_samples(samples: Sequence[Sample], net_config: DiffusionNetConfig,
                      patch_size: Optional[tuple[int, ...]]) -> None:
    """Raise InputError for samples the network cannot be trained on."""
    if not samples:
        raise InputError("No training samples were given. Pass a list of (image, labels, foreground).")
    dims = net_config.spatial_dims
    num_classes = net_config.cond_channels - 1
    if num_classes < 1:
        raise InputError(f"cond_channels must be >= 2 (classes + body channel), got "
                         f"{net_config.cond_channels}.")
    sample_dims = None
    for i, sample in enumerate(samples):
        if len(sample) != 3:
            raise InputError(f"Sample {i} must be a tuple (image, labels, foreground).")
        image, labels, foreground = sample
        if labels.ndim != dims and not (dims == 2 and labels.ndim == 3):
            raise InputError(
                f"Sample {i}: labels have {labels.ndim} dimensions; a {dims}D diffusion network "
                f"needs {dims}D samples{' (or 3D volumes, trained slice by slice)' if dims == 2 else ''}.")
        if sample_dims is None:
            sample_dims = labels.ndim
        elif labels.ndim != sample_dims:
            raise InputError(f"Sample {i} is {labels.ndim}D but sample 0 is {sample_dims}D. Pass samples "
                             "of one dimensionality.")
        if image.shape != (net_config.image_channels, *labels.shape) or foreground.shape != labels.shape:
            raise InputError(
                f"Sample {i}: image {image.shape}, labels {labels.shape}, foreground "
                f"{foreground.shape}; expected image (C={net_config.image_channels}, *S) and labels, "
                "foreground (*S) of the same spatial size. Put the channels first.")
        if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
            raise InputError(f"Sample {i}: labels must be integer class indices, got {labels.dtype}.")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(
                f"Sample {i}: class indices {labels.min()}..{labels.max()} outside 0..{num_classes - 1} "
                f"(cond_channels {net_config.cond_channels} = {num_classes} classes + body). Map label "
                "values to class indices or fix cond_channels.")
        if not np.all(np.isfinite(image)) or image.size and (image.min() < -1.0 - 1e-4
                                                             or image.max() > 1.0 + 1e-4):
            raise InputError(f"Sample {i}: the image must be finite and in [-1, 1]. Map normalised "
                             "intensities with image_to_unit_range first.")
    if patch_size is not None and (len(patch_size) != dims or min(patch_size) < 1):
        raise InputError(f"patch_size {tuple(patch_size)} must give {dims} positive sizes (one per "
                         "spatial axis of the network), or be None for whole images.")


def train_diffusion(samples: Sequence[Sample], net_config: DiffusionNetConfig, schedule: ScheduleConfig,
                    config: DiffusionTrainingConfig, patch_size: Optional[tuple[int, ...]] = None,
                    progress: Optional[ProgressReporter] = None) -> DiffusionTrainingResult:
    """Train the conditional diffusion model; return its EMA weights and the loss curve.

    Each iteration draws ``config.batch_size`` random patches (whole images when
    ``patch_size`` is None, padded to the largest one; images smaller than the patch are padded
    with -1, background and no body), flips each spatial axis with probability 1/2, builds
    the condition with :func:`make_condition` and takes one Adam step on
    :func:`~SFUDASegmentLib.diffusion.sampling.diffusion_loss`; the EMA (with warm-up) follows.
    With a 2D network and 3D samples ``(C, z, y, x)``, random axial slices ``z`` are drawn.

    Args:
        samples: ``(image (C, *S) float32 in [-1, 1], labels (*S) int class indices,
            foreground (*S) bool)``; not modified.
        net_config: the network to build; ``cond_channels - 1`` is the number of classes.
        schedule: the noise schedule.
        config: iterations, batch size, learning rate, EMA decay, loss, AMP, seed, device.
        patch_size: training patch per spatial axis of the network, or None.
        progress: receives ``("diffusion-training", fraction, message)`` every iteration and
            may cancel.

    Returns:
        :class:`DiffusionTrainingResult`.
    """
    samples = [tuple(np.asarray(a) for a in sample) for sample in samples]
    _validate_samples(samples, net_config, patch_size)
    if config.iterations < 1 or config.batch_size < 1 or config.lr <= 0:
        raise InputError(f"Diffusion training needs iterations >= 1, batch_size >= 1 and lr > 0 (got "
                         f"{config.iterations}, {config.batch_size}, {config.lr}). Fix "
                         "DiffusionTrainingConfig.")
    device = resolve_device(config.device)
    noise_schedule = NoiseSchedule.from_config(schedule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ConditionalDiffusionUNet.from_config(net_config)
    model.to(device).train()
    ema = ExponentialMovingAverage(model, decay=config.ema_decay, warmup=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    patches = _PatchSampler(samples, net_config, patch_size, np.random.default_rng(config.seed))
    num_classes = net_config.cond_channels - 1

    losses: list[float] = []
    for iteration in range(config.iterations):
        images, labels, masks = patches.draw(config.batch_size)
        x0 = torch.from_numpy(images).to(device)
        cond = make_condition(torch.from_numpy(labels).to(device), torch.from_numpy(masks).to(device),
                              num_classes)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, enabled=use_amp):
            loss = diffusion_loss(model, x0, cond, noise_schedule, generator=generator, loss=config.loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)
        losses.append(float(loss.detach()))
        report(progress, "diffusion-training", (iteration + 1) / config.iterations,
               f"iteration {iteration + 1}/{config.iterations}, loss {losses[-1]:.4f}")
    return DiffusionTrainingResult(net_config=net_config, schedule_config=schedule,
                                   ema_state_dict=ema.averaged_state_dict(), losses=losses)
