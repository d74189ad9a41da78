"""Segmentation losses."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

SumOver = Callable[[torch.Tensor], torch.Tensor]
"""Adds a tensor of statistics up over the processes of a data-parallel run, differentiably
(``DistributedContext.sum_with_gradient``); None for one process."""


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   sum_over: Optional[SumOver] = None) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, computed over the whole batch.

    Args:
        logits: ``(B, K, *S)``.
        target: ``(B, *S)`` class indices.
        smooth: added to numerator and denominator.
        sum_over: when this process holds only a share of the batch, sums the per-class
            intersections and sizes over the processes, so that the Dice is that of the whole
            global batch.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).float()
    dims = [0] + list(range(2, probs.ndim))
    sums = torch.stack([(probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)])
    intersection, denominator = sum_over(sums) if sum_over is not None else sums
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice[1:].mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, sum_over: Optional[SumOver] = None) -> torch.Tensor:
    """Soft Dice + cross-entropy (nnU-Net's default), ``(B, K, *S)`` logits, ``(B, *S)`` target.

    ``sum_over``: see :func:`soft_dice_loss`; the cross-entropy stays this process's mean (the
    processes' gradients are averaged, which makes it the global batch's mean).
    """
    return soft_dice_loss(logits, target, sum_over=sum_over) + F.cross_entropy(logits.float(), target)
