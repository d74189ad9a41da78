"""GMM-adapted inference (SFS, Stan & Rostami): align the target embedding to the source
class Gaussians with the sliced Wasserstein distance, then segment.

Loss per iteration: ``CE(classifier(z_s), y_s) + lambda * SWD(z_t, z_s)`` where ``(z_s, y_s)``
are drawn from the prototypes and ``z_t`` are embeddings of target voxels. The number of
samples per class follows the source class priors (the shares of all labelled source voxels,
recorded with the prototypes; default) or the target's confident pseudo-label proportions,
each floored at ``min_class_share`` - never any ground truth (the public code's label leak is
not copied).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import SourceCheckpoint
from ..config import GMMConfig, InferenceConfig, to_dict
from ..data.geometry import Volume
from ..data.labels import indices_to_values
from ..errors import InputError
from ..inference.preparation import PreparedInput, predict_indices, prepare_input
from ..inference.segment import result_from_prediction
from ..results.result import Result, structure_statistics
from ..heal.denoising import nig_variance_map
from ..uncertainty.disagreement import probability_disagreement
from ..uncertainty.ensemble import ensemble_entropy
from ..uncertainty.flip_tta import flip_tta
from ..uncertainty.review import review_uncertainty
from ..utils.device import StageTimer, autocast, free_memory, resolve_device
from ..utils.progress import ProgressReporter, report
from .embeddings import flatten_embedding, random_input_batch
from .harm_guard import adaptation_signals, guard_fires, guard_message
from .prototypes import ClassPrototypes, check_compatible
from .swd import random_directions, sliced_wasserstein

PROPORTIONS = ("pseudo", "source")


@dataclass
class GMMAdaptation:
    """An adapted network and the record of its adaptation.

    Attributes:
        model: the adapted segmentation network (eval mode).
        swd_before, swd_after: SWD of target embeddings to the prototypes, with fixed
            directions and samples, before and after adaptation.
        loss_curve: total loss per iteration.
        proportions: class proportions used for the prototype samples.
        stopped_early: message when a NaN loss stopped the run (weights restored), else None.
        embedding_pca: 2D PCA of prototype samples and target embeddings before/after (for the
            reviewer's plot), see :func:`embedding_pca`.
    """

    model: torch.nn.Module
    swd_before: float
    swd_after: float
    loss_curve: list[float] = field(default_factory=list)
    proportions: list[float] = field(default_factory=list)
    stopped_early: Optional[str] = None
    embedding_pca: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-friendly record (goes into report.json)."""
        return {"swd_before": self.swd_before, "swd_after": self.swd_after,
                "loss_curve": self.loss_curve, "class_proportions": self.proportions,
                "stopped_early": self.stopped_early, "embedding_pca": self.embedding_pca}


def embedding_pca(prototype_samples: torch.Tensor, prototype_labels: torch.Tensor, before: torch.Tensor,
                  after: torch.Tensor, seed: int, points: int = 400) -> dict[str, Any]:
    """Project prototype samples and target embeddings (before/after) on the prototypes' first
    two principal axes.

    Args:
        prototype_samples: ``(N, D)`` draws from the class Gaussians; prototype_labels: ``(N,)``.
        before, after: ``(M, D)`` target embeddings of the same voxels before/after adaptation.
        points: at most this many points of each set are kept.

    Returns:
        ``{"prototypes": [[x, y, class], ...], "before": [[x, y], ...], "after": [[x, y], ...]}``.
    """
    rng = np.random.default_rng(seed)
    data = prototype_samples.detach().double().cpu()
    mean = data.mean(0)
    _, _, v = torch.linalg.svd(data - mean, full_matrices=False)
    axes = v[:2].T

    def project(z: torch.Tensor) -> np.ndarray:
        pts = ((z.detach().double().cpu() - mean) @ axes).numpy()
        return pts[rng.choice(len(pts), size=min(points, len(pts)), replace=False)] if len(pts) > points else pts

    keep = rng.choice(len(data), size=min(points, len(data)), replace=False)
    proto = ((data[keep] - mean) @ axes).numpy()
    labels = prototype_labels.detach().cpu().numpy()[keep]
    return {"prototypes": [[float(a), float(b), int(c)] for (a, b), c in zip(proto, labels)],
            "before": project(before).tolist(), "after": project(after).tolist()}


def check_gmm_config(config: GMMConfig) -> None:
    """Raise a clear error for settings GMM adaptation cannot run with."""
    if config.iterations < 1:
        raise InputError(f"GMM adaptation needs at least 1 iteration, got {config.iterations}.")
    if config.class_proportions not in PROPORTIONS:
        raise InputError(f"class_proportions must be one of {PROPORTIONS}, got '{config.class_proportions}'.")
    if config.lam < 0 or config.lr <= 0 or config.projections < 1:
        raise InputError("lambda must be >= 0, the learning rate > 0 and projections >= 1.")
    if not 0.0 <= config.guard_agreement <= 1.0:
        raise InputError(f"The guard's agreement threshold is a Dice in [0, 1] (0 disables it), got "
                         f"{config.guard_agreement}.")
    if not 0.0 <= config.min_class_share < 0.5:
        raise InputError(f"min_class_share must be in [0, 0.5) (a share of the prototype samples), got "
                         f"{config.min_class_share}. The default is 0.001.")


def load_prototypes(checkpoint: SourceCheckpoint, embedding_dim: int) -> ClassPrototypes:
    """The checkpoint's prototypes, checked against the network (clear error when absent)."""
    prototypes = None if checkpoint.prototypes is None else ClassPrototypes.from_state(checkpoint.prototypes)
    check_compatible(prototypes, embedding_dim, checkpoint.num_classes)
    assert prototypes is not None
    return prototypes


def _pseudo_shares(model: torch.nn.Module, targets: Sequence[PreparedInput], checkpoint: SourceCheckpoint,
                   prototypes: ClassPrototypes, confidence: float, device: torch.device) -> Optional[np.ndarray]:
    """Class shares ``(K,)`` (prototype order) among the target voxels the source model predicts
    with ``> confidence``; None when no voxel is that confident."""
    counts = np.zeros(checkpoint.num_classes)
    for prepared in targets:
        _, probs = predict_indices(model, prepared.image, checkpoint.input_spec, checkpoint.num_classes,
                                   InferenceConfig(probabilities_dtype="float16"), device, True)
        top = probs.max(0)
        arg = probs.argmax(0)
        counts += np.bincount(arg[top > confidence].ravel(), minlength=checkpoint.num_classes)
    shares = np.array([counts[c] for c in prototypes.class_indices], dtype=np.float64)
    return shares / shares.sum() if shares.sum() > 0 else None


def floored_proportions(shares: Sequence[float], floor: float) -> list[float]:
    """``shares`` with every entry raised to at least ``floor``, renormalised to sum to 1.

    Every class keeps enough prototype samples for its Gaussian to anchor the classifier, even
    when its share is tiny (e.g. tumour classes among confident source voxels, about 1e-4).

    Args:
        shares: ``(K,)`` non-negative values summing to 1.
        floor: minimum share before renormalisation, in ``[0, 1 / K]``.

    Returns:
        ``K`` proportions summing to 1.
    """
    raised = np.maximum(np.asarray(shares, dtype=np.float64), floor)
    return [float(s) for s in raised / raised.sum()]


def _target_embeddings(model: torch.nn.Module, targets: Sequence[PreparedInput], spec, batch: int,
                       voxels: int, rng: np.random.Generator, device: torch.device, amp: bool) -> torch.Tensor:
    """``(voxels, D)`` embeddings of random voxels of random target slices/patches (with grad)."""
    prepared = targets[int(rng.integers(len(targets)))]
    x = random_input_batch(prepared.image, spec, batch, rng).to(device)
    with autocast(device, amp):
        z = model.embed(x)
    flat = flatten_embedding(z.float())
    index = torch.from_numpy(rng.choice(flat.shape[0], size=min(voxels, flat.shape[0]), replace=False))
    return flat[index.to(device)]


def adapt_model(checkpoint: SourceCheckpoint, targets: Sequence[PreparedInput], config: GMMConfig,
                device: torch.device, progress: Optional[ProgressReporter] = None,
                input_batch: int = 4) -> GMMAdaptation:
    """Adapt a copy of the source network to the target images (the checkpoint is unchanged).

    Args:
        checkpoint: source checkpoint with prototypes.
        targets: prepared target images.
        config: iterations, lambda, learning rate, projections, sample sizes, proportions, seed.
        device: compute device.
        progress: progress/cancel reporter (stage ``"adaptation"``).
        input_batch: slices (2D) or patches (3D) per iteration.
    """
    check_gmm_config(config)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = checkpoint.build_segmentation_net(device)
    prototypes = load_prototypes(checkpoint, model.embedding_dim)
    spec = checkpoint.input_spec
    shares = (_pseudo_shares(model, targets, checkpoint, prototypes, config.pseudo_confidence, device)
              if config.class_proportions == "pseudo" else None)
    if shares is None:  # source priors: label shares when recorded, else the mixture weights
        shares = prototypes.label_shares or prototypes.weights.tolist()
    proportions = floored_proportions(shares, config.min_class_share)
    counts = prototypes.allocate(config.prototype_samples, proportions)

    eval_rng = np.random.default_rng(config.seed + 1)
    eval_directions = random_directions(model.embedding_dim, config.projections,
                                        torch.Generator().manual_seed(config.seed + 2)).to(device)
    eval_samples, eval_labels = prototypes.sample(counts, torch.Generator().manual_seed(config.seed + 3), device)
    eval_state = eval_rng.bit_generator.state

    def evaluate_swd() -> tuple[float, torch.Tensor]:
        eval_rng.bit_generator.state = eval_state
        with torch.no_grad():
            z_t = _target_embeddings(model, targets, spec, input_batch, config.batch_voxels, eval_rng,
                                     device, config.amp)
            return float(sliced_wasserstein(z_t, eval_samples, directions=eval_directions)), z_t

    swd_before, z_before = evaluate_swd()
    if config.freeze_classifier:
        for p in model.classifier.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    # weights known to give a finite loss, and after how many steps (0 = the source weights)
    good_state, good_steps = copy.deepcopy(model.state_dict()), 0
    losses: list[float] = []
    stopped = None
    for it in range(config.iterations):
        z_s, y_s = prototypes.sample(counts, generator, device)
        z_t = _target_embeddings(model, targets, spec, input_batch, config.batch_voxels, rng, device, config.amp)
        ce = F.cross_entropy(model.classify_embedding(z_s), y_s)
        swd = sliced_wasserstein(z_t, z_s, projections=config.projections, generator=generator)
        loss = ce + config.lam * swd
        if not torch.isfinite(loss):
            stopped = (f"loss became {float(loss.detach())} at iteration {it + 1}; adaptation stopped and "
                       f"the weights after iteration {good_steps} were restored (0: the source weights). "
                       "Lower the learning rate.")
            model.load_state_dict(good_state)
            break
        if it % 10 == 0 and it > 0:  # the current weights (after `it` steps) gave a finite loss
            good_state, good_steps = copy.deepcopy(model.state_dict()), it
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        report(progress, "adaptation", (it + 1) / config.iterations,
               f"iteration {it + 1}/{config.iterations}: CE {float(ce.detach()):.3f}, SWD {float(swd.detach()):.4f}",
               done=it + 1, total=config.iterations, unit="iterations")
    if stopped is None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        stopped = (f"the weights became NaN or infinite at the last iteration; the weights after iteration "
                   f"{good_steps} were restored (0: the source weights). Lower the learning rate.")
        model.load_state_dict(good_state)
    model.eval()
    swd_after, z_after = evaluate_swd()
    pca = embedding_pca(eval_samples, eval_labels, z_before, z_after, config.seed)
    return GMMAdaptation(model, swd_before, swd_after, losses, proportions, stopped, pca)


def adapted_checkpoint(checkpoint: SourceCheckpoint, adaptation: GMMAdaptation, config: GMMConfig,
                       targets: Sequence[str]) -> SourceCheckpoint:
    """A new checkpoint with the adapted weights and the adaptation in its provenance."""
    provenance = dict(checkpoint.provenance)
    provenance["gmm_adaptation"] = {"targets": list(targets), "config": to_dict(config), **adaptation.report()}
    state = {k: v.detach().cpu().clone() for k, v in adaptation.model.state_dict().items()}
    return replace(checkpoint, seg_state=state, provenance=provenance)


def gmm_adapt(volumes: Volume | Sequence[Volume], checkpoint: SourceCheckpoint,
              config: GMMConfig = GMMConfig(), inference: InferenceConfig = InferenceConfig(),
              progress: Optional[ProgressReporter] = None) -> tuple[list[Result], GMMAdaptation]:
    """Adapt the source model to one or several target images, then segment each.

    Args:
        volumes: one target image or several (adaptation uses all of them).
        checkpoint: source checkpoint with prototypes (not modified).
        config: GMM settings.
        inference: device and inference settings.
        progress: progress/cancel reporter.

    Returns:
        One Result per volume (method ``"gmm"``; report entries ``swd_before``, ``swd_after``,
        ``loss_curve``; maps ``entropy`` of the kept prediction, ``disagreement`` with the source
        prediction, ``nig_variance`` and, with ``config.flip_uncertainty``, ``ensemble_entropy``:
        the entropy of the mean probabilities of the source and the adapted network over flips,
        each temperature-scaled when the checkpoint has a temperature, see
        ``uncertainty/ensemble.py``) and the adaptation record.
    """
    volumes = [volumes] if isinstance(volumes, Volume) else list(volumes)
    if not volumes:
        raise InputError("GMM adaptation needs at least one target image.")
    check_gmm_config(config)
    device = resolve_device(inference.device)
    timer = StageTimer(device)
    with timer.stage("preprocess"):
        targets = [prepare_input(v, checkpoint.input_spec, f"target image {i + 1}") for i, v in enumerate(volumes)]
    with timer.stage("adaptation"):
        adaptation = adapt_model(checkpoint, targets, config, device, progress)
    free_memory(device)
    results = []
    source_model = checkpoint.build_segmentation_net(device)
    for prepared in targets:
        with timer.stage("inference"):
            indices, probs = predict_indices(adaptation.model, prepared.image, checkpoint.input_spec,
                                             checkpoint.num_classes, inference, device, True, progress)
            source_indices, source_probs = predict_indices(source_model, prepared.image, checkpoint.input_spec,
                                                           checkpoint.num_classes, inference, device, True)
        with timer.stage("postprocess"):
            signals = adaptation_signals(source_indices, indices, prepared.foreground, checkpoint.num_classes,
                                         source_probs, probs)
            signals.update(swd_before=adaptation.swd_before, swd_after=adaptation.swd_after)
            fired = guard_fires(signals, config.guard_agreement)
            kept_indices, kept_probs = (source_indices, source_probs) if fired else (indices, probs)
            result = result_from_prediction("gmm", checkpoint, prepared, kept_indices, kept_probs)
            result.extra.update(adaptation.report())
            result.extra["gmm"] = to_dict(config)
            result.extra["guard"] = {"signals": signals, "threshold": config.guard_agreement, "fired": fired,
                                     "kept": "source" if fired else "adapted"}
            result.extra["warnings"] = [guard_message(signals, config.guard_agreement)] if fired else []
            if fired:
                result.label_maps["gmm_adapted_labels"] = indices_to_values(
                    prepared.to_input_grid(indices.astype(np.int64), is_label=True), checkpoint.classes)
            maps = {"disagreement": probability_disagreement(source_probs, probs),
                    "nig_variance": nig_variance_map(kept_probs, prepared.network_spacing, prepared.is_2d)}
        if config.flip_uncertainty:
            with timer.stage("flip_uncertainty"):
                maps["ensemble_entropy"] = ensemble_entropy(
                    [flip_tta(net, prepared.image, checkpoint.input_spec, checkpoint.num_classes, inference, device,
                              progress=progress, unflipped=plain).mean
                     for net, plain in ((source_model, source_probs), (adaptation.model, probs))],
                    checkpoint.temperature)
        with timer.stage("postprocess"):
            result.maps.update({name: prepared.to_input_grid(values, is_label=False).astype(np.float32)
                                for name, values in maps.items()})
            result.structure_stats = structure_statistics(result.labels, result.classes, result.geometry,
                                                          result.maps)
            review_uncertainty(result, checkpoint.input_spec.modality, prepared.to_input_grid(prepared.foreground, True))
        results.append(result)
    del source_model
    for result in results:
        result.timings = timer.to_dict()
        result.timings["seconds_per_iteration"] = timer.seconds["adaptation"] / max(1, len(adaptation.loss_curve))
    return results, adaptation
