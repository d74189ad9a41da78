"""Tests of SFUDASegmentLib.data.preprocess: every transform against its inverse and references."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import read_image, to_sitk
from SFUDASegmentLib.data.preprocess import (CropBox, bounding_box, center_slice_of_stack, crop_to_box,
                                        crop_with_box, cropped_geometry, denormalize_intensity,
                                        foreground_mask, normalize_intensity, pad_to_min_size,
                                        pad_to_multiple, paste_from_box, resample_probabilities,
                                        resample_to_shape, resample_to_spacing, resampled_geometry,
                                        stack_neighbour_slices, target_shape, unpad)
from SFUDASegmentLib.errors import InputError

OBLIQUE = Geometry(spacing=(3.0, 0.8, 0.9), origin=(5.0, -7.0, 11.0),
                   direction=tuple(np.array([[0.0, -1.0, 0.0], [0.6, 0.0, -0.8], [0.8, 0.0, 0.6]]).ravel()))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _blobs(shape=(24, 40, 36)) -> np.ndarray:
    """Label map with two big ellipsoids (labels 1 and 2) in a grid of 3 mm x 0.8 mm x 0.9 mm."""
    z, y, x = np.meshgrid(*(np.arange(n) + 0.5 for n in shape), indexing="ij")
    z, y, x = z * 3.0, y * 0.8, x * 0.9
    labels = np.zeros(shape, np.uint8)
    labels[((z - 36) / 22) ** 2 + ((y - 16) / 9) ** 2 + ((x - 12) / 8) ** 2 < 1] = 1
    labels[((z - 30) / 15) ** 2 + ((y - 17) / 6) ** 2 + ((x - 24) / 6) ** 2 < 1] = 2
    return labels


# --------------------------------------------------------------------------- resampling


def test_label_resampled_there_and_back_keeps_shape_values_and_voxels():
    labels = _blobs()
    before = labels.copy()
    fine, new_spacing = resample_to_spacing(labels, OBLIQUE.spacing, (1.0, 1.0, 1.0), order=0)
    assert fine.shape == (72, 32, 32)  # round(24*3/1), round(40*0.8), round(36*0.9)
    assert fine.dtype == np.uint8 and set(np.unique(fine)) == {0, 1, 2}
    # the new grid spans exactly the old physical extent
    np.testing.assert_allclose(np.array(fine.shape) * new_spacing, np.array(labels.shape) * OBLIQUE.spacing)
    back = resample_to_shape(fine, labels.shape, order=0)
    assert back.shape == labels.shape and back.dtype == np.uint8
    assert np.mean(back == labels) > 0.98
    for value in (1, 2):
        assert _dice(back == value, labels == value) > 0.95
    np.testing.assert_array_equal(labels, before)


def test_target_shape_preserves_extent_to_within_one_voxel():
    shape, spacing, target = (155, 240, 37), (1.0, 0.9375, 4.4), (1.5, 1.5, 1.5)
    new = target_shape(shape, spacing, target)
    assert new == (103, 150, 109)
    np.testing.assert_array_less(np.abs(np.array(new) * 1.5 - np.array(shape) * spacing), 1.5 / 2 + 1e-9)
    with pytest.raises(InputError, match="must be positive"):
        target_shape(shape, (1.0, 0.0, 1.0), target)


def test_linear_resampling_reproduces_a_physical_ramp_with_half_voxel_alignment():
    # f = physical z of the voxel centre, (i + 0.5) * spacing, in a box starting at 0 mm
    n, spacing, m = 10, 2.0, 25
    ramp = np.broadcast_to(((np.arange(n) + 0.5) * spacing)[:, None, None], (n, 3, 4)).astype(np.float32)
    out = resample_to_shape(ramp, (m, 3, 4), order=1)
    new_centres = (np.arange(m) + 0.5) * (n * spacing / m)
    expected = np.clip(new_centres, 0.5 * spacing, (n - 0.5) * spacing)  # edge values extended
    np.testing.assert_allclose(out[:, 1, 2], expected, atol=1e-5)
    assert out.dtype == np.float32


def test_resampled_geometry_matches_simpleitk_physical_resampling(rng):
    smooth = ndimage.gaussian_filter(rng.normal(size=(12, 20, 18)), 2.0).astype(np.float32)
    new_shape = (18, 13, 27)
    ours = resample_to_shape(smooth, new_shape, order=1)
    geom = resampled_geometry(OBLIQUE, smooth.shape, new_shape)
    np.testing.assert_allclose(np.array(geom.spacing) * new_shape, np.array(OBLIQUE.spacing) * smooth.shape)
    grid = to_sitk(Volume(np.zeros(new_shape, np.float32), geom))
    reference = sitk.Resample(to_sitk(Volume(smooth, OBLIQUE)), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    ref = sitk.GetArrayFromImage(reference)
    inner = (slice(2, -2),) * 3  # sitk has no edge extension: compare where both interpolate
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)
    # and back: the geometry of the restored grid is the original one
    restored = resampled_geometry(geom, new_shape, smooth.shape)
    np.testing.assert_allclose(restored.spacing, OBLIQUE.spacing, atol=1e-12)
    np.testing.assert_allclose(restored.origin, OBLIQUE.origin, atol=1e-12)


def test_resample_channel_first_and_integer_image_to_float():
    img = np.arange(2 * 4 * 6, dtype=np.int16).reshape(2, 4, 6)
    out = resample_to_shape(img, (8, 12), order=1)
    assert out.shape == (2, 8, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out[1], resample_to_shape(img[1].astype(np.float32), (8, 12), order=1))
    same = resample_to_shape(img, (4, 6), order=1)
    np.testing.assert_array_equal(same, img.astype(np.float32))


def test_resample_probabilities_sum_to_one_and_match_scipy_zoom(rng):
    logits = ndimage.gaussian_filter(rng.normal(size=(3, 10, 14, 12)), (0, 1.5, 1.5, 1.5)) * 8
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    shape = (15, 21, 18)
    out = resample_probabilities(probs.astype(np.float32), shape)
    assert out.shape == (3,) + shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    zoom = [s / o for s, o in zip(shape, probs.shape[1:])]
    reference = np.stack([ndimage.zoom(p, zoom, order=1, mode="nearest", grid_mode=True) for p in probs])
    assert reference.shape == out.shape
    np.testing.assert_allclose(out, reference, atol=1e-5)
    back = resample_probabilities(out, probs.shape[1:])
    assert np.mean(back.argmax(0) == probs.argmax(0)) > 0.95


# --------------------------------------------------------------------------- crop


def test_crop_and_paste_exact_round_trip_with_margin():
    image = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    mask = np.zeros(image.shape, bool)
    mask[3:5, 4:9, 12] = True
    cropped, box = crop_to_box(image, mask, margin=2)
    assert box.slices == (slice(1, 7), slice(2, 11), slice(10, 14))  # last axis clipped at 14
    assert box.original_shape == (10, 12, 14) and box.start == (1, 2, 10) and box.shape == (6, 9, 4)
    np.testing.assert_array_equal(cropped, image[1:7, 2:11, 10:14])
    pasted = paste_from_box(cropped, box, fill=-1)
    inside = np.zeros(image.shape, bool)
    inside[box.slices] = True
    np.testing.assert_array_equal(pasted[inside], image[inside])
    assert np.all(pasted[~inside] == -1) and pasted.dtype == image.dtype
    cropped[0, 0, 0] = 1e6  # a copy: the input is untouched
    assert image[1, 2, 10] == 1 * 168 + 2 * 14 + 10


def test_crop_channel_first_channel_last_and_per_axis_margin():
    mask = np.zeros((8, 9), bool)
    mask[4, 5] = True
    box = bounding_box(mask, margin=(1, 3))
    assert box.slices == (slice(3, 6), slice(2, 9))
    rgb = np.random.default_rng(3).integers(0, 255, (8, 9, 3)).astype(np.uint8)
    chw = np.moveaxis(rgb, -1, 0).copy()
    np.testing.assert_array_equal(crop_with_box(rgb, box), rgb[3:6, 2:9])
    np.testing.assert_array_equal(crop_with_box(chw, box), chw[:, 3:6, 2:9])
    np.testing.assert_array_equal(paste_from_box(crop_with_box(rgb, box), box)[3:6, 2:9], rgb[3:6, 2:9])
    assert paste_from_box(crop_with_box(chw, box), box).shape == (3, 8, 9)
    whole = bounding_box(np.zeros((4, 5), bool), margin=2)
    assert whole == CropBox((slice(0, 4), slice(0, 5)), (4, 5))
    with pytest.raises(InputError, match="spatial shape"):
        crop_with_box(np.zeros((7, 9)), box)


def test_cropped_geometry_matches_simpleitk_region_of_interest():
    image = np.random.default_rng(1).normal(size=(10, 12, 14)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[4:7, 3:8, 5:9] = True
    cropped, box = crop_to_box(image, mask, margin=1)
    geom = cropped_geometry(OBLIQUE, box)
    roi = sitk.RegionOfInterest(to_sitk(Volume(image, OBLIQUE)), size=box.shape[::-1], index=box.start[::-1])
    np.testing.assert_allclose(geom.origin, roi.GetOrigin(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(roi), cropped)


# --------------------------------------------------------------------------- padding


def test_pad_to_multiple_and_unpad_exact():
    image = np.random.default_rng(2).normal(size=(5, 7, 9)).astype(np.float32)
    padded, pads = pad_to_multiple(image, 4, value=-3.0)
    assert padded.shape == (8, 8, 12)
    assert pads == ((1, 2), (0, 1), (1, 2))
    np.testing.assert_array_equal(padded[1:6, 0:7, 1:10], image)
    assert np.all(padded[0] == -3.0) and np.all(padded[:, 7] == -3.0)
    np.testing.assert_array_equal(unpad(padded, pads), image)
    # channel-first network output of the padded input
    probs = np.stack([padded, padded * 2])
    np.testing.assert_array_equal(unpad(probs, pads), np.stack([image, image * 2]))


def test_pad_channel_first_per_axis_multiple_and_edge_mode():
    image = np.arange(2 * 3 * 5, dtype=np.int32).reshape(2, 3, 5)
    padded, pads = pad_to_multiple(image, (4, 8), mode="edge")
    assert padded.shape == (2, 4, 8) and pads == ((0, 1), (1, 2))
    np.testing.assert_array_equal(padded[:, 3, 1:6], image[:, 2])  # edge row repeated
    np.testing.assert_array_equal(padded[:, 0:3, 0], image[:, :, 0])
    np.testing.assert_array_equal(unpad(padded, pads), image)
    same, pads_int = pad_to_multiple(image, 4, spatial_dims=2)
    assert same.shape == (2, 4, 8) and pads_int == pads


def test_pad_to_min_size_only_grows_small_axes():
    image = np.ones((3, 20, 6), np.uint8)
    padded, pads = pad_to_min_size(image, (8, 16, 9))
    assert padded.shape == (8, 20, 9) and pads == ((2, 3), (0, 0), (1, 2))
    assert padded.sum() == image.sum()
    np.testing.assert_array_equal(unpad(padded, pads), image)


# --------------------------------------------------------------------------- 2.5D


def test_stack_neighbour_slices_middle_channel_and_replicated_edges():
    volume = np.stack([np.full((4, 3), z, np.float32) for z in range(5)])
    stack = stack_neighbour_slices(volume, context=2)
    assert stack.shape == (5, 5, 4, 3)
    # slice index used for (z, channel): clip(z + channel - 2, 0, 4)
    expected = np.clip(np.arange(5)[:, None] + np.arange(-2, 3)[None, :], 0, 4)
    np.testing.assert_array_equal(stack[:, :, 0, 0], expected)
    np.testing.assert_array_equal(stack[:, 2], volume)
    np.testing.assert_array_equal(center_slice_of_stack(stack, context=2), volume)
    assert stack_neighbour_slices(volume, 0).shape == (5, 1, 4, 3)


def test_stack_neighbour_slices_with_channels():
    rng = np.random.default_rng(4)
    volume = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
    stack = stack_neighbour_slices(volume, context=1)
    assert stack.shape == (4, 6, 5, 6)
    for z in range(4):
        for k, offset in enumerate((-1, 0, 1)):
            src = volume[min(max(z + offset, 0), 3)]
            for ch in range(2):
                np.testing.assert_array_equal(stack[z, k * 2 + ch], src[..., ch])
    np.testing.assert_array_equal(center_slice_of_stack(stack, context=1, channels=2), volume)
    with pytest.raises(InputError, match=r"\(z, 6, y, x\)"):
        center_slice_of_stack(stack[:, :5], context=1, channels=2)


# --------------------------------------------------------------------------- intensity


def test_normalize_hand_computed_example():
    image = np.arange(20, dtype=np.int16).reshape(4, 5)
    out, stats = normalize_intensity(image, np.ones((4, 5), bool), clip_percentiles=(0, 100))
    std = np.sqrt((20 ** 2 - 1) / 12.0)  # population std of 0..19
    np.testing.assert_allclose(out, (image - 9.5) / std, atol=1e-6)
    assert stats["mean"] == pytest.approx(9.5) and stats["std"] == pytest.approx(std)
    assert stats["lower"] == 0 and stats["upper"] == 19 and out.dtype == np.float32


def test_normalize_clips_inside_mask_and_sets_background_to_lower_clip(rng):
    image = rng.normal(200.0, 40.0, (12, 16, 16))
    image[0, 0, 0] = 1e5  # an outlier, outside the mask
    image[6, 8, 8] = 5e4  # an outlier, inside the mask
    mask = np.zeros(image.shape, bool)
    mask[2:10, 3:13, 3:13] = True
    before = image.copy()
    out, stats = normalize_intensity(image, mask, clip_percentiles=(1, 99))
    np.testing.assert_array_equal(image, before)
    lower, upper = np.percentile(image[mask], [1, 99])
    clipped = np.clip(image[mask], lower, upper)
    np.testing.assert_allclose(out[mask], (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[mask].std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out[~mask], stats["background"], atol=1e-6)
    assert stats["background"] == pytest.approx((lower - clipped.mean()) / clipped.std())
    assert stats["foreground_fraction"] == pytest.approx(mask.mean())
    restored = denormalize_intensity(out, stats)
    np.testing.assert_allclose(restored[mask], clipped, rtol=1e-5)
    np.testing.assert_allclose(restored[~mask], lower, rtol=1e-5)


def test_normalize_rgb_per_channel(rng):
    rgb = np.stack([rng.normal(m, s, (20, 24)) for m, s in ((50, 5), (120, 20), (200, 2))], axis=-1)
    mask = np.ones((20, 24), bool)
    out, stats = normalize_intensity(rgb.astype(np.float32), mask)
    assert out.shape == rgb.shape and len(stats["mean"]) == 3
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(stats["mean"], [50, 120, 200], rtol=0.05)
    clipped = np.clip(rgb, stats["lower"], stats["upper"])
    np.testing.assert_allclose(denormalize_intensity(out, stats), clipped, rtol=1e-4)


def test_normalize_refuses_constant_nan_and_bad_masks():
    with pytest.raises(InputError, match="constant inside the foreground"):
        normalize_intensity(np.full((4, 5, 6), 3.0))
    nan = np.ones((4, 5))
    nan[1, 1] = np.nan
    with pytest.raises(InputError, match="NaN/Inf"):
        normalize_intensity(nan)
    with pytest.raises(InputError, match="mask is empty"):
        normalize_intensity(np.arange(20.0).reshape(4, 5), np.zeros((4, 5), bool))
    with pytest.raises(InputError, match=r"mask shape \(4, 4\)"):
        normalize_intensity(np.arange(20.0).reshape(4, 5), np.ones((4, 4), bool))
    with pytest.raises(InputError, match="clip_percentiles"):
        normalize_intensity(np.arange(20.0).reshape(4, 5), clip_percentiles=(99, 1))


# --------------------------------------------------------------------------- foreground


def _phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy-background phantom: ellipsoid body (60) with an enclosed dark cavity (12)."""
    shape = (24, 48, 48)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    body = ((z - 12) / 9) ** 2 + ((y - 24) / 18) ** 2 + ((x - 22) / 15) ** 2 < 1
    cavity = ((z - 12) / 3) ** 2 + ((y - 24) / 5) ** 2 + ((x - 22) / 5) ** 2 < 1
    image = rng.normal(10.0, 3.0, shape)
    image[body] += 50.0
    image[cavity] -= 48.0
    image[2, 2, 2] = 90.0  # a hot noise voxel outside the body
    return image, body


def test_foreground_mask_on_noisy_phantom(rng):
    image, body = _phantom(rng)
    before = image.copy()
    mask = foreground_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    assert _dice(mask, body) > 0.95
    assert mask[12, 24, 22]  # the dark cavity is filled
    assert not mask[2, 2, 2]
    np.testing.assert_array_equal(image, before)


def test_foreground_mask_exact_zero_background_and_fallbacks(rng):
    image, body = _phantom(rng)
    stripped = np.where(body, np.abs(image) + 1.0, 0.0)
    stripped[12, 24, 22] = 0.0  # a zero inside the body is a hole, filled
    stripped[0, 0, 1] = -5.0  # a few voxels below the background value (interpolation ringing)
    mask = foreground_mask(stripped)
    np.testing.assert_array_equal(mask, body)
    assert foreground_mask(np.full((4, 5), 2.0)).all()  # constant: the whole image
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[5:15, 8:25] = (200, 100, 50)
    m2 = foreground_mask(rgb)
    assert m2.shape == (20, 30) and m2.sum() == 10 * 17 and m2[5:15, 8:25].all()


def test_foreground_mask_covers_real_skull_stripped_brain(shared_data):
    t1c = read_image(shared_data / "tcga_glioma" / "TCGA-DU-7294" / "t1c.nii.gz").array
    mask = foreground_mask(t1c)
    assert _dice(mask, t1c > 0) > 0.95
    out, stats = normalize_intensity(t1c, mask)
    assert abs(float(out[mask].mean())) < 1e-3 and abs(float(out[mask].std()) - 1.0) < 1e-3
    assert 0.05 < stats["foreground_fraction"] < 0.5
