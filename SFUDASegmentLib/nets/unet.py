"""Residual U-Net (MONAI style) for 2D, 2.5D and 3D segmentation.

Layout, for ``channels = (c0, c1, ..., cL)``::

    x (B, in, *S) -> pad to a multiple of 2**L (and at least 2 * 2**L per axis)
    encoder:  e0 = Res(in -> c0, stride 1)
              ei = Res(c(i-1) -> ci, stride 2)            i = 1..L   (eL is the bottom)
    decoder:  di = Res([Up(d(i+1)) ; ei] -> ci, stride 1)  i = L-1..0, with dL = eL
              Up = ConvTranspose(k=2, s=2) -> norm -> LeakyReLU
    embedding = d0 (B, c0, *S_padded) -> cropped back to *S
    logits    = classifier(embedding), a 1x1 convolution (B, out, *S)

``Res`` is a residual unit: ``res_units`` sub-layers conv3 -> norm -> dropout -> LeakyReLU
(the first one carries the stride) plus a shortcut (identity, or a strided 3-kernel / 1x1
convolution when the width or resolution changes).

2.5D is the 2D network with the neighbouring slices stacked as input channels.

Sizes: the input is zero-padded symmetrically to a multiple of ``size_divisor`` and to at least
``2 * size_divisor`` per axis, so that the bottom level always has >= 2 voxels per axis.
Instance normalisation (and batch normalisation with batch 1) of a single voxel is undefined
(PyTorch raises; mathematically it erases the feature), so the minimum keeps any input, even
1x1, working in train and eval mode. Outputs are cropped back to the input's size. Zero padding
changes the normalisation statistics slightly; sliding-window inference should use window
sizes for which :meth:`ResidualUNet.padded_shape` is the identity.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SegNetConfig
from ..errors import InputError

NORMS = ("instance", "batch", "group", "none")
GROUP_NORM_MAX_GROUPS = 8
LEAKY_SLOPE = 0.01


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _conv_transpose(spatial_dims: int) -> type[nn.Module]:
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """The normalisation layer for ``channels`` features.

    ``instance``: InstanceNorm with affine=True and no running statistics (per-image
    statistics in train and eval); ``batch``: BatchNorm; ``group``: GroupNorm with
    gcd(channels, 8) groups; ``none``: identity.
    """
    if norm == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True, track_running_stats=False)
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, GROUP_NORM_MAX_GROUPS), channels)
    return nn.Identity()


class ConvNormAct(nn.Sequential):
    """conv(k, stride) -> norm -> dropout -> LeakyReLU; (B, cin, *S) -> (B, cout, *S/stride).

    The convolution has a bias only without normalisation (a norm would cancel it).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int,
                 norm: str, dropout: float) -> None:
        super().__init__(
            _conv(spatial_dims)(in_channels, out_channels, kernel_size=3, stride=stride,
                                padding=1, bias=norm == "none"),
            make_norm(norm, spatial_dims, out_channels),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.LeakyReLU(LEAKY_SLOPE))


class ResidualUnit(nn.Module):
    """``units`` stacked :class:`ConvNormAct` plus a shortcut; the first carries ``stride``.

    Shapes: (B, cin, *S) -> (B, cout, *S/stride). The shortcut is the identity when width and
    resolution are unchanged, a 1x1 convolution when only the width changes, and a 3-kernel
    strided convolution when the resolution changes.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int,
                 units: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(*[
            ConvNormAct(spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                        stride if i == 0 else 1, norm, dropout)
            for i in range(units)])
        if stride != 1:
            self.shortcut: nn.Module = _conv(spatial_dims)(
                in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        elif in_channels != out_channels:
            self.shortcut = _conv(spatial_dims)(in_channels, out_channels, kernel_size=1)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class UpBlock(nn.Module):
    """Transposed-conv upsampling, skip concatenation, residual unit.

    (B, c_deep, *S) and skip (B, c_skip, *2S) -> (B, c_skip, *2S).
    """

    def __init__(self, spatial_dims: int, deep_channels: int, skip_channels: int, units: int,
                 norm: str, dropout: float) -> None:
        super().__init__()
        self.up = nn.Sequential(
            _conv_transpose(spatial_dims)(deep_channels, skip_channels, kernel_size=2, stride=2,
                                          bias=norm == "none"),
            make_norm(norm, spatial_dims, skip_channels),
            nn.LeakyReLU(LEAKY_SLOPE))
        self.fuse = ResidualUnit(spatial_dims, 2 * skip_channels, skip_channels, 1, units, norm,
                                 dropout)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(deep), skip], dim=1))


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}. "
                         f"Set it to 1 or more in the segmentation network config.")


class ResidualUNet(nn.Module):
    """Residual U-Net with a separate 1x1 classifier on the last decoder features.

    Args:
        spatial_dims: 2 (2D and 2.5D) or 3.
        in_channels: input channels (2.5D: image channels x stacked slices).
        out_channels: classes, background included.
        channels: width of each level, finest first; ``len(channels) - 1`` downsamplings.
        res_units: convolution sub-layers in every residual unit.
        norm: ``"instance"`` | ``"batch"`` | ``"group"`` | ``"none"``.
        dropout: dropout probability after each normalisation, in [0, 1).

    Raises:
        InputError: any argument outside the ranges above.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128), res_units: int = 2,
                 norm: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 (2D/2.5D network) or 3 (3D network), got "
                             f"{spatial_dims!r}.")
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("res_units", res_units)
        channels = tuple(channels)
        if not channels:
            raise InputError("channels is empty. Give the width of each level, finest first, "
                             "e.g. (16, 32, 64, 128).")
        for width in channels:
            _check_positive_int("every entry of channels", width)
        norm_name = str(norm).lower()
        if norm_name not in NORMS:
            raise InputError(f"Unknown norm '{norm}'. Use one of {', '.join(NORMS)}.")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout}.")

        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.channels = channels
        self.res_units = int(res_units)
        self.norm = norm_name
        self.dropout = dropout

        args = (self.res_units, norm_name, dropout)
        self.encoder = nn.ModuleList(
            [ResidualUnit(spatial_dims, in_channels, channels[0], 1, *args)]
            + [ResidualUnit(spatial_dims, channels[i - 1], channels[i], 2, *args)
               for i in range(1, len(channels))])
        # decoder[i] produces level i from level i + 1; applied from the deepest level up.
        self.decoder = nn.ModuleList(
            [UpBlock(spatial_dims, channels[i + 1], channels[i], *args)
             for i in range(len(channels) - 1)])
        self.classifier = _conv(spatial_dims)(channels[0], out_channels, kernel_size=1)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_config(cls, cfg: SegNetConfig) -> "ResidualUNet":
        """Build the network described by ``cfg`` (e.g. from a checkpoint)."""
        if not isinstance(cfg, SegNetConfig):
            raise InputError(f"from_config needs a SegNetConfig, got {type(cfg).__name__}. "
                             "Use SegNetConfig.from_dict(...) on a stored dict first.")
        return cls(cfg.spatial_dims, cfg.in_channels, cfg.out_channels, cfg.channels,
                   cfg.res_units, cfg.norm, cfg.dropout)

    def to_config(self) -> SegNetConfig:
        """The :class:`SegNetConfig` that rebuilds this architecture."""
        return SegNetConfig(spatial_dims=self.spatial_dims, in_channels=self.in_channels,
                            out_channels=self.out_channels, channels=self.channels,
                            res_units=self.res_units, norm=self.norm, dropout=self.dropout)

    @property
    def embedding_dim(self) -> int:
        """D, the width of the embedding (the classifier's input): ``channels[0]``."""
        return self.channels[0]

    @property
    def size_divisor(self) -> int:
        """2**(levels - 1): the spatial sizes the network runs at are multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def padded_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The internal size for an input of ``spatial_shape``.

        Each axis is rounded up to a multiple of :attr:`size_divisor` and to at least
        ``2 * size_divisor`` (>= 2 voxels per axis at the bottom level).
        """
        f = self.size_divisor
        return tuple(max(-(-int(s) // f) * f, 2 * f) for s in spatial_shape)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"The network input must be a torch.Tensor, got {type(x).__name__}.")
        expected = self.spatial_dims + 2
        if x.ndim != expected:
            raise InputError(
                f"The network input must have {expected} dimensions (B, C, "
                f"{', '.join('ZYX'[3 - self.spatial_dims:])}), got shape {tuple(x.shape)}. "
                "Add the batch/channel axes with x[None, None] or use the matching 2D/3D net.")
        if x.shape[1] != self.in_channels:
            raise InputError(
                f"The network expects {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(shape {tuple(x.shape)}). For 2.5D, stack the neighbouring slices the network "
                "was trained with as channels.")
        if any(s < 1 for s in x.shape[2:]) or x.shape[0] < 1:
            raise InputError(f"The network input has an empty axis: shape {tuple(x.shape)}.")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding, the last decoder features: (B, in, *S) -> (B, D, *S), any size S."""
        self._check_input(x)
        spatial = tuple(x.shape[2:])
        target = self.padded_shape(spatial)
        pads: list[int] = []
        for s, t in zip(reversed(spatial), reversed(target)):
            before = (t - s) // 2
            pads += [before, t - s - before]
        h = F.pad(x, pads) if any(pads) else x
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        for level in range(len(self.decoder) - 1, -1, -1):
            h = self.decoder[level](h, skips[level])
        crop = tuple(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(spatial, target))
        return h[(slice(None), slice(None)) + crop]

    def classify_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of embeddings: (B, D, *S) -> (B, out, *S), or flat vectors (N, D) -> (N, out).

        Flat vectors (e.g. samples drawn from the class prototypes) go through the classifier
        convolution's weight and bias as a linear map, identical to the 1x1 convolution.
        """
        if not isinstance(z, torch.Tensor):
            raise InputError(f"Embeddings must be a torch.Tensor, got {type(z).__name__}.")
        d = self.embedding_dim
        if z.ndim == 2 and z.shape[1] == d:
            weight = self.classifier.weight.reshape(self.out_channels, d)
            return F.linear(z, weight, self.classifier.bias)
        if z.ndim == self.spatial_dims + 2 and z.shape[1] == d:
            return self.classifier(z)
        raise InputError(
            f"Embeddings must be (N, {d}) vectors or a (B, {d}, *S) map with "
            f"{self.spatial_dims} spatial axes, got shape {tuple(z.shape)}.")

    def forward(self, x: torch.Tensor, return_embedding: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, out, *S) for x (B, in, *S); with ``return_embedding`` also (B, D, *S)."""
        z = self.embed(x)
        logits = self.classifier(z)
        return (logits, z) if return_embedding else logits
