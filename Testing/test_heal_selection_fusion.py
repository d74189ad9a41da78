"""HEAL edge-guided candidate selection and size-aware fusion on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from SFUDASegmentLib.config import HEALConfig
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.heal.edge_selection import (
    canny_edges, dilate_in_slice, edge_score, label_edges, select_candidate)
from SFUDASegmentLib.heal.fusion import (
    class_sizes, fusion_weights, size_aware_fusion)
from SFUDASegmentLib.utils.progress import ProgressReporter


def square(size: int = 40, lo: int = 10, hi: int = 30) -> np.ndarray:
    labels = np.zeros((size, size), np.int64)
    labels[lo:hi, lo:hi] = 1
    return labels


# --------------------------------------------------------------------------------------------
# Edge-guided selection


def test_edge_score_by_hand():
    reference = np.zeros((4, 5), bool)
    reference[1, 0:5] = True                      # 5 reference edge pixels
    candidate = np.zeros((4, 5), bool)
    candidate[1, 1:4] = True                      # 3 of them
    candidate[3, 0:5] = True                      # 5 elsewhere: do not count
    assert edge_score(candidate, reference) == 3 / 5
    # Tolerance 1: candidate pixels row 1 cols 1..3 reach cols 0..4 of row 1 -> all 5.
    assert edge_score(candidate, reference, tolerance=1) == 1.0
    moved = np.zeros((4, 5), bool)
    moved[2, 0:2] = True                          # one row below, cols 0, 1 -> covers cols 0..2
    assert edge_score(moved, reference) == 0.0
    assert edge_score(moved, reference, tolerance=1) == 3 / 5
    assert edge_score(candidate, np.zeros((4, 5), bool)) == 0.0
    with pytest.raises(InputError, match="shape"):
        edge_score(candidate, reference[:3])


def test_same_square_beats_shift_and_noise(rng):
    labels = square()
    same = labels.astype(np.float32)
    shifted = np.roll(labels, 3, axis=1).astype(np.float32)
    noise = rng.normal(size=labels.shape).astype(np.float32)
    result = select_candidate(np.stack([noise, shifted, same]), labels, HEALConfig())
    s_noise, s_shift, s_same = result.scores
    assert s_same == 1.0
    assert s_same > s_shift and s_same > s_noise
    assert result.selected_index == 2
    assert not result.reference_edges_empty
    # A brighter, offset copy of the label map with another contrast has the same edges.
    rescaled = 0.3 + 0.5 * labels.astype(np.float32)
    assert edge_score(canny_edges(rescaled), label_edges(labels)) == 1.0


def test_tolerance_forgives_a_one_pixel_shift():
    labels = square()
    shifted = np.roll(labels, 1, axis=0).astype(np.float32)
    exact = select_candidate(shifted[None], labels, HEALConfig(edge_tolerance=0))
    tolerant = select_candidate(shifted[None], labels, HEALConfig(edge_tolerance=1))
    assert exact.scores[0] < 1.0
    assert tolerant.scores[0] == 1.0


def test_empty_reference_edges_fall_back_to_first_candidate(rng):
    labels = np.zeros((20, 20), np.int64)
    candidates = rng.normal(size=(3, 20, 20))
    result = select_candidate(candidates, labels, HEALConfig())
    assert result.reference_edges_empty
    assert result.scores == [0.0, 0.0, 0.0]
    assert result.selected_index == 0


def test_ties_go_to_the_lowest_index(rng):
    labels = square()
    noise = rng.normal(size=labels.shape)
    same = labels.astype(float)
    result = select_candidate(np.stack([noise, same, same]), labels, HEALConfig())
    assert result.scores[1] == result.scores[2] == 1.0
    assert result.selected_index == 1


def test_3d_is_slice_by_slice(rng):
    volume = rng.random((4, 24, 24))
    volume[:, 0, 0] = 0.0   # every slice spans [0, 1], so the volume scale equals the slice's
    volume[:, -1, -1] = 1.0
    volume[:, 6:18, 6:18] += 2.0
    volume /= volume.max()
    volume[:, 0, 0], volume[:, -1, -1] = 0.0, 1.0
    stacked = np.stack([canny_edges(s) for s in volume])
    np.testing.assert_array_equal(canny_edges(volume), stacked)
    labels = np.stack([square(24, 4 + z, 14 + z) for z in range(4)])
    np.testing.assert_array_equal(label_edges(labels), np.stack([label_edges(s) for s in labels]))
    scores = select_candidate(labels[None].astype(float), labels, HEALConfig()).scores
    assert scores == [1.0]


def test_one_intensity_scale_for_the_whole_volume():
    volume = np.zeros((2, 20, 20))
    volume[0, 5:15, 5:15] = 1.0    # bright square in slice 0
    volume[1, 5:15, 5:15] = 0.02   # faint square in slice 1: step 0.02 of the range
    edges = canny_edges(volume, sigma=0.0)
    assert edges[0].any()
    # Sobel magnitude 4 * round(0.02 * 255) = 20 < low threshold 25.5: no edge.
    assert not edges[1].any()
    # On its own the faint slice is rescaled to [0, 1] and has edges.
    assert canny_edges(volume[1], sigma=0.0).any()


def test_thresholds_are_fractions_of_the_unit_range():
    image = np.zeros((20, 30))
    image[:, 10:] = 0.15           # step 0.15: magnitude 4 * 38 = 152 > 51 (high)
    image[0, 29] = 1.0             # sets the range to [0, 1]
    assert canny_edges(image, sigma=0.0)[5:15, 8:12].any()
    assert not canny_edges(image, low=0.7, high=0.8, sigma=0.0)[5:15, 8:12].any()


def test_constant_images_have_no_edges():
    assert not canny_edges(np.full((10, 10), 3.0)).any()
    volume = np.zeros((2, 16, 16))
    volume[0, 4:12, 4:12] = 1.0
    edges = canny_edges(volume)
    assert edges[0].any() and not edges[1].any()


def test_rgb_candidates_are_converted_to_grey():
    labels = square(30, 8, 20)
    grey = labels.astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    shifted = np.roll(rgb, 2, axis=0)
    result = select_candidate(np.stack([shifted, rgb]), labels, HEALConfig())
    assert result.scores[1] == 1.0 and result.selected_index == 1


def test_dilate_in_slice_and_bad_inputs():
    edges = np.zeros((2, 5, 5), bool)
    edges[0, 2, 2] = True
    grown = dilate_in_slice(edges, 1)
    assert grown[0].sum() == 9 and not grown[1].any()   # 3x3 square, never across slices
    with pytest.raises(InputError, match="integer label map"):
        label_edges(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="Candidates"):
        select_candidate(np.zeros((2, 5, 6)), np.zeros((5, 5), int), HEALConfig())
    with pytest.raises(InputError, match="low <= high"):
        canny_edges(np.zeros((4, 4)), low=0.3, high=0.2)


def test_selection_reports_progress():
    events = []
    labels = square(20, 5, 15)
    select_candidate(np.stack([labels, labels]).astype(float), labels, HEALConfig(),
                     progress=ProgressReporter(events.append))
    assert {e.stage for e in events} == {"selection"} and events[-1].fraction == 1.0


# --------------------------------------------------------------------------------------------
# Size-aware fusion

Y_STAR = np.array([[0, 1, 1, 0],
                   [0, 1, 1, 0],
                   [0, 0, 2, 2],
                   [0, 0, 0, 0]])
M_S = np.array([[1, 1, 1, 0],
                [2, 1, 1, 0],
                [2, 2, 0, 0],
                [0, 0, 0, 3]])


def test_class_sizes_and_weights_by_hand():
    sizes = class_sizes(Y_STAR, 4)
    assert sizes == {1: 4, 2: 2, 3: 0}
    weights = fusion_weights(sizes)
    # (1/4) / (1/4 + 1/2) = 1/3, (1/2) / (3/4) = 2/3, absent class: 0.
    assert weights[1] == pytest.approx(1 / 3) and weights[2] == pytest.approx(2 / 3)
    assert weights[3] == 0.0
    assert fusion_weights({1: 0, 2: 0}) == {1: 0.0, 2: 0.0}


def test_smallest_class_comes_from_refined_labels():
    keep_y, keep_m = Y_STAR.copy(), M_S.copy()
    result = size_aware_fusion(Y_STAR, M_S, 4)
    # Class 2 is the smallest present in Y* (2 voxels; class 3 is absent and ignored): M_S's
    # class-2 voxels become background, Y*'s class-2 voxels are painted; 1 and 3 from M_S.
    expected = np.array([[1, 1, 1, 0],
                         [0, 1, 1, 0],
                         [0, 0, 2, 2],
                         [0, 0, 0, 3]])
    np.testing.assert_array_equal(result.labels, expected)
    assert result.smallest_class == 2 and result.fused
    assert result.labels.dtype == M_S.dtype
    np.testing.assert_array_equal(Y_STAR, keep_y)
    np.testing.assert_array_equal(M_S, keep_m)


def test_painting_overrides_other_classes_of_the_segmentation():
    y_star = np.array([[2, 0, 1, 1, 1]])
    m_s = np.array([[1, 2, 1, 1, 0]])
    result = size_aware_fusion(y_star, m_s, 3)
    np.testing.assert_array_equal(result.labels, [[2, 0, 1, 1, 0]])


def test_ties_go_to_the_smaller_class_index():
    y_star = np.array([[1, 1, 2, 2, 3, 3, 3]])
    m_s = np.array([[0, 2, 1, 0, 3, 1, 3]])
    result = size_aware_fusion(y_star, m_s, 4)
    assert result.smallest_class == 1
    np.testing.assert_array_equal(result.labels, [[1, 1, 0, 0, 3, 0, 3]])


def test_no_fusion_without_foreground_or_with_a_single_class():
    empty = size_aware_fusion(np.zeros((2, 3), int), M_S[:2, :3], 4)
    assert not empty.fused and empty.smallest_class is None
    np.testing.assert_array_equal(empty.labels, M_S[:2, :3])
    binary_y = np.array([[0, 1, 1], [0, 0, 1]])
    binary_m = np.array([[1, 1, 0], [0, 0, 0]])
    binary = size_aware_fusion(binary_y, binary_m, 2)
    assert not binary.fused and binary.smallest_class is None
    assert binary.weights == {1: 1.0}
    np.testing.assert_array_equal(binary.labels, binary_m)
    assert binary.labels is not binary_m


def test_fusion_3d_and_bad_inputs():
    y_star = np.zeros((2, 2, 2), np.uint8)
    y_star[0, 0, 0] = 2
    y_star[1] = 1
    m_s = np.full((2, 2, 2), 2, np.uint8)
    result = size_aware_fusion(y_star, m_s, 3)
    expected = np.zeros((2, 2, 2), np.uint8)
    expected[0, 0, 0] = 2
    np.testing.assert_array_equal(result.labels, expected)
    with pytest.raises(InputError, match="class indices"):
        size_aware_fusion(np.array([[0, 4]]), np.array([[0, 1]]), 3)
    with pytest.raises(InputError, match="same shape"):
        size_aware_fusion(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(InputError, match="integer"):
        size_aware_fusion(np.zeros((2, 2)), np.zeros((2, 2), int), 3)
