"""Fit the per-class Gaussian prototypes of a source model's embedding and store them in the
checkpoint (SFS: voxels with label == prediction == c and confidence > rho)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch

from ..checkpoint import SourceCheckpoint
from ..config import GMMConfig, to_dict
from ..device import autocast, resolve_device
from ..geometry import Volume
from ..preparation import prepare_training_case
from ..progress import ProgressReporter, report
from .embeddings import input_batches
from .prototypes import PrototypeAccumulator


@torch.no_grad()
def fit_prototypes(checkpoint: SourceCheckpoint, images: Sequence[Volume], labels: Sequence[Volume],
                   config: GMMConfig = GMMConfig(), device: str = "auto", batch_size: int = 8,
                   progress: Optional[ProgressReporter] = None) -> SourceCheckpoint:
    """Return a copy of ``checkpoint`` with class prototypes fitted on labelled source images.

    Streams over slices/patches; memory is bounded by the per-class reservoirs
    (``config.max_samples_per_class``). The input checkpoint object is not modified.

    Args:
        checkpoint: the source checkpoint.
        images, labels: labelled source cases (same geometry per pair).
        config: ``rho``, ``max_samples_per_class``, ``shrinkage``, ``seed``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        batch_size: slices or patches per forward pass.
        progress: progress/cancel reporter (stage ``"prototypes"``).
    """
    dev = resolve_device(device)
    model = checkpoint.build_segmentation_net(dev)
    accumulator = PrototypeAccumulator(checkpoint.num_classes, model.embedding_dim, config.rho,
                                       config.max_samples_per_class, config.seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        case = prepare_training_case(image, label, checkpoint.classes, checkpoint.input_spec, f"case {i}")
        for x, y in input_batches(case.image, checkpoint.input_spec, batch_size, case.labels):
            with autocast(dev, config.amp):
                logits, z = model(x.to(dev), return_embedding=True)
            probs = torch.softmax(logits.float(), 1)
            accumulator.add(z.float().cpu(), y, probs.cpu())
        report(progress, "prototypes", (i + 1) / len(images), f"embeddings of case {i + 1}/{len(images)}")
    prototypes = accumulator.finalize(config.shrinkage)
    provenance = dict(checkpoint.provenance)
    provenance["prototypes"] = {"cases": len(images), "rho": config.rho,
                                "selected_voxels": list(prototypes.counts), "config": to_dict(config)}
    return replace(checkpoint, prototypes=prototypes.to_state(), provenance=provenance)
