"""A guard against adaptation that makes a scan's segmentation worse, from label-free signals.

GMM adaptation changes the segmentation a lot, in both directions: on real BraTS scans it
raised the whole tumour's Dice by up to about 30 points on some patients and lowered it by up to
about 50 on others. No ground truth is available at the target, so the guard compares the adapted
prediction with the source model's own prediction of the same scan, and the adaptation's record
(sliced Wasserstein distance, entropy). Which signal separates the scans made worse, and where
its threshold lies, was measured on the development benchmark
(``Testing/benchmarks/bench_brats.py``; the figures are in the README): the guard keeps the
source prediction when the adapted foreground agrees with the source foreground less than
``GMMConfig.guard_agreement`` (Dice), and says so.

Label maps hold class indices ``0..K-1`` (0 = background), ``(Z, Y, X)``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..uncertainty.entropy import voxel_entropy


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty (they agree)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def adaptation_signals(source: np.ndarray, adapted: np.ndarray, body: np.ndarray, num_classes: int,
                       source_probabilities: Optional[np.ndarray] = None,
                       adapted_probabilities: Optional[np.ndarray] = None) -> dict[str, float]:
    """Label-free comparison of an adapted prediction with the source model's.

    Args:
        source, adapted: ``(Z, Y, X)`` class indices of the source and the adapted model.
        body: ``(Z, Y, X)`` body mask (where the entropy means are taken).
        num_classes: K, background included.
        source_probabilities, adapted_probabilities: optional ``(K, Z, Y, X)`` probabilities
            for the entropy signals.

    Returns:
        ``foreground_agreement`` (Dice of the two foregrounds), ``class_agreement`` (mean Dice
        per foreground class), ``foreground_volume_log_ratio`` (``log((V_adapted + 1) /
        (V_source + 1))`` in voxels), ``changed_share`` (share of body voxels whose class
        changed), and with probabilities ``entropy_before``, ``entropy_after`` (mean voxel
        entropy in the body, bits) and ``entropy_drop``.
    """
    fg_source, fg_adapted = source > 0, adapted > 0
    signals = {
        "foreground_agreement": _dice(fg_source, fg_adapted),
        "class_agreement": float(np.mean([_dice(source == k, adapted == k) for k in range(1, num_classes)])),
        "foreground_volume_log_ratio": float(np.log((fg_adapted.sum() + 1.0) / (fg_source.sum() + 1.0))),
        "changed_share": float((source != adapted)[body].mean()) if body.any() else 0.0,
    }
    if source_probabilities is not None and adapted_probabilities is not None and body.any():
        signals["entropy_before"] = float(voxel_entropy(source_probabilities)[body].mean())
        signals["entropy_after"] = float(voxel_entropy(adapted_probabilities)[body].mean())
        signals["entropy_drop"] = signals["entropy_before"] - signals["entropy_after"]
    return signals


def guard_fires(signals: dict[str, float], threshold: float) -> bool:
    """True when the adapted foreground agrees with the source's less than ``threshold``
    (``threshold`` 0 disables the guard)."""
    return threshold > 0 and signals["foreground_agreement"] < threshold


def guard_message(signals: dict[str, float], threshold: float) -> str:
    """The warning a user reads when the guard kept the source prediction."""
    return (f"GMM adaptation changed this scan's segmentation too much to trust (the adapted "
            f"foreground agrees with the source model's at Dice {signals['foreground_agreement']:.2f}, "
            f"below {threshold:.2f}); on the development benchmark such changes were mostly losses, so the "
            "source model's segmentation was kept. The adapted one is in the label map 'gmm_adapted_labels'. "
            "Set the guard to 0 to always use the adapted segmentation.")
