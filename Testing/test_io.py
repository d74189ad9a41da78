"""Tests of SFUDASegmentLib.data.io: formats, geometry, labels, bad input and atomic writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import (ImageNotFoundError, check_label_values, check_same_geometry,
                                from_sitk, read_image, read_label, resample_onto, rgb_to_gray,
                                to_sitk, validate_image, write_image)
from SFUDASegmentLib.errors import InputError


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = Geometry(spacing=(2.5, 0.7, 0.9), origin=(12.3, -45.6, 78.9),
                   direction=tuple(_rotation(0.3, -0.2, 0.5).ravel()))


def _volume(rng: np.random.Generator, dtype, shape=(6, 9, 11)) -> Volume:
    if np.issubdtype(dtype, np.floating):
        array = rng.normal(100.0, 30.0, shape).astype(dtype)
    else:
        array = rng.integers(0, 120, shape).astype(dtype)
    return Volume(array, OBLIQUE)


def _assert_geometry(a: Geometry, b: Geometry, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol, rtol=rtol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol, rtol=rtol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol, rtol=rtol)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- conversion


def test_to_sitk_maps_array_axes_to_itk_axes_and_physical_points(rng):
    vol = _volume(rng, np.float32)
    image = to_sitk(vol)
    assert image.GetSize() == (11, 9, 6)
    assert image.GetSpacing() == pytest.approx((0.9, 0.7, 2.5))
    # voxel (z=1, y=2, x=3): physical = origin + D @ (3 * sx, 2 * sy, 1 * sz)
    expected = np.array(OBLIQUE.origin) + np.array(OBLIQUE.direction).reshape(3, 3) @ np.array(
        [3 * 0.9, 2 * 0.7, 1 * 2.5])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((3, 2, 1)), expected, atol=1e-9)
    assert image.GetPixel(3, 2, 1) == vol.array[1, 2, 3]
    back = from_sitk(image)
    np.testing.assert_array_equal(back.array, vol.array)
    _assert_geometry(back.geometry, vol.geometry, 1e-12)


def test_to_sitk_rejects_array_that_does_not_fit_geometry():
    with pytest.raises(InputError, match=r"does not fit a 2D geometry"):
        to_sitk(Volume(np.zeros((4, 5, 6)), Geometry((1.0, 1.0))))


# --------------------------------------------------------------------------- round trips


DETACHED_DATA = {".mhd": ["vol.zraw"], ".nhdr": ["vol.raw.gz"]}


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".mhd", ".nhdr", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_round_trip_generated_volume_keeps_array_and_oblique_geometry(tmp_path, rng, ext, dtype):
    vol = _volume(rng, dtype)
    before = vol.array.copy()
    out = write_image(vol, tmp_path / f"sub/dir/vol{ext}")
    assert out == tmp_path / f"sub/dir/vol{ext}" and out.is_file()
    back = read_image(out)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, vol.array)
    # NIfTI stores the origin as float32: 1e-6 mm plus float32 rounding (6e-8 relative)
    _assert_geometry(back.geometry, vol.geometry, 1e-6, rtol=1e-7)
    np.testing.assert_array_equal(vol.array, before)
    # only the image (and a detached header's data file) is left: no staging folder
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == sorted([f"vol{ext}"] + DETACHED_DATA.get(ext, []))


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_2d_grey_with_geometry(tmp_path, rng, ext):
    geom = Geometry((0.5, 0.8), (3.0, -4.0), (0.0, 1.0, -1.0, 0.0))
    vol = Volume(rng.normal(size=(13, 17)).astype(np.float32), geom)
    back = read_image(write_image(vol, tmp_path / f"img{ext}"))
    assert back.array.shape == (13, 17)
    np.testing.assert_array_equal(back.array, vol.array)
    _assert_geometry(back.geometry, geom, 1e-6)


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_round_trip_2d_grey_raster_formats_keep_pixels(tmp_path, rng, ext):
    vol = Volume(rng.integers(0, 256, (13, 17)).astype(np.uint8), Geometry((1.0, 1.0)))
    back = read_image(write_image(vol, tmp_path / f"img{ext}"))
    assert back.array.shape == (13, 17) and back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, vol.array)


def test_2d_rgb_is_kept_as_rgb_and_as_gray_uses_bt601_luma(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 255, 0)
    rgb[2, 2] = (0, 0, 255)
    rgb[3, 3] = (10, 20, 30)
    path = write_image(Volume(rgb, Geometry((1.0, 1.0))), tmp_path / "rgb.png")
    back = read_image(path)
    assert back.array.shape == (4, 5, 3) and back.is_rgb
    np.testing.assert_array_equal(back.array, rgb)
    gray = read_image(path, as_gray=True)
    assert gray.array.shape == (4, 5) and gray.array.dtype == np.float32
    assert gray.array[0, 0] == pytest.approx(0.299 * 255, abs=1e-4)
    assert gray.array[1, 1] == pytest.approx(0.587 * 255, abs=1e-4)
    assert gray.array[2, 2] == pytest.approx(0.114 * 255, abs=1e-4)
    assert gray.array[3, 3] == pytest.approx(0.299 * 10 + 0.587 * 20 + 0.114 * 30, abs=1e-4)
    np.testing.assert_allclose(rgb_to_gray(rgb), gray.array)


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.dstack([np.full((3, 4), v, np.uint8) for v in (10, 20, 30, 40)])
    path = tmp_path / "rgba.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(path))
    back = read_image(path)
    assert back.array.shape == (3, 4, 3)
    np.testing.assert_array_equal(back.array[0, 0], [10, 20, 30])


# --------------------------------------------------------------------------- real scans


@pytest.mark.parametrize("name,ext", [("t1c.nii.gz", ".nii.gz"), ("fla.nii.gz", ".nrrd"),
                                      ("seg_fusion_mav.nii.gz", ".mha")])
def test_round_trip_glioma_scan_exact(shared_data, tmp_path, name, ext):
    src = shared_data / "tcga_glioma" / "TCGA-DU-7294" / name
    digest = _digest(src)
    vol = read_image(src)
    assert vol.array.shape == (155, 240, 240)
    assert vol.spacing == (1.0, 1.0, 1.0)
    back = read_image(write_image(vol, tmp_path / f"copy{ext}"))
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)
    _assert_geometry(back.geometry, vol.geometry, 1e-9)
    assert _digest(src) == digest


def test_glioma_label_values_are_brats_labels(shared_data):
    seg = read_label(shared_data / "tcga_glioma" / "TCGA-DU-7294" / "seg_fusion_mav.nii.gz",
                     allowed_values={1, 2, 4})
    assert seg.array.dtype == np.uint8
    assert set(np.unique(seg.array)) <= {0, 1, 2, 4}
    assert seg.array.max() > 0
    with pytest.raises(InputError, match=r"unexpected label values \[2\].*allowed values are \[0, 1, 4\]"):
        read_label(shared_data / "tcga_glioma" / "TCGA-DU-7294" / "seg_fusion_mav.nii.gz",
                   allowed_values={1, 4})


def test_round_trip_spinal_cord_oblique_scan_and_float_mask(shared_data, tmp_path):
    folder = shared_data / "spinalcord_unf01"
    vol = read_image(folder / "T2w.nii.gz")
    assert vol.array.shape == (16, 141, 131)
    assert not np.allclose(vol.geometry.direction, np.eye(3).ravel())  # oblique on purpose
    back = read_image(write_image(vol, tmp_path / "t2w.nii.gz"))
    np.testing.assert_array_equal(back.array, vol.array)
    _assert_geometry(back.geometry, vol.geometry, 1e-9)
    seg = read_label(folder / "T2w_seg-manual.nii.gz", allowed_values={1})  # stored as float 0/1
    assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) == {0, 1}
    check_same_geometry(vol, seg)
    seg_back = read_label(write_image(seg, tmp_path / "seg.nrrd"))
    np.testing.assert_array_equal(seg_back.array, seg.array)
    _assert_geometry(seg_back.geometry, seg.geometry, 1e-9)


@pytest.mark.parametrize("dataset,image,mask", [
    ("cvc_clinicdb", "fine_3_1_fram.jpg", "fine_3_1_mask.jpg"),
    ("kvasir_seg", "cju0qkwl35piu0993l0dewei2.jpg", "cju0qkwl35piu0993l0dewei2.jpg"),
])
def test_polyp_image_and_jpeg_mask(shared_data, tmp_path, dataset, image, mask):
    folder = shared_data / "polyp" / dataset
    img = read_image(folder / "images" / image)
    assert img.is_rgb and img.array.ndim == 3 and img.array.shape[-1] == 3 and img.array.dtype == np.uint8
    back = read_image(write_image(img, tmp_path / "img.png"))  # PNG: lossless
    np.testing.assert_array_equal(back.array, img.array)
    _assert_geometry(back.geometry, img.geometry, 1e-12)

    raw = read_image(folder / "masks" / mask)
    lab = read_label(folder / "masks" / mask, allowed_values={1})
    assert lab.array.shape == img.array.shape[:2]
    assert set(np.unique(lab.array)) == {0, 1}
    gray = rgb_to_gray(raw.array) if raw.is_rgb else raw.array
    np.testing.assert_array_equal(lab.array, (gray > 127).astype(np.uint8))
    lab_back = read_label(write_image(lab, tmp_path / "mask.png"))
    np.testing.assert_array_equal(lab_back.array, lab.array)


# --------------------------------------------------------------------------- labels


def test_jpeg_mask_thresholding_gives_binary_labels(tmp_path):
    yy, xx = np.mgrid[:64, :80]
    truth = ((yy - 30) ** 2 + (xx - 40) ** 2 < 18 ** 2).astype(np.uint8)
    path = tmp_path / "mask.jpg"
    write_image(Volume(truth * 255, Geometry((1.0, 1.0))), path)
    raw = read_image(path).array
    assert len(np.unique(raw)) > 2  # JPEG really is lossy here
    lab = read_label(path)
    assert set(np.unique(lab.array)) == {0, 1}
    assert np.mean(lab.array == truth) > 0.99
    # an explicit threshold applies to any format; a lossless PNG of 0/255 is kept as is otherwise
    png = write_image(Volume(truth * 255, Geometry((1.0, 1.0))), tmp_path / "mask.png")
    np.testing.assert_array_equal(read_label(png, binary_threshold=127).array, truth)
    np.testing.assert_array_equal(read_label(png).array, truth * 255)


def test_read_label_rejects_soft_masks_and_colour_labels(tmp_path):
    soft = Volume(np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5), OBLIQUE)
    path = write_image(soft, tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match=r"not a label map: \d+ voxels are not integers.*binary_threshold"):
        read_label(path)
    lab = read_label(path, binary_threshold=0.5)
    np.testing.assert_array_equal(lab.array, (soft.array > 0.5).astype(np.uint8))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 1] = (255, 0, 0)
    cpath = write_image(Volume(rgb, Geometry((1.0, 1.0))), tmp_path / "colour.png")
    with pytest.raises(InputError, match=r"colour image.*single-channel"):
        read_label(cpath)


def test_read_label_chooses_integer_type_by_range(tmp_path):
    arr = np.zeros((2, 3, 4), np.int32)
    arr[0, 0, 0] = 1000
    arr[1, 2, 3] = -3
    lab = read_label(write_image(Volume(arr, OBLIQUE), tmp_path / "big.nrrd"))
    assert lab.array.dtype == np.int16
    np.testing.assert_array_equal(lab.array, arr)


def test_check_label_values_lists_unexpected_and_allowed():
    labels = np.array([[0, 1], [3, 7]])
    with pytest.raises(InputError, match=r"unexpected label values \[3, 7\]; allowed values are \[0, 1, 2\]"):
        check_label_values(labels, {1, 2})
    check_label_values(labels, {1, 3, 7})


# --------------------------------------------------------------------------- bad files


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "scan.nii.gz"
    with pytest.raises(ImageNotFoundError, match="scan.nii.gz") as info:
        read_image(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, InputError)
    assert str(path) in str(info.value)
    with pytest.raises(ImageNotFoundError, match="folder"):
        read_image(tmp_path)


def test_corrupt_and_unsupported_files_name_file_and_formats(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not an image" * 20)
    digest = _digest(bad)
    with pytest.raises(InputError, match=r"Could not read '.*broken\.nii\.gz' as NIfTI.*NRRD.*PNG"):
        read_image(bad)
    assert _digest(bad) == digest
    truncated = tmp_path / "cut.nrrd"
    write_image(Volume(np.arange(1000, dtype=np.float32).reshape(10, 10, 10), OBLIQUE), truncated,
                compress=False)
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    with pytest.raises(InputError, match=r"cut\.nrrd.*supported formats"):
        read_image(truncated)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt.*not a supported image format.*NIfTI"):
        read_image(other)


def test_4d_and_vector_and_1d_images_are_refused(tmp_path):
    series = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32) * i) for i in range(2)])
    p4 = tmp_path / "series.nii.gz"
    sitk.WriteImage(series, str(p4))
    with pytest.raises(InputError, match=r"4D image of shape \(2, 3, 4, 5\).*select one channel/time point"):
        read_image(p4)
    vec = sitk.GetImageFromArray(np.ones((3, 4, 5, 2), np.float32), isVector=True)
    pv = tmp_path / "vector.nrrd"
    sitk.WriteImage(vec, str(pv))
    with pytest.raises(InputError, match=r"3D vector image with 2 components.*select one channel"):
        read_image(pv)
    p1 = tmp_path / "signal.nrrd"
    p1.write_text("NRRD0004\ntype: float\ndimension: 1\nsizes: 5\nencoding: ascii\n\n1 2 3 4 5\n")
    with pytest.raises(InputError, match=r"1D signal of 5 samples"):
        read_image(p1)


# --------------------------------------------------------------------------- validation


def test_validate_image_accepts_good_images(rng):
    validate_image(_volume(rng, np.float32))
    validate_image(Volume(rng.integers(0, 255, (5, 6, 3)).astype(np.uint8), Geometry((1.0, 1.0))))


def test_validate_image_counts_nan_and_inf_and_keeps_input():
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.nan
    arr[2, 2, 2] = np.inf
    before = arr.copy()
    with pytest.raises(InputError, match=r"The scan has 2 NaN and 1 Inf voxels out of 60.*nan_to_num"):
        validate_image(Volume(arr, OBLIQUE), name="scan")
    np.testing.assert_array_equal(arr, before)


@pytest.mark.parametrize("array,geometry,fragment", [
    (np.full((3, 4, 5), 7.0), OBLIQUE, r"constant \(every voxel is 7\.0\)"),
    (np.zeros((0, 4, 5)), OBLIQUE, r"empty \(shape \(0, 4, 5\)\)"),
    (np.ones((2, 3, 4, 5)), OBLIQUE, r"4 dimensions.*select one channel"),
    (np.ones(5), Geometry((1.0,)), r"1 dimensions"),
    (np.arange(60.0).reshape(3, 4, 5), Geometry((1.0, 0.0, 1.0)), r"invalid spacing \(1\.0, 0\.0, 1\.0\)"),
    (np.arange(60.0).reshape(3, 4, 5), Geometry((1.0, -2.0, 1.0)), r"must be positive"),
    (np.arange(60.0).reshape(3, 4, 5), Geometry((1.0, 1.0)), r"does not fit a 2D geometry"),
])
def test_validate_image_rejects_bad_volumes(array, geometry, fragment):
    before = array.copy()
    with pytest.raises(InputError, match=fragment):
        validate_image(Volume(array, geometry))
    np.testing.assert_array_equal(array, before)


def test_check_same_geometry_lists_every_difference_and_suggests_resampling(rng):
    image = _volume(rng, np.float32)
    check_same_geometry(image, Volume(np.zeros((6, 9, 11), np.uint8), OBLIQUE))
    other = Geometry((2.0, 0.7, 0.9), (12.3, -40.0, 78.9), tuple(np.eye(3).ravel()))
    with pytest.raises(InputError) as info:
        check_same_geometry(image, Volume(np.zeros((6, 9, 12), np.uint8), other))
    msg = str(info.value)
    for fragment in ("shape (6, 9, 11) vs (6, 9, 12)", "spacing (2.5, 0.7, 0.9) vs (2.0, 0.7, 0.9)",
                     "origin (12.3, -45.6, 78.9) vs (12.3, -40.0, 78.9)", "direction",
                     "Resample", "resample_onto(label, image, is_label=True)"):
        assert fragment in msg
    rgb = Volume(np.zeros((4, 5, 3), np.uint8), Geometry((1.0, 1.0)))
    check_same_geometry(rgb, Volume(np.zeros((4, 5), np.uint8), Geometry((1.0, 1.0))))


def test_resample_onto_puts_label_on_image_grid():
    # label on a 2x finer grid covering the same box as the 1 mm image
    image = Volume(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32),
                   Geometry((1.0, 1.0, 1.0), (10.0, 20.0, 30.0)))
    fine = np.zeros((16, 16, 16), np.uint8)
    fine[4:12, 6:10, 0:8] = 3
    label = Volume(fine, Geometry((0.5, 0.5, 0.5), (9.75, 19.75, 29.75)))
    with pytest.raises(InputError):
        check_same_geometry(image, label)
    moved = resample_onto(label, image, is_label=True)
    check_same_geometry(image, moved)
    expected = np.zeros((8, 8, 8), np.uint8)
    expected[2:6, 3:5, 0:4] = 3
    np.testing.assert_array_equal(moved.array, expected)
    assert moved.array.dtype == np.uint8


# --------------------------------------------------------------------------- writing


def test_atomic_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, rng, monkeypatch):
    vol = _volume(rng, np.float32)
    target = tmp_path / "out.nii.gz"
    write_image(vol, target)
    old = _digest(target)

    def failing_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half an image")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(InputError, match=r"Could not write '.*out\.nii\.gz' as NIfTI \(disk full\)"):
        write_image(Volume(vol.array * 2, vol.geometry), target)
    with pytest.raises(InputError, match="disk full"):
        write_image(vol, tmp_path / "new.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    assert _digest(target) == old


@pytest.mark.parametrize("name,array,geometry,fragment", [
    ("out.xyz", np.ones((3, 4, 5), np.float32), OBLIQUE, r"not a supported image format"),
    ("out.png", np.ones((3, 4, 5), np.uint8), OBLIQUE, r"holds 2D images only"),
    ("out.png", np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), Geometry((1.0, 1.0)),
     r"float32 pixels.*PNG holds uint8/uint16.*Rescale to 0-255"),
    ("out.jpg", np.full((3, 4), 300, np.int32), Geometry((1.0, 1.0)), r"JPEG holds uint8 only"),
])
def test_write_refuses_what_the_format_cannot_hold(tmp_path, name, array, geometry, fragment):
    before = array.copy()
    with pytest.raises(InputError, match=fragment):
        write_image(Volume(array, geometry), tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(array, before)


def test_write_png_converts_integer_valued_labels_losslessly(tmp_path):
    labels = np.zeros((5, 6), np.int64)
    labels[1:3, 2:5] = 2
    as_float = Volume(labels.astype(np.float64), Geometry((1.0, 1.0)))
    back = read_image(write_image(as_float, tmp_path / "l.png"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)
    mask = read_image(write_image(Volume(labels > 0, Geometry((1.0, 1.0))), tmp_path / "m.bmp"))
    np.testing.assert_array_equal(mask.array, (labels > 0).astype(np.uint8))
    wide = read_image(write_image(Volume(labels * 1000, Geometry((1.0, 1.0))), tmp_path / "w.png"))
    assert wide.array.dtype == np.uint16
    np.testing.assert_array_equal(wide.array, labels * 1000)


def test_nifti_nan_and_inf_are_refused_not_zeroed(tmp_path):
    """SimpleITK reads NaN/Inf in NIfTI as 0: read_image must refuse the file instead."""
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    for name in ("bad.nii.gz", "bad.nii"):
        path = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # the trap
        with pytest.raises(InputError, match="2 NaN/Inf voxel"):
            read_image(path)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.float64)), str(tmp_path / "ok.nii.gz"))
    assert read_image(tmp_path / "ok.nii.gz").array.dtype == np.float64
