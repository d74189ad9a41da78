"""HEAL hierarchical denoising of pseudo-labels: voxel entropy, then NIG variance.

Notation (HEAL paper; see the project's RESEARCH notes):

- ``P``: class probabilities ``(C, *S)`` of the frozen source model, background first.
- ``Y_T = argmax_c P``: pseudo-labels (class indices ``0..C-1``, 0 = background).
- ``H``: voxel entropy of ``P``; ``Y_ent``: ``Y_T`` with voxels of ``H > tau1`` set to 0.
- ``E``: regional entropy (mean of ``H`` over the 3x3(x3) window, or the public code's
  histogram variant), divided by its largest possible value so that it lies in [0, 1]
  (``HEALConfig.normalize_regional``; no change for binary tasks).
- ``alpha, beta, omega``: Normal-Inverse-Gamma parameters per voxel; ``Var``: its epistemic
  variance, min-max normalised; ``Y*``: voxels of normalised ``Var > tau2`` set to 0.

``*S`` is ``(y, x)`` for 2D and ``(z, y, x)`` for 3D. Every function returns new arrays and
never writes into its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import uniform_filter

from ..config import HEALConfig
from ..errors import InputError
from ..uncertainty.entropy import check_probabilities, spatial_chunks, voxel_entropy
from ..utils.progress import ProgressReporter, report

#: An axis whose spacing exceeds this multiple of the finest spacing gets a window of 1 voxel.
ANISOTROPY_RATIO = 3.0
#: Number of bins of the histogram variant of the regional entropy (public code).
HISTOGRAM_BINS = 10

REGIONAL_MODES = ("mean", "histogram")
REFINE_BASES = ("entropy", "pseudo")


@dataclass
class DenoiseResult:
    """Every intermediate of :func:`hierarchical_denoise` (all arrays shaped ``*S``).

    Attributes:
        pseudo: ``Y_T``, argmax class indices (uint8, or int32 for more than 256 classes).
        entropy: ``H``, voxel entropy in ``HEALConfig.entropy_base`` units, float32.
        y_ent: ``Y_ent``, entropy-refined labels (dtype of ``pseudo``).
        regional: ``E``, regional entropy, float32 (normalised to [0, 1] when
            ``HEALConfig.normalize_regional``).
        alpha, beta, omega: NIG parameters, float32.
        variance: raw NIG variance ``beta / (omega * (alpha - 1))``, float32.
        variance_normalized: ``variance`` min-max scaled to ``[0, 1]``, float32.
        refined: ``Y*``, the denoised pseudo-labels (dtype of ``pseudo``).
        window: neighbourhood size per spatial axis used for ``E``.
    """

    pseudo: np.ndarray
    entropy: np.ndarray
    y_ent: np.ndarray
    regional: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    omega: np.ndarray
    variance: np.ndarray
    variance_normalized: np.ndarray
    refined: np.ndarray
    window: tuple[int, ...]


def _label_dtype(num_classes: int) -> np.dtype:
    """Smallest dtype used here for class-index maps of ``num_classes`` classes."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int32)


def pseudo_labels(probs: np.ndarray, chunk_elements: int = 1 << 24) -> np.ndarray:
    """``Y_T = argmax_c P``, chunked along spatial axis 0.

    Ties go to the lower class index (numpy's argmax), so an exact 50/50 voxel is background.

    Args:
        probs: ``(C, *S)`` class probabilities.
        chunk_elements: as in :func:`voxel_entropy`.

    Returns:
        ``(*S)`` class indices, uint8 (int32 for more than 256 classes).
    """
    check_probabilities(probs)
    spatial = probs.shape[1:]
    out = np.empty(spatial, dtype=_label_dtype(probs.shape[0]))
    for rows in spatial_chunks(spatial, probs.shape[0], chunk_elements):
        out[rows] = np.argmax(probs[:, rows], axis=0)
    return out


def _check_same_shape(**arrays: np.ndarray) -> None:
    """Raise :class:`InputError` when the named arrays do not all have one shape."""
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise InputError(f"Arrays must have the same shape; got {listed}. Pass maps computed "
                         "on the same grid.")


def entropy_refine(pseudo: np.ndarray, entropy: np.ndarray, tau1: float) -> np.ndarray:
    """Entropy denoising: ``Y_ent(v) = Y_T(v)`` if ``H(v) <= tau1`` else 0 (background).

    Args:
        pseudo: ``(*S)`` class indices ``Y_T``.
        entropy: ``(*S)`` voxel entropy ``H``.
        tau1: entropy threshold (0.2 in the paper, in the units of ``entropy``).

    Returns:
        ``(*S)`` ``Y_ent``, same dtype as ``pseudo``.
    """
    _check_same_shape(pseudo=pseudo, entropy=entropy)
    return np.where(entropy > tau1, np.zeros((), pseudo.dtype), pseudo).astype(pseudo.dtype)


def neighbourhood_size(ndim: int, spacing: Optional[Sequence[float]] = None) -> tuple[int, ...]:
    """Window of the regional entropy: 3 voxels along every axis (3x3 / 3x3x3, the paper).

    With ``spacing`` given, an axis whose spacing is more than ``ANISOTROPY_RATIO`` times the
    finest spacing gets a window of 1 voxel (e.g. 0.5 x 0.5 x 5 mm slices -> 1x3x3), so that
    the window does not mix voxels centimetres apart. Isotropic data (the paper's BraTS) is
    unaffected.

    Args:
        ndim: number of spatial axes (2 or 3).
        spacing: mm per array axis, length ``ndim``; None means isotropic.

    Returns:
        Window size per axis.
    """
    if spacing is None:
        return (3,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"Spacing must give {ndim} positive values (mm per array axis); got "
                         f"{spacing}.")
    finest = min(spacing)
    return tuple(1 if s > ANISOTROPY_RATIO * finest else 3 for s in spacing)


def _histogram_bins(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Bin index (of ``HISTOGRAM_BINS`` equal bins on [0, 1]) of each value ``k / (K - 1)``.

    Exact integer arithmetic: ``floor(k * bins / (K - 1))``, the top edge (k = K - 1) falling
    into the last bin, as ``np.histogram`` does with a closed last bin.
    """
    k = labels.astype(np.int64)
    if k.min() < 0 or k.max() > num_classes - 1:
        raise InputError(f"Label map holds values outside 0..{num_classes - 1} "
                         f"([{k.min()}, {k.max()}]); pass class indices, not label values.")
    return np.minimum(k * HISTOGRAM_BINS // max(num_classes - 1, 1), HISTOGRAM_BINS - 1)


def regional_entropy(entropy: Optional[np.ndarray], mode: str = "mean",
                     labels: Optional[np.ndarray] = None, num_classes: Optional[int] = None,
                     size: int | Sequence[int] = 3) -> np.ndarray:
    """Regional entropy ``E(v)`` over the window centred on every voxel.

    Windows that cross the border are completed by repeating the edge voxel (scipy's
    ``mode="nearest"``, the same as the public code's ``np.pad(mode="edge")``).

    Modes:
        ``"mean"`` (paper): ``E(v)`` = mean of ``H`` over the 3x3 (2D) / 3x3x3 (3D) window.
        ``"histogram"`` (public code, here for 2D and 3D): ``E(v) = -sum_b q_b log2 q_b``,
        with ``q_b`` the share of the window's voxels whose value ``Y_ent / (K - 1)`` falls in
        bin ``b`` of 10 equal bins on ``[0, 1]`` (``0 log 0 = 0``; the code adds 1e-6 to every
        bin count instead, which changes E by about 1e-5). Labels are class indices; dividing
        by ``K - 1`` maps them onto [0, 1] as the code's binary 0/255 PNG masks divided by 255
        were. Up to K = 11 classes every class has its own bin and ``E`` is the entropy of the
        class frequencies in the window (at most ``log2 K``); with more classes neighbouring
        classes share bins. ``entropy`` is not used by this mode (it may be None; when given
        its shape must match ``labels``).

    Args:
        entropy: ``(*S)`` voxel entropy ``H`` (``"mean"``).
        mode: ``"mean"`` or ``"histogram"``.
        labels: ``(*S)`` entropy-refined class indices ``Y_ent`` (``"histogram"``).
        num_classes: K, background included (``"histogram"``); None takes ``max(labels) + 1``
            (at least 2), which is only right when the highest class is present.
        size: window size, one int for all axes or one per axis (see
            :func:`neighbourhood_size`).

    Returns:
        ``(*S)`` float32 ``E``.
    """
    if mode not in REGIONAL_MODES:
        raise InputError(f"Unknown regional entropy mode '{mode}'; use one of {REGIONAL_MODES}.")
    if mode == "mean":
        if entropy is None:
            raise InputError("Regional entropy mode 'mean' needs the voxel entropy map.")
        return uniform_filter(np.asarray(entropy, dtype=np.float32), size=size, mode="nearest")
    if labels is None:
        raise InputError("Regional entropy mode 'histogram' needs the entropy-refined label "
                         "map (labels=Y_ent).")
    if entropy is not None:
        _check_same_shape(entropy=entropy, labels=labels)
    if num_classes is None:
        num_classes = max(int(labels.max()) + 1, 2)
    bins = _histogram_bins(labels, num_classes)
    result = np.zeros(labels.shape, dtype=np.float32)
    present = np.flatnonzero(np.bincount(bins.ravel(), minlength=HISTOGRAM_BINS))
    for b in present:
        share = uniform_filter((bins == b).astype(np.float32), size=size, mode="nearest")
        positive = share > 1e-6
        result[positive] -= share[positive] * np.log2(share[positive])
    return result


def regional_entropy_ceiling(mode: str, num_classes: int, base: float = 2.0) -> float:
    """Largest value the regional entropy can take with ``num_classes`` classes (``K``).

    ``"mean"``: the mean of voxel entropies is at most ``log_base K``. ``"histogram"``: the
    entropy (log2) of the bin shares is at most ``log2`` of the number of bins that can be
    occupied, ``min(K, HISTOGRAM_BINS)``. Both are 1 for a binary task with ``base = 2``.

    Args:
        mode: ``"mean"`` or ``"histogram"``.
        num_classes: K, background included (>= 2).
        base: logarithm base of the voxel entropy (``"mean"`` only).

    Returns:
        The ceiling, > 0.
    """
    if mode not in REGIONAL_MODES:
        raise InputError(f"Unknown regional entropy mode '{mode}'; use one of {REGIONAL_MODES}.")
    if num_classes < 2:
        raise InputError(f"num_classes counts the background too and must be >= 2; got {num_classes}.")
    if mode == "mean":
        return float(np.log(num_classes) / np.log(base))
    return float(np.log2(min(num_classes, HISTOGRAM_BINS)))


def nig_parameters(pseudo: np.ndarray, y_ent: np.ndarray, regional: np.ndarray,
                   config: HEALConfig, dtype: type = np.float32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal-Inverse-Gamma parameters per voxel.

    ``alpha = max(kappa * |Y_T - Y_ent| + eps, alpha_floor)``,
    ``beta = zeta1 * (1 - E) + zeta2``, ``omega = 1 / (eta1 * E + eta2)``.

    ``|Y_T - Y_ent|`` is the absolute difference of the class **indices**, as in the public
    code (binary masks there, so 0 or 1); for multi-class maps a removed voxel of class k
    contributes k. With the code's constants (kappa 0.1, eps 1e-3, floor 1.01) alpha is 1.01
    everywhere for up to 10 classes. The formulas assume ``E`` in [0, 1]: ``beta`` turns
    negative where ``E > 1 + zeta2 / zeta1`` (possible for more than two classes unless ``E``
    is normalised, see :func:`regional_entropy_ceiling`), and the variance with it.

    Args:
        pseudo: ``(*S)`` ``Y_T`` class indices.
        y_ent: ``(*S)`` ``Y_ent`` class indices.
        regional: ``(*S)`` regional entropy ``E``.
        config: the constants ``kappa, eps, alpha_floor, zeta1, zeta2, eta1, eta2``.
        dtype: dtype of the returned maps (computed in float64). The variance divides by
            ``alpha - 1 = 0.01``, where float32 keeps only about 5 digits: pass float64 when the
            variance is computed from these maps, as :func:`hierarchical_denoise` does.

    Returns:
        ``(alpha, beta, omega)``, each ``(*S)`` of ``dtype``.

    Raises:
        InputError: ``alpha_floor <= 1`` (the variance would be infinite or negative) or
            ``eta1 * E + eta2 <= 0`` somewhere.
    """
    _check_same_shape(pseudo=pseudo, y_ent=y_ent, regional=regional)
    if not config.alpha_floor > 1:
        raise InputError(f"HEALConfig.alpha_floor must be > 1 (got {config.alpha_floor}); the "
                         "NIG variance divides by alpha - 1. Use the default 1.01.")
    e = np.asarray(regional, dtype=np.float64)
    diff = np.abs(pseudo.astype(np.int64) - y_ent.astype(np.int64))
    alpha = np.maximum(config.kappa * diff + config.eps, config.alpha_floor)
    beta = config.zeta1 * (1.0 - e) + config.zeta2
    denominator = config.eta1 * e + config.eta2
    if denominator.size and denominator.min() <= 0:
        raise InputError("eta1 * E + eta2 must be positive everywhere (omega = 1 / (eta1 * E + "
                         f"eta2)); got eta1={config.eta1}, eta2={config.eta2}. Use eta2 > 0.")
    omega = 1.0 / denominator
    return alpha.astype(dtype), beta.astype(dtype), omega.astype(dtype)


def nig_variance(alpha: np.ndarray, beta: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Epistemic variance of the NIG distribution, ``Var = beta / (omega * (alpha - 1))``.

    This is the standard ``Var[mu] = beta / (nu (alpha - 1))`` with ``nu = omega`` and what
    the public code computes. The HEAL paper prints the inverse, ``omega / (beta (alpha -
    1))``, which is not a variance and whose sign follows ``alpha - 1`` (negative for
    ``alpha < 1``); the code's form is used.

    With alpha at its floor everywhere (the code's constants), ``Var`` is proportional to
    ``(zeta1 (1 - E) + zeta2) (eta1 E + eta2)``: largest near ``E = 0.5`` and smaller towards
    ``E = 0`` and ``E = 1``. That is the published rule, reproduced as is.

    Args:
        alpha, beta, omega: ``(*S)`` NIG parameters, ``alpha > 1``, ``omega > 0``.

    Returns:
        ``(*S)`` float32 variance (computed in float64).

    Raises:
        InputError: ``alpha <= 1`` or ``omega <= 0`` somewhere.
    """
    _check_same_shape(alpha=alpha, beta=beta, omega=omega)
    a = np.asarray(alpha, dtype=np.float64)
    w = np.asarray(omega, dtype=np.float64)
    if a.size and (a.min() <= 1 or w.min() <= 0):
        raise InputError("NIG variance needs alpha > 1 and omega > 0 everywhere (got min "
                         f"alpha {a.min():.4g}, min omega {w.min():.4g}); keep "
                         "HEALConfig.alpha_floor > 1 and eta2 > 0.")
    return (np.asarray(beta, dtype=np.float64) / (w * (a - 1.0))).astype(np.float32)


def minmax_normalize(x: np.ndarray) -> np.ndarray:
    """Scale ``x`` to ``[0, 1]`` by its minimum and maximum (per image, as the public code).

    A constant map (max == min) gives all zeros, so every voxel counts as most certain and
    survives any ``tau2 >= 0``. (The code adds 1e-6 to the range instead; that only differs
    by a factor of ``1 - 1e-6 / range``.)

    Args:
        x: any-shaped finite array.

    Returns:
        float32 array of the same shape.
    """
    values = np.asarray(x, dtype=np.float64)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise InputError("Cannot min-max normalise a map with NaN or infinite values.")
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def nig_refine(pseudo: np.ndarray, y_ent: np.ndarray, variance_normalized: np.ndarray,
               tau2: float, base: str = "entropy") -> np.ndarray:
    """NIG denoising: keep voxels whose normalised variance is ``<= tau2``, others -> 0.

    Args:
        pseudo: ``(*S)`` ``Y_T``.
        y_ent: ``(*S)`` ``Y_ent``.
        variance_normalized: ``(*S)`` min-max normalised NIG variance.
        tau2: threshold (0.2 in the paper).
        base: which labels the kept voxels take. ``"entropy"`` (default, hierarchical):
            ``Y* = Y_ent`` where kept, so voxels removed by the entropy stage stay removed.
            ``"pseudo"`` (the public code, literally): ``Y* = Y_T`` where kept, which can
            bring back voxels the entropy stage removed.

    Returns:
        ``(*S)`` ``Y*``, dtype of ``pseudo``.
    """
    if base not in REFINE_BASES:
        raise InputError(f"Unknown refinement base '{base}'; use one of {REFINE_BASES}.")
    _check_same_shape(pseudo=pseudo, y_ent=y_ent, variance_normalized=variance_normalized)
    source = y_ent if base == "entropy" else pseudo
    kept = np.asarray(variance_normalized) <= tau2
    return np.where(kept, source, np.zeros((), source.dtype)).astype(pseudo.dtype)


def hierarchical_denoise(probs: np.ndarray, config: HEALConfig,
                         spacing: Optional[Sequence[float]] = None,
                         refine_base: str = "entropy",
                         progress: Optional[ProgressReporter] = None) -> DenoiseResult:
    """HEAL's hierarchical denoising of the source model's pseudo-labels.

    ``Y_T = argmax P`` -> entropy stage (``tau1``) -> regional entropy ``E`` (divided by
    :func:`regional_entropy_ceiling` when ``config.normalize_regional``) -> NIG parameters and
    variance -> min-max normalisation -> NIG stage (``tau2``) -> ``Y*``.

    Args:
        probs: ``(C, y, x)`` (2D) or ``(C, z, y, x)`` (3D) class probabilities, background
            first; float16 is fine. Not modified.
        config: HEAL parameters (``tau1, entropy_base, regional_entropy, tau2`` and the NIG
            constants).
        spacing: mm per spatial axis; sets the regional-entropy window (see
            :func:`neighbourhood_size`). None: 3 voxels on every axis.
        refine_base: ``"entropy"`` or ``"pseudo"``, see :func:`nig_refine`.
        progress: optional reporter (stage ``"denoising"``).

    Returns:
        :class:`DenoiseResult` with every intermediate.
    """
    check_probabilities(probs)
    if probs.ndim not in (3, 4):
        raise InputError(f"Class probabilities must be (C, y, x) or (C, z, y, x); got shape "
                         f"{probs.shape}.")
    num_classes = probs.shape[0]
    window = neighbourhood_size(probs.ndim - 1, spacing)
    report(progress, "denoising", 0.0, "Pseudo-labels and voxel entropy")
    pseudo = pseudo_labels(probs)
    entropy = voxel_entropy(probs, base=config.entropy_base)
    y_ent = entropy_refine(pseudo, entropy, config.tau1)
    report(progress, "denoising", 0.4, f"Regional entropy ({config.regional_entropy})")
    regional = regional_entropy(entropy, mode=config.regional_entropy, labels=y_ent,
                                num_classes=num_classes, size=window)
    if config.normalize_regional:
        ceiling = regional_entropy_ceiling(config.regional_entropy, num_classes, config.entropy_base)
        regional = (regional / np.float32(ceiling)).astype(np.float32)
    report(progress, "denoising", 0.7, "NIG variance")
    alpha, beta, omega = nig_parameters(pseudo, y_ent, regional, config, dtype=np.float64)
    variance = nig_variance(alpha, beta, omega)
    alpha, beta, omega = (a.astype(np.float32) for a in (alpha, beta, omega))
    variance_normalized = minmax_normalize(variance)
    refined = nig_refine(pseudo, y_ent, variance_normalized, config.tau2, base=refine_base)
    report(progress, "denoising", 1.0, "Denoised pseudo-labels ready")
    return DenoiseResult(pseudo=pseudo, entropy=entropy, y_ent=y_ent, regional=regional,
                         alpha=alpha, beta=beta, omega=omega, variance=variance,
                         variance_normalized=variance_normalized, refined=refined,
                         window=window)


def nig_variance_map(probs: np.ndarray, spacing: Sequence[float], is_2d: bool,
                     config: HEALConfig = HEALConfig()) -> np.ndarray:
    """HEAL's min-max normalised NIG variance of any network's probabilities, as a map.

    Args:
        probs: ``(K, Z, Y, X)`` probabilities on the network grid (``Z`` = 1 for a 2D image).
        spacing: the network grid's spacing, ``(z, y, x)`` mm.
        is_2d: the grid holds one 2D image (``Z`` = 1): the regional entropy is taken in 2D.
        config: the denoising constants.

    Returns:
        ``(Z, Y, X)`` float map in [0, 1].
    """
    if is_2d:
        return hierarchical_denoise(probs[:, 0], config, spacing=spacing[1:]).variance_normalized[None]
    return hierarchical_denoise(probs, config, spacing=spacing).variance_normalized

