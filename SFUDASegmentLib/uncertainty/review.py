"""What a reader of a result is told about its uncertainty: which map to look at, how far to
trust it, and where to look first.

Every method calls :func:`review_uncertainty` last; it fills ``Result.reliability`` (the
chosen map and :func:`~.reliability.trust_statement`) and ``Result.review_queue``
(:func:`~.review_queue.review_queue` on that map).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from ..results.result import Result
from .reliability import DEFAULT_TABLE, method_key, recommended_map, trust_statement
from .review_queue import review_queue, suspect_threshold


def review_uncertainty(result: Result, source_modality: Optional[str] = None, body: Optional[np.ndarray] = None,
                       table: Mapping[str, Any] = DEFAULT_TABLE, target_modality: Optional[str] = None,
                       max_regions: int = 10) -> None:
    """Choose the map to show, state how far to trust it and rank the regions to review.

    Args:
        result: a method's result (modified in place: ``reliability`` and ``review_queue``).
        source_modality: the checkpoint's modality (``input_spec.modality``), for the lookup.
        body: ``(*S)`` bool body mask on the input grid; suspect voxels lie inside it.
        table: the reliability table (see ``uncertainty/reliability.py``).
        target_modality: the scan's modality when known.
        max_regions: length of the review queue.
    """
    stages = result.extra.get("heal", {}).get("stages") if result.method == "heal" else None
    key = method_key(result.method, stages)
    name = recommended_map(key, sorted(result.maps), table, source_modality, target_modality)
    statement = trust_statement(key, name, table, source_modality, target_modality)
    if name is None:
        result.review_queue = []
    else:
        values = result.maps[name]
        threshold = suspect_threshold(name, values, body)
        result.review_queue = review_queue(result.labels, values, result.geometry, result.classes, threshold,
                                           body, max_regions=max_regions)
        statement["review_threshold"] = threshold
    result.reliability = statement
