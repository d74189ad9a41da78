"""Measures of how well a map finds errors (voxel AUROC, AUPRC), expected calibration error and
Spearman's correlation, against brute-force references, SciPy and hand-computed examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, spearmanr

from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.evaluation.uncertainty_metrics import (expected_calibration_error, spearman,
                                                            voxel_auprc, voxel_auroc)


def pairwise_auroc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Brute force: over every (wrong, correct) pair, 1 when the wrong voxel scores higher,
    1/2 on a tie."""
    wrong, right = scores[errors], scores[~errors]
    total = sum(1.0 if w > r else 0.5 if w == r else 0.0 for w, r in itertools.product(wrong, right))
    return total / (len(wrong) * len(right))


def threshold_sweep_ap(scores: np.ndarray, errors: np.ndarray) -> float:
    """Brute force: every distinct score as a threshold (flag >= t), highest first;
    AP = sum of (recall step) x precision."""
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        tp = np.count_nonzero(flagged & errors)
        recall = tp / errors.sum()
        ap += (recall - previous_recall) * tp / flagged.sum()
        previous_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_the_pairwise_definition_and_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(7, 9)).astype(np.float32)  # many ties
    errors = rng.random((7, 9)) < 0.15 + 0.1 * scores
    expected = pairwise_auroc(scores.ravel(), errors.ravel())
    assert voxel_auroc(scores, errors) == pytest.approx(expected, abs=1e-12)
    u = mannwhitneyu(scores[errors], scores[~errors]).statistic
    assert voxel_auroc(scores, errors) == pytest.approx(u / (errors.sum() * (~errors).sum()), abs=1e-12)


def test_auroc_hand_computed_perfect_inverted_and_tied():
    errors = np.array([True, True, False, False])
    assert voxel_auroc(np.array([0.9, 0.8, 0.1, 0.2]), errors) == 1.0
    assert voxel_auroc(np.array([0.1, 0.2, 0.9, 0.8]), errors) == 0.0
    # wrong {0.5, 0.2} vs right {0.5, 0.1}: pairs 0.5/0.5 tie, 0.5>0.1, 0.2<0.5, 0.2>0.1 -> 2.5/4
    assert voxel_auroc(np.array([0.5, 0.2, 0.5, 0.1]), errors) == pytest.approx(0.625)


def test_auroc_of_a_constant_map_is_one_half_and_undefined_without_both_kinds():
    errors = np.array([True, False, False, True, False])
    assert voxel_auroc(np.full(5, 0.3), errors) == 0.5
    assert np.isnan(voxel_auroc(np.arange(5.0), np.zeros(5, bool)))   # no wrong voxel
    assert np.isnan(voxel_auroc(np.arange(5.0), np.ones(5, bool)))    # no correct voxel


def test_auroc_only_counts_voxels_inside_the_mask():
    scores = np.array([[0.9, 0.1], [0.8, 0.95]])
    errors = np.array([[True, False], [False, False]])
    mask = np.array([[True, True], [True, False]])  # the confident-but-correct 0.95 is outside
    assert voxel_auroc(scores, errors, mask) == 1.0
    assert voxel_auroc(scores, errors) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_auprc_matches_a_threshold_sweep(seed):
    rng = np.random.default_rng(10 + seed)
    scores = rng.integers(0, 5, size=40).astype(np.float64)
    errors = rng.random(40) < 0.1 + 0.12 * scores
    assert voxel_auprc(scores, errors) == pytest.approx(threshold_sweep_ap(scores, errors), abs=1e-12)


def test_auprc_hand_computed_and_constant_map_gives_prevalence():
    # scores 0.9 (wrong), 0.8 (right), 0.7 (wrong), 0.1 (right):
    # t=0.9: P 1, R 1/2; t=0.8: P 1/2, R 1/2; t=0.7: P 2/3, R 1 -> AP = 1/2*1 + 1/2*2/3 = 5/6
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    errors = np.array([True, False, True, False])
    assert voxel_auprc(scores, errors) == pytest.approx(5 / 6)
    assert voxel_auprc(np.zeros(10), np.arange(10) < 3) == pytest.approx(0.3)
    assert np.isnan(voxel_auprc(np.arange(4.0), np.zeros(4, bool)))
    # ties enter together: {0.5 wrong, 0.5 right} at one threshold -> precision 1/2 at recall 1
    assert voxel_auprc(np.array([0.5, 0.5, 0.1]), np.array([True, False, False])) == pytest.approx(0.5)


def test_metrics_refuse_nan_and_mismatched_shapes():
    with pytest.raises(InputError, match="NaN"):
        voxel_auroc(np.array([np.nan, 1.0]), np.array([True, False]))
    with pytest.raises(InputError, match="shape"):
        voxel_auprc(np.zeros(4), np.zeros(5, bool))
    with pytest.raises(InputError, match="mask"):
        voxel_auroc(np.zeros(4), np.zeros(4, bool), np.ones(3, bool))


def test_ece_hand_computed_with_equal_width_bins():
    # two classes, four voxels; top-label confidences 0.9, 0.9, 0.6, 0.6
    p1 = np.array([0.9, 0.9, 0.4, 0.6])
    probs = np.stack([1 - p1, p1])
    labels = np.array([1, 0, 0, 0])  # correct: yes, no, yes, no
    # 5 bins: (0.8, 1.0] holds 0.9, 0.9 -> acc 0.5, conf 0.9; (0.4, 0.6] holds 0.6, 0.6 -> acc 0.5, conf 0.6
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(0.5 - 0.6)
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected)
    # one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.5 - 0.75))


def test_ece_puts_a_confidence_on_a_bin_edge_in_the_lower_bin_and_is_zero_when_calibrated():
    # confidence exactly 0.6 with 5 bins lies in (0.4, 0.6]; with accuracy 0.6 there: ECE 0
    probs = np.stack([np.full(5, 0.4), np.full(5, 0.6)])
    labels = np.array([1, 1, 1, 0, 0])
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(0.0, abs=1e-12)
    mask = np.array([True, True, True, True, False])  # accuracy 3/4 inside the mask
    assert expected_calibration_error(probs, labels, mask, bins=5) == pytest.approx(0.15)
    assert np.isnan(expected_calibration_error(probs, labels, np.zeros(5, bool)))


def test_spearman_matches_scipy_and_is_nan_when_undefined(rng):
    x = rng.integers(0, 5, 30).astype(float)
    y = x + rng.normal(0, 2, 30)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert np.isnan(spearman([1.0], [2.0]))
    # a structure missing from one case (NaN mean) is left out
    assert spearman([1, np.nan, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)
