"""Exponential moving average of a model's weights (the weights a diffusion model samples with)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, InputError


class ExponentialMovingAverage:
    """Shadow copy of a model's state: parameters averaged, buffers copied.

    After each :meth:`update`, every floating-point parameter ``p`` gives
    ``shadow = d * shadow + (1 - d) * p``; buffers (and integer tensors) are copied as they are.

    Args:
        model: the model to track; the shadow starts as a copy of its current state, on the
            same device.
        decay: ``d`` (Med-DDPM: 0.995).
        warmup: when True the decay used at update ``n`` (0-based) is
            ``min(decay, (1 + n) / (10 + n))``, so short runs are not dominated by the random
            initial weights; when False it is always ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise InputError(f"EMA decay must be in [0, 1], got {decay}. Med-DDPM uses 0.995.")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._parameter_names = {name for name, _ in model.named_parameters()}
        self.shadow: dict[str, torch.Tensor] = {
            name: value.detach().clone() for name, value in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current parameters into the shadow and copy its buffers."""
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            if name not in self.shadow:
                raise InputError(f"The model has a tensor '{name}' that the EMA does not track. "
                                 "Update the EMA with the model it was created from.")
            shadow = self.shadow[name]
            if name in self._parameter_names and shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), 1.0 - decay)
            else:
                shadow.copy_(value.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (strict)."""
        model.load_state_dict(self.shadow, strict=True)

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights as a model ``state_dict`` (detached copies on the CPU)."""
        return {name: value.detach().to("cpu", copy=True) for name, value in self.shadow.items()}

    def state_dict(self) -> dict[str, Any]:
        """The EMA's own state: ``decay``, ``warmup``, ``num_updates`` and ``shadow``."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {name: value.detach().clone() for name, value in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the tensors must match the tracked model.

        Raises:
            CheckpointError: missing entries, other tensor names or shapes.
        """
        missing = {"decay", "warmup", "num_updates", "shadow"} - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks {sorted(missing)}. Save it with "
                                  "ExponentialMovingAverage.state_dict().")
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise CheckpointError(
                "EMA state does not match the model: tensors "
                f"{sorted(set(shadow) ^ set(self.shadow))[:5]} differ. Load an EMA saved for the "
                "same network configuration.")
        for name, value in shadow.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise CheckpointError(
                    f"EMA tensor '{name}' has shape {tuple(value.shape)}, the model "
                    f"{tuple(self.shadow[name].shape)}. Load an EMA saved for the same network "
                    "configuration.")
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
