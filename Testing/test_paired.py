"""Paired differences with their t interval, against hand computation and scipy's paired t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.evaluation.paired import paired_difference


def test_hand_computed_example() -> None:
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.302652729911275
    result = paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert result.mean == pytest.approx(2.0)
    assert (result.low, result.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert (result.n, result.gains, result.losses) == (3, 3, 0)
    assert not result.excludes_zero  # 2 - 2.48 < 0


def test_matches_scipy_paired_t_test_interval() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.6, 0.1, 10), rng.normal(0.5, 0.1, 10)
    reference = stats.ttest_rel(a, b).confidence_interval(0.9)
    result = paired_difference(a, b, confidence=0.9)
    assert (result.low, result.high) == pytest.approx((reference.low, reference.high))
    assert result.gains + result.losses == 10


def test_ties_one_case_and_constant_differences() -> None:
    tied = paired_difference([0.5, 0.7], [0.5, 0.6])
    assert (tied.gains, tied.losses) == (1, 0)
    single = paired_difference([0.4], [0.5])
    assert single.mean == pytest.approx(-0.1) and math.isnan(single.low) and not single.excludes_zero
    constant = paired_difference([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    assert constant.low == pytest.approx(0.1) and constant.high == pytest.approx(0.1) and constant.excludes_zero


@pytest.mark.parametrize("a, b, confidence", [([1.0], [1.0, 2.0], 0.95), ([], [], 0.95),
                                              ([math.nan], [1.0], 0.95), ([1.0], [1.0], 1.0)])
def test_bad_input_is_refused(a, b, confidence) -> None:
    with pytest.raises(InputError):
        paired_difference(a, b, confidence)
