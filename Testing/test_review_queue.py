"""The review queue on hand-made maps (ranking, ties, empty maps, 2D and 3D, physical centres),
the reliability table and statement, and how a result carries both into report.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SFUDASegmentLib.config import LabelClass
from SFUDASegmentLib.data.geometry import Geometry, lps_to_ras
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.results.files import read_result, write_result
from SFUDASegmentLib.results.result import Result
from SFUDASegmentLib.uncertainty.reliability import (DEFAULT_TABLE, TABLE_FORMAT, load_reliability_table,
                                                     recommended_map, trust_statement, validate_table)
from SFUDASegmentLib.uncertainty.review import review_uncertainty
from SFUDASegmentLib.uncertainty.review_queue import OUTSIDE, review_queue, suspect_threshold

ORGAN, VESSEL = LabelClass(1, "organ"), LabelClass(2, "vessel")
OBLIQUE = Geometry((2.5, 0.8, 0.9), (-12.5, 30.25, 8.0),
                   (0.8660254, -0.5, 0.0, 0.4698463, 0.8137977, -0.3420201, 0.1710101, 0.2961981, 0.9396926))


def test_regions_are_ranked_by_uncertainty_mass_and_named_after_their_structure():
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8] = ORGAN.value
    labels[12:18, 12:14] = VESSEL.value
    u = np.zeros((20, 20), np.float32)
    u[4:6, 4:6] = 0.9          # inside the organ: 4 voxels, mass 3.6
    u[11:19, 11:15] = 0.6      # around the vessel: 32 voxels, mass 19.2
    u[0, 18] = 1.0             # one voxel far from any structure: mass 1.0
    queue = review_queue(labels, u, Geometry((1.0, 2.0)), [ORGAN, VESSEL], threshold=0.5)
    assert [r["structure"] for r in queue] == ["vessel", "organ", OUTSIDE]
    assert [r["rank"] for r in queue] == [1, 2, 3]
    assert [r["voxels"] for r in queue] == [32, 4, 1]
    assert queue[0]["uncertainty_mass"] == pytest.approx(0.6 * 32 * 2.0)   # mm^2 in 2D (1 x 2 mm pixels)
    assert queue[0]["area_mm2"] == pytest.approx(64.0) and "volume_ml" not in queue[0]
    assert queue[1]["mean_uncertainty"] == pytest.approx(0.9) and queue[2]["max_uncertainty"] == 1.0
    assert queue[2]["label_value"] == 0 and queue[0]["label_value"] == VESSEL.value
    assert len(review_queue(labels, u, Geometry((1.0, 2.0)), [ORGAN, VESSEL], 0.5, max_regions=2)) == 2


def test_ties_on_mass_and_maximum_go_in_array_order_of_the_centres():
    u = np.zeros((12, 12))
    for y, x in ((8, 8), (1, 9), (1, 2)):  # three identical 2x2 blocks
        u[y:y + 2, x:x + 2] = 0.7
    queue = review_queue(np.zeros((12, 12), np.uint8), u, Geometry((1.0, 1.0)), [ORGAN], 0.5)
    assert [r["center_index"] for r in queue] == [[1, 2], [1, 9], [8, 8]]
    u[8, 8] = 0.75  # same mass order broken by the larger mass of the last block
    assert review_queue(np.zeros((12, 12), np.uint8), u, Geometry((1.0, 1.0)), [ORGAN], 0.5)[0]["center_index"][0] == 8


def test_empty_and_constant_maps():
    labels = np.zeros((3, 6, 6), np.uint8)
    labels[1, 2:4, 2:4] = ORGAN.value
    geometry = Geometry((2.0, 1.0, 1.0))
    assert review_queue(labels, np.zeros((3, 6, 6)), geometry, [ORGAN], 0.5) == []
    body = np.zeros((3, 6, 6), bool)
    body[:, 1:5, 1:5] = True
    queue = review_queue(labels, np.ones((3, 6, 6)), geometry, [ORGAN], 0.5, body=body)
    assert len(queue) == 1 and queue[0]["voxels"] == 48                 # the whole body, one region
    assert queue[0]["volume_ml"] == pytest.approx(48 * 2.0 / 1000.0)    # ml in 3D
    assert queue[0]["structure"] == "organ"
    assert review_queue(labels, np.ones((3, 6, 6)), geometry, [ORGAN], 1.0) == []  # strictly above


def test_region_connectivity_is_26_neighbours_in_3d():
    u = np.zeros((4, 4, 4))
    u[0, 0, 0] = u[1, 1, 1] = 1.0  # corner neighbours: one region
    u[3, 3, 0] = 1.0
    queue = review_queue(np.zeros((4, 4, 4), np.uint8), u, Geometry((1.0, 1.0, 1.0)), [ORGAN], 0.5)
    assert [r["voxels"] for r in queue] == [2, 1]


def test_the_centre_of_a_ring_is_a_voxel_of_the_ring_and_its_physical_point_is_itks():
    yy, xx = np.mgrid[:15, :15]
    radius = np.hypot(yy - 7, xx - 7)
    u = np.zeros((9, 15, 15))
    u[4] = ((radius > 4) & (radius < 6)).astype(float)      # a ring on slice 4
    labels = np.zeros(u.shape, np.uint8)
    labels[4][radius <= 4.5] = ORGAN.value
    region = review_queue(labels, u, OBLIQUE, [ORGAN], 0.5)[0]
    z, y, x = region["center_index"]
    assert u[z, y, x] == 1.0 and region["structure"] == "organ"
    image = sitk.Image(15, 15, 9, sitk.sitkUInt8)
    image.SetSpacing(tuple(reversed(OBLIQUE.spacing)))
    image.SetOrigin(OBLIQUE.origin)
    image.SetDirection(OBLIQUE.direction)
    expected = image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
    np.testing.assert_allclose(region["center_lps"], expected, atol=1e-9)
    np.testing.assert_allclose(region["center_ras"], lps_to_ras(expected), atol=1e-9)
    assert region["center_ras"][0] == pytest.approx(-expected[0]) and region["center_ras"][2] == pytest.approx(expected[2])


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="same shape"):
        review_queue(np.zeros((4, 4)), np.zeros((4, 5)), Geometry((1.0, 1.0)), [ORGAN], 0.5)
    with pytest.raises(InputError, match="NaN"):
        review_queue(np.zeros((2, 2)), np.array([[np.nan, 0], [0, 0]]), Geometry((1.0, 1.0)), [ORGAN], 0.5)
    with pytest.raises(InputError, match="2D label map"):
        review_queue(np.zeros((2, 2)), np.zeros((2, 2)), Geometry((1.0, 1.0, 1.0)), [ORGAN], 0.5)


def test_suspect_thresholds_are_fixed_for_known_maps_and_relative_otherwise():
    values = np.linspace(0, 10, 101)
    assert suspect_threshold("entropy", values) == 0.5
    assert suspect_threshold("mahalanobis", values) == pytest.approx(0.5 * np.percentile(values, 99))
    body = values < 5
    assert suspect_threshold("mahalanobis", values, body) == pytest.approx(0.5 * np.percentile(values[body], 99))


# --------------------------------------------------------------------------- reliability


def table(*entries: dict) -> dict:
    base = {"source_modality": "T2", "target_modality": "FLAIR", "cases": 6, "data": "BraTS benchmark"}
    return {"format": TABLE_FORMAT, "version": 1, "entries": [{**base, **e} for e in entries]}


def test_recommended_map_is_the_best_measured_one_and_never_a_misleading_one():
    t = table({"method": "none", "map": "entropy", "auroc": 0.88}, {"method": "none", "map": "flip_entropy", "auroc": 0.91},
              {"method": "gmm", "map": "entropy", "auroc": 0.95}, {"method": "gmm", "map": "disagreement", "auroc": 0.7},
              {"method": "none", "map": "mahalanobis", "auroc": 0.97, "misleading": True})
    assert recommended_map("none", ["entropy", "flip_entropy", "mahalanobis"], t, "T2", "FLAIR") == "flip_entropy"
    assert recommended_map("none", ["entropy"], t) == "entropy"
    # GMM's own entropy is known to mislead: the measured disagreement wins whatever the figures
    assert recommended_map("gmm", ["entropy", "disagreement"], t) == "disagreement"
    assert recommended_map("heal", ["entropy", "nig_variance"], t) == "entropy"   # fallback order
    assert recommended_map("none", [], t) is None


def test_lookup_prefers_the_matching_modality_pair():
    t = table({"method": "none", "map": "entropy", "auroc": 0.9},
              {"method": "none", "map": "entropy", "auroc": 0.5, "source_modality": "T1", "target_modality": "T1ce"})
    assert trust_statement("none", "entropy", t, "T2", "FLAIR")["auroc"] == pytest.approx(0.9)
    assert trust_statement("none", "entropy", t, "T1", "T1ce")["auroc"] == pytest.approx(0.5)
    assert trust_statement("none", "entropy", t, "CT", None)["auroc"] == pytest.approx(0.7)  # any: mean of both


def test_trust_statement_words_and_warnings():
    t = table({"method": "none", "map": "entropy", "auroc": 0.88, "auprc": 0.4},
              {"method": "heal/hd", "map": "nig_variance", "auroc": 0.55, "phantom": True, "data": "phantoms"})
    good = trust_statement("none", "entropy", t, "T2", "FLAIR")
    assert "88 times in 100" in good["text"] and "AUROC 0.88" in good["text"] and good["grade"] == "fair"
    assert good["warnings"] == [] and good["cases"] == 6 and good["auprc"] == pytest.approx(0.4)
    poor = trust_statement("heal/hd", "nig_variance", t)
    assert poor["phantom"] and "synthetic phantoms" in poor["text"]
    assert any("phantoms" in w for w in poor["warnings"]) and any("chance" in w for w in poor["warnings"])
    unknown = trust_statement("gmm", "entropy", t)
    assert unknown["auroc"] is None and "not been measured" in unknown["text"]
    assert unknown["warnings"][0].startswith("Known to mislead") and "0.656" in unknown["warnings"][0]
    assert "No uncertainty map" in trust_statement("none", None, t)["text"]


def test_reliability_tables_are_validated_and_read_from_json(tmp_path):
    assert validate_table(DEFAULT_TABLE) == DEFAULT_TABLE
    good = table({"method": "none", "map": "entropy", "auroc": 0.8})
    (tmp_path / "t.json").write_text(json.dumps(good))
    assert load_reliability_table(tmp_path / "t.json")["entries"][0]["auroc"] == 0.8
    for bad, words in ((table({"method": "magic", "map": "entropy", "auroc": 0.8}), "method"),
                       (table({"method": "none", "map": "entropy", "auroc": 1.5}), "AUROC"),
                       ({"format": TABLE_FORMAT, "version": 1, "entries": [{"method": "none"}]}, "lacks"),
                       ({"format": "other"}, "not a")):
        with pytest.raises(InputError, match=words):
            validate_table(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="Cannot read"):
        load_reliability_table(tmp_path / "broken.json")


def test_the_shipped_table_holds_phantom_and_brats_figures_and_says_which():
    entries = DEFAULT_TABLE["entries"]
    assert {e["phantom"] for e in entries} == {True, False}
    assert all(e["source_modality"] == "phantom-source" for e in entries if e["phantom"])
    assert {(e["source_modality"], e["target_modality"]) for e in entries if not e["phantom"]} == {
        ("T2", "FLAIR"), ("T1", "T1c"), ("T1c", "FLAIR")}
    phantom = trust_statement("none", "entropy", DEFAULT_TABLE, "phantom-source", "phantom-target")
    assert phantom["phantom"] and "synthetic phantoms, not on patient scans" in phantom["text"]
    assert any("phantoms" in w for w in phantom["warnings"])
    brats = trust_statement("none", "entropy", DEFAULT_TABLE, "T2", "FLAIR")
    assert not brats["phantom"] and brats["auroc"] == pytest.approx(0.921) and "BraTS" in brats["text"]
    assert not any("phantoms" in w for w in brats["warnings"])
    # each modality pair gets its own figures: GMM's ensemble entropy on T1c models (FLAIR scans), 0.891
    t1c = trust_statement("gmm", "ensemble_entropy", DEFAULT_TABLE, "T1c")
    assert t1c["auroc"] == pytest.approx(0.891) and "2D T1c models" in t1c["measured_on"]
    assert recommended_map("gmm", ["entropy", "nig_variance", "disagreement", "ensemble_entropy"], DEFAULT_TABLE,
                           "T2", "FLAIR") == "ensemble_entropy"
    heal = {e["map"]: e["auroc"] for e in DEFAULT_TABLE["entries"] if e["method"] == "heal"}
    assert recommended_map("heal", sorted(heal)) == max(heal, key=heal.get)


# --------------------------------------------------------------------------- a result carries both


def test_a_result_carries_its_queue_and_statement_into_report_json_and_back(tmp_path):
    geometry = Geometry((2.0, 1.0, 1.0))
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 2:6, 2:6] = ORGAN.value
    entropy = np.zeros((4, 8, 8), np.float32)
    entropy[1:3, 2:4, 2:6] = 0.8
    result = Result("none", labels, [ORGAN], geometry, maps={"entropy": entropy})
    review_uncertainty(result, "T2", table=table({"method": "none", "map": "entropy", "auroc": 0.9}))
    assert result.reliability["map"] == "entropy" and result.reliability["auroc"] == pytest.approx(0.9)
    assert result.reliability["review_threshold"] == 0.5
    assert len(result.review_queue) == 1 and result.review_queue[0]["voxels"] == 16
    report = write_result(result, tmp_path / "out")
    assert report["review_queue"] == result.review_queue
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["reliability"]["text"] == result.reliability["text"]
    back = read_result(tmp_path / "out")
    assert back.review_queue == result.review_queue and back.reliability == result.reliability
    assert "review_queue" not in back.extra and "reliability" not in back.extra


def test_a_labels_only_result_has_an_empty_queue_and_says_why():
    result = Result("none", np.zeros((5, 5), np.uint8), [ORGAN], Geometry((1.0, 1.0)))
    review_uncertainty(result)
    assert result.review_queue == [] and result.reliability["map"] is None
    assert "labels only" in result.reliability["text"]
