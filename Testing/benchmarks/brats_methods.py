"""Every method of the development benchmark on one target case, the audit of the source model's
errors, and the label-free signals the harm guard is chosen from.

Rows (Dice and ASD of WT / TC / ET against the expert labels):
    ``none``: the source model (``Y_T``).
    ``Y_ent``: HEAL's entropy stage; ``Y* (paper HD)``: its NIG stage (the paper's denoised labels).
    ``comp(<markers>, <grouping>[, drop])``: component reconstruction of ``Y_T`` from the markers
    (``Y_ent`` or ``Y*``), per class or per whole tumour (``heal/component_reconstruction.py``).
    ``HD+EGS`` / ``HEAL`` ``(paper)`` and ``(components)``: the full pipeline (``heal_adapt``) with
    the paper's denoised labels and with the components mode.
    ``GMM``: ``gmm_adapt`` with the library defaults.
    ``target-trained``: a model trained the same way on the target modality (upper bound).
The denoising rows share one source prediction and run the same functions ``heal_adapt`` runs
(``hierarchical_denoise`` then ``denoised_labels``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from brats_cases import CLASSES, Case, region_scores

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import GMMConfig, HEALConfig, InferenceConfig
from SFUDASegmentLib.data.geometry import Volume
from SFUDASegmentLib.data.labels import indices_to_values
from SFUDASegmentLib.evaluation.metrics import BRATS_REGIONS
from SFUDASegmentLib.gmm import gmm_adapt
from SFUDASegmentLib.heal import heal_adapt
from SFUDASegmentLib.heal.denoised_labels import denoised_labels
from SFUDASegmentLib.heal.denoising import hierarchical_denoise
from SFUDASegmentLib.heal.pipeline import edge_guided_segmentation
from SFUDASegmentLib.inference.preparation import (PreparedInput, labels_on_network_grid, predict_indices,
                                                   prepare_input)
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.uncertainty.entropy import voxel_entropy
from SFUDASegmentLib.utils.device import resolve_device

DENOISING_ROWS: dict[str, Optional[HEALConfig]] = {
    "Y_ent": None,
    "Y* (paper HD)": HEALConfig(denoise="paper"),
    "comp(Y_ent, class)": HEALConfig(denoise="components", component_markers="entropy"),
    "comp(Y*, class)": HEALConfig(denoise="components", component_markers="nig"),
    "comp(Y*, class, drop)": HEALConfig(denoise="components", component_markers="nig", orphan_classes="drop"),
    "comp(Y_ent, tumour)": HEALConfig(denoise="components", component_markers="entropy",
                                      component_grouping="foreground"),
    "comp(Y*, tumour)": HEALConfig(denoise="components", component_markers="nig", component_grouping="foreground"),
}
#: The components configuration the full HEAL rows use.
FULL_COMPONENTS = replace(DENOISING_ROWS["comp(Y_ent, class)"], stages="heal")


@dataclass(frozen=True)
class Settings:
    """How the methods run.

    Attributes:
        candidates, sampler, steps: HEAL's rendering.
        gmm_iterations: GMM adaptation steps (library default 100).
        device: ``cpu`` or ``cuda``.
        heal_full: run the full HEAL pipeline (diffusion) on the target scans.
        control_heal_full: also on the source-modality control scans.
        round_trip: audit the diffusion round trip (ground truth and Y_T rendered) on this case.
    """

    candidates: int = 6
    sampler: str = "ddim"
    steps: int = 10
    gmm_iterations: int = 100
    device: str = "cpu"
    heal_full: bool = True
    control_heal_full: bool = False
    round_trip: bool = False

    def heal(self, base: HEALConfig) -> HEALConfig:
        return replace(base, candidates=self.candidates, sampler=self.sampler, steps=self.steps,
                       candidate_batch=self.candidates * 4)

    @property
    def inference(self) -> InferenceConfig:
        return InferenceConfig(device=self.device, batch_size=16)


def _values(prepared: PreparedInput, indices: np.ndarray) -> np.ndarray:
    """Network-grid class indices -> label values on the case's grid."""
    return indices_to_values(prepared.to_input_grid(indices.astype(np.int64), is_label=True), CLASSES)


class CaseRun:
    """One target case under one source model: the shared source prediction and every row."""

    def __init__(self, source: SourceCheckpoint, image, settings: Settings) -> None:
        self.source, self.image, self.settings = source, image, settings
        self.device = resolve_device(settings.device)
        spec, k = source.input_spec, source.num_classes
        self.prepared = prepare_input(image, spec)
        self.model = source.build_segmentation_net(self.device)
        self.indices, self.probs = predict_indices(self.model, self.prepared.image, spec, k,
                                                   settings.inference, self.device, True)
        self.denoised = hierarchical_denoise(self.probs, HEALConfig(), spacing=self.prepared.network_spacing)
        self.none = _values(self.prepared, self.indices)
        self.entropy = self.prepared.to_input_grid(voxel_entropy(self.probs), is_label=False)

    def denoising_rows(self) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """Labels of every denoising row and the denoising summaries."""
        voxel_ml = float(np.prod(self.prepared.network_spacing)) / 1000.0
        labels = {"none": self.none, "Y_ent": _values(self.prepared, self.denoised.y_ent)}
        summaries = {}
        for name, config in DENOISING_ROWS.items():
            if config is None:
                continue
            indices, summaries[name] = denoised_labels(self.denoised, config, CLASSES, voxel_ml)
            labels[name] = _values(self.prepared, indices)
        return labels, summaries

    def heal_rows(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """HD+EGS and HEAL with the paper's denoising and with components (full pipeline)."""
        labels, record = {}, {}
        for tag, base in (("paper", HEALConfig(denoise="paper", stages="heal")), ("components", FULL_COMPONENTS)):
            start = time.perf_counter()
            result = heal_adapt(self.image, self.source, self.settings.heal(base), self.settings.inference)
            labels[f"HD+EGS ({tag})"] = result.label_maps["selected_segmentation"]
            labels[f"HEAL ({tag})"] = result.labels
            record[tag] = {"seconds": time.perf_counter() - start, "rendered_slices": result.extra["rendered_slices"],
                           "candidate_scores": result.candidate_scores, "warnings": result.extra["warnings"]}
        return labels, record

    def gmm_row(self) -> tuple[np.ndarray, dict[str, float]]:
        """GMM-adapted labels and the adaptation's own signals (SWD, entropy)."""
        start = time.perf_counter()
        results, _ = gmm_adapt(self.image, self.source, GMMConfig(iterations=self.settings.gmm_iterations),
                               self.settings.inference)
        result = results[0]  # the guard is off by default: these are the adapted labels
        signals = dict(result.extra["guard"]["signals"])
        signals["swd_ratio"] = signals["swd_after"] / max(signals["swd_before"], 1e-12)
        signals["abs_volume_log_ratio"] = abs(signals["foreground_volume_log_ratio"])
        signals["seconds"] = time.perf_counter() - start
        return result.labels, signals

    def round_trip(self, truth: Volume) -> dict[str, np.ndarray]:
        """``M_S(D(ground truth))`` and ``M_S(D(Y_T))``: rendered from the labels, edge-selected,
        segmented by the source model."""
        config = self.settings.heal(HEALConfig())
        out = {}
        conditions = {"M_S(D(ground truth))": labels_on_network_grid(truth, CLASSES, self.prepared, "truth"),
                      "M_S(D(Y_T))": self.indices}
        for name, condition in conditions.items():
            seg = edge_guided_segmentation(self.source, self.prepared, condition.astype(np.int64), config,
                                           self.settings.inference, self.device, self.model).segmentation
            out[name] = _values(self.prepared, seg)
        return out


def audit(run: CaseRun, truth: np.ndarray, tau1: float = HEALConfig().tau1) -> dict[str, Any]:
    """The source model's errors per class and whole tumour: false-positive and false-negative
    voxels and the share of each with voxel entropy above ``tau1`` (what HEAL's entropy stage can
    see), and the remove-every-false-positive oracle (``Y_T`` where it equals the truth)."""
    out: dict[str, Any] = {}
    uncertain = run.entropy > tau1
    for name, values in [(c.name, [c.value]) for c in CLASSES] + [("WT", [1, 2, 4])]:
        p, r = np.isin(run.none, values), np.isin(truth, values)
        fp, fn = p & ~r, r & ~p
        out[name] = {"fp": int(fp.sum()), "fn": int(fn.sum()),
                     "fp_uncertain_share": float(uncertain[fp].mean()) if fp.any() else float("nan"),
                     "fn_uncertain_share": float(uncertain[fn].mean()) if fn.any() else float("nan")}
    return out


def removal_oracle(pred: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """The most any denoising that only removes labels can reach: per region, the prediction
    with every false-positive voxel of that region removed (Dice ``2|P&T| / (|P&T| + |T|)``;
    ASD of that mask)."""
    cleaned = {}
    for region, values in BRATS_REGIONS.items():
        r = np.isin(truth, values)
        cleaned[region] = np.where(np.isin(pred, values) & r, values[0], 0)
    out = {}
    for region, values in BRATS_REGIONS.items():
        region_scores_of = region_scores(cleaned[region], truth, spacing)
        out[f"{region}_dice"] = region_scores_of[f"{region}_dice"]
        out[f"{region}_asd"] = region_scores_of[f"{region}_asd"]
    out["mean_dice"] = float(np.mean([out[f"{r}_dice"] for r in BRATS_REGIONS]))
    return out


def run_case(case: Case, source_modality: str, target_modality: str, source: SourceCheckpoint,
             target_model: SourceCheckpoint, settings: Settings) -> dict[str, Any]:
    """Every row on the target scan and on the source-modality control scan of one case."""
    truth = case.labels.array
    spacing = case.labels.spacing
    record: dict[str, Any] = {"case": case.name, "target": {}, "control": {}, "seconds": {}}

    def score(rows: dict[str, np.ndarray], into: dict[str, Any]) -> None:
        for name, labels in rows.items():
            into[name] = region_scores(labels, truth, spacing)

    start = time.perf_counter()
    run = CaseRun(source, case.scans[target_modality], settings)
    rows, summaries = run.denoising_rows()
    record["seconds"]["denoising"] = time.perf_counter() - start
    record["denoising"] = {name: [{k: e[k] for k in ("name", "source_voxels", "kept_voxels")}
                                  for e in s["classes"]] for name, s in summaries.items()}
    record["audit"] = audit(run, truth)
    if settings.heal_full:
        heal_labels, record["heal"] = run.heal_rows()
        rows.update(heal_labels)
    if settings.round_trip:
        start = time.perf_counter()
        rows.update(run.round_trip(case.labels))
        record["seconds"]["round_trip"] = time.perf_counter() - start
    rows["GMM"], gmm_signals = run.gmm_row()
    record["signals"] = {"GMM": gmm_signals}
    start = time.perf_counter()
    rows["target-trained (upper bound)"] = segment(target_model, case.scans[target_modality],
                                                   settings.inference, "labels").labels
    record["seconds"]["upper_bound"] = time.perf_counter() - start
    score(rows, record["target"])
    record["target"]["oracle: every FP removed"] = removal_oracle(run.none, truth, spacing)

    control = CaseRun(source, case.scans[source_modality], settings)
    control_rows, _ = control.denoising_rows()
    if settings.control_heal_full:
        heal_labels, record["control_heal"] = control.heal_rows()
        control_rows.update(heal_labels)
    control_rows["GMM"], record["signals"]["GMM (control)"] = control.gmm_row()
    score(control_rows, record["control"])
    return record
