"""Fit the per-class Gaussian prototypes of a source model's embedding and store them in the
checkpoint (SFS: voxels with label == prediction == c and confidence > rho)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import SourceCheckpoint
from ..config import GMMConfig, to_dict
from ..data.geometry import Volume
from ..inference.preparation import prepare_training_case
from ..utils.device import autocast, resolve_device
from ..utils.progress import ProgressReporter, report
from .embeddings import input_batches
from .prototypes import ClassPrototypes, PrototypeAccumulator


@torch.no_grad()
def fit_prototypes(checkpoint: SourceCheckpoint, images: Sequence[Volume], labels: Sequence[Volume],
                   config: GMMConfig = GMMConfig(), device: str = "auto", batch_size: int = 8,
                   progress: Optional[ProgressReporter] = None) -> SourceCheckpoint:
    """Return a copy of ``checkpoint`` with class prototypes fitted on labelled source images.

    SFS selection: voxels with label == prediction == c and confidence > rho. A class with
    fewer than 2 such voxels (a weak or under-trained source model, a rare class) falls back to
    all voxels labelled c, so that every class still gets its Gaussian; the fallback classes
    are listed in the provenance (``prototypes.fallback_classes``). Streams over
    slices/patches; memory is bounded by the per-class reservoirs
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
    k = checkpoint.num_classes
    accumulator = PrototypeAccumulator(k, model.embedding_dim, config.rho, config.max_samples_per_class,
                                       config.seed)
    labelled = PrototypeAccumulator(k, model.embedding_dim, 0.0, config.max_samples_per_class, config.seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        case = prepare_training_case(image, label, checkpoint.classes, checkpoint.input_spec, f"case {i}")
        for x, y in input_batches(case.image, checkpoint.input_spec, batch_size, case.labels):
            with autocast(dev, config.amp):
                logits, z = model(x.to(dev), return_embedding=True)
            probs = torch.softmax(logits.float(), 1)
            accumulator.add(z.float().cpu(), y, probs.cpu())
            labelled.add(z.float().cpu(), y, F.one_hot(y, k).movedim(-1, 1).float())
        report(progress, "prototypes", (i + 1) / len(images), f"embeddings of case {i + 1}/{len(images)}",
               done=i + 1, total=len(images), unit="cases")
    fallback = [c for c, n in enumerate(accumulator.selected_counts) if n < 2]
    prototypes = accumulator.finalize(config.shrinkage) if not fallback else _with_fallback(
        accumulator, labelled, fallback, config, model.embedding_dim)
    prototypes = replace(prototypes, label_counts=tuple(int(n) for n in labelled.selected_counts))
    prototypes.validate()
    provenance = dict(checkpoint.provenance)
    provenance["prototypes"] = {"cases": len(images), "rho": config.rho, "fallback_classes": fallback,
                                "selected_voxels": list(prototypes.counts), "config": to_dict(config)}
    return replace(checkpoint, prototypes=prototypes.to_state(), provenance=provenance)


def _with_fallback(strict: PrototypeAccumulator, labelled: PrototypeAccumulator, fallback: list[int],
                   config: GMMConfig, dim: int) -> ClassPrototypes:
    """Prototypes from the strict selection, with the ``fallback`` classes fitted on all their
    labelled voxels; weights from the voxel counts of the selection each class used.

    Raises:
        InputError: a class with fewer than 2 labelled voxels at all (from ``finalize``).
    """
    k = strict.num_classes
    merged = PrototypeAccumulator(k, dim, 0.0, config.max_samples_per_class, config.seed)
    counts = []
    for c in range(k):
        source = labelled if c in fallback else strict
        rows = source.samples(c)
        if len(rows):
            merged.add(rows, torch.full((len(rows),), c), F.one_hot(torch.full((len(rows),), c), k).float())
        counts.append(source.selected_counts[c])
    fitted = merged.finalize(config.shrinkage)
    weights = torch.tensor(counts, dtype=torch.float64) / float(sum(counts))
    return replace(fitted, weights=weights, counts=tuple(counts), rho=strict.rho)
