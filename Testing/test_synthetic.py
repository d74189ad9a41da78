"""Tests of the seeded two-modality phantoms (SFUDASegmentLib.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SFUDASegmentLib.config import LabelClass
from SFUDASegmentLib.data.synthetic import (
    PHANTOM_CLASSES, SOURCE_CONTRASTS, TARGET_CONTRASTS, make_anatomy, make_phantom,
    make_phantom_set, phantom_geometry, render, render_settings)
from SFUDASegmentLib.errors import InputError

SHAPE_2D = (64, 64)
SHAPE_3D = (16, 32, 32)
SEEDS = (0, 1, 2, 3, 4)


def _tissue_means(image: np.ndarray, labels: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """Mean intensity of the unlabelled body and of each labelled structure."""
    means = {"body": float(image[body & (labels == 0)].mean())}
    for cls in PHANTOM_CLASSES:
        means[cls.name] = float(image[labels == cls.value].mean())
    return means


# --------------------------------------------------------------------------- metadata


def test_phantom_classes_are_three_distinct_label_classes():
    assert all(isinstance(c, LabelClass) for c in PHANTOM_CLASSES)
    assert [c.value for c in PHANTOM_CLASSES] == [1, 2, 3]
    assert [c.name for c in PHANTOM_CLASSES] == ["organ", "vessel", "lesion"]
    colours = [c.color for c in PHANTOM_CLASSES]
    assert len(set(colours)) == 3
    assert all(len(c) == 3 and all(0.0 <= v <= 1.0 for v in c) for c in colours)
    assert make_phantom(SHAPE_2D, 0).classes == PHANTOM_CLASSES


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_same_seed_gives_identical_arrays(shape):
    a, b = make_phantom(shape, 7), make_phantom(shape, 7)
    for name in ("source", "target", "labels"):
        np.testing.assert_array_equal(getattr(a, name).array, getattr(b, name).array)
    np.testing.assert_array_equal(a.body, b.body)


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_different_seeds_give_different_labels(shape):
    labels = [make_phantom(shape, s).labels.array for s in (0, 1, 2)]
    assert not np.array_equal(labels[0], labels[1])
    assert not np.array_equal(labels[1], labels[2])


def test_gap_changes_only_the_target_appearance():
    low, high = make_phantom(SHAPE_2D, 3, gap=0.2), make_phantom(SHAPE_2D, 3, gap=0.9)
    np.testing.assert_array_equal(low.labels.array, high.labels.array)
    np.testing.assert_array_equal(low.source.array, high.source.array)
    assert not np.allclose(low.target.array, high.target.array)


def test_phantom_set_is_deterministic_with_different_anatomies():
    first = make_phantom_set(3, SHAPE_2D, seed=11, gap=0.5)
    again = make_phantom_set(3, SHAPE_2D, seed=11, gap=0.5)
    assert len(first) == 3
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.target.array, b.target.array)
        np.testing.assert_array_equal(a.labels.array, b.labels.array)
        assert a.gap == 0.5
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(first[i].labels.array, first[j].labels.array)
    other = make_phantom_set(3, SHAPE_2D, seed=12)
    assert not np.array_equal(first[0].labels.array, other[0].labels.array)
    # case i is make_phantom with the documented derived seed
    case_seed = int(np.random.SeedSequence(11).generate_state(3, dtype=np.uint32)[1])
    np.testing.assert_array_equal(make_phantom(SHAPE_2D, case_seed, gap=0.5).labels.array,
                                  first[1].labels.array)


# --------------------------------------------------------------------------- anatomy


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D, (24, 48, 48)])
def test_every_label_present_with_size_ordering_and_fractions(shape):
    for seed in SEEDS:
        phantom = make_phantom(shape, seed)
        labels, body = phantom.labels.array, phantom.body
        counts = [int((labels == v).sum()) for v in (1, 2, 3)]
        assert counts[0] > counts[1] > counts[2] > 0, (seed, counts)
        fractions = np.array(counts) / body.sum()
        assert 0.13 <= fractions[0] <= 0.26, (seed, fractions)
        assert 0.028 <= fractions[1] <= 0.065, (seed, fractions)
        assert 0.0025 <= fractions[2] <= 0.0100, (seed, fractions)


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_types_and_labels_inside_a_body_clear_of_the_border(shape):
    for seed in SEEDS:
        phantom = make_phantom(shape, seed)
        labels, body = phantom.labels.array, phantom.body
        assert labels.dtype == np.uint8 and body.dtype == bool
        assert labels.shape == body.shape == phantom.source.array.shape == shape
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        assert body[labels > 0].all()
        for axis in range(body.ndim):
            assert not body.take(0, axis=axis).any() and not body.take(-1, axis=axis).any()
        # the body is one piece and a large part of the image
        assert ndimage.label(body)[1] == 1
        assert 0.15 < body.mean() < 0.8


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_shapes_are_not_boxes_and_the_vessel_is_elongated(shape):
    for seed in SEEDS:
        phantom = make_phantom(shape, seed)
        labels = phantom.labels.array
        organ = np.argwhere(labels == 1)
        box = np.prod(organ.max(axis=0) - organ.min(axis=0) + 1)
        assert len(organ) / box < 0.9, seed
        # ratio of the principal extents of the vessel, in mm
        vessel = np.argwhere(labels == 2) * np.asarray(phantom.labels.spacing)
        eigen = np.linalg.eigvalsh(np.cov(vessel.T))
        assert np.sqrt(eigen[-1] / eigen[0]) > 1.8, seed


def test_lesion_sometimes_touches_the_organ_and_sometimes_not():
    touching = []
    for seed in range(12):
        labels = make_phantom(SHAPE_2D, seed).labels.array
        ring = ndimage.binary_dilation(labels == 3) & (labels != 3)
        touching.append(bool((labels[ring] == 1).any()))
    assert any(touching) and not all(touching)


def test_anisotropic_spacing_keeps_the_anatomy_roughly_isotropic_in_mm():
    phantom = make_phantom((24, 48, 48), 0)  # default spacing (2, 1, 1): a 48 mm cube
    body = phantom.body
    extent_mm = [np.ptp(np.nonzero(body.any(axis=tuple(a for a in range(3) if a != k)))[0])
                 * phantom.labels.spacing[k] for k in range(3)]
    assert 0.7 < extent_mm[0] / extent_mm[1] < 1.4


def test_make_anatomy_is_driven_only_by_the_generator():
    a = make_anatomy(SHAPE_2D, None, np.random.default_rng(5))
    b = make_anatomy(SHAPE_2D, None, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --------------------------------------------------------------------------- geometry


def test_geometry_defaults_and_origin():
    p3 = make_phantom(SHAPE_3D, 0)
    g = p3.labels.geometry
    assert g.spacing == (2.0, 1.0, 1.0)
    # centred grid (z: -15 mm, y/x: -15.5 mm) shifted by (12.5, -31, 47) in x, y, z order
    assert g.origin == pytest.approx((-3.0, -46.5, 32.0))
    assert g.direction == pytest.approx(tuple(np.eye(3).ravel()))
    assert p3.source.geometry == g and p3.target.geometry == g

    g2 = make_phantom((32, 48), 0).labels.geometry
    assert g2.spacing == (1.0, 1.0)
    assert g2.origin == pytest.approx((-11.0, -46.5))

    custom = make_phantom(SHAPE_3D, 0, spacing=(1.5, 0.8, 0.8))
    assert custom.source.spacing == (1.5, 0.8, 0.8)
    assert phantom_geometry(SHAPE_3D, (1.5, 0.8, 0.8)) == custom.labels.geometry


# --------------------------------------------------------------------------- appearance


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_images_are_finite_float32(shape):
    for gap in (0.0, 0.5, 1.0):
        phantom = make_phantom(shape, 1, gap=gap)
        for image in (phantom.source.array, phantom.target.array):
            assert image.dtype == np.float32
            assert np.isfinite(image).all()


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_domain_gap_inverts_organ_and_vessel_relative_to_body(shape):
    for seed in SEEDS:
        phantom = make_phantom(shape, seed)
        labels, body = phantom.labels.array, phantom.body
        src = _tissue_means(phantom.source.array, labels, body)
        tgt = _tissue_means(phantom.target.array, labels, body)
        assert src["organ"] > src["body"] > src["vessel"], (seed, src)
        assert tgt["organ"] < tgt["body"] < tgt["vessel"], (seed, tgt)
        assert src["lesion"] > src["organ"] and tgt["lesion"] > tgt["organ"], (seed, src, tgt)
        # the lesion/organ contrast is lower in the target
        assert tgt["lesion"] - tgt["organ"] < src["lesion"] - src["organ"] + 0.05


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_zero_gap_target_matches_source_means(shape):
    for seed in SEEDS:
        phantom = make_phantom(shape, seed, gap=0.0)
        labels, body = phantom.labels.array, phantom.body
        src = _tissue_means(phantom.source.array, labels, body)
        tgt = _tissue_means(phantom.target.array, labels, body)
        for name in src:
            assert abs(src[name] - tgt[name]) < 0.04, (seed, name, src, tgt)
        # and the source means are the documented contrasts (texture is zero-mean per tissue)
        assert src["body"] == pytest.approx(SOURCE_CONTRASTS.body, abs=0.02)
        assert src["organ"] == pytest.approx(SOURCE_CONTRASTS.organ, abs=0.03)


def test_target_contrasts_move_monotonically_with_gap():
    organ, vessel = [], []
    for gap in (0.0, 0.5, 1.0):
        phantom = make_phantom(SHAPE_2D, 2, gap=gap)
        means = _tissue_means(phantom.target.array, phantom.labels.array, phantom.body)
        organ.append(means["organ"] - means["body"])
        vessel.append(means["vessel"] - means["body"])
    assert organ[0] > organ[1] > organ[2]
    assert vessel[0] < vessel[1] < vessel[2]


def test_render_settings_blend_by_hand():
    half = render_settings("target", 0.5)
    assert half.contrasts.organ == pytest.approx((0.75 + 0.30) / 2)
    assert half.contrasts.vessel == pytest.approx((0.25 + 0.85) / 2)
    assert half.contrasts.lesion == pytest.approx((1.0 + 0.50) / 2)
    assert half.contrasts.body == pytest.approx((0.45 + 0.55) / 2)
    assert half.noise_sigma == pytest.approx(0.04) and half.rician
    assert half.blur_mm == pytest.approx(0.7)
    assert half.bias_log_amplitude == pytest.approx(0.125)
    assert render_settings("target", 0.0).contrasts == SOURCE_CONTRASTS
    assert render_settings("target", 1.0).contrasts == TARGET_CONTRASTS
    source = render_settings("source", 0.3)
    assert source.contrasts == SOURCE_CONTRASTS and source.bias_log_amplitude == 0.0
    assert not source.rician


def test_background_noise_statistics():
    shape = (128, 128)
    empty = np.zeros(shape, dtype=np.uint8)
    no_body = np.zeros(shape, dtype=bool)
    source = render(empty, no_body, "source", np.random.default_rng(0))
    assert abs(source.mean()) < 0.001
    assert source.std() == pytest.approx(0.02, rel=0.03)
    # Rician noise on a zero signal is Rayleigh: mean sigma * sqrt(pi / 2)
    for gap, sigma in ((1.0, 0.06), (0.5, 0.04)):
        target = render(empty, no_body, "target", np.random.default_rng(0), gap=gap)
        assert target.min() >= 0.0
        assert target.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.03)


def test_bias_field_only_in_the_target_and_texture_in_both():
    shape = (96, 96)
    labels = np.zeros(shape, dtype=np.uint8)
    body = np.ones(shape, dtype=bool)
    source = render(labels, body, "source", np.random.default_rng(1))
    target = render(labels, body, "target", np.random.default_rng(1), gap=1.0)

    def smooth_variation(image):
        """Relative standard deviation of the image smoothed well beyond the texture scale."""
        smooth = ndimage.gaussian_filter(image.astype(float), 8)[12:-12, 12:-12]
        return smooth.std() / smooth.mean()

    assert smooth_variation(source) < 0.015
    assert smooth_variation(target) > 0.03
    # texture: the homogeneous body varies more than the noise alone would make it
    assert source.std() > 0.02 * 1.1
    assert source.mean() == pytest.approx(0.45, abs=0.005)


def test_render_does_not_modify_inputs_and_is_reproducible():
    phantom = make_phantom(SHAPE_2D, 4)
    labels, body = phantom.labels.array.copy(), phantom.body.copy()
    one = render(labels, body, "target", np.random.default_rng(9), gap=0.7)
    two = render(labels, body, "target", np.random.default_rng(9), gap=0.7)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(labels, phantom.labels.array)
    np.testing.assert_array_equal(body, phantom.body)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [
    dict(shape=(64,), seed=0), dict(shape=(2, 64, 64, 64), seed=0), dict(shape=(8, 64), seed=0),
    dict(shape=SHAPE_2D, seed=-1), dict(shape=SHAPE_2D, seed=0, gap=1.5),
    dict(shape=SHAPE_2D, seed=0, gap=-0.1), dict(shape=SHAPE_2D, seed=0, spacing=(1.0,)),
    dict(shape=SHAPE_2D, seed=0, spacing=(1.0, 0.0)),
])
def test_make_phantom_rejects_bad_input(kwargs):
    with pytest.raises(InputError):
        make_phantom(**kwargs)


def test_render_and_set_reject_bad_input():
    labels = np.zeros((32, 32), dtype=np.uint8)
    body = np.zeros((32, 32), dtype=bool)
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="modality"):
        render(labels, body, "ct", rng)
    with pytest.raises(InputError):
        render(labels, body[:16], "source", rng)
    with pytest.raises(InputError):
        render(labels + 7, body, "source", rng)
    with pytest.raises(InputError):
        render(labels.astype(float), body, "source", rng)
    with pytest.raises(InputError):
        make_phantom_set(0, SHAPE_2D, seed=0)
