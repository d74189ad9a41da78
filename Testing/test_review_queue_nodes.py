"""The review queue in a real MRML scene (slicer-core): its table node, and the slice views
jumping to the region of a chosen row."""

from __future__ import annotations

import numpy as np
import pytest

from SFUDASegmentLib.config import LabelClass
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.slicer_bridge.mrml import add_volume_node
from SFUDASegmentLib.slicer_bridge.review_queue_nodes import (add_review_queue_table, jump_slices_to_region,
                                                              jump_slices_to_row, region_center_ras)
from SFUDASegmentLib.uncertainty.review_queue import review_queue
from mrml_scene import mrml_scene  # noqa: F401

ORGAN = LabelClass(1, "organ")
OBLIQUE = Geometry((2.5, 0.8, 0.9), (-12.5, 30.25, 8.0),
                   (0.8660254, -0.5, 0.0, 0.4698463, 0.8137977, -0.3420201, 0.1710101, 0.2961981, 0.9396926))


def add_slice_views(scene) -> list:
    """Red (axial), Yellow (sagittal) and Green (coronal) slice nodes, as Slicer's layout makes them."""
    import slicer

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    nodes = []
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        node.SetOrientation(orientation)
        nodes.append(scene.AddNode(node))
        node.UnRegister(None)
    return nodes


def offsets_match(nodes, point) -> None:
    """Every slice passes through ``point``: its offset is its normal dotted with the point."""
    for node in nodes:
        matrix = node.GetSliceToRAS()
        normal = np.array([matrix.GetElement(r, 2) for r in range(3)])
        assert node.GetSliceOffset() == pytest.approx(float(normal @ np.asarray(point)), abs=1e-6), node.GetName()
    red, yellow, green = nodes
    assert abs(red.GetSliceOffset()) == pytest.approx(abs(point[2]))       # axial: S
    assert abs(yellow.GetSliceOffset()) == pytest.approx(abs(point[0]))    # sagittal: R
    assert abs(green.GetSliceOffset()) == pytest.approx(abs(point[1]))     # coronal: A


def hand_queue() -> tuple[np.ndarray, list[dict]]:
    u = np.zeros((6, 20, 20), np.float32)
    u[1:3, 2:5, 3:6] = 0.9
    u[4, 12:16, 12:18] = 0.7
    labels = np.zeros(u.shape, np.uint8)
    labels[4, 10:18, 10:18] = ORGAN.value
    return u, review_queue(labels, u, OBLIQUE, [ORGAN], 0.5)


def test_choosing_a_row_moves_every_slice_view_to_the_regions_centre(mrml_scene):
    u, queue = hand_queue()
    views = add_slice_views(mrml_scene)
    table = add_review_queue_table(queue, "review", mrml_scene)
    assert table.GetNumberOfRows() == 2
    assert [table.GetCellText(r, 1) for r in range(2)] == [q["structure"] for q in queue]
    for row, region in enumerate(queue):
        point = jump_slices_to_row(table, row)
        np.testing.assert_allclose(point, region["center_ras"], atol=1e-6)
        offsets_match(views, region["center_ras"])
        assert views[0].GetSliceToRAS().GetElement(0, 3) == pytest.approx(region["center_ras"][0])  # centred
    # the centre is the voxel the volume node puts at that RAS point (Slicer's own IJK -> RAS)
    import vtk

    node = add_volume_node(Volume(u, OBLIQUE), "map", mrml_scene)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    k, j, i = queue[1]["center_index"]
    np.testing.assert_allclose(ijk_to_ras.MultiplyPoint((i, j, k, 1.0))[:3], queue[1]["center_ras"], atol=1e-6)


def test_a_parent_transform_moves_the_jump_with_the_volume(mrml_scene):
    import vtk

    _, queue = hand_queue()
    views = add_slice_views(mrml_scene)
    volume = add_volume_node(Volume(np.zeros((6, 20, 20), np.float32), OBLIQUE), "scan", mrml_scene)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    shift.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    point = jump_slices_to_region(queue[0], mrml_scene, volume)
    expected = np.asarray(queue[0]["center_ras"]) + [10.0, 0.0, -4.0]
    np.testing.assert_allclose(point, expected, atol=1e-6)
    offsets_match(views, expected)


def test_a_2d_queue_jumps_to_s_zero_and_an_empty_queue_gives_an_empty_table(mrml_scene):
    u = np.zeros((10, 10))
    u[3:5, 6:8] = 1.0
    queue = review_queue(np.zeros((10, 10), np.uint8), u, Geometry((0.5, 0.5), (3.0, -2.0)), [ORGAN], 0.5)
    assert "area_mm2" in queue[0] and region_center_ras(queue[0])[2] == 0.0
    views = add_slice_views(mrml_scene)
    table = add_review_queue_table(queue, "review2d", mrml_scene)
    assert table.GetColumnName(2) == "area_mm2"
    offsets_match(views, jump_slices_to_row(table, 0))
    empty = add_review_queue_table([], "empty", mrml_scene)
    assert empty.GetNumberOfRows() == 0 and empty.GetTable().GetColumnByName("center_S") is not None
    with pytest.raises(InputError, match="row 0 does not exist"):
        jump_slices_to_row(empty, 0)
    with pytest.raises(InputError, match="no centre"):
        region_center_ras({"rank": 1})


def test_a_result_with_a_recommended_map_brings_its_queue_into_the_scene(mrml_scene):
    """What the panel loads: add_result_to_scene adds the queue table beside the maps, the panel's
    recommended overlay is that map's node, and a click on a row (jump_slices_to_row on the
    table the result brought) moves the slice views to that region."""
    from SFUDASegmentLib.results.result import Result
    from SFUDASegmentLib.slicer_bridge import mrml, panel_support

    u, queue = hand_queue()
    labels = np.zeros(u.shape, np.uint8)
    labels[4, 10:18, 10:18] = ORGAN.value
    input_node = add_volume_node(Volume(np.zeros(u.shape, np.float32), OBLIQUE), "scan", mrml_scene)
    views = add_slice_views(mrml_scene)
    result = Result(method="none", labels=labels, classes=[ORGAN], geometry=OBLIQUE,
                    maps={"entropy": u, "flip_entropy": u * 0.5}, review_queue=queue,
                    reliability={"map": "flip_entropy", "text": "Measured on phantoms.", "warnings": []})
    nodes = mrml.add_result_to_scene(result, input_node)
    assert nodes["review_queue"].GetNumberOfRows() == len(queue) == 2
    key = panel_support.recommended_map_key(result.reliability, nodes)
    assert key == "map_flip_entropy" and nodes[key].GetName().endswith("_flip_entropy")
    assert panel_support.overlay_title("recommended", "flip_entropy") == \
        "Recommended: " + panel_support.OVERLAY_LEGEND_TITLES["flip_entropy"]
    jump_slices_to_row(nodes["review_queue"], 1, input_node)
    offsets_match(views, queue[1]["center_ras"])
    # no recommended map (labels only): no queue table, the overlay falls back to entropy
    bare = mrml.add_result_to_scene(Result(method="none", labels=labels, classes=[ORGAN], geometry=OBLIQUE),
                                    input_node)
    assert "review_queue" not in bare and panel_support.recommended_map_key({}, bare) is None
    assert panel_support.recommended_map_key({"map": "mahalanobis"}, nodes) is None  # named but not loaded
