"""Tests of SFUDASegmentLib.evaluation.metrics: hand-computed cases, empty conventions, regions, JSON,
and agreement with independent implementations (MedPy, DeepMind surface-distance, brute force)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.evaluation import metrics as M
from SFUDASegmentLib.utils.progress import ProgressReporter

ANISO_3D = (2.5, 0.8, 1.2)
ANISO_2D = (0.8, 1.2)


def _blob_pair(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 2.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping random blob masks: smoothed noise thresholded, the second perturbed."""
    base = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    base /= base.std()
    noise /= noise.std()
    ref = base > 0.3
    pred = (0.8 * base + 0.6 * noise) > 0.3
    assert ref.any() and pred.any() and not np.array_equal(ref, pred)
    return pred, ref


# ----------------------------------------------------------------------------- hand-computed

def test_dice_and_iou_of_two_offset_squares():
    pred = np.zeros((8, 8), bool)
    ref = np.zeros((8, 8), bool)
    pred[0:4, 0:4] = True
    ref[2:6, 1:5] = True  # overlap rows 2-3, cols 1-3: 6 pixels
    assert M.dice(pred, ref) == pytest.approx(12 / 32, abs=1e-15)
    assert M.iou(pred, ref) == pytest.approx(6 / 26, abs=1e-15)
    assert M.dice(pred.astype(np.uint8) * 7, ref) == pytest.approx(3 / 8)  # non-zero = inside


def test_parallel_lines_use_the_spacing_of_their_own_axis():
    cols_pred = np.zeros((6, 10), bool)
    cols_ref = np.zeros((6, 10), bool)
    cols_pred[:, 1] = True
    cols_ref[:, 4] = True  # 3 columns apart, x spacing 1.2 -> 3.6 mm
    for fn in (M.asd, M.assd, M.hd95, M.hausdorff):
        assert fn(cols_pred, cols_ref, ANISO_2D) == pytest.approx(3.6, abs=1e-12)
    d_pr, d_rp = M.surface_distances(cols_pred, cols_ref, ANISO_2D)
    np.testing.assert_allclose(d_pr, np.full(6, 3.6), atol=1e-12)
    np.testing.assert_allclose(d_rp, np.full(6, 3.6), atol=1e-12)
    assert M.nsd(cols_pred, cols_ref, ANISO_2D, 3.5) == 0.0
    assert M.nsd(cols_pred, cols_ref, ANISO_2D, 3.7) == 1.0
    rows_pred = np.zeros((6, 10), bool)
    rows_ref = np.zeros((6, 10), bool)
    rows_pred[1] = True
    rows_ref[4] = True  # 3 rows apart, y spacing 0.8 -> 2.4 mm
    assert M.assd(rows_pred, rows_ref, ANISO_2D) == pytest.approx(2.4, abs=1e-12)


def test_parallel_planes_3d_anisotropic():
    pred = np.zeros((8, 5, 6), bool)
    ref = np.zeros((8, 5, 6), bool)
    pred[2] = True
    ref[5] = True  # 3 slices apart at 2.5 mm
    assert M.asd(pred, ref, ANISO_3D) == pytest.approx(7.5, abs=1e-12)
    assert M.assd(pred, ref, ANISO_3D) == pytest.approx(7.5, abs=1e-12)
    assert M.hd95(pred, ref, ANISO_3D) == pytest.approx(7.5, abs=1e-12)
    assert M.dice(pred, ref) == 0.0
    assert M.nsd(pred, ref, ANISO_3D, 7.4) == 0.0
    assert M.nsd(pred, ref, ANISO_3D, 7.6) == 1.0


def test_asymmetric_distances_assd_and_both_hd95_modes():
    pred = np.zeros((3, 6), bool)
    ref = np.zeros((3, 6), bool)
    pred[1, 0] = True
    ref[1, 0] = ref[1, 4] = True  # second reference pixel 4 columns (4.8 mm) away
    d_pr, d_rp = M.surface_distances(pred, ref, ANISO_2D)
    np.testing.assert_allclose(d_pr, [0.0], atol=1e-12)
    np.testing.assert_allclose(d_rp, [0.0, 4.8], atol=1e-12)
    assert M.asd(pred, ref, ANISO_2D) == pytest.approx(0.0, abs=1e-12)
    assert M.asd(ref, pred, ANISO_2D) == pytest.approx(2.4, abs=1e-12)
    assert M.assd(pred, ref, ANISO_2D) == pytest.approx(4.8 / 3, abs=1e-12)  # union, not (0+2.4)/2
    # pooled [0, 0, 4.8]: rank 0.95*2 = 1.9 -> 0.9*4.8; max of directed: 0.95*4.8 from [0, 4.8]
    assert M.hd95(pred, ref, ANISO_2D) == pytest.approx(0.9 * 4.8, abs=1e-12)
    assert M.hd95(pred, ref, ANISO_2D, mode="max") == pytest.approx(0.95 * 4.8, abs=1e-12)
    assert M.hausdorff(pred, ref, ANISO_2D) == pytest.approx(4.8, abs=1e-12)
    assert M.nsd(pred, ref, ANISO_2D, 3.0) == pytest.approx(2 / 3, abs=1e-15)
    assert M.nsd(pred, ref, ANISO_2D, 5.0) == 1.0


def test_surfel_nsd_on_two_single_pixels():
    pred = np.zeros((5, 8), bool)
    ref = np.zeros((5, 8), bool)
    pred[2, 2] = True
    ref[2, 5] = True
    spacing = (1.0, 0.5)
    # cells sit at the pixel corners: x in {1.5, 2.5} and {4.5, 5.5}; half of each mask's four
    # equal cells are 2 columns (1.0 mm) from the other, the rest 3 columns (1.5 mm)
    assert M.nsd(pred, ref, spacing, 1.2, method="surfel") == pytest.approx(0.5, abs=1e-15)
    assert M.nsd(pred, ref, spacing, 1.6, method="surfel") == 1.0
    assert M.nsd(pred, ref, spacing, 0.9, method="surfel") == 0.0
    assert M.nsd(pred, ref, spacing, 1.2, method="voxel") == 0.0  # pixel centres 1.5 mm apart


def test_surfel_lengths_and_areas_follow_the_spacing_of_each_axis():
    rect = np.zeros((6, 6), bool)
    rect[1:4, 2:4] = True  # 3 rows x 2 columns
    sy, sx = ANISO_2D
    d_p, length, _, _ = M._surfel_distances(rect, rect, ANISO_2D)
    expected = 2 * (2 - 1) * sx + 2 * (3 - 1) * sy + 4 * 0.5 * math.hypot(sy, sx)
    assert length.sum() == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(d_p, 0.0)

    bar = np.zeros((5, 4, 4), bool)
    bar[1:3, 1, 1] = True  # two voxels along z
    a, b, c = ANISO_3D
    corners = math.sqrt((a * b) ** 2 + (a * c) ** 2 + (b * c) ** 2)  # 8 corner triangles
    sides = 4 * a * 0.5 * math.hypot(b, c)  # 4 cells with an edge along z
    _, area, _, _ = M._surfel_distances(bar, bar, ANISO_3D)
    assert area.sum() == pytest.approx(corners + sides, abs=1e-12)
    _, area_swapped, _, _ = M._surfel_distances(bar, bar, (b, a, c))
    assert area_swapped.sum() == pytest.approx(corners + 4 * b * 0.5 * math.hypot(a, c), abs=1e-12)


# ----------------------------------------------------------------------------- empty masks

@pytest.mark.parametrize("shape,spacing", [((6, 7), ANISO_2D), ((4, 6, 7), ANISO_3D)])
@pytest.mark.parametrize("case", ["both", "pred_empty", "ref_empty"])
def test_empty_conventions(shape, spacing, case):
    filled = np.zeros(shape, bool)
    filled[(slice(1, 3),) * len(shape)] = True
    empty = np.zeros(shape, bool)
    pred, ref = {"both": (empty, empty), "pred_empty": (empty, filled),
                 "ref_empty": (filled, empty)}[case]
    both = case == "both"
    distance = 0.0 if both else math.inf
    assert M.dice(pred, ref) == (1.0 if both else 0.0)
    assert M.iou(pred, ref) == (1.0 if both else 0.0)
    assert M.asd(pred, ref, spacing) == distance
    assert M.assd(pred, ref, spacing) == distance
    assert M.hd95(pred, ref, spacing) == distance
    assert M.hd95(pred, ref, spacing, mode="max") == distance
    for method in ("voxel", "surfel"):
        assert M.nsd(pred, ref, spacing, 2.0, method=method) == (1.0 if both else 0.0)
    report = M.structure_metrics(pred, ref, spacing)
    assert (report["dice"], report["assd"], report["hd95"], report["nsd"]) == (
        (1.0, 0.0, 0.0, 1.0) if both else (0.0, math.inf, math.inf, 0.0))
    d_pr, d_rp = M.surface_distances(pred, ref, spacing)
    n_border = 2 ** len(shape)  # every voxel of the 2x2(x2) block is a border voxel
    assert (d_pr.size, d_rp.size) == {"both": (0, 0), "pred_empty": (0, n_border),
                                      "ref_empty": (n_border, 0)}[case]
    assert np.all(np.isinf(d_pr)) and np.all(np.isinf(d_rp))


# ----------------------------------------------------------------------------- multi-label

def _three_label_maps() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((4, 6), np.int16)
    ref[:, 0:2], ref[:, 2:4], ref[:, 4:6] = 1, 2, 4
    pred = ref.copy()
    pred[:, 4:6] = 2  # enhancing tumour missed, called oedema
    return pred, ref


def test_evaluate_labels_regions_and_mean_dice():
    pred, ref = _three_label_maps()
    out = M.evaluate(pred, ref, (1.0, 1.0), labels={"NCR": 1, "ED": 2, "ET": 4},
                     regions=M.BRATS_REGIONS, nsd_tolerance_mm=1.0)
    labels, regions = out["labels"], out["regions"]
    assert labels["NCR"]["dice"] == 1.0 and labels["NCR"]["assd"] == 0.0
    assert labels["ED"]["dice"] == pytest.approx(2 * 8 / (16 + 8))
    assert (labels["ED"]["pred_voxels"], labels["ED"]["ref_voxels"]) == (16, 8)
    assert labels["ET"]["dice"] == 0.0 and labels["ET"]["hd95"] == math.inf
    assert labels["ET"]["label"] == 4
    assert regions["WT"]["dice"] == 1.0 and regions["WT"]["hd95"] == 0.0
    assert regions["WT"]["pred_voxels"] == 24 and regions["WT"]["labels"] == [1, 2, 4]
    assert regions["TC"]["dice"] == pytest.approx(2 * 8 / (8 + 16))
    assert regions["ET"]["nsd"] == 0.0
    assert out["mean_dice"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # a region is scored exactly as the union mask of its labels
    union = M.structure_metrics(np.isin(pred, [1, 4]), np.isin(ref, [1, 4]), (1.0, 1.0))
    assert {k: regions["TC"][k] for k in union} == union


def test_evaluate_label_names_from_a_list_and_from_the_maps():
    pred, ref = _three_label_maps()
    assert list(M.evaluate(pred, ref, (1.0, 1.0), labels=[4, 1])["labels"]) == ["4", "1"]
    found = M.evaluate(pred.astype(np.float32), ref, (1.0, 1.0))
    assert list(found["labels"]) == ["1", "2", "4"] and found["regions"] == {}
    with pytest.raises(InputError, match="labels explicitly"):
        M.evaluate(np.zeros((3, 3), int), np.zeros((3, 3), int), (1.0, 1.0))


def test_evaluate_reports_progress_and_leaves_inputs_untouched():
    pred, ref = _three_label_maps()
    pred_copy, ref_copy = pred.copy(), ref.copy()
    events = []
    M.evaluate(pred, ref, (1.0, 1.0), labels=[1, 2, 4], regions={"TC": [1, 4]},
               nsd_method="surfel", progress=ProgressReporter(events.append))
    assert [e.stage for e in events] == ["metrics"] * 5
    assert events[-1].fraction == 1.0
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(ref, ref_copy)


def test_bad_inputs_raise_input_errors_that_name_the_problem():
    with pytest.raises(InputError, match=r"\(4, 6\).*\(4, 5\)"):
        M.evaluate(np.zeros((4, 6), int), np.zeros((4, 5), int), (1.0, 1.0), labels=[1])
    with pytest.raises(InputError, match=r"\(3, 3\).*\(3, 4\)"):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(InputError, match="non-integer"):
        M.evaluate(np.full((3, 3), 0.5), np.zeros((3, 3)), (1.0, 1.0), labels=[1])
    with pytest.raises(InputError, match="one spacing per array axis"):
        M.assd(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="positive"):
        M.hd95(np.ones((3, 3)), np.ones((3, 3)), (1.0, 0.0))
    with pytest.raises(InputError, match="method"):
        M.nsd(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0), 1.0, method="mesh")
    with pytest.raises(InputError, match="tolerance"):
        M.nsd(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0), -1.0)
    with pytest.raises(InputError, match="mode"):
        M.hd95(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0), mode="mean")
    with pytest.raises(InputError, match="NaN"):
        M.dice(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(InputError, match="2D"):
        M.dice(np.ones(4), np.ones(4))
    with pytest.raises(InputError, match="not an integer"):
        M.evaluate(np.ones((3, 3), int), np.ones((3, 3), int), (1.0, 1.0), labels=[1.5])


def test_parse_regions():
    assert M.parse_regions("WT=1,2,4;TC=1,4;ET=4") == M.BRATS_REGIONS
    assert M.parse_regions(" WT = 4, 2,1,2 ; ET=3; ") == {"WT": [1, 2, 4], "ET": [3]}
    assert M.parse_regions("WT=1,2,3;TC=1,3;ET=3") == M.BRATS_2023_REGIONS


@pytest.mark.parametrize("text,fragment", [
    ("", "No region"), (" ; ", "No region"), ("WT", "no '='"), ("=1,2", "name"),
    ("1WT=1", "name"), ("WT=1;WT=2", "twice"), ("WT=", "label ''"), ("WT=1,,2", "label ''"),
    ("WT=a", "'a'"), ("WT=-1", "'-1'"), ("WT=1.5", "'1.5'"),
])
def test_parse_regions_rejects_bad_syntax(text, fragment):
    with pytest.raises(InputError, match=fragment):
        M.parse_regions(text)


def test_to_jsonable_makes_strict_json():
    pred, ref = _three_label_maps()
    out = M.evaluate(pred, ref, (1.0, 1.0), labels=[1, 2, 4])
    text = json.dumps(M.to_jsonable(out), allow_nan=False)
    back = json.loads(text)
    assert back["labels"]["4"]["hd95"] is None and back["labels"]["1"]["hd95"] == 0.0
    assert M.to_jsonable({1: (np.float32(0.5), np.int64(3), np.bool_(True), float("nan")),
                          "a": np.array([[1.0, np.inf]]), "b": -math.inf}) == {
        "1": [0.5, 3, True, None], "a": [[1.0, None]], "b": None}


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape,spacing", [((40, 52), ANISO_2D), ((18, 24, 28), ANISO_3D)])
def test_agreement_with_medpy(seed, shape, spacing):
    binary = pytest.importorskip("medpy.metric.binary")
    pred, ref = _blob_pair(np.random.default_rng(seed), shape)
    assert M.dice(pred, ref) == pytest.approx(binary.dc(pred, ref), abs=1e-12)
    assert M.iou(pred, ref) == pytest.approx(binary.jc(pred, ref), abs=1e-12)
    assert M.asd(pred, ref, spacing) == pytest.approx(binary.asd(pred, ref, spacing), abs=1e-6)
    assert M.asd(ref, pred, spacing) == pytest.approx(binary.asd(ref, pred, spacing), abs=1e-6)
    assert M.assd(pred, ref, spacing) == pytest.approx(binary.assd(pred, ref, spacing), abs=1e-6)
    assert M.hd95(pred, ref, spacing) == pytest.approx(binary.hd95(pred, ref, spacing), abs=1e-6)
    assert M.hausdorff(pred, ref, spacing) == pytest.approx(binary.hd(pred, ref, spacing), abs=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface_distance uses ndimage.filters
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape,spacing", [((40, 52), ANISO_2D), ((18, 24, 28), ANISO_3D)])
def test_surfel_nsd_agrees_with_deepmind_surface_distance(seed, shape, spacing):
    sd = pytest.importorskip("surface_distance")
    pred, ref = _blob_pair(np.random.default_rng(100 + seed), shape)
    # surface_distance 0.1 uses np.Inf (gone in numpy 2) only for empty masks: both non-empty here
    distances = sd.compute_surface_distances(ref, pred, list(spacing))
    for tolerance in (0.5, 1.0, 2.5):
        expected = sd.compute_surface_dice_at_tolerance(distances, tolerance)
        assert M.nsd(pred, ref, spacing, tolerance, method="surfel") == pytest.approx(
            expected, abs=1e-9)


def _brute_force_border(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background (or outside) pixel among their 4 face neighbours."""
    padded = np.pad(mask, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


@pytest.mark.parametrize("seed", [3, 4])
def test_voxel_distances_and_nsd_match_a_brute_force_computation(seed):
    pred, ref = _blob_pair(np.random.default_rng(seed), (30, 34), sigma=1.5)
    scale = np.asarray(ANISO_2D)
    points_p = np.argwhere(_brute_force_border(pred)) * scale
    points_r = np.argwhere(_brute_force_border(ref)) * scale
    pairwise = cdist(points_p, points_r)
    expected_pr, expected_rp = pairwise.min(axis=1), pairwise.min(axis=0)
    d_pr, d_rp = M.surface_distances(pred, ref, ANISO_2D)
    np.testing.assert_allclose(d_pr, expected_pr, atol=1e-9)  # both in np.nonzero order
    np.testing.assert_allclose(d_rp, expected_rp, atol=1e-9)
    tolerance = 1.7
    within = (expected_pr <= tolerance).sum() + (expected_rp <= tolerance).sum()
    assert M.nsd(pred, ref, ANISO_2D, tolerance) == pytest.approx(
        within / (len(expected_pr) + len(expected_rp)), abs=1e-12)
    report = M.structure_metrics(pred, ref, ANISO_2D, nsd_tolerance_mm=tolerance)
    assert report["assd"] == pytest.approx(np.concatenate([expected_pr, expected_rp]).mean())
    assert report["hd95"] == pytest.approx(M.hd95(pred, ref, ANISO_2D))


def test_real_glioma_label_maps_use_the_brats_labels_and_score_like_medpy(shared_data):
    sitk = pytest.importorskip("SimpleITK")
    binary = pytest.importorskip("medpy.metric.binary")
    folder = shared_data / "tcga_glioma"
    image = sitk.ReadImage(str(folder / "OtherEXampleFromTCIA" / "seg_fusion_mav.nii.gz"))
    ref = sitk.GetArrayFromImage(image)
    spacing = tuple(image.GetSpacing())[::-1]
    assert set(np.unique(ref).tolist()) == {0, 1, 2, 4}
    same = M.evaluate(ref, ref, spacing, regions=M.BRATS_REGIONS)
    for entry in [*same["labels"].values(), *same["regions"].values()]:
        assert (entry["dice"], entry["hd95"], entry["nsd"]) == (1.0, 0.0, 1.0)
    assert same["regions"]["WT"]["ref_voxels"] == int(np.count_nonzero(ref))
    pred = np.roll(ref, (2, -1), axis=(0, 2))  # a shifted "prediction"
    # medpy does not crop: score the tumour's bounding box plus a background margin instead
    tumour = np.nonzero((pred > 0) | (ref > 0))
    box = tuple(slice(max(c.min() - 3, 0), c.max() + 4) for c in tumour)
    pred, ref = pred[box], ref[box]
    shifted = M.evaluate(pred, ref, spacing, labels=[4], regions={"WT": [1, 2, 4]})
    assert shifted["regions"]["WT"]["hd95"] == pytest.approx(
        binary.hd95(pred > 0, ref > 0, spacing), abs=1e-6)
    assert shifted["labels"]["4"]["assd"] == pytest.approx(
        binary.assd(pred == 4, ref == 4, spacing), abs=1e-6)
    # the other case has no enhancing tumour: ET is empty in both maps -> Dice 1, HD95 0
    no_et_file = folder / "TCGA-DU-7294" / "seg_fusion_mav.nii.gz"
    no_et = sitk.GetArrayFromImage(sitk.ReadImage(str(no_et_file)))
    assert set(np.unique(no_et).tolist()) == {0, 1, 2}
    scores = M.evaluate(no_et, no_et, spacing, labels=[1, 2, 4], regions=M.BRATS_REGIONS)
    et = scores["regions"]["ET"]
    assert (et["dice"], et["hd95"], et["pred_voxels"]) == (1.0, 0.0, 0)
