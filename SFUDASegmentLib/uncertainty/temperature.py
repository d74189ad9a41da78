"""Temperature scaling (Guo et al., ICML 2017), fitted on the source side.

One scalar T divides the logits: ``softmax(z / T)``. T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one; the labels (argmax) never change. T is fitted on
labelled source cases by minimising the negative log-likelihood of their labels, stored in the
checkpoint (``SourceCheckpoint.temperature``; older checkpoints have none) and applied at the
target to the probabilities the uncertainty maps use.

Scaling probabilities is exact: ``softmax(z / T) = softmax(log softmax(z) / T)``, because
``log softmax(z)`` differs from ``z`` by one constant per voxel. So T is fitted on, and applied
to, the probabilities the inference produces (Gaussian-weighted over windows in 3D), never on
raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from ..checkpoint import SourceCheckpoint
from ..config import InferenceConfig
from ..data.geometry import Volume
from ..errors import InputError
from ..inference.preparation import labels_on_network_grid, predict_indices, prepare_input
from ..utils.device import resolve_device
from ..utils.progress import ProgressReporter, report
from .entropy import check_probabilities, spatial_chunks

#: T is searched in ``[1 / MAX_INVERSE, MAX_INVERSE]`` (the NLL is convex in 1/T).
MAX_INVERSE = 20.0
#: Lower clip of probabilities before their logarithm (float16 probabilities reach 0).
LOG_CLIP = 1e-7


@dataclass
class TemperatureFit:
    """The fitted temperature and what it changed on the fitting voxels.

    Attributes:
        temperature: T.
        nll_before, nll_after: mean negative log-likelihood (nats) at T = 1 and at T.
        voxels: body voxels the fit used (a random subset of each case).
        cases: labelled cases.
    """

    temperature: float
    nll_before: float
    nll_after: float
    voxels: int
    cases: int

    def report(self) -> dict[str, Any]:
        """JSON-friendly record (stored in the checkpoint's provenance)."""
        return {"temperature": self.temperature, "nll_before": self.nll_before,
                "nll_after": self.nll_after, "voxels": self.voxels, "cases": self.cases}


def check_temperature(value: Any, where: str = "temperature") -> float:
    """A positive finite float, or InputError naming ``where``."""
    try:
        t = float(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"The {where} must be a number, got {value!r}.") from error
    if not np.isfinite(t) or t <= 0:
        raise InputError(f"The {where} must be positive and finite, got {value!r}. Refit it with "
                         "`sfuda fit-temperature`.")
    return t


def _nll(log_probs: np.ndarray, labels: np.ndarray, inverse_temperature: float) -> float:
    """Mean NLL of ``labels`` under ``softmax(inverse_temperature * log_probs)``; ``(N, K)``."""
    scaled = inverse_temperature * log_probs
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(labels)), labels]))


def nll_optimal_temperature(log_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """The temperature that minimises the NLL of ``labels``.

    Args:
        log_probs: ``(N, K)`` log-probabilities (or logits) of N voxels.
        labels: ``(N,)`` class indices ``0..K-1``.

    Returns:
        ``(T, nll at T = 1, nll at T)``; T in ``[1 / MAX_INVERSE, MAX_INVERSE]``.

    Raises:
        InputError: empty input, mismatched shapes, labels outside ``0..K-1``, non-finite values.
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if log_probs.ndim != 2 or labels.shape != (log_probs.shape[0],) or log_probs.shape[0] == 0:
        raise InputError(f"Temperature fitting needs (N, K) log-probabilities and (N,) labels with N > 0; "
                         f"got {log_probs.shape} and {labels.shape}.")
    if not np.all(np.isfinite(log_probs)):
        raise InputError("The log-probabilities contain NaN or infinite values; clip the "
                         "probabilities before taking their logarithm.")
    if labels.min() < 0 or labels.max() >= log_probs.shape[1]:
        raise InputError(f"Labels must be class indices 0..{log_probs.shape[1] - 1}.")
    labels = labels.astype(np.int64)
    fit = minimize_scalar(lambda b: _nll(log_probs, labels, b), bounds=(1.0 / MAX_INVERSE, MAX_INVERSE),
                          method="bounded", options={"xatol": 1e-5})
    return 1.0 / float(fit.x), _nll(log_probs, labels, 1.0), float(fit.fun)


def apply_temperature(probs: np.ndarray, temperature: float, chunk_elements: int = 1 << 24) -> np.ndarray:
    """``softmax(log P / T)`` at every voxel.

    Args:
        probs: ``(C, *S)`` class probabilities (float16/32/64).
        temperature: T > 0.
        chunk_elements: about how many values are converted to float32 at once.

    Returns:
        ``(C, *S)`` float32 probabilities with the same argmax as ``probs`` (up to ties from
        the clipping at :data:`LOG_CLIP`).
    """
    check_probabilities(probs)
    inverse = np.float32(1.0 / check_temperature(temperature))
    out = np.empty(probs.shape, dtype=np.float32)
    for rows in spatial_chunks(probs.shape[1:], probs.shape[0], chunk_elements):
        scaled = np.log(np.clip(probs[:, rows].astype(np.float32), LOG_CLIP, 1.0)) * inverse
        scaled -= scaled.max(axis=0, keepdims=True)
        np.exp(scaled, out=scaled)
        out[:, rows] = scaled / scaled.sum(axis=0, keepdims=True)
    return out


def fit_temperature(checkpoint: SourceCheckpoint, images: Sequence[Volume], labels: Sequence[Volume],
                    inference: InferenceConfig = InferenceConfig(), max_voxels: int = 200_000, seed: int = 0,
                    progress: Optional[ProgressReporter] = None) -> tuple[SourceCheckpoint, TemperatureFit]:
    """Fit T on labelled source cases and return a copy of the checkpoint that carries it.

    Each case is segmented as at inference (float32 probabilities); up to
    ``max_voxels / len(images)`` of its body voxels, drawn at random, enter the fit. Cases the
    model was not trained on (its validation cases) give an honest T; its training cases give a
    T that is too low, since the model fits them better than any new scan.

    Args:
        checkpoint: the source checkpoint (not modified).
        images, labels: labelled source-modality cases (same geometry per pair).
        inference: device and batch settings (the probability dtype is forced to float32).
        max_voxels: voxels used in all (memory: ``max_voxels * K`` float64).
        seed: seeds the voxel draw.
        progress: progress reporter (stage ``"temperature"``).

    Returns:
        ``(checkpoint with temperature and provenance["temperature"], the fit)``.

    Raises:
        InputError: no cases, unequal counts, bad images or labels, no body voxels.
    """
    if not images or len(images) != len(labels):
        raise InputError(f"Got {len(images)} images and {len(labels)} label maps; give one label map per "
                         "image (labelled source cases, ideally ones the model was not trained on).")
    if int(max_voxels) < len(images):
        raise InputError(f"max_voxels ({max_voxels}) must be at least the number of cases ({len(images)}).")
    device = resolve_device(inference.device)
    config = replace(inference, probabilities_dtype="float32")
    model = checkpoint.build_segmentation_net(device)
    k = checkpoint.num_classes
    rng = np.random.default_rng(seed)
    per_case = int(max_voxels) // len(images)
    rows, truths = [], []
    for i, (image, label) in enumerate(zip(images, labels)):
        prepared = prepare_input(image, checkpoint.input_spec, f"case {i + 1}")
        truth = labels_on_network_grid(label, checkpoint.classes, prepared, f"case {i + 1}")
        _, probs = predict_indices(model, prepared.image, checkpoint.input_spec, k, config, device, True)
        assert probs is not None
        body = np.flatnonzero(prepared.foreground.ravel())
        chosen = rng.choice(body, size=min(per_case, body.size), replace=False) if body.size else body
        rows.append(np.log(np.clip(probs.reshape(k, -1)[:, chosen].T, LOG_CLIP, 1.0)))
        truths.append(truth.ravel()[chosen])
        report(progress, "temperature", (i + 1) / len(images), f"case {i + 1}/{len(images)}")
    log_probs, truth = np.concatenate(rows), np.concatenate(truths)
    if truth.size == 0:
        raise InputError("The labelled cases have no body voxels to fit a temperature on.")
    temperature, before, after = nll_optimal_temperature(log_probs, truth)
    fit = TemperatureFit(temperature, before, after, int(truth.size), len(images))
    provenance = dict(checkpoint.provenance)
    provenance["temperature"] = fit.report()
    return replace(checkpoint, temperature=temperature, provenance=provenance), fit
