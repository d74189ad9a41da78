"""The chance that the shown label is wrong: one minus the support the networks behind a result
give to the label each voxel shows.

``e(v) = 1 - (1/M) sum_m P_m(y(v) | v)`` for the result's labels ``y`` and the class
probabilities ``P_1 .. P_M`` of the networks behind it: the source network alone for no
adaptation and HEAL, the source and the adapted network for GMM; with flip test-time
augmentation each ``P_m`` is the network's mean over the flipped inputs.

Why this map and not the entropy: the entropy spreads over every class, this one asks only
about the label on screen. On the real-BraTS T2 -> FLAIR benchmark it found the unadapted
model's errors better than the entropy on all 10 patients (README, "Do the uncertainty maps
find the errors?"). After GMM the adapted network alone is sure of itself where it is wrong; the
source network's doubt about the adapted label keeps the map honest, which is why GMM's map
averages both.

``*S`` is ``(y, x)`` or ``(z, y, x)``; probabilities are ``(K, *S)``, background first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .entropy import check_probabilities


def label_error(probabilities: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """One minus the mean probability the networks give to the shown label, per voxel.

    Args:
        probabilities: M >= 1 arrays ``(K, *S)`` of class probabilities on one grid (one per
            network; float16/32/64).
        labels: ``(*S)`` integer class indices in ``[0, K)`` (the labels the result shows).

    Returns:
        ``(*S)`` float32 in ``[0, 1]``: 0 where every network puts all its mass on the shown
        label, 1 where none puts any there.

    Raises:
        InputError: no probabilities, arrays that are not probabilities or differ in shape,
            labels of another shape, not integers, or outside ``[0, K)``.
    """
    if not probabilities:
        raise InputError("The label error needs the probabilities of at least one network.")
    for probs in probabilities:
        check_probabilities(probs)
    shape = probabilities[0].shape
    if any(p.shape != shape for p in probabilities):
        raise InputError(f"The networks' probabilities must share one shape (K, *S); got "
                         f"{[p.shape for p in probabilities]}.")
    labels = np.asarray(labels)
    if labels.shape != shape[1:] or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"The labels must be integer class indices shaped {shape[1:]}; got {labels.dtype} "
                         f"{labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= shape[0]):
        raise InputError(f"The labels hold class indices outside [0, {shape[0]}); convert label values to "
                         "indices first (data/labels.values_to_indices).")
    support = np.zeros(shape[1:], dtype=np.float32)
    for probs in probabilities:
        support += np.take_along_axis(probs, labels[None].astype(np.intp), axis=0)[0].astype(np.float32)
    error = 1.0 - support / len(probabilities)
    np.clip(error, 0.0, 1.0, out=error)
    return error
