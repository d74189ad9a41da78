"""Training of the conditional diffusion model on (image, label map) pairs.

The model (Med-DDPM style) learns to turn noise into an image whose anatomy follows a given
label map. Its condition is built by :func:`make_condition`; images are brought from the
library's z-scored intensities into the diffusion's ``[-1, 1]`` range by
:func:`image_to_unit_range`. :func:`diffusion_defaults` sizes the network and the run for the
device (small on CPU, the paper's on GPU); :func:`parse_diffusion_widths` reads the
``--diffusion-channels`` option.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DiffusionNetConfig, DiffusionTrainingConfig, ScheduleConfig
from ..errors import InputError
from ..nets.diffusion_unet import ConditionalDiffusionUNet
from ..training.ema import ExponentialMovingAverage
from ..utils.distributed import SINGLE_PROCESS, DistributedContext
from ..utils.device import autocast
from ..utils.progress import ProgressReporter, report
from .sampling import LOSSES, NoiseSchedule

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


@dataclass(frozen=True)
class DiffusionDefaults:
    """Diffusion network and run sized for a device.

    Attributes:
        device: ``"cpu"`` or ``"gpu"``, the kind of device these defaults are for.
        widths: channels per level of the U-Net (the first is the base width).
        num_res_blocks: residual blocks a level.
        iterations: training iterations.
        lr: Adam learning rate.
    """

    device: str
    widths: tuple[int, ...]
    num_res_blocks: int
    iterations: int
    lr: float

    def to_dict(self) -> dict:
        """JSON-friendly form (for the model card)."""
        return {"device": self.device, "widths": list(self.widths), "num_res_blocks": self.num_res_blocks,
                "iterations": self.iterations, "lr": self.lr}


CPU_DIFFUSION_DEFAULTS = DiffusionDefaults("cpu", (16, 32, 32), 1, 600, 1e-3)
"""A small network (three levels, base 16, one residual block a level: the demo's) and a short
run at a higher learning rate, sized for a half-hour budget on two CPU cores: with train-source's
other defaults the brats2018 recipe (ten cases, 2D at 2 mm in-plane) takes 14.2 minutes on an idle
2-core machine, 7 of them the diffusion model (the README has the command and the figures)."""

GPU_DIFFUSION_DEFAULTS = DiffusionDefaults("gpu", (64, 64, 128, 192, 256), 2, 100_000, 1e-5)
"""Med-DDPM's network (base 64, multipliers 1, 1, 2, 3, 4, two residual blocks a level) and run
(100k iterations, Adam 1e-5)."""


def diffusion_defaults(device: torch.device) -> DiffusionDefaults:
    """The diffusion defaults for a compute device: small on CPU, the paper's on GPU."""
    return GPU_DIFFUSION_DEFAULTS if torch.device(device).type == "cuda" else CPU_DIFFUSION_DEFAULTS


def parse_diffusion_widths(text: str, option: str = "--diffusion-channels") -> tuple[int, ...]:
    """Channels per level of the diffusion U-Net from ``"16,32,32"`` (or ``"16x32x32"``).

    Every width must be a positive multiple of the first (the network is built from a base
    width and per-level multipliers: see :func:`widths_to_base_and_multipliers`).

    Raises:
        InputError: anything else, naming ``option``.
    """
    try:
        widths = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        widths = ()
    if not widths or any(w < 1 or w % widths[0] for w in widths):
        raise InputError(f"{option} takes positive widths per level that are multiples of the first, "
                         f"e.g. '16,32,32' or '32,64,64,128'; got '{text}'.")
    return widths


def widths_to_base_and_multipliers(widths: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """``(16, 32, 32)`` -> base 16 and multipliers ``(1, 2, 2)``."""
    return int(widths[0]), tuple(int(w) // int(widths[0]) for w in widths)


@dataclass
class DiffusionTrainingResult:
    """What :func:`train_diffusion` returns (everything a checkpoint needs for the diffusion).

    Attributes:
        net_config: the network configuration.
        schedule_config: the noise schedule.
        ema_state_dict: EMA weights (CPU tensors); load with
            ``ConditionalDiffusionUNet.from_config(net_config).load_state_dict(...)``.
        losses: training loss of every iteration (of the global batch).
        seconds: wall time of the iterations.
    """

    net_config: DiffusionNetConfig
    schedule_config: ScheduleConfig
    ema_state_dict: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float = 0.0

    @property
    def iterations_per_second(self) -> Optional[float]:
        """Training rate (None when no time was measured)."""
        return len(self.losses) / self.seconds if self.seconds > 0 else None


class _PatchSampler:
    """Draws random, randomly flipped patches (or slices of 3D volumes) from the samples.

    Slices of 3D volumes are drawn among those that hold body (all slices of a volume without
    any): HEAL renders only such slices, so empty ones would only cost time.
    """

    def __init__(self, samples: Sequence[Sample], net_config: DiffusionNetConfig,
                 patch_size: Optional[tuple[int, ...]], rng: np.random.Generator) -> None:
        self.samples = samples
        self.rng = rng
        dims = net_config.spatial_dims
        self.slice_mode = samples[0][1].ndim == 3 and dims == 2
        self.body_slices = []
        if self.slice_mode:
            for _, labels, body in samples:
                held = np.flatnonzero(body.reshape(body.shape[0], -1).any(axis=1))
                self.body_slices.append(held if held.size else np.arange(labels.shape[0]))
        shapes = [lab.shape[1:] if self.slice_mode else lab.shape for _, lab, _ in samples]
        if patch_size is None:
            self.patch = tuple(int(max(s[a] for s in shapes)) for a in range(dims))
        else:
            self.patch = tuple(int(p) for p in patch_size)

    def _choose(self) -> tuple[int, int, list[int], list[bool]]:
        """Draw one element's sample, slice (-1 without), crop corner and flips."""
        index = int(self.rng.integers(len(self.samples)))
        shape = self.samples[index][1].shape
        z = -1
        if self.slice_mode:
            slices = self.body_slices[index]
            z = int(slices[self.rng.integers(len(slices))])
            shape = shape[1:]
        starts = [int(self.rng.integers(max(p, s) - p + 1)) for p, s in zip(self.patch, shape)]
        flips = [bool(self.rng.random() < 0.5) for _ in shape]
        return index, z, starts, flips

    def draw(self, batch_size: int, part: slice = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patches of a batch: images ``(B', C, *P)`` float32, labels ``(B', *P)`` int64,
        foreground ``(B', *P)`` bool.

        Args:
            batch_size: B, the elements drawn (the random stream advances by B draws).
            part: the elements cut out and returned (default: all): see
                :meth:`SFUDASegmentLib.training.patch_sampler.PatchSampler.sample`.
        """
        images, labels, masks = [], [], []
        for index, z, starts, flips in [self._choose() for _ in range(batch_size)][part]:
            image, label, mask = self.samples[index]
            if z >= 0:
                image, label, mask = image[:, z], label[z], mask[z]
            image, label, mask = self._crop(image, label, mask, starts)
            for axis, flip in enumerate(flips):
                if flip:
                    image, label, mask = (np.flip(image, axis + 1), np.flip(label, axis), np.flip(mask, axis))
            images.append(image)
            labels.append(label)
            masks.append(mask)
        return (np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64),
                np.stack(masks).astype(bool))

    def _crop(self, image: np.ndarray, label: np.ndarray, mask: np.ndarray,
              starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pad (centred) to at least the patch size, then cut the patch at ``starts``."""
        pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
                for p, s in zip(self.patch, label.shape)]
        if any(sum(pad) for pad in pads):
            image = np.pad(image, [(0, 0)] + pads, constant_values=PAD_INTENSITY)
            label = np.pad(label, pads, constant_values=0)
            mask = np.pad(mask, pads, constant_values=False)
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


def _noise_prediction_loss(model: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor,
                           schedule: NoiseSchedule, generator: torch.Generator, global_batch: int,
                           part: slice, loss: str) -> torch.Tensor:
    """:func:`~SFUDASegmentLib.diffusion.sampling.diffusion_loss` on a share of a global batch.

    The timesteps and the noise of the whole global batch are drawn (in that loss's order:
    ``t``, then the noise) and this process keeps its ``part``, so the processes of a
    data-parallel run together draw what one process would; with the whole batch this is
    ``diffusion_loss`` draw for draw.

    Args:
        x0: ``(B', C, *S)`` clean images of this share; cond: ``(B', Cc, *S)``.
        global_batch: B, the batch of all processes.
        part: this share's elements of it.
    """
    draw_device = generator.device
    t = torch.randint(0, schedule.timesteps, (global_batch,), generator=generator, device=draw_device)
    noise = torch.randn((global_batch, *x0.shape[1:]), generator=generator, device=draw_device,
                        dtype=torch.float32)
    t, noise = t[part].to(x0.device), noise[part].to(device=x0.device, dtype=x0.dtype)
    predicted = model(schedule.q_sample(x0, t, noise), t, cond).float()
    if loss == "l1":
        return F.l1_loss(predicted, noise.float())
    return F.mse_loss(predicted, noise.float())


def train_diffusion(samples: Sequence[Sample], net_config: DiffusionNetConfig, schedule: ScheduleConfig,
                    config: DiffusionTrainingConfig, patch_size: Optional[tuple[int, ...]] = None,
                    progress: Optional[ProgressReporter] = None,
                    distributed: DistributedContext = SINGLE_PROCESS) -> DiffusionTrainingResult:
    """Train the conditional diffusion model; return its EMA weights and the loss curve.

    Each iteration draws ``config.batch_size`` random patches (whole images when
    ``patch_size`` is None, padded to the largest one; images smaller than the patch are padded
    with -1, background and no body), flips each spatial axis with probability 1/2, builds
    the condition with :func:`make_condition` and takes one Adam step on the noise-prediction
    loss (:func:`~SFUDASegmentLib.diffusion.sampling.diffusion_loss`); the EMA (with warm-up)
    follows. With a 2D network and 3D samples ``(C, z, y, x)``, random axial slices ``z`` are
    drawn.

    Args:
        samples: ``(image (C, *S) float32 in [-1, 1], labels (*S) int class indices,
            foreground (*S) bool)``; not modified.
        net_config: the network to build; ``cond_channels - 1`` is the number of classes.
        schedule: the noise schedule.
        config: iterations, (global) batch size, learning rate, EMA decay, loss, AMP, seed, device.
        patch_size: training patch per spatial axis of the network, or None.
        progress: receives ``("diffusion-training", fraction, message, done, total,
            "iterations")`` every iteration and may cancel.
        distributed: this process's place in a torchrun group: DistributedDataParallel, each
            process on its share of every global batch (same result as one process up to float
            rounding).

    Returns:
        :class:`DiffusionTrainingResult`.
    """
    samples = [tuple(np.asarray(a) for a in sample) for sample in samples]
    _validate_samples(samples, net_config, patch_size)
    if config.iterations < 1 or config.batch_size < 1 or config.lr <= 0:
        raise InputError(f"Diffusion training needs iterations >= 1, batch_size >= 1 and lr > 0 (got "
                         f"{config.iterations}, {config.batch_size}, {config.lr}). Fix "
                         "DiffusionTrainingConfig.")
    if config.loss not in LOSSES:
        raise InputError(f"Unknown diffusion loss '{config.loss}'. Use one of {LOSSES} ('l1' is Med-DDPM's).")
    device = distributed.device(config.device)
    part = distributed.batch_part(config.batch_size)
    noise_schedule = NoiseSchedule.from_config(schedule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ConditionalDiffusionUNet.from_config(net_config)
    model.to(device).train()
    ema = ExponentialMovingAverage(model, decay=config.ema_decay, warmup=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    network = distributed.wrap(model, device)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    patches = _PatchSampler(samples, net_config, patch_size, np.random.default_rng(config.seed))
    num_classes = net_config.cond_channels - 1

    losses: list[float] = []
    counts = {"total": config.iterations, "unit": "iterations"}
    report(progress, "diffusion-training", 0.0, f"iteration 0/{config.iterations}", done=0, **counts)
    started = time.perf_counter()
    for iteration in range(config.iterations):
        images, labels, masks = patches.draw(config.batch_size, part)
        x0 = torch.from_numpy(images).to(device)
        cond = make_condition(torch.from_numpy(labels).to(device), torch.from_numpy(masks).to(device),
                              num_classes)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, enabled=use_amp):
            loss = _noise_prediction_loss(network, x0, cond, noise_schedule, generator, config.batch_size,
                                          part, config.loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)
        losses.append(distributed.mean(float(loss.detach())))
        report(progress, "diffusion-training", (iteration + 1) / config.iterations,
               f"iteration {iteration + 1}/{config.iterations}, loss {losses[-1]:.4f}", done=iteration + 1,
               **counts)
    return DiffusionTrainingResult(net_config=net_config, schedule_config=schedule,
                                   ema_state_dict=ema.averaged_state_dict(), losses=losses,
                                   seconds=time.perf_counter() - started)
