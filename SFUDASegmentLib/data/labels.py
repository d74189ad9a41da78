"""Mapping between label *values* (what label files hold, e.g. BraTS 1, 2, 4) and class *indices*
(what networks predict: 0 = background, i = ``classes[i - 1]``)."""

from __future__ import annotations

import numpy as np

from ..config import LabelClass
from ..errors import InputError


def values_to_indices(labels: np.ndarray, classes: list[LabelClass], source: str = "label map") -> np.ndarray:
    """Label values -> class indices.

    Args:
        labels: integer label map ``(*S)``.
        classes: foreground classes in network order.
        source: name used in the error message (e.g. a file name).

    Returns:
        ``(*S)`` int64 class indices.

    Raises:
        InputError: the map holds values that are neither 0 nor a class value.
    """
    values = np.unique(labels)
    known = {0} | {c.value for c in classes}
    unexpected = sorted(int(v) for v in values if int(v) not in known)
    if unexpected:
        raise InputError(
            f"{source} contains label values {unexpected} that are not in the class list "
            f"{sorted(known - {0})}. Add them to --labels (e.g. '{unexpected[0]}:name') or "
            "relabel the file.")
    lut = np.zeros(int(max(known | {int(values.max())})) + 1, dtype=np.int64)
    for index, c in enumerate(classes, start=1):
        lut[c.value] = index
    return lut[labels.astype(np.int64)]


def indices_to_values(indices: np.ndarray, classes: list[LabelClass]) -> np.ndarray:
    """Class indices ``(*S)`` -> label values (uint8 when every value fits, else int16)."""
    lut = np.array([0] + [c.value for c in classes])
    dtype = np.uint8 if lut.max() < 256 else np.int16
    return lut.astype(dtype)[indices]
