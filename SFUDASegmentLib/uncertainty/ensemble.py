"""The source and the adapted network as an ensemble: the entropy of their mean probabilities.

After GMM adaptation the adapted network is sure of itself in places where it is wrong, and its
own entropy says so (the spinal-cord observation of issue 15; on real BraTS T2 -> FLAIR its
entropy found its errors worse than the entropy before adaptation found the source model's).
The source network was never pulled towards the target, so where the two part ways the mean of
their probabilities stays uncertain; averaging each network over flipped copies of the scan
(``flip_tta.py``) adds the spread of its predictions under mirroring. When the checkpoint
carries a temperature fitted on the source side (``temperature.py``), each network's
flip-averaged probabilities are temperature-scaled before they are averaged, so that neither
member weighs in with the over- or under-confidence the source model was measured to have.
GMM's default overlay, ``ensemble_entropy``, is the entropy of that mean over both networks and
the 4 in-plane flips (README, "Do the uncertainty maps find the errors?").

``*S`` is ``(y, x)`` or ``(z, y, x)``; probabilities are ``(K, *S)``, background first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from .entropy import check_probabilities, voxel_entropy
from .temperature import apply_temperature


def ensemble_entropy(members: Sequence[np.ndarray], temperature: Optional[float] = None) -> np.ndarray:
    """Entropy (bits) of the mean class probabilities of several members.

    Args:
        members: M >= 1 arrays ``(K, *S)`` of class probabilities on one grid (float16/32/64),
            e.g. the flip-averaged probabilities of the source and of the adapted network.
        temperature: T > 0 fitted on the source side (the checkpoint's); each member becomes
            ``softmax(log P / T)`` before the mean. None: the members as given.

    Returns:
        ``(*S)`` float32 in ``[0, log2 K]``.

    Raises:
        InputError: no members, arrays that are not probabilities, members of different
            shapes, or a temperature that is not a positive number.
    """
    if not members:
        raise InputError("An ensemble entropy needs the probabilities of at least one network.")
    for probs in members:
        check_probabilities(probs)
    shapes = {p.shape for p in members}
    if len(shapes) > 1:
        raise InputError(f"The ensemble's probabilities must share one shape (K, *S); got {sorted(shapes)}.")
    mean = np.zeros(members[0].shape, dtype=np.float32)
    for probs in members:
        mean += probs.astype(np.float32) if temperature is None else apply_temperature(probs, temperature)
    mean /= len(members)
    return voxel_entropy(mean)
