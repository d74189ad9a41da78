"""The MRML bridge (SFUDASegmentLib.slicer_bridge.mrml) on a real MRML scene from the slicer-core wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SFUDASegmentLib.config import LabelClass
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.results.result import Result, structure_statistics
from SFUDASegmentLib.slicer_bridge import mrml
from mrml_scene import mrml_scene  # noqa: F401  (pytest fixture)

FLIP = np.diag([-1.0, -1.0, 1.0])
CLASSES = [LabelClass(1, "liver", (0.9, 0.3, 0.25)), LabelClass(4, "kidney", (0.3, 0.7, 0.35)),
           LabelClass(2, "tumour", (0.25, 0.5, 0.9))]


def rotation(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    """Rodrigues rotation matrix (3x3)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def oblique_geometry() -> Geometry:
    """Anisotropic spacing (sz, sy, sx), a non-zero LPS origin and an oblique direction."""
    return Geometry(spacing=(2.5, 0.8, 0.7), origin=(12.5, -40.25, 7.0),
                    direction=tuple(rotation((0.3, -0.5, 1.0), 0.4).ravel()))


def make_result(rng: np.random.Generator, shape=(5, 6, 7), geometry=None) -> Result:
    """A HEAL-like result built from arrays; the 'tumour' class (value 2) is empty."""
    geometry = geometry or oblique_geometry()
    labels = rng.choice(np.array([0, 1, 4], dtype=np.uint8), size=shape)
    maps = {"entropy": rng.random(shape).astype(np.float32),
            "nig_variance": (rng.random(shape) * 3.0 + 1.0).astype(np.float32)}
    return Result(
        method="heal", labels=labels, classes=list(CLASSES), geometry=geometry, maps=maps,
        label_maps={"pseudo_labels": np.roll(labels, 1, axis=-1),
                    "refined_labels": labels.astype(np.int16)},
        candidates=rng.standard_normal((3, *shape)).astype(np.float32),
        candidate_scores=[0.25, 0.75, 0.5], selected_index=1,
        structure_stats=structure_statistics(labels, CLASSES, geometry, maps))


def scene_snapshot(scene) -> dict[str, str]:
    """Node ID -> name of every node in the scene."""
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetName()
            for i in range(scene.GetNumberOfNodes())}


def table_rows(node) -> list[dict]:
    """Rows of a table node as dicts (doubles as float, strings as str)."""
    table = node.GetTable()
    return [{table.GetColumnName(c): table.GetValue(r, c).ToString()
             if table.GetColumn(c).IsA("vtkStringArray") else table.GetValue(r, c).ToDouble()
             for c in range(table.GetNumberOfColumns())} for r in range(table.GetNumberOfRows())]


def node_array(node) -> np.ndarray:
    import slicer

    return np.array(slicer.util.arrayFromVolume(node))


def test_module_imports_without_slicer():
    code = ("import sys; sys.modules['slicer'] = None; sys.modules['vtk'] = None; "
            "import SFUDASegmentLib.slicer_bridge.mrml")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_volume_round_trip_is_exact(mrml_scene, rng):
    volume = Volume(rng.standard_normal((5, 6, 7)).astype(np.float32), oblique_geometry())
    original = volume.array.copy()
    node = mrml.add_volume_node(volume, "vol", mrml_scene)
    back = mrml.volume_from_node(node)
    assert back.geometry == volume.geometry
    assert back.array.dtype == np.float32 and np.array_equal(back.array, original)
    assert np.array_equal(volume.array, original)
    # The IJK-to-RAS matrix computed by hand: RAS = F (origin + D diag(sx, sy, sz) ijk).
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    got = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    d = np.reshape(volume.geometry.direction, (3, 3))
    assert np.allclose(got[:3, :3], FLIP @ d @ np.diag([0.7, 0.8, 2.5]), atol=1e-12)
    assert np.allclose(got[:3, 3], FLIP @ np.array([12.5, -40.25, 7.0]), atol=1e-12)
    # volume_from_node returns a copy: changing it does not change the node.
    back.array[:] = 0
    assert np.array_equal(node_array(node), original)


def test_volume_geometry_agrees_with_simpleitk(mrml_scene, rng, tmp_path):
    import slicer
    import SimpleITK as sitk

    volume = Volume(rng.integers(-100, 100, (4, 5, 6)).astype(np.int16), oblique_geometry())
    node = mrml.add_volume_node(volume, "written", mrml_scene)
    mrml.save_node(node, tmp_path / "written.nrrd")
    image = sitk.ReadImage(str(tmp_path / "written.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(image), volume.array)
    assert np.allclose(image.GetSpacing(), volume.geometry.spacing[::-1], atol=1e-9)
    assert np.allclose(image.GetOrigin(), volume.geometry.origin, atol=1e-9)
    assert np.allclose(image.GetDirection(), volume.geometry.direction, atol=1e-9)

    # The other way: a file written by SimpleITK, read by a Slicer storage node.
    other = sitk.GetImageFromArray(rng.random((3, 4, 5)).astype(np.float32))
    other.SetSpacing((0.5, 1.5, 3.0))
    other.SetOrigin((-3.0, 4.0, 100.0))
    other.SetDirection(tuple(rotation((1.0, 1.0, 0.2), -0.7).ravel()))
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    loaded = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "other.nrrd"))
    assert storage.ReadData(loaded)
    got = mrml.volume_from_node(loaded)
    assert np.array_equal(got.array, sitk.GetArrayFromImage(other))
    assert np.allclose(got.geometry.spacing, (3.0, 1.5, 0.5), atol=1e-9)
    assert np.allclose(got.geometry.origin, other.GetOrigin(), atol=1e-9)
    assert np.allclose(got.geometry.direction, other.GetDirection(), atol=1e-9)
    assert isinstance(loaded, slicer.vtkMRMLScalarVolumeNode)


def test_2d_image_becomes_one_slice_and_int64_is_stored_as_int32(mrml_scene):
    d2 = rotation((0, 0, 1), 0.3)[:2, :2]
    image = Volume(np.arange(12, dtype=np.int64).reshape(3, 4),
                   Geometry(spacing=(0.5, 0.25), origin=(3.0, -2.0), direction=tuple(d2.ravel())))
    back = mrml.volume_from_node(mrml.add_volume_node(image, "slice", mrml_scene))
    assert back.array.shape == (1, 3, 4) and back.array.dtype == np.int32
    assert np.array_equal(back.array[0], image.array)
    assert back.geometry.spacing == (1.0, 0.5, 0.25)
    assert back.geometry.origin == (3.0, -2.0, 0.0)
    assert np.allclose(np.reshape(back.geometry.direction, (3, 3))[:2, :2], d2, atol=0)


def test_result_layers_leave_input_untouched(mrml_scene, rng):
    import vtk

    result = make_result(rng)
    input_node = mrml.add_volume_node(
        Volume(rng.standard_normal((5, 6, 7)).astype(np.float32), result.geometry), "CT",
        mrml_scene)
    before_array = node_array(input_node)
    before_matrix, after_matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    input_node.GetIJKToRASMatrix(before_matrix)
    before_mtime = input_node.GetMTime()
    before_nodes = scene_snapshot(mrml_scene)

    nodes = mrml.add_result_to_scene(result, input_node)

    assert np.array_equal(node_array(input_node), before_array)
    input_node.GetIJKToRASMatrix(after_matrix)
    assert all(before_matrix.GetElement(r, c) == after_matrix.GetElement(r, c)
               for r in range(4) for c in range(4))
    assert input_node.GetMTime() == before_mtime
    after_nodes = scene_snapshot(mrml_scene)
    assert all(after_nodes.get(i) == name for i, name in before_nodes.items())
    assert set(nodes) == {"segmentation", "map_entropy", "map_nig_variance", "label_colors",
                          "label_map_pseudo_labels", "label_map_refined_labels", "candidates",
                          "candidate_browser", "candidate_proxy", "candidate_scores",
                          "statistics"}
    assert all(n.GetName().startswith("CT_heal_") for n in nodes.values())
    assert all(n.GetID() not in before_nodes for n in nodes.values())


def test_segmentation_segments_and_round_trip(mrml_scene, rng):
    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    seg = mrml.add_result_to_scene(result, input_node)["segmentation"]
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for i, c in enumerate(CLASSES):
        segment = segmentation.GetNthSegment(i)
        assert segmentation.GetNthSegmentID(i) == c.name
        assert segment.GetName() == c.name
        assert np.allclose(segment.GetColor(), c.color)
        assert segment.GetLabelValue() == c.value
    back = mrml.labels_from_segmentation_node(seg, CLASSES, input_node)
    assert np.array_equal(back, result.labels)
    assert not (back == 2).any()  # the empty class has an empty segment


def test_maps_label_maps_candidates_and_tables(mrml_scene, rng):
    import slicer

    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    nodes = mrml.add_result_to_scene(result, input_node, base_name="run")

    for key in ("entropy", "nig_variance"):
        node = nodes[f"map_{key}"]
        assert node.GetName() == f"run_{key}"
        got = mrml.volume_from_node(node)
        assert np.array_equal(got.array, result.maps[key]) and got.geometry == result.geometry
        display = node.GetDisplayNode()
        # "Inferno" is a file-based table that slicer-core lacks: the first fallback is used.
        assert display.GetColorNode().GetName() == "Iron"
        assert display.GetWindowLevelMin() == pytest.approx(float(result.maps[key].min()))
        assert display.GetWindowLevelMax() == pytest.approx(float(result.maps[key].max()))

    colors = nodes["label_colors"]
    for key, values in result.label_maps.items():
        node = nodes[f"label_map_{key}"]
        assert node.IsA("vtkMRMLLabelMapVolumeNode")
        assert np.array_equal(node_array(node), values)
        assert node.GetDisplayNode().GetColorNodeID() == colors.GetID()
    for c in CLASSES:
        rgba = [0.0] * 4
        colors.GetColor(c.value, rgba)
        assert colors.GetColorName(c.value) == c.name
        assert np.allclose(rgba, (*c.color, 1.0), atol=0.5 / 255)  # 8-bit table

    sequence, browser = nodes["candidates"], nodes["candidate_browser"]
    assert sequence.GetNumberOfDataNodes() == 3
    for i in range(3):
        item = sequence.GetNthDataNode(i)
        assert sequence.GetNthIndexValue(i) == str(i)
        assert np.array_equal(node_array(item), result.candidates[i])
        assert f"score={result.candidate_scores[i]:.6g}" in item.GetName()
        assert item.GetName().endswith("(selected)") == (i == 1)
    assert sequence.GetAttribute("SFUDA.selected_index") == "1"
    assert browser.GetSelectedItemNumber() == 1
    proxy = nodes["candidate_proxy"]
    assert proxy is browser.GetProxyNode(sequence) and proxy.GetName() == "run_candidates_current"
    assert np.array_equal(node_array(proxy), result.candidates[1])
    browser.SetSelectedItemNumber(2)
    assert np.array_equal(slicer.util.arrayFromVolume(proxy), result.candidates[2])

    assert table_rows(nodes["candidate_scores"]) == [
        {"index": 0.0, "score": 0.25, "selected": 0.0},
        {"index": 1.0, "score": 0.75, "selected": 1.0},
        {"index": 2.0, "score": 0.5, "selected": 0.0}]
    stats = table_rows(nodes["statistics"])
    assert [r["name"] for r in stats] == ["liver", "kidney", "tumour"]
    for row, expected in zip(stats, result.structure_stats):
        assert row["value"] == expected["value"] and row["voxels"] == expected["voxels"]
        assert row["volume_ml"] == pytest.approx(expected["volume_ml"])
        assert row["mean_entropy"] == pytest.approx(expected["mean_entropy"], nan_ok=True)
    assert stats[2]["voxels"] == 0 and np.isnan(stats[2]["mean_entropy"])


def test_names_are_unique_when_added_twice(mrml_scene, rng):
    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    first = mrml.add_result_to_scene(result, input_node)
    second = mrml.add_result_to_scene(result, input_node)
    names = [n.GetName() for n in (*first.values(), *second.values())]
    assert len(set(names)) == len(names)
    assert first["segmentation"].GetName() == "MR_heal_segmentation"
    assert second["segmentation"].GetName() != "MR_heal_segmentation"
    assert all(name.startswith("MR_heal_") for name in names)


def test_remove_nodes_restores_the_scene_and_errors_roll_back(mrml_scene, rng):
    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    before = scene_snapshot(mrml_scene)
    mrml.remove_nodes(mrml.add_result_to_scene(result, input_node).values())
    assert scene_snapshot(mrml_scene) == before

    result.maps["nig_variance"] = np.zeros((5, 6, 8), np.float32)  # wrong grid, added 2nd
    with pytest.raises(InputError, match="nig_variance"):
        mrml.add_result_to_scene(result, input_node)
    assert scene_snapshot(mrml_scene) == before

    shifted = make_result(rng, geometry=Geometry((2.5, 0.8, 0.7), origin=(0.0, 0.0, 50.0)))
    with pytest.raises(InputError, match="geometry"):
        mrml.add_result_to_scene(shifted, input_node)
    assert scene_snapshot(mrml_scene) == before


def test_seg_nrrd_written_and_read_back(mrml_scene, rng, tmp_path):
    import SimpleITK as sitk

    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    seg = mrml.add_segmentation_node(result.labels, CLASSES, input_node, "seg")
    path = tmp_path / "result.seg.nrrd"
    mrml.save_node(seg, path)

    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), result.labels)
    assert np.allclose(image.GetOrigin(), result.geometry.origin, atol=1e-6)
    assert np.allclose(image.GetDirection(), result.geometry.direction, atol=1e-6)
    segments = {image.GetMetaData(f"Segment{i}_Name"):
                int(image.GetMetaData(f"Segment{i}_LabelValue")) for i in range(3)}
    assert segments == {c.name: c.value for c in CLASSES}

    reloaded = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(reloaded)
    assert np.array_equal(mrml.labels_from_segmentation_node(reloaded, CLASSES, input_node),
                          result.labels)


def test_2d_result_on_one_slice_volume(mrml_scene, rng):
    geometry2d = Geometry(spacing=(0.5, 0.4), origin=(1.0, 2.0))
    result = make_result(rng, shape=(6, 7), geometry=geometry2d)
    input_node = mrml.add_volume_node(Volume(rng.random((6, 7)).astype(np.float32), geometry2d),
                                      "fundus", mrml_scene)
    nodes = mrml.add_result_to_scene(result, input_node)
    labels = mrml.labels_from_segmentation_node(nodes["segmentation"], CLASSES, input_node)
    assert labels.shape == (1, 6, 7) and np.array_equal(labels[0], result.labels)
    assert np.array_equal(node_array(nodes["map_entropy"])[0], result.maps["entropy"])
    assert nodes["candidates"].GetNumberOfDataNodes() == 3


def test_map_colour_table_by_name_with_fallback(mrml_scene, rng):
    values = rng.random((2, 3, 4)).astype(np.float32)
    geometry = Geometry((1.0, 1.0, 1.0))
    rainbow = mrml.add_map_node(values, "m", geometry, "Rainbow", mrml_scene)
    missing = mrml.add_map_node(values, "m", geometry, "NoSuchTable", mrml_scene)
    constant = mrml.add_map_node(np.full((2, 3, 4), 2.0), "c", geometry, "PET-Heat", mrml_scene)
    assert rainbow.GetDisplayNode().GetColorNode().GetName() == "Rainbow"
    assert missing.GetDisplayNode().GetColorNode().GetName() == "Iron"
    assert constant.GetDisplayNode().GetColorNode().GetName() == "PET-Heat"
    assert constant.GetDisplayNode().GetWindowLevelMin() == 2.0
    assert constant.GetDisplayNode().GetWindowLevelMax() > 2.0
    assert rainbow.GetName() != missing.GetName()


def test_table_columns_types_and_missing_values(mrml_scene):
    rows = [{"name": "a", "x": 1, "flag": True}, {"name": "b", "y": 2.5, "flag": False}]
    node = mrml.add_table_node(rows, "t", mrml_scene)
    table = node.GetTable()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [
        "name", "x", "flag", "y"]
    assert table.GetColumnByName("name").IsA("vtkStringArray")
    assert table.GetColumnByName("x").IsA("vtkDoubleArray")
    got = table_rows(node)
    assert got[0]["name"] == "a" and got[0]["x"] == 1.0 and got[0]["flag"] == 1.0
    assert np.isnan(got[0]["y"]) and np.isnan(got[1]["x"]) and got[1]["y"] == 2.5


def test_bad_labels_and_candidates_are_rejected(mrml_scene):
    geometry = Geometry((1.0, 1.0, 1.0))
    reference = mrml.add_volume_node(Volume(np.zeros((2, 3, 4), np.float32), geometry), "ref",
                                     mrml_scene)
    before = scene_snapshot(mrml_scene)
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 0, 0] = 7
    with pytest.raises(InputError, match=r"\[7\]"):
        mrml.add_segmentation_node(labels, CLASSES, reference, "seg")
    with pytest.raises(InputError, match="shape"):
        mrml.add_segmentation_node(np.zeros((2, 3, 5), np.uint8), CLASSES, reference, "seg")
    with pytest.raises(InputError, match="scores"):
        mrml.add_candidate_sequence(np.zeros((2, 2, 3, 4)), geometry, "c", [1.0], 0, mrml_scene)
    with pytest.raises(InputError, match="scalar volume"):
        mrml.volume_from_node(mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "t"))
    assert set(scene_snapshot(mrml_scene)) - set(before) == {
        mrml_scene.GetFirstNodeByName("t").GetID()}


def test_run_goes_into_one_folder_under_the_input_study_and_leaves_with_it(mrml_scene, rng):
    import slicer
    import vtk

    from SFUDASegmentLib.slicer_bridge import run_folder

    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "P1"),
                                      "MR brain")
    hierarchy.CreateItem(study, input_node)
    # A node of the user's elsewhere in the hierarchy is neither moved nor removed.
    elsewhere = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "earlier table")
    hierarchy.CreateItem(hierarchy.GetSceneItemID(), elsewhere)
    before = scene_snapshot(mrml_scene)

    nodes = mrml.add_result_to_scene(result, input_node, folder_name="HEAL (learning-free): MR")
    again = mrml.add_result_to_scene(result, input_node, folder_name="HEAL (learning-free): MR")
    folder = run_folder.run_folder_of(nodes["segmentation"])
    assert hierarchy.GetItemName(folder) == "HEAL (learning-free): MR"
    assert hierarchy.GetItemName(run_folder.run_folder_of(again["statistics"])) == \
        "HEAL (learning-free): MR (2)"
    assert hierarchy.GetItemParent(folder) == study
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(folder, children)
    in_folder = {hierarchy.GetItemDataNode(children.GetId(i)).GetID()
                 for i in range(children.GetNumberOfIds())}
    assert in_folder == {n.GetID() for n in nodes.values()}  # every node of the run, no other
    assert len(nodes) >= 10

    # In Slicer every new node already has an item (at the top): it is moved, not doubled.
    moved = mrml.add_table_node([{"a": 1}], "moved")
    hierarchy.CreateItem(hierarchy.GetSceneItemID(), moved)
    item_count = hierarchy.GetNumberOfItems()
    assert run_folder.put_in_run_folder([moved], input_node, "one more") == \
        run_folder.run_folder_of(moved)
    assert hierarchy.GetNumberOfItems() == item_count + 1  # the folder; the table's item moved

    run_folder.remove_run_folder(mrml_scene, folder)
    run_folder.remove_run_folder(mrml_scene, run_folder.run_folder_of(again["statistics"]))
    run_folder.remove_run_folder(mrml_scene, run_folder.run_folder_of(moved))
    # Data, display and storage nodes of both runs are gone; the input and the rest stay.
    assert scene_snapshot(mrml_scene) == before
    assert hierarchy.GetItemByDataNode(input_node) and np.array_equal(
        node_array(input_node), np.zeros((5, 6, 7), np.float32))


def test_2d_rgb_candidates_become_vector_volumes(mrml_scene, rng):
    geometry2d = Geometry(spacing=(0.5, 0.4), origin=(1.0, 2.0))
    candidates = rng.random((2, 6, 7, 3)).astype(np.float32)
    sequence, browser = mrml.add_candidate_sequence(candidates, geometry2d, "rgb", [0.1, 0.2], 0,
                                                    mrml_scene)
    item = sequence.GetNthDataNode(1)
    assert item.IsA("vtkMRMLVectorVolumeNode")
    assert np.array_equal(node_array(item), candidates[1][None])
    assert browser.GetProxyNode(sequence).IsA("vtkMRMLVectorVolumeNode")


def test_new_nodes_follow_the_input_transform(mrml_scene, rng):
    result = make_result(rng)
    input_node = mrml.add_volume_node(Volume(np.zeros((5, 6, 7), np.float32), result.geometry),
                                      "MR", mrml_scene)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    input_node.SetAndObserveTransformNodeID(transform.GetID())
    nodes = mrml.add_result_to_scene(result, input_node)
    transformable = [n for n in nodes.values() if n.IsA("vtkMRMLTransformableNode")]
    assert {"segmentation", "map_entropy", "label_map_refined_labels"} <= {
        k for k, n in nodes.items() if n in transformable}
    assert all(n.GetTransformNodeID() == transform.GetID() for n in transformable)
    assert input_node.GetTransformNodeID() == transform.GetID()
