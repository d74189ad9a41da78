"""Paired differences between two methods scored on the same cases: the mean difference with a
Student-t confidence interval, and how many cases gained or lost.

With a handful of cases (the development benchmark has ten per direction) the t interval is the
standard choice for a mean of paired differences; it assumes the differences are roughly
normal, so the counts of gains and losses are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from ..errors import InputError


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``method - baseline`` over cases.

    Attributes:
        mean: mean paired difference.
        low, high: bounds of the two-sided confidence interval (NaN with one case).
        n: number of cases.
        gains, losses: cases where the method is above / below the baseline.
    """

    mean: float
    low: float
    high: float
    n: int
    gains: int
    losses: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely above or entirely below zero."""
        return self.low > 0 or self.high < 0


def paired_difference(method: Sequence[float], baseline: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """Mean difference ``method - baseline`` and its Student-t interval.

    Args:
        method, baseline: one score per case, in the same case order, finite.
        confidence: two-sided coverage of the interval.

    Returns:
        :class:`PairedDifference`; with all differences equal the interval has zero width.

    Raises:
        InputError: different lengths, no cases, non-finite scores or a confidence outside (0, 1).
    """
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise InputError(f"Paired scores need two equally long, non-empty lists (got {a.shape} and {b.shape}).")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InputError("Paired scores must be finite; drop or replace NaN/inf scores first.")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}.")
    d = a - b
    n = d.size
    mean = float(d.mean())
    if n == 1:
        low = high = math.nan
    else:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
        low, high = mean - half, mean + half
    return PairedDifference(mean, low, high, n, int((d > 0).sum()), int((d < 0).sum()))
