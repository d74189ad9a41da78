"""Segmentation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, computed over the whole batch.

    Args:
        logits: ``(B, K, *S)``.
        target: ``(B, *S)`` class indices.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).float()
    dims = [0] + list(range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice[1:].mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + cross-entropy (nnU-Net's default), ``(B, K, *S)`` logits, ``(B, *S)`` target."""
    return soft_dice_loss(logits, target) + F.cross_entropy(logits.float(), target)
