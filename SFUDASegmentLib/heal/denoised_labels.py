"""The denoised pseudo-labels HEAL proceeds with, in the chosen mode, and what the denoising did
to every class.

Modes (``HEALConfig.denoise``):
    ``"paper"``: ``Y*``, the voxels the NIG stage keeps (the paper and its public code).
    ``"components"``: the connected components of ``Y_T`` that hold a marker voxel, kept whole
    (``component_reconstruction.py``); markers are ``Y_ent`` or ``Y*``.

Either way the denoising only *removes* labels of the source model's prediction ``Y_T``: it
cannot add a structure that the source model missed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..config import HEALConfig, LabelClass
from ..errors import InputError
from .component_reconstruction import GROUPINGS, ORPHAN_RULES, reconstruct_components
from .denoising import DenoiseResult

DENOISE_MODES = ("paper", "components")
MARKERS = ("entropy", "nig")

#: The sentence every HEAL report carries.
CANNOT_ADD = ("HEAL's denoising only removes labels of the source model's prediction: it cannot add "
              "a structure the source model missed.")


def check_denoise_config(config: HEALConfig) -> None:
    """Raise a clear error for an unknown denoising mode, marker, grouping or orphan rule."""
    for value, allowed, option in ((config.denoise, DENOISE_MODES, "denoise"),
                                   (config.component_markers, MARKERS, "component_markers"),
                                   (config.component_grouping, GROUPINGS, "component_grouping"),
                                   (config.orphan_classes, ORPHAN_RULES, "orphan_classes")):
        if value not in allowed:
            raise InputError(f"HEAL {option} must be one of {allowed}, got '{value}'.")


def denoised_labels(denoised: DenoiseResult, config: HEALConfig, classes: Sequence[LabelClass],
                    voxel_ml: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The labels HEAL conditions the diffusion model on, and a per-class summary.

    Args:
        denoised: the hierarchical denoising's intermediates (``Y_T``, ``Y_ent``, ``Y*``).
        config: ``denoise``, ``component_markers``, ``component_grouping``, ``orphan_classes``.
        classes: the checkpoint's foreground classes (names and label values for the summary).
        voxel_ml: volume of one voxel of these maps in mL (network grid).

    Returns:
        ``(labels, summary)``: ``(*S)`` class indices (dtype of ``Y_T``) and a JSON-friendly
        dict: ``mode``, the component settings, ``classes`` (one entry per class: ``source_voxels``
        in ``Y_T``, ``removed_by_entropy`` and ``removed_by_nig`` of the paper's stages,
        ``kept_voxels`` and ``removed_voxels`` of the mode's labels, the same in mL, and for
        components ``components`` / ``kept_components`` / ``no_marker``), and ``note``
        (:data:`CANNOT_ADD`).
    """
    check_denoise_config(config)
    num_classes = len(classes) + 1
    reconstruction = None
    if config.denoise == "paper":
        labels = denoised.refined
    else:
        markers = denoised.y_ent if config.component_markers == "entropy" else denoised.refined
        reconstruction = reconstruct_components(denoised.pseudo, markers, num_classes,
                                                config.component_grouping, config.orphan_classes)
        labels = reconstruction.labels
    entries = []
    for k, c in enumerate(classes, start=1):
        source = denoised.pseudo == k
        kept = int((labels == k).sum())
        entry: dict[str, Any] = {
            "name": c.name, "value": c.value, "source_voxels": int(source.sum()),
            "removed_by_entropy": int((source & (denoised.y_ent != k)).sum()),
            "removed_by_nig": int((source & (denoised.y_ent == k) & (denoised.refined != k)).sum()),
            "kept_voxels": kept, "removed_voxels": int(source.sum()) - kept,
        }
        entry["source_ml"] = entry["source_voxels"] * voxel_ml
        entry["kept_ml"] = kept * voxel_ml
        if reconstruction is not None:
            entry.update(components=reconstruction.components[k]["components"],
                         kept_components=reconstruction.components[k]["kept_components"],
                         no_marker=k in reconstruction.orphan_classes)
        entries.append(entry)
    summary: dict[str, Any] = {"mode": config.denoise, "classes": entries, "note": CANNOT_ADD}
    if reconstruction is not None:
        summary.update(markers=config.component_markers, grouping=config.component_grouping,
                       orphan_rule=config.orphan_classes,
                       classes_without_markers=[classes[k - 1].name for k in reconstruction.orphan_classes])
    return labels, summary
