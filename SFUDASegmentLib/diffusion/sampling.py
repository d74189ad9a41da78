"""Noise schedules, the training loss and the DDPM / DDIM samplers (separate from the network).

Conventions (guided-diffusion / diffusers): timestep indices ``t = 0 .. T-1``;
``alphas_cumprod[t]`` is abar of step ``t + 1`` of the continuous-time formulation, so
``alphas_cumprod[0] = 1 - betas[0]`` is the least noisy and ``alphas_cumprod[T-1]`` is almost
pure noise. The forward process is ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, and the
network predicts ``eps`` from ``(x_t, t, cond)``. Images live in ``[-1, 1]``.

A sampler only needs the schedule and a callable ``model(x_t, t, cond) -> eps``, so a faster
sampler is a swap, not a rewrite.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ScheduleConfig
from ..errors import InputError
from ..utils.device import autocast, single_threaded_workers
from ..utils.progress import ProgressReporter, report

NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULE_KINDS = ("cosine", "linear")
LOSSES = ("l1", "l2")


def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` as ``like.dtype`` on ``like.device``, shaped ``(B, 1, ..., 1)`` to broadcast."""
    picked = values[t.detach().to("cpu", torch.long)].to(device=like.device, dtype=like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Variance schedule of the forward (noising) process.

    Args:
        timesteps: T, the number of diffusion steps (Med-DDPM: 250).
        kind: ``"cosine"`` (Nichol & Dhariwal: ``abar(t) = f(t)/f(0)``,
            ``f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)``, ``beta_t = 1 - abar(t)/abar(t-1)``
            clipped to 0.999) or ``"linear"`` (Ho et al.: betas evenly spaced from 1e-4 to 2e-2
            at T = 1000; both ends are scaled by 1000/T for other T, as in guided-diffusion, so
            that the last step is still almost pure noise).
        cosine_s: the cosine schedule's offset s (0.008).

    Attributes (float64 tensors of length T, indexed by timestep index):
        betas, alphas, alphas_cumprod, alphas_cumprod_prev (1 before the first step),
        posterior_variance, posterior_log_variance (clipped: the t = 0 entry uses t = 1's),
        posterior_mean_coef_x0, posterior_mean_coef_xt.
    """

    def __init__(self, timesteps: int = 250, kind: str = "cosine", cosine_s: float = 0.008) -> None:
        if int(timesteps) < 1:
            raise InputError(f"The noise schedule needs at least 1 timestep, got {timesteps}. "
                             "Set ScheduleConfig.timesteps to a positive integer (Med-DDPM: 250).")
        if kind not in SCHEDULE_KINDS:
            raise InputError(f"Unknown noise schedule '{kind}'. Use one of {SCHEDULE_KINDS}.")
        if kind == "cosine" and not 0.0 <= cosine_s < 1.0:
            raise InputError(f"cosine_s must be in [0, 1), got {cosine_s}. The usual value is 0.008.")
        self.timesteps = int(timesteps)
        self.kind = kind
        self.cosine_s = float(cosine_s)
        T = self.timesteps
        if kind == "cosine":
            steps = np.arange(T + 1, dtype=np.float64) / T
            f = np.cos((steps + cosine_s) / (1.0 + cosine_s) * math.pi / 2.0) ** 2
            abar = f / f[0]
            betas = np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
        else:
            scale = 1000.0 / T
            betas = np.linspace(scale * 1e-4, min(scale * 2e-2, 0.999), T, dtype=np.float64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if T > 1 else betas.copy()

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

        self.betas = tensor(betas)
        self.alphas = tensor(alphas)
        self.alphas_cumprod = tensor(alphas_cumprod)
        self.alphas_cumprod_prev = tensor(alphas_cumprod_prev)
        self.posterior_variance = tensor(posterior_variance)
        self.posterior_log_variance = tensor(np.log(clipped))
        self.posterior_mean_coef_x0 = tensor(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef_xt = tensor((1.0 - alphas_cumprod_prev) * np.sqrt(alphas)
                                             / (1.0 - alphas_cumprod))

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "NoiseSchedule":
        """The schedule described by ``config``."""
        return cls(timesteps=config.timesteps, kind=config.kind, cosine_s=config.cosine_s)

    def to_config(self) -> ScheduleConfig:
        """This schedule's configuration."""
        return ScheduleConfig(kind=self.kind, timesteps=self.timesteps, cosine_s=self.cosine_s)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean images to step ``t``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

        Args:
            x0: clean images ``(B, C, *S)``.
            t: timestep indices ``(B,)``.
            noise: standard normal noise, same shape as ``x0``.

        Returns:
            ``x_t`` ``(B, C, *S)`` in ``x0.dtype``.
        """
        abar = self.alphas_cumprod
        return _extract(abar.sqrt(), t, x0) * x0 + _extract((1.0 - abar).sqrt(), t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`q_sample` for a known noise: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        abar = self.alphas_cumprod
        return _extract((1.0 / abar).sqrt(), t, x_t) * x_t - _extract((1.0 / abar - 1.0).sqrt(), t, x_t) * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise implied by ``x0``: ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        abar = self.alphas_cumprod
        return (x_t - _extract(abar.sqrt(), t, x_t) * x0) / _extract((1.0 - abar).sqrt(), t, x_t)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log-variance of ``q(x_{t-1} | x_t, x0)``.

        ``mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) * x0
        + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) * x_t``,
        ``variance = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (0 at t = 0).

        Returns:
            ``mean`` ``(B, C, *S)``, ``variance`` and ``log_variance`` ``(B, 1, ..., 1)``.
        """
        mean = (_extract(self.posterior_mean_coef_x0, t, x_t) * x0
                + _extract(self.posterior_mean_coef_xt, t, x_t) * x_t)
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance, t, x_t)


def diffusion_loss(model: NoisePredictor, x0: torch.Tensor, cond: torch.Tensor, schedule: NoiseSchedule,
                   generator: Optional[torch.Generator] = None, loss: str = "l1") -> torch.Tensor:
    """Noise-prediction loss at a uniformly random timestep.

    Args:
        model: ``model(x_t, t, cond) -> eps_hat``.
        x0: clean images ``(B, C, *S)`` in ``[-1, 1]``.
        cond: condition ``(B, Cc, *S)``.
        schedule: the noise schedule.
        generator: draws ``t`` and the noise (on the generator's device, then moved to
            ``x0.device``); None uses the global RNG.
        loss: ``"l1"`` (mean absolute error, Med-DDPM) or ``"l2"`` (mean squared error, DDPM).

    Returns:
        Scalar float32 loss.
    """
    if loss not in LOSSES:
        raise InputError(f"Unknown diffusion loss '{loss}'. Use one of {LOSSES} ('l1' is Med-DDPM's).")
    draw_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator,
                      device=draw_device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=draw_device,
                        dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    predicted = model(x_t, t, cond).float()
    if loss == "l1":
        return F.l1_loss(predicted, noise.float())
    return F.mse_loss(predicted, noise.float())


CPU_VOXELS_PER_CALL = 65_536
"""On CPU, a network call gets items of at most this many voxels in all (at least one item):
about two 176x176 slices. Large calls are slower per item on CPU: in a call on 48 such slices
the kernel mapping and zeroing fresh memory took 131.7 of the 215.2 CPU ms per item, in calls
on 2 it took 6.9 of 64.5 (``bench_speed.py network``, one run on a busy machine)."""


def network_groups(device: torch.device, batch: int, item_voxels: int, workers: int) -> list[slice]:
    """How a sampler splits a batch into network calls: consecutive groups of items.

    Every item is computed on its own (convolutions, GroupNorm and attention never mix
    items), so the split changes float rounding at most, never the samples. On GPU the batch
    is one call. On CPU the groups are the fewest within :data:`CPU_VOXELS_PER_CALL`, but at
    least one per worker, and their number a multiple of ``workers`` (so that the threads that
    compute them side by side finish together), of sizes that differ by one at most, the larger
    ones first. One worker takes a batch within the budget in one call.

    Args:
        device: where the network runs.
        batch: items in the batch.
        item_voxels: spatial voxels of one item.
        workers: CPU threads that will compute groups side by side.

    Returns:
        Slices of the batch axis, in order, covering it.
    """
    workers = max(1, workers)
    if device.type != "cpu" or (workers == 1 and batch * item_voxels <= CPU_VOXELS_PER_CALL):
        return [slice(0, batch)]
    most = max(1, CPU_VOXELS_PER_CALL // max(item_voxels, 1))
    fewest = -(-batch // most)
    count = min(batch, -(-fewest // workers) * workers)
    size, larger = divmod(batch, count)
    starts = [0]
    for i in range(count):  # the larger groups first: the pool hands out groups in order
        starts.append(starts[-1] + size + (i < larger))
    return [slice(lo, hi) for lo, hi in zip(starts[:-1], starts[1:])]


def _predict_noise(model: NoisePredictor, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   groups: Sequence[slice], pool: Optional[ThreadPoolExecutor], amp: bool) -> torch.Tensor:
    """``model(x_t, t, cond)`` as float32, one call per group of items (side by side on the
    pool's threads when there is one; grad mode and autocast are per thread, so each call sets
    them)."""
    def call(group: slice) -> torch.Tensor:
        with torch.inference_mode(), autocast(x_t.device, enabled=amp):
            return model(x_t[group], t[group], cond[group]).float()

    parts = list(pool.map(call, groups)) if pool is not None else [call(group) for group in groups]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Sampler(ABC):
    """Shared sampling loop: subclasses define :attr:`timesteps_sequence` and :meth:`step`."""

    stage = "diffusion"
    name = "sampler"

    def __init__(self, schedule: NoiseSchedule, clip_x0: bool = True) -> None:
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.timesteps_sequence: list[int] = list(range(schedule.timesteps - 1, -1, -1))

    @property
    def num_steps(self) -> int:
        """Number of network evaluations per sample."""
        return len(self.timesteps_sequence)

    def _x0_and_eps(self, x_t: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted x0 (clipped to [-1, 1] when ``clip_x0``) and the noise consistent with it."""
        x0 = self.schedule.predict_x0(x_t, t, eps)
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.schedule.predict_eps(x_t, t, x0)
        return x0, eps

    @abstractmethod
    def step(self, index: int, x_t: torch.Tensor, eps: torch.Tensor,
             generator: Optional[torch.Generator]) -> torch.Tensor:
        """Move ``x_t`` at ``timesteps_sequence[index]`` one step towards x0, given the predicted noise."""

    def sample(self, model: NoisePredictor, cond: torch.Tensor, image_channels: int,
               generator: Optional[torch.Generator] = None, progress: Optional[ProgressReporter] = None,
               amp: bool = True) -> torch.Tensor:
        """Generate images conditioned on ``cond``.

        Args:
            model: ``model(x_t, t, cond) -> eps_hat`` (an ``nn.Module`` is put in eval mode
                for the call and restored afterwards).
            cond: condition ``(B, Cc, *S)`` on the device to compute on.
            image_channels: channels of the generated image.
            generator: CPU generator for the initial and per-step noise (drawn on CPU, then
                moved to ``cond.device``, so a seed gives the same samples on every device);
                None uses the global CPU RNG.
            progress: receives ``("diffusion", i / num_steps)`` after each step and may cancel.
            amp: mixed precision on GPU (no effect on CPU).

        Returns:
            ``x0`` ``(B, image_channels, *S)`` float32 in ``[-1, 1]``.
        """
        if cond.ndim < 3:
            raise InputError(f"The condition must be (B, channels, *spatial), got shape {tuple(cond.shape)}. "
                             "Add the batch and channel axes (see make_condition).")
        if int(image_channels) < 1:
            raise InputError(f"image_channels must be >= 1, got {image_channels}.")
        if generator is not None and generator.device.type != "cpu":
            raise InputError("Pass a CPU torch.Generator to the sampler (noise is drawn on CPU so that "
                             "a seed gives the same samples on every device).")
        device = cond.device
        shape = (cond.shape[0], int(image_channels), *cond.shape[2:])
        was_training = getattr(model, "training", None)
        if was_training:
            model.eval()  # type: ignore[union-attr]
        threads = torch.get_num_threads()
        groups = network_groups(device, shape[0], math.prod(shape[2:]), threads)
        try:
            with torch.inference_mode(), single_threaded_workers(min(len(groups), threads)) as pool:
                x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
                for i, t_value in enumerate(self.timesteps_sequence):
                    t = torch.full((shape[0],), t_value, dtype=torch.long, device=device)
                    eps = _predict_noise(model, x, t, cond, groups, pool, amp)
                    x = self.step(i, x, eps, generator)
                    report(progress, self.stage, (i + 1) / self.num_steps,
                           f"{self.name} step {i + 1}/{self.num_steps}",
                           done=i + 1, total=self.num_steps, unit="steps")
        finally:
            if was_training:
                model.train()  # type: ignore[union-attr]
        return x.float().clamp(-1.0, 1.0)


class DDPMSampler(_Sampler):
    """Ancestral sampling over all T steps (Ho et al.; Med-DDPM and HEAL).

    Each step predicts x0 from eps (clipped to [-1, 1] when ``clip_x0``) and draws
    ``x_{t-1} ~ N(posterior mean(x0, x_t), posterior variance)``; no noise at t = 0.
    """

    name = "DDPM"

    def step(self, index: int, x_t: torch.Tensor, eps: torch.Tensor,
             generator: Optional[torch.Generator]) -> torch.Tensor:
        """One ancestral step from ``timesteps_sequence[index]`` to the next lower timestep."""
        t_value = self.timesteps_sequence[index]
        t = torch.full((x_t.shape[0],), t_value, dtype=torch.long)
        x0, _ = self._x0_and_eps(x_t, t, eps)
        mean, _, log_variance = self.schedule.q_posterior(x0, x_t, t)
        if t_value == 0:
            return mean
        noise = torch.randn(x_t.shape, generator=generator, dtype=torch.float32).to(x_t.device)
        return mean + torch.exp(0.5 * log_variance) * noise


class DDIMSampler(_Sampler):
    """DDIM (Song et al.) over ``steps`` evenly spaced timesteps.

    Timesteps ``round((i + 1) * T / steps) - 1`` for ``i = steps-1 .. 0`` (the first step starts
    from pure noise at T-1, "trailing" spacing). Update:
    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)``; ``eta = 0`` is
    deterministic given the initial noise, ``eta = 1`` matches DDPM's variance.
    """

    name = "DDIM"

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0,
                 clip_x0: bool = True) -> None:
        super().__init__(schedule, clip_x0)
        T = schedule.timesteps
        if not 1 <= int(steps) <= T:
            raise InputError(f"DDIM steps must be between 1 and the schedule's T = {T}, got {steps}. "
                             f"Choose steps in 1..{T} (e.g. 50), or use the DDPM sampler for all {T}.")
        if eta < 0:
            raise InputError(f"DDIM eta must be >= 0 (0 deterministic, 1 DDPM-like), got {eta}.")
        self.eta = float(eta)
        k = int(steps)
        self.timesteps_sequence = [int(round((i + 1) * T / k)) - 1 for i in range(k - 1, -1, -1)]

    def step(self, index: int, x_t: torch.Tensor, eps: torch.Tensor,
             generator: Optional[torch.Generator]) -> torch.Tensor:
        """One DDIM step from ``timesteps_sequence[index]`` to the next one (or to x0)."""
        t_value = self.timesteps_sequence[index]
        t = torch.full((x_t.shape[0],), t_value, dtype=torch.long)
        x0, eps = self._x0_and_eps(x_t, t, eps)
        abar = float(self.schedule.alphas_cumprod[t_value])
        is_last = index + 1 == len(self.timesteps_sequence)
        abar_prev = 1.0 if is_last else float(self.schedule.alphas_cumprod[self.timesteps_sequence[index + 1]])
        sigma = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar)) * math.sqrt(1.0 - abar / abar_prev)
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            noise = torch.randn(x_t.shape, generator=generator, dtype=torch.float32).to(x_t.device)
            x_prev = x_prev + sigma * noise
        return x_prev
