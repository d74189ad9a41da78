"""The optional uncertainty maps of a result, computed after its method ran.

Every method returns the maps it gets for free (``entropy``; ``nig_variance`` for HEAL and GMM;
``calibrated_entropy`` when the checkpoint has a temperature; ``candidate_spread`` when HEAL was
asked for it; GMM also ``disagreement`` and, unless ``GMMConfig.flip_uncertainty`` is off,
``ensemble_entropy``). :func:`add_uncertainty_maps` adds the ones that cost extra inference, from the
scan, the source checkpoint and, for GMM, the adapted checkpoint:

=======================  ================================================================
``calibrated_entropy``   entropy (bits) of the temperature-scaled probabilities
``nig_variance``         HEAL's min-max normalised NIG variance (``heal/denoising.py``,
                         default ``HEALConfig``), of any result's probabilities
``flip_entropy``         entropy (bits) of the mean probabilities over flips (4 passes)
``flip_variance``        across-flip variance of the class probabilities, mean over classes
``mahalanobis``          embedding distance to the nearest source class Gaussian
``disagreement``         total variation distance, source vs adapted probabilities (GMM)
``ensemble_entropy``     entropy (bits) of the mean probabilities of the source and the adapted
                         network, each over flips and temperature-scaled when the checkpoint
                         has a temperature (GMM; 6-8 passes, ``ensemble.py``)
``label_disagreement``   1 where the result's labels differ from the source model's
=======================  ================================================================

Probability-based maps use the probabilities of the network behind the result: the adapted
network for GMM (``model_checkpoint``), the source network for no adaptation and HEAL (whose
probabilities are the source model's).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import SourceCheckpoint
from ..config import InferenceConfig
from ..data.geometry import Volume
from ..data.labels import indices_to_values
from ..errors import CheckpointError, InputError
from ..gmm.prototypes import ClassPrototypes, check_compatible
from ..heal.denoising import nig_variance_map
from ..inference.preparation import PreparedInput, predict_indices, prepare_input
from ..results.result import Result, structure_statistics
from ..utils.device import resolve_device
from ..utils.progress import ProgressReporter
from .disagreement import label_disagreement, probability_disagreement
from .entropy import voxel_entropy
from .ensemble import ensemble_entropy
from .flip_tta import FlipTTA, flip_tta
from .mahalanobis import mahalanobis_map
from .reliability import DEFAULT_TABLE
from .review import review_uncertainty
from .temperature import apply_temperature

MAP_NAMES = ("calibrated_entropy", "nig_variance", "flip_entropy", "flip_variance", "mahalanobis", "disagreement",
             "ensemble_entropy", "label_disagreement")


class _Networks:
    """The source and result networks, built and run at most once each."""

    def __init__(self, checkpoint: SourceCheckpoint, model_checkpoint: Optional[SourceCheckpoint],
                 prepared: PreparedInput, inference: InferenceConfig) -> None:
        self.checkpoint, self.model_checkpoint = checkpoint, model_checkpoint or checkpoint
        self.prepared, self.inference = prepared, inference
        self.device = resolve_device(inference.device)
        self._nets: dict[str, torch.nn.Module] = {}
        self._probs: dict[str, np.ndarray] = {}
        self._flips: dict[str, FlipTTA] = {}

    def net(self, which: str) -> torch.nn.Module:
        """``"source"`` or ``"result"``: the network, in eval mode."""
        if which not in self._nets:
            part = self.checkpoint if which == "source" else self.model_checkpoint
            self._nets[which] = part.build_segmentation_net(self.device)
        return self._nets[which]

    def probabilities(self, which: str) -> np.ndarray:
        """``(K, Z, Y, X)`` network-grid probabilities of the source or result network."""
        if which not in self._probs:
            spec = self.checkpoint.input_spec
            _, probs = predict_indices(self.net(which), self.prepared.image, spec, self.checkpoint.num_classes,
                                       self.inference, self.device, True)
            assert probs is not None
            self._probs[which] = probs
        return self._probs[which]

    def flips(self, which: str, axes: Sequence[str], progress: Optional[ProgressReporter]) -> FlipTTA:
        """Flip test-time augmentation of the source or result network over ``axes`` (reusing its
        unflipped probabilities when they were computed)."""
        if which not in self._flips:
            self._flips[which] = flip_tta(self.net(which), self.prepared.image, self.checkpoint.input_spec,
                                          self.checkpoint.num_classes, self.inference, self.device, axes, progress,
                                          self._probs.get(which))
        return self._flips[which]


def add_uncertainty_maps(result: Result, volume: Volume, checkpoint: SourceCheckpoint, names: Sequence[str],
                         model_checkpoint: Optional[SourceCheckpoint] = None,
                         inference: InferenceConfig = InferenceConfig(), flip_axes: Sequence[str] = ("y", "x"),
                         table: Mapping[str, Any] = DEFAULT_TABLE, target_modality: Optional[str] = None,
                         progress: Optional[ProgressReporter] = None) -> Result:
    """Add the maps ``names`` (see the module table) to ``result``, then recompute its
    structure statistics, reliability statement and review queue.

    Args:
        result: the method's result for ``volume`` (modified in place and returned).
        volume: the scan the result was computed from.
        checkpoint: the source checkpoint (prototypes for ``mahalanobis``, temperature for
            ``calibrated_entropy`` and, when fitted, ``ensemble_entropy``).
        names: maps to add.
        model_checkpoint: the adapted checkpoint of a GMM result (``adapt --save-adapted``);
            None: the source network (no adaptation, HEAL).
        inference: device and batch settings.
        flip_axes: axes of the flip maps.
        table: the reliability table the map to show is chosen from.
        target_modality: the scan's modality when known (for the table lookup).
        progress: progress reporter.

    Raises:
        InputError: an unknown map, a result not on the scan's grid, ``disagreement`` or
            ``ensemble_entropy`` without an adapted checkpoint.
        CheckpointError: ``mahalanobis`` without prototypes, ``calibrated_entropy`` without a
            temperature.
    """
    unknown = [n for n in names if n not in MAP_NAMES]
    if unknown:
        raise InputError(f"Unknown uncertainty map(s) {unknown}; choose from {list(MAP_NAMES)}.")
    for name in ("disagreement", "ensemble_entropy"):
        if name in names and model_checkpoint is None:
            raise InputError(f"The {name} map compares the source and the adapted model: give the adapted "
                             "checkpoint (`sfuda adapt --method gmm --save-adapted`).")
    prepared = prepare_input(volume, checkpoint.input_spec)
    if tuple(result.labels.shape) != tuple(prepared.input_shape):
        raise InputError(f"The result {result.labels.shape} is not on the scan's grid {prepared.input_shape}; "
                         "give the scan the result was computed from.")
    nets = _Networks(checkpoint, model_checkpoint, prepared, inference)
    k, spec = checkpoint.num_classes, checkpoint.input_spec
    maps: dict[str, np.ndarray] = {}
    if "calibrated_entropy" in names:
        if checkpoint.temperature is None:
            raise CheckpointError("The checkpoint has no fitted temperature; run `sfuda fit-temperature` on "
                                  "labelled source cases first.")
        maps["calibrated_entropy"] = voxel_entropy(apply_temperature(nets.probabilities("result"),
                                                                     checkpoint.temperature))
    if "nig_variance" in names:
        maps["nig_variance"] = nig_variance_map(nets.probabilities("result"), prepared.network_spacing,
                                                prepared.is_2d)
    if "flip_entropy" in names or "flip_variance" in names:
        tta = nets.flips("result", flip_axes, progress)
        maps.update({"flip_entropy": tta.entropy, "flip_variance": tta.variance})
    if "mahalanobis" in names:
        prototypes = None if checkpoint.prototypes is None else ClassPrototypes.from_state(checkpoint.prototypes)
        check_compatible(prototypes, checkpoint.seg_config.channels[0], k)
        assert prototypes is not None
        maps["mahalanobis"] = mahalanobis_map(nets.net("result"), prepared.image, spec, prototypes, nets.device,
                                              inference.batch_size, inference.amp, progress)
    if "disagreement" in names:
        maps["disagreement"] = probability_disagreement(nets.probabilities("source"), nets.probabilities("result"))
    if "ensemble_entropy" in names:
        maps["ensemble_entropy"] = ensemble_entropy([nets.flips(n, flip_axes, progress).mean
                                                     for n in ("source", "result")], checkpoint.temperature)
    on_input = {name: prepared.to_input_grid(values, is_label=False).astype(np.float32)
                for name, values in maps.items() if name in names}
    if "label_disagreement" in names:
        source = result.label_maps.get("pseudo_labels")
        if source is None:
            indices = nets.probabilities("source").argmax(axis=0)
            source = indices_to_values(prepared.to_input_grid(indices, is_label=True), checkpoint.classes)
        on_input["label_disagreement"] = label_disagreement(source, result.labels)
    result.maps.update(on_input)
    result.structure_stats = structure_statistics(result.labels, result.classes, result.geometry, result.maps)
    review_uncertainty(result, spec.modality, prepared.to_input_grid(prepared.foreground, True), table,
                       target_modality)
    return result
