"""Conditional noise-prediction U-Net for 2D and 3D diffusion (Med-DDPM / guided-diffusion style).

The network predicts the noise ``eps`` that was added to a clean image: given the noisy image
``x_t`` ``(B, image_channels, *S)``, the integer timestep ``t`` ``(B,)`` and the condition
``cond`` ``(B, cond_channels, *S)`` (one-hot label map plus a body channel, see
``diffusion_training.make_condition``), it returns ``eps_hat`` ``(B, image_channels, *S)``.
The condition is concatenated with ``x_t`` at the input, as in Med-DDPM.

Architecture: sinusoidal timestep embedding followed by a two-layer MLP; residual blocks
(GroupNorm, SiLU, 3x3(x3) conv) whose second normalisation is modulated by the timestep
embedding (scale-shift, ``h = norm(h) * (1 + scale) + shift``); strided-conv downsampling,
nearest upsampling plus conv, skip connections by concatenation; multi-head self-attention at
the bottom (and at the levels listed in ``attention_levels``). The last conv of each residual
branch, of each attention block and of the output is initialised to zero, so the untrained
network predicts zero noise and every block starts as the identity (guided-diffusion).

Any spatial size is accepted: the input is zero-padded at the end of each axis to a multiple of
``2 ** (len(channel_mults) - 1)`` and the output cropped back.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiffusionNetConfig
from ..errors import InputError

_HEAD_CHANNELS = 64


def _conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
          stride: int = 1) -> nn.Module:
    """A 2D or 3D convolution with 'same' padding for odd kernels."""
    cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def _zero(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is ``<= groups`` (GroupNorm needs a divisor)."""
    count = max(1, min(groups, channels))
    while channels % count:
        count -= 1
    return count


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, groups), channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps.

    Args:
        timesteps: ``(B,)`` timestep indices.
        dim: embedding width.
        max_period: longest wavelength.

    Returns:
        ``(B, dim)`` float32: ``[cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})]`` with
        ``f_i = max_period ** (-i / h)``, ``h = dim // 2`` (a zero column is appended for odd dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class _ResidualBlock(nn.Module):
    """Residual block with scale-shift timestep conditioning: ``(B, Cin, *S) -> (B, Cout, *S)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, embedding_dim: int,
                 groups: int, dropout: float) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = _conv(spatial_dims, in_channels, out_channels)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(_conv(spatial_dims, out_channels, out_channels))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else _conv(spatial_dims, in_channels, out_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        # Without autograd (sampling) the activations and the residual sum overwrite tensors
        # this block made itself; with it they must not (backward needs them).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        modulation = self.embedding(F.silu(embedding)).to(h.dtype)
        modulation = modulation.reshape(*modulation.shape, *([1] * (h.ndim - 2)))
        scale, shift = modulation.chunk(2, dim=1)
        h = F.silu(_modulated_norm(self.norm2, h, scale, shift), inplace=inplace)
        h = self.conv2(self.dropout(h))
        skip = self.skip(x)
        return h.add_(skip) if inplace and h.dtype == skip.dtype else skip + h


def _modulated_norm(norm: nn.GroupNorm, h: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor) -> torch.Tensor:
    """``norm(h) * (1 + scale) + shift`` as one normalisation and one multiply-add.

    GroupNorm's per-channel affine and the per-item modulation combine into per-(item,
    channel) factors: ``(n * gamma + beta) * (1 + scale) + shift = n * a + b`` with ``n`` the
    normalised ``h``, ``a = gamma (1 + scale)`` and ``b = beta (1 + scale) + shift``. The
    full-size tensor is then read and written twice fewer than by the three separate
    operations; the values agree up to float rounding.

    Args:
        norm: the GroupNorm (with its affine weights).
        h: ``(B, C, *S)``.
        scale, shift: ``(B, C, 1, ..., 1)``.

    Returns:
        ``(B, C, *S)``.
    """
    per_channel = (1, -1) + (1,) * (h.ndim - 2)
    factor = 1 + scale
    a = norm.weight.reshape(per_channel) * factor
    b = torch.addcmul(shift, norm.bias.reshape(per_channel), factor)
    return torch.addcmul(b, F.group_norm(h, norm.num_groups, eps=norm.eps), a)


class _SelfAttention(nn.Module):
    """Multi-head self-attention over all spatial positions, residual: ``(B, C, *S) -> same``."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.heads = channels // _HEAD_CHANNELS if channels % _HEAD_CHANNELS == 0 else 1
        self.heads = max(1, self.heads)
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.project = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = self.norm(x).reshape(batch, channels, -1)
        qkv = self.qkv(tokens).reshape(batch, 3, self.heads, channels // self.heads, -1)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, d)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(-1, -2).reshape(batch, channels, -1)
        return x + self.project(attended).reshape(batch, channels, *spatial)


class _Downsample(nn.Module):
    """Stride-2 3x3(x3) conv: halves every spatial axis."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = _conv(spatial_dims, channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3(x3) conv."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = _conv(spatial_dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.ModuleList):
    """Layers applied in order; residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, embedding) if isinstance(layer, _ResidualBlock) else layer(x)
        return x


class ConditionalDiffusionUNet(nn.Module):
    """Noise-prediction U-Net conditioned on a label map.

    Args:
        spatial_dims: 2 or 3.
        image_channels: channels of the image being generated (1 grey, 3 RGB).
        cond_channels: channels of the condition (one-hot classes + body channel).
        base_channels: width of the first level.
        channel_mults: width of level i is ``base_channels * channel_mults[i]``; the number of
            levels is ``len(channel_mults)`` (``len - 1`` downsamplings).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: levels (0-based) that also get self-attention after each block.
        mid_attention: self-attention between the two bottleneck residual blocks.
        groups: GroupNorm groups, reduced to the largest divisor of each channel count.
        dropout: dropout inside the residual blocks.
    """

    def __init__(self, spatial_dims: int = 3, image_channels: int = 1, cond_channels: int = 3,
                 base_channels: int = 64, channel_mults: Sequence[int] = (1, 1, 2, 3, 4),
                 num_res_blocks: int = 2, attention_levels: Sequence[int] = (),
                 mid_attention: bool = True, groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = DiffusionNetConfig(
            spatial_dims=int(spatial_dims), image_channels=int(image_channels),
            cond_channels=int(cond_channels), base_channels=int(base_channels),
            channel_mults=tuple(int(m) for m in channel_mults), num_res_blocks=int(num_res_blocks),
            attention_levels=tuple(int(a) for a in attention_levels),
            mid_attention=bool(mid_attention), groups=int(groups), dropout=float(dropout))
        _validate(self.config)
        cfg = self.config
        dims, base = cfg.spatial_dims, cfg.base_channels
        levels = len(cfg.channel_mults)
        self.size_multiple = 2 ** (levels - 1)
        embedding_dim = 4 * base

        self.time_mlp = nn.Sequential(nn.Linear(base, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.input_conv = _conv(dims, cfg.image_channels + cfg.cond_channels, base)

        def residual(cin: int, cout: int) -> _ResidualBlock:
            return _ResidualBlock(dims, cin, cout, embedding_dim, cfg.groups, cfg.dropout)

        channels = base
        skip_channels = [channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mults):
            width = base * mult
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [residual(channels, width)]
                if level in cfg.attention_levels:
                    layers.append(_SelfAttention(width, cfg.groups))
                self.down.append(_Stage(layers))
                channels = width
                skip_channels.append(channels)
            if level < levels - 1:
                self.down.append(_Stage([_Downsample(dims, channels)]))
                skip_channels.append(channels)

        middle: list[nn.Module] = [residual(channels, channels)]
        if cfg.mid_attention:
            middle.append(_SelfAttention(channels, cfg.groups))
        middle.append(residual(channels, channels))
        self.middle = _Stage(middle)

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            width = base * cfg.channel_mults[level]
            for block in range(cfg.num_res_blocks + 1):
                layers = [residual(channels + skip_channels.pop(), width)]
                if level in cfg.attention_levels:
                    layers.append(_SelfAttention(width, cfg.groups))
                if level > 0 and block == cfg.num_res_blocks:
                    layers.append(_Upsample(dims, width))
                self.up.append(_Stage(layers))
                channels = width

        self.output = nn.Sequential(_norm(channels, cfg.groups), nn.SiLU(),
                                    _zero(_conv(dims, channels, cfg.image_channels)))

    @classmethod
    def from_config(cls, config: DiffusionNetConfig) -> "ConditionalDiffusionUNet":
        """Build the network described by ``config``."""
        return cls(**asdict(config))

    def to_config(self) -> DiffusionNetConfig:
        """The configuration this network was built from."""
        return self.config

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x_t``.

        Args:
            x_t: noisy image ``(B, image_channels, *S)``.
            t: integer timesteps ``(B,)`` (a scalar is broadcast to the batch).
            cond: condition ``(B, cond_channels, *S)``, same spatial size as ``x_t``.

        Returns:
            Predicted noise ``(B, image_channels, *S)``.
        """
        self._check_inputs(x_t, t, cond)
        batch, spatial = x_t.shape[0], x_t.shape[2:]
        if t.ndim == 0:
            t = t.expand(batch)
        pads: list[int] = []
        for size in reversed(spatial):
            pads.extend((0, (-size) % self.size_multiple))
        h = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        if any(pads):
            h = F.pad(h, pads)
        embedding = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        h = self.input_conv(h)
        skips = [h]
        for stage in self.down:
            h = stage(h, embedding)
            skips.append(h)
        h = self.middle(h, embedding)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop().to(h.dtype)], dim=1), embedding)
        out = self.output(h)
        return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> None:
        cfg = self.config
        if x_t.ndim != cfg.spatial_dims + 2 or x_t.shape[1] != cfg.image_channels:
            raise InputError(
                f"The diffusion network expects x_t of shape (B, {cfg.image_channels}, "
                f"{'z, y, x' if cfg.spatial_dims == 3 else 'y, x'}), got {tuple(x_t.shape)}. "
                "Pass a batch of images with the network's channel count and dimensionality.")
        expected = (x_t.shape[0], cfg.cond_channels, *x_t.shape[2:])
        if tuple(cond.shape) != expected:
            raise InputError(
                f"The condition must have shape {expected} (one-hot classes + body channel, same "
                f"size as the image), got {tuple(cond.shape)}. Build it with make_condition and "
                "the network's number of classes.")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x_t.shape[0]):
            raise InputError(f"Timesteps must have shape ({x_t.shape[0]},), got {tuple(t.shape)}. "
                             "Pass one integer timestep per batch item.")


def _validate(cfg: DiffusionNetConfig) -> None:
    """Raise InputError for a configuration that cannot build a network."""
    problems = []
    if cfg.spatial_dims not in (2, 3):
        problems.append(f"spatial_dims must be 2 or 3 (got {cfg.spatial_dims})")
    if min(cfg.image_channels, cfg.cond_channels, cfg.base_channels, cfg.groups) < 1:
        problems.append("image_channels, cond_channels, base_channels and groups must be >= 1")
    if not cfg.channel_mults or min(cfg.channel_mults) < 1:
        problems.append(f"channel_mults must be a non-empty list of positive integers "
                        f"(got {cfg.channel_mults})")
    if cfg.num_res_blocks < 1:
        problems.append(f"num_res_blocks must be >= 1 (got {cfg.num_res_blocks})")
    bad_levels = [a for a in cfg.attention_levels if not 0 <= a < len(cfg.channel_mults)]
    if bad_levels:
        problems.append(f"attention_levels {bad_levels} are outside 0..{len(cfg.channel_mults) - 1}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1) (got {cfg.dropout})")
    if problems:
        raise InputError("Invalid diffusion network configuration: " + "; ".join(problems)
                         + ". Fix these fields of DiffusionNetConfig.")
