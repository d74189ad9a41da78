"""Component reconstruction of HEAL's pseudo-labels, on hand-made label maps (2D and 3D)."""

from __future__ import annotations

import numpy as np
import pytest

from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.heal.component_reconstruction import reconstruct_components


def _map(rows: list[str]) -> np.ndarray:
    """A 2D class-index map from strings of digits."""
    return np.array([[int(c) for c in row] for row in rows], dtype=np.uint8)


# Y_T: a class-1 blob (left) with a confident core, a spurious class-1 blob (right) without one,
# and a class-2 blob touching the left blob.
PSEUDO = _map([
    "0000000000",
    "0111000110",
    "0111200110",
    "0111220000",
    "0000220000",
    "0000000000",
])
# Markers (e.g. Y*): one voxel inside the left class-1 blob, one inside the class-2 blob.
MARKERS = _map([
    "0000000000",
    "0000000000",
    "0010000000",
    "0000020000",
    "0000000000",
    "0000000000",
])


def test_a_component_with_a_marker_is_kept_whole_and_one_without_is_removed() -> None:
    result = reconstruct_components(PSEUDO, MARKERS, num_classes=3)
    expected = PSEUDO.copy()
    expected[1:3, 7:9] = 0  # the right blob has no marker
    np.testing.assert_array_equal(result.labels, expected)
    assert result.components[1] == {"components": 2, "kept_components": 1, "voxels": 13, "kept_voxels": 9}
    assert result.components[2] == {"components": 1, "kept_components": 1, "voxels": 5, "kept_voxels": 5}
    assert result.orphan_classes == []


def test_touching_classes_are_separate_components_per_class() -> None:
    # Only the class-1 marker: the touching class-2 blob is its own component and has no marker
    # of its class -> class 2 is an orphan (kept by default, removed with orphan="drop").
    markers = MARKERS.copy()
    markers[markers == 2] = 0
    kept = reconstruct_components(PSEUDO, markers, num_classes=3)
    assert kept.orphan_classes == [2]
    np.testing.assert_array_equal(kept.labels == 2, PSEUDO == 2)
    dropped = reconstruct_components(PSEUDO, markers, num_classes=3, orphan="drop")
    assert dropped.orphan_classes == [2]
    assert not (dropped.labels == 2).any()
    assert (dropped.labels == 1).sum() == 9


def test_foreground_grouping_keeps_a_whole_tumour_with_its_classes() -> None:
    # One class-1 marker confirms the whole foreground component (class 1 and the touching
    # class 2) with every voxel's own class; the unconfirmed right blob goes.
    markers = np.zeros_like(PSEUDO)
    markers[2, 2] = 1
    result = reconstruct_components(PSEUDO, markers, num_classes=3, grouping="foreground")
    expected = PSEUDO.copy()
    expected[1:3, 7:9] = 0
    np.testing.assert_array_equal(result.labels, expected)
    assert result.components[2]["kept_voxels"] == 5
    assert result.orphan_classes == []


def test_face_connectivity_diagonal_neighbours_are_separate() -> None:
    pseudo = _map(["110", "110", "001"])
    markers = _map(["100", "000", "000"])
    result = reconstruct_components(pseudo, markers, num_classes=2)
    np.testing.assert_array_equal(result.labels, _map(["110", "110", "000"]))


def test_3d_components_connect_across_slices() -> None:
    pseudo = np.zeros((3, 4, 4), dtype=np.uint8)
    pseudo[0, 1:3, 1:3] = 1   # a column through all three slices ...
    pseudo[1, 1:3, 1:3] = 1
    pseudo[2, 1:3, 1:3] = 1
    pseudo[2, 0, 3] = 1       # ... and a lone voxel on the last slice
    markers = np.zeros_like(pseudo)
    markers[0, 1, 1] = 1      # the marker sits on the first slice only
    result = reconstruct_components(pseudo, markers, num_classes=2)
    expected = pseudo.copy()
    expected[2, 0, 3] = 0
    np.testing.assert_array_equal(result.labels, expected)
    assert result.components[1] == {"components": 2, "kept_components": 1, "voxels": 13, "kept_voxels": 12}


def test_result_is_a_subset_of_y_t_and_holds_every_agreeing_marker() -> None:
    rng = np.random.default_rng(0)
    pseudo = rng.integers(0, 4, (6, 12, 12)).astype(np.uint8)
    markers = np.where(rng.random(pseudo.shape) < 0.2, pseudo, 0).astype(np.uint8)
    for grouping in ("class", "foreground"):
        out = reconstruct_components(pseudo, markers, 4, grouping=grouping).labels
        assert np.all((out == 0) | (out == pseudo))
        assert np.all(out[markers > 0] == pseudo[markers > 0])


def test_inputs_are_not_modified_and_bad_input_is_refused() -> None:
    pseudo, markers = PSEUDO.copy(), MARKERS.copy()
    reconstruct_components(pseudo, markers, 3)
    np.testing.assert_array_equal(pseudo, PSEUDO)
    np.testing.assert_array_equal(markers, MARKERS)
    with pytest.raises(InputError, match="same shape"):
        reconstruct_components(PSEUDO, MARKERS[:-1], 3)
    with pytest.raises(InputError, match="outside 0..2"):
        reconstruct_components(PSEUDO * 2, MARKERS, 3)
    with pytest.raises(InputError, match="grouping"):
        reconstruct_components(PSEUDO, MARKERS, 3, grouping="tumour")
    with pytest.raises(InputError, match="without markers"):
        reconstruct_components(PSEUDO, MARKERS, 3, orphan="maybe")


# --------------------------------------------------------------------------- in the pipeline

from dataclasses import replace  # noqa: E402

from SFUDASegmentLib.config import HEALConfig, InferenceConfig  # noqa: E402
from SFUDASegmentLib.data.synthetic import make_phantom_set  # noqa: E402
from SFUDASegmentLib.heal.denoised_labels import CANNOT_ADD  # noqa: E402
from SFUDASegmentLib.heal.diffusion_quality import ROUND_TRIP_KEY, round_trip_warning  # noqa: E402
from SFUDASegmentLib.heal.pipeline import heal_adapt  # noqa: E402
from SFUDASegmentLib.heal.round_trip import diffusion_round_trip  # noqa: E402
from tiny_models import TINY_SHAPE, single_thread, tiny_full_model  # noqa: E402,F401

CPU = InferenceConfig(device="cpu")


@pytest.fixture(scope="module")
def phantom():
    """A target-modality phantom at gap 0.2 (the tiny model's Y* erodes its structures)."""
    return make_phantom_set(3, TINY_SHAPE, seed=12, gap=0.2)[1]


def _indices(values: np.ndarray, classes) -> np.ndarray:
    lookup = {0: 0, **{c.value: i for i, c in enumerate(classes, start=1)}}
    return np.vectorize(lookup.get)(values)


@pytest.mark.parametrize("markers, grouping", [("entropy", "class"), ("nig", "class"), ("entropy", "foreground")])
def test_components_mode_reconstructs_y_t_from_the_chosen_markers(tiny_full_model, phantom, markers, grouping):
    checkpoint = tiny_full_model.checkpoint
    config = HEALConfig(stages="hd", denoise="components", component_markers=markers, component_grouping=grouping)
    result = heal_adapt(phantom.target, checkpoint, config, CPU)
    maps, classes = result.label_maps, checkpoint.classes
    marker_map = maps["entropy_labels"] if markers == "entropy" else maps["nig_labels"]
    expected = reconstruct_components(_indices(maps["pseudo_labels"], classes), _indices(marker_map, classes),
                                      len(classes) + 1, grouping).labels
    np.testing.assert_array_equal(_indices(maps["refined_labels"], classes), expected)
    np.testing.assert_array_equal(result.labels, maps["refined_labels"])  # stages="hd": Y is the denoised map
    # Paper mode on the same image: its refined labels are Y* (the nig_labels of the components run).
    paper = heal_adapt(phantom.target, checkpoint, replace(config, denoise="paper"), CPU)
    np.testing.assert_array_equal(paper.label_maps["refined_labels"], maps["nig_labels"])
    assert "nig_labels" not in paper.label_maps


def test_components_mode_keeps_more_of_y_t_than_the_paper(tiny_full_model, phantom):
    checkpoint = tiny_full_model.checkpoint
    paper = heal_adapt(phantom.target, checkpoint, HEALConfig(stages="hd", denoise="paper"), CPU)
    components = heal_adapt(phantom.target, checkpoint, HEALConfig(stages="hd", denoise="components"), CPU)
    pseudo = paper.label_maps["pseudo_labels"]
    kept_paper = int((paper.labels > 0).sum())
    kept_components = int((components.labels > 0).sum())
    assert kept_paper < kept_components <= int((pseudo > 0).sum())


def test_report_says_per_class_what_the_denoising_removed_and_kept(tiny_full_model, phantom):
    checkpoint = tiny_full_model.checkpoint
    result = heal_adapt(phantom.target, checkpoint, HEALConfig(stages="hd", denoise="components"), CPU)
    summary = result.report()["denoising"]
    assert summary["mode"] == "components" and summary["note"] == CANNOT_ADD
    assert summary["markers"] == "entropy" and summary["grouping"] == "class"
    maps = result.label_maps
    for entry in summary["classes"]:
        v = entry["value"]
        source = maps["pseudo_labels"] == v
        assert entry["source_voxels"] == int(source.sum())  # network grid == input grid here
        assert entry["kept_voxels"] == int((result.labels == v).sum())
        assert entry["removed_voxels"] == entry["source_voxels"] - entry["kept_voxels"]
        assert entry["removed_by_entropy"] == int((source & (maps["entropy_labels"] != v)).sum())
        assert entry["removed_by_nig"] == int((source & (maps["entropy_labels"] == v)
                                              & (maps["nig_labels"] != v)).sum())
        assert entry["kept_components"] <= entry["components"]


def test_bad_denoising_settings_are_refused_before_any_work(tiny_full_model, phantom):
    from SFUDASegmentLib.errors import InputError as Refused

    for field, value in (("denoise", "erode"), ("component_markers", "gt"), ("component_grouping", "x"),
                         ("orphan_classes", "maybe")):
        with pytest.raises(Refused, match=field):
            heal_adapt(phantom.target, tiny_full_model.checkpoint, replace(HEALConfig(stages="hd"), **{field: value}), CPU)


# --------------------------------------------------------------------------- round trip


def test_round_trip_scores_the_rendered_ground_truth_against_the_labels(tiny_full_model, phantom):
    checkpoint = tiny_full_model.checkpoint
    config = HEALConfig(candidates=2, steps=3, seed=1)
    image, labels = tiny_full_model.train_images[0], tiny_full_model.train_labels[0]
    figure = diffusion_round_trip(checkpoint, [image], [labels], config, CPU, max_slices=4)
    assert set(figure["per_class"]) == {c.name for c in checkpoint.classes}
    assert 0.0 <= figure["round_trip_dice"] <= 1.0 and 0.0 < figure["source_dice"] <= 1.0
    assert figure["slices"] == 1 and figure["candidates"] == 2
    # The figure is the edge-guided segmentation of the ground truth itself: run the same stage by hand.
    from SFUDASegmentLib.heal.pipeline import edge_guided_segmentation
    from SFUDASegmentLib.inference.preparation import labels_on_network_grid, prepare_input
    from SFUDASegmentLib.utils.device import resolve_device

    prepared = prepare_input(image, checkpoint.input_spec)
    truth = labels_on_network_grid(labels, checkpoint.classes, prepared, "case")
    model = checkpoint.build_segmentation_net(resolve_device("cpu"))
    seg = edge_guided_segmentation(checkpoint, prepared, truth.astype(np.int64), config, CPU,
                                   resolve_device("cpu"), model).segmentation
    dices = []
    for k in range(1, checkpoint.num_classes):
        p, r = seg == k, truth == k
        if p.sum() + r.sum():
            dices.append(2 * (p & r).sum() / (p.sum() + r.sum()))
    assert figure["round_trip_dice"] == pytest.approx(float(np.mean(dices)))


def test_round_trip_warning_when_far_below_the_source_or_missing():
    assert "no round-trip figure" in round_trip_warning({})
    low = {ROUND_TRIP_KEY: {"round_trip_dice": 0.2, "source_dice": 0.8}}
    assert "far below" in round_trip_warning(low) and "0.20" in round_trip_warning(low)
    assert round_trip_warning({ROUND_TRIP_KEY: {"round_trip_dice": 0.7, "source_dice": 0.8}}) is None


def test_heal_reports_the_warning_past_the_denoising_only(tiny_full_model, phantom):
    checkpoint = tiny_full_model.checkpoint
    assert heal_adapt(phantom.target, checkpoint, HEALConfig(stages="hd"), CPU).extra["warnings"] == []
    warned = heal_adapt(phantom.target, checkpoint, HEALConfig(stages="hd+egs", candidates=2, steps=2), CPU)
    assert warned.extra["warnings"] == [round_trip_warning(checkpoint.provenance)]
