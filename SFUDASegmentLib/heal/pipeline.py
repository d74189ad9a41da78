"""HEAL end to end: pseudo-labels -> hierarchical denoising -> diffusion candidates ->
edge-guided selection -> size-aware fusion. Learning-free: no weight of either network changes
and no optimizer is ever created.

Stages (the paper's ablation): ``"hd"`` returns Y*; ``"hd+egs"`` returns M_S(I_B), the source
model's segmentation of the selected candidate; ``"heal"`` fuses Y* and M_S(I_B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..checkpoint import SourceCheckpoint
from ..config import HEALConfig, InferenceConfig
from ..data.geometry import Volume
from ..data.labels import indices_to_values
from ..diffusion.sampling import DDIMSampler, DDPMSampler, NoiseSchedule
from ..diffusion.training import image_to_unit_range, make_condition, unit_range_to_image
from ..errors import CheckpointError, InputError
from ..inference.preparation import PreparedInput, predict_indices, prepare_input
from ..inference.segment import result_from_prediction
from ..results.result import Result, structure_statistics
from ..uncertainty.candidate_spread import candidate_spread, segment_candidates
from ..uncertainty.review import review_uncertainty
from ..utils.device import StageTimer, free_memory, map_in_chunks, resolve_device
from ..utils.progress import ProgressReporter, report
from .denoised_labels import check_denoise_config, denoised_labels
from .denoising import hierarchical_denoise
from .edge_selection import SelectionResult, select_candidate
from .fusion import size_aware_fusion
from .diffusion_quality import round_trip_warning

STAGES = ("hd", "hd+egs", "heal")
SAMPLERS = ("ddpm", "ddim")


def check_heal_config(config: HEALConfig, checkpoint: SourceCheckpoint) -> None:
    """Raise a clear error for settings HEAL cannot run with."""
    if config.stages not in STAGES:
        raise InputError(f"stages must be one of {STAGES}, got '{config.stages}'.")
    check_denoise_config(config)
    if config.stages == "hd":
        if config.candidate_spread:
            raise InputError("The candidate spread needs the diffusion candidates; use stages 'hd+egs' or "
                             "'heal', or turn candidate_spread off.")
        return
    if checkpoint.diffusion is None:
        raise CheckpointError(
            "HEAL needs the checkpoint's diffusion model, and this checkpoint has none. Retrain with "
            "`sfuda train-source ... --diffusion`, or run with --stages hd (denoising only) or "
            "another method (none, gmm).")
    if config.candidates < 1:
        raise InputError(f"The number of candidates must be at least 1, got {config.candidates}.")
    if config.sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {SAMPLERS}, got '{config.sampler}'.")
    timesteps = checkpoint.diffusion.schedule.timesteps
    if config.sampler == "ddim" and not 1 <= config.steps <= timesteps:
        raise InputError(f"DDIM steps must be between 1 and the model's T = {timesteps}, got "
                         f"{config.steps}. Use --steps {min(50, timesteps)} (or --sampler ddpm for all T).")


def _bounding_box(mask: np.ndarray, multiple: int, margin: int = 4) -> tuple[slice, ...]:
    """In-plane (last two axes) box around ``mask`` with a margin, sizes a multiple of ``multiple``
    where the image allows (diffusion runs on this box only)."""
    box = []
    for axis in (-2, -1):
        other = tuple(a for a in range(mask.ndim) if a != mask.ndim + axis)
        present = np.flatnonzero(mask.any(axis=other))
        size = mask.shape[axis]
        lo, hi = (int(present[0]), int(present[-1]) + 1) if present.size else (0, size)
        lo, hi = max(0, lo - margin), min(size, hi + margin)
        want = min(size, -(-(hi - lo) // multiple) * multiple)
        lo = max(0, min(lo - (want - (hi - lo)) // 2, size - want))
        box.append(slice(lo, lo + want))
    return (Ellipsis, *box)


def slices_to_render(prepared: PreparedInput, refined: np.ndarray, config: HEALConfig,
                     spatial_dims: int) -> list[int]:
    """Axial slices (network grid) a 2D diffusion model renders; all of them for a 3D model.

    A slice with no body is never rendered. With ``config.skip_empty_slices`` a slice of a
    volume whose Y* has no foreground is not rendered either: it has no condition edges, so it
    adds nothing to any S_i, and Y* says nothing is there (M_S(I_B) is background on it). A
    single 2D image is always rendered.

    Args:
        refined: ``(Z, Y, X)`` Y* class indices on the network grid.

    Returns:
        Sorted slice indices.
    """
    depth = refined.shape[0]
    if spatial_dims == 3:
        return list(range(depth))
    skip = config.skip_empty_slices and depth > 1
    return [z for z in range(depth)
            if prepared.foreground[z].any() and not (skip and not refined[z].any())]


def render_candidates(checkpoint: SourceCheckpoint, prepared: PreparedInput, refined: np.ndarray,
                      config: HEALConfig, device: torch.device, slices: Sequence[int],
                      progress: Optional[ProgressReporter] = None) -> np.ndarray:
    """Draw ``n`` source-style candidate images conditioned on Y* (and the body mask).

    Args:
        refined: ``(Z, Y, X)`` Y* class indices on the network grid.
        slices: axial slices to render with a 2D model (:func:`slices_to_render`); ignored by
            a 3D model, which renders the whole volume.

    Returns:
        ``(n, C, Z, Y, X)`` candidates as normalised intensities (z-scores), background where
        the body mask is empty and on slices not rendered.
    """
    part = checkpoint.diffusion
    assert part is not None
    net = checkpoint.build_diffusion_net(device)
    schedule = NoiseSchedule.from_config(part.schedule)
    sampler = (DDPMSampler(schedule) if config.sampler == "ddpm"
               else DDIMSampler(schedule, steps=config.steps, eta=config.ddim_eta))
    n, channels, k = config.candidates, part.net_config.image_channels, checkpoint.num_classes
    background = float(image_to_unit_range(np.float32(prepared.image.min()), part.intensity_scale))
    out = np.full((n, channels, *refined.shape), background, dtype=np.float32)
    volume_mode = part.net_config.spatial_dims == 3
    # 3D: one item per candidate. 2D: one per (slice, candidate), slice-major, so that a chunk
    # holds neighbouring slices and is cropped to their joint body box.
    items: list = list(range(n)) if volume_mode else [(z, i) for z in slices for i in range(n)]
    done = [0]

    def run(chunk: list) -> list[tuple[tuple, np.ndarray]]:
        first = items.index(chunk[0])
        generator = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + first)
        planes = list(range(refined.shape[0])) if volume_mode else [z for z, _ in chunk]
        box = _bounding_box(prepared.foreground[planes], 8)
        labels = torch.from_numpy(refined[planes][box].astype(np.int64))
        body = torch.from_numpy(prepared.foreground[planes][box])
        if volume_mode:
            cond = make_condition(labels[None], body[None], k).expand(len(chunk), -1, *labels.shape)
            masks = [body.numpy()] * len(chunk)
        else:
            cond = make_condition(labels, body, k)
            masks = list(body.numpy())
        stage = _ChunkProgress(progress, done[0], len(items), len(chunk),
                               "candidates" if volume_mode else "candidate slices")
        samples = sampler.sample(net, cond.to(device), channels, generator, stage, config.amp).cpu().numpy()
        done[0] += len(chunk)
        return [(box, np.where(mask, sample, background)) for mask, sample in zip(masks, samples)]

    rendered = map_in_chunks(run, items, max(1, config.candidate_batch), device, "candidate batch")
    for item, (box, sample) in zip(items, rendered):
        if volume_mode:
            out[(item, slice(None), slice(None)) + box[1:]] = sample
        else:
            z, i = item
            out[(i, slice(None), z) + box[1:]] = sample
    del net
    free_memory(device)
    return unit_range_to_image(out, part.intensity_scale).astype(np.float32)


class _ChunkProgress(ProgressReporter):
    """Maps one chunk's sampler progress onto the whole candidate rendering stage."""

    def __init__(self, parent: Optional[ProgressReporter], done: int, total: int, size: int,
                 unit: str) -> None:
        super().__init__()
        self.parent, self.done, self.total, self.size, self.unit = parent, done, total, size, unit

    def report(self, stage: str, fraction: float, message: str = "", *, done: Optional[float] = None,
               total: Optional[float] = None, unit: str = "") -> None:
        overall = (self.done + fraction * self.size) / max(self.total, 1)
        report(self.parent, "diffusion", overall, f"candidates {overall * 100:.0f}% ({message})",
               done=self.done + fraction * self.size, total=self.total, unit=self.unit)


@dataclass
class EdgeGuidedOutcome:
    """What :func:`edge_guided_segmentation` returns.

    Attributes:
        candidates: ``(n, C, Z, Y, X)`` rendered candidates on the network grid (z-scores).
        selection: edge scores and the selected index.
        segmentation: ``(Z, Y, X)`` class indices ``M_S(I_B)``, the source model's segmentation
            of the selected candidate (background on slices not rendered).
        rendered_slices: axial slices the diffusion model rendered.
    """

    candidates: np.ndarray
    selection: SelectionResult
    segmentation: np.ndarray
    rendered_slices: list[int]


def edge_guided_segmentation(checkpoint: SourceCheckpoint, prepared: PreparedInput, labels: np.ndarray,
                             config: HEALConfig, inference: InferenceConfig, device: torch.device,
                             model: torch.nn.Module, timer: Optional[StageTimer] = None,
                             progress: Optional[ProgressReporter] = None) -> EdgeGuidedOutcome:
    """Render ``n`` source-style candidates of ``labels``, select the one whose Canny edges match
    the labels' best, and segment it with the source model (HEAL's EGS, ``M_S(I_B)``).

    Also the diffusion round trip: with ``labels`` the ground truth, ``M_S(I_B)`` against it
    measures how much structure the candidates carry.

    Args:
        prepared: the image on the network grid (its body mask conditions the renderings).
        labels: ``(Z, Y, X)`` class indices on the network grid (the condition).
        model: the source segmentation network (eval mode, on ``device``).
        timer: optional stage timer (stages ``diffusion``, ``selection``, ``source_on_selected``).
    """
    timer = timer or StageTimer(device)
    spec, k = checkpoint.input_spec, checkpoint.num_classes
    rendered = slices_to_render(prepared, labels, config, checkpoint.diffusion.net_config.spatial_dims)
    with timer.stage("diffusion"):
        candidates = render_candidates(checkpoint, prepared, labels, config, device, rendered, progress)
    with timer.stage("selection"):
        grey = candidates[:, 0] if candidates.shape[1] == 1 else np.moveaxis(candidates, 1, -1)
        reference = labels
        if prepared.is_2d:
            grey, reference = grey[:, 0], labels[0]
        selection = select_candidate(grey, reference, config, progress)
    with timer.stage("source_on_selected"):
        segmentation, _ = predict_indices(model, candidates[selection.selected_index], spec, k, inference, device)
        segmentation[np.setdiff1d(np.arange(labels.shape[0]), rendered)] = 0
    return EdgeGuidedOutcome(candidates, selection, segmentation, rendered)


def heal_adapt(volume: Volume, checkpoint: SourceCheckpoint, config: HEALConfig = HEALConfig(),
               inference: InferenceConfig = InferenceConfig(),
               progress: Optional[ProgressReporter] = None) -> Result:
    """Adapt the frozen source model to one target image with HEAL.

    Args:
        volume: target ``(Z, Y, X)`` volume or 2D image with its geometry (not modified).
        checkpoint: source checkpoint (with a diffusion model unless ``stages == "hd"``).
        config: HEAL settings (tau1, tau2, denoising mode, n, sampler, steps, Canny, stages, seed).
        inference: device, batch size and overlap for the source model.
        progress: progress/cancel reporter.

    Returns:
        Result with method ``"heal"``: final labels; source probabilities; maps ``entropy`` and
        ``nig_variance`` (min-max normalised), and ``candidate_spread`` with
        ``config.candidate_spread``; label maps ``pseudo_labels`` (Y_T),
        ``entropy_labels`` (Y_ent), ``refined_labels`` (the denoised labels of the chosen mode:
        Y* for ``"paper"``), ``nig_labels`` (Y*, with ``"components"``) and, past ``hd``,
        ``selected_segmentation`` (M_S(I_B)); the candidates in the input's intensity units,
        their edge scores and the selected index; per-stage seconds and peak memory; report
        entries ``denoising`` (what the denoising did to every class, see
        :func:`~SFUDASegmentLib.heal.denoised_labels.denoised_labels`) and ``warnings``.
    """
    check_heal_config(config, checkpoint)
    device = resolve_device(inference.device)
    timer = StageTimer(device)
    spec, k = checkpoint.input_spec, checkpoint.num_classes
    with timer.stage("preprocess"):
        prepared = prepare_input(volume, spec)
    with timer.stage("source_prediction"):
        model = checkpoint.build_segmentation_net(device)
        indices, probs = predict_indices(model, prepared.image, spec, k, inference, device, True, progress)
    with timer.stage("denoising"):
        squeeze = prepared.is_2d
        denoised = hierarchical_denoise(probs[:, 0] if squeeze else probs, config,
                                        spacing=prepared.network_spacing[1:] if squeeze else prepared.network_spacing)

        def grid(a: np.ndarray) -> np.ndarray:
            return a[None] if squeeze else a

        labels, summary = denoised_labels(denoised, config, checkpoint.classes,
                                          float(np.prod(prepared.network_spacing)) / 1000.0)
        refined = grid(labels).astype(np.int64)
        report(progress, "denoising", 1.0, "hierarchical denoising done")
    warnings = [w for w in (round_trip_warning(checkpoint.provenance),) if w] if config.stages != "hd" else []
    final = refined
    egs, spread = None, None
    if config.stages != "hd":
        egs = edge_guided_segmentation(checkpoint, prepared, refined, config, inference, device, model,
                                       timer, progress)
        final = egs.segmentation
        if config.candidate_spread:
            with timer.stage("candidate_spread"):
                spread = candidate_spread(segment_candidates(model, egs.candidates, spec, k, inference, device,
                                                             egs.rendered_slices), k)
        if config.stages == "heal":
            with timer.stage("fusion"):
                final = size_aware_fusion(refined, egs.segmentation, k).labels
    del model
    free_memory(device)
    with timer.stage("postprocess"):
        result = result_from_prediction("heal", checkpoint, prepared, final, probs)
        result.maps["nig_variance"] = prepared.to_input_grid(
            grid(denoised.variance_normalized), is_label=False).astype(np.float32)
        if spread is not None:
            result.maps["candidate_spread"] = prepared.to_input_grid(spread, is_label=False).astype(np.float32)
        intermediates = [("pseudo_labels", grid(denoised.pseudo)), ("entropy_labels", grid(denoised.y_ent)),
                         ("refined_labels", refined)]
        if config.denoise != "paper":
            intermediates.append(("nig_labels", grid(denoised.refined)))
        if egs is not None:
            intermediates.append(("selected_segmentation", egs.segmentation))
        for name, array in intermediates:
            result.label_maps[name] = indices_to_values(
                prepared.to_input_grid(array.astype(np.int64), is_label=True), checkpoint.classes)
        if egs is not None:
            result.candidates = np.stack([_to_input_intensity(prepared, c) for c in egs.candidates])
            result.candidate_scores = list(egs.selection.scores)
            result.selected_index = egs.selection.selected_index
            result.extra["reference_edges_empty"] = egs.selection.reference_edges_empty
            result.extra["rendered_slices"] = len(egs.rendered_slices)
        result.structure_stats = structure_statistics(result.labels, checkpoint.classes,
                                                      prepared.input_geometry, result.maps)
        result.extra["heal"] = {"stages": config.stages, "denoise": config.denoise, "sampler": config.sampler,
                                "steps": config.steps if config.sampler == "ddim" else
                                (checkpoint.diffusion.schedule.timesteps if checkpoint.diffusion else 0),
                                "candidates": config.candidates, "seed": config.seed,
                                "tau1": config.tau1, "tau2": config.tau2}
        result.extra["denoising"] = summary
        result.extra["warnings"] = warnings
        review_uncertainty(result, spec.modality, prepared.to_input_grid(prepared.foreground, True))
    result.timings = timer.to_dict()
    return result


def _to_input_intensity(prepared: PreparedInput, candidate: np.ndarray) -> np.ndarray:
    """A ``(C, Z, Y, X)`` normalised candidate on the input grid (RGB channel-last for 2D colour)."""
    if candidate.shape[0] == 1:
        return prepared.to_input_grid(candidate[0], is_label=False).astype(np.float32)
    channels = prepared.to_input_grid(candidate, is_label=False)
    return np.moveaxis(channels, 0, -1).astype(np.float32)
