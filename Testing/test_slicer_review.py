"""What a reviewer sees of a result in Slicer, checked on a real MRML scene (slicer-core):
standard terminology on the segments (slicer_bridge.terminology), the uncertainty overlay made
transparent where the model is confident, its colour legend, and the segmentation outline
(slicer_bridge.overlay_display)."""

from __future__ import annotations

import numpy as np
import pytest

from SFUDASegmentLib.config import LabelClass
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.results.result import Result
from SFUDASegmentLib.slicer_bridge import mrml, overlay_display, terminology
from mrml_scene import mrml_scene  # noqa: F401  (pytest fixture)

BRATS = [LabelClass(1, "necrosis", (0.9, 0.3, 0.2)), LabelClass(2, "edema", (0.3, 0.8, 0.3)),
         LabelClass(4, "enhancing", (0.9, 0.9, 0.2)), LabelClass(5, "ventricle", (0.2, 0.2, 0.9))]
GEOMETRY = Geometry(spacing=(2.0, 1.0, 1.0))


# ----------------------------------------------------------------------------- terminology


@pytest.mark.parametrize("name, expected", [
    ("necrosis", "necrosis"), ("Necrotic core", "necrosis"), ("NCR/NET", "necrosis"),
    ("non-enhancing tumour core", "necrosis"), ("NETC", "necrosis"), ("edema", "edema"),
    ("Peritumoral oedema", "edema"), ("ED", "edema"), ("enhancing", "enhancing"),
    ("GD-enhancing tumor", "enhancing"), ("ET", "enhancing"), ("whole tumour", None),
    ("tumor core", None), ("liver", None), ("vessel", None), ("", None),
])
def test_brats_classes_are_recognised_by_name(name: str, expected) -> None:
    assert terminology.brats_class(name) == expected


def test_brats_terminology_uses_the_monai_auto3dseg_codes() -> None:
    found = terminology.class_terminology(BRATS)
    assert set(found) == {"necrosis", "edema", "enhancing"}  # no guess for 'ventricle'
    assert found["edema"] == (
        "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered "
        "Structure~SCT^79654002^Edema~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")
    assert "~SCT^6574001^Necrosis~" in found["necrosis"]
    assert "~SCT^86049000^Neoplasm, Primary~" in found["enhancing"]


def test_card_terminology_overrides_names_and_covers_other_classes() -> None:
    card = {"provenance": {"terminology": {
        "ventricle": {"category": "SCT^123037004^Anatomical Structure",
                      "type": "SCT^35764002^Brain ventricle"},
        "1": "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically "
             "Altered Structure~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~^^~^^",
        "edema": {"category": "SCT^49755003", "type": "SCT^79654002^Edema"},
    }}}
    found = terminology.class_terminology(BRATS, card)
    assert found["ventricle"].split("~")[1:3] == ["SCT^123037004^Anatomical Structure",
                                                  "SCT^35764002^Brain ventricle"]
    assert "~SCT^4147007^Mass~" in found["necrosis"]  # by label value, before the name rule
    assert "~SCT^79654002^Edema~" in found["edema"]  # the malformed card entry is not used
    _, problems = terminology.card_terminology(card)
    assert len(problems) == 1 and "'edema'" in problems[0] and "category" in problems[0]


@pytest.mark.parametrize("value, words", [
    ("SCT^1^a~SCT^2^b", "7 '~'-separated fields"),
    ({"category": "SCT^1^a"}, "'type'"),
    ({"category": "SCT^1^a", "type": "SCT^2^b", "colour": "red"}, "Unknown terminology field"),
    (42, "string or a dict"),
])
def test_malformed_terminology_is_rejected_with_the_reason(value, words: str) -> None:
    with pytest.raises(ValueError) as info:
        terminology.parse_entry(value)
    assert words in str(info.value)


def test_segments_carry_terminology_that_slicer_reads_and_writes(mrml_scene, tmp_path) -> None:
    import slicer
    import vtk

    labels = np.zeros((3, 8, 9), np.uint8)
    labels[1, 2:5, 2:5], labels[1, 5:7, 5:8], labels[2, 1:3, 1:3] = 1, 2, 4
    input_node = mrml.add_volume_node(Volume(labels.astype(np.float32), GEOMETRY), "FLAIR")
    result = Result(method="none", labels=labels, classes=BRATS, geometry=GEOMETRY,
                    maps={"entropy": np.zeros(labels.shape, np.float32)})
    nodes = mrml.add_result_to_scene(result, input_node,
                                     terminology=terminology.class_terminology(BRATS))
    segmentation = nodes["segmentation"].GetSegmentation()
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    codes = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = vtk.mutable("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), value)
        tag = str(value)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(tag, entry), tag  # Slicer parses it
        codes[segment.GetName()] = (entry.GetCategoryObject().GetCodeValue(),
                                    entry.GetTypeObject().GetCodeValue(),
                                    entry.GetTypeObject().GetCodeMeaning())
    assert codes == {"necrosis": ("49755003", "6574001", "Necrosis"),
                     "edema": ("49755003", "79654002", "Edema"),
                     "enhancing": ("49755003", "86049000", "Neoplasm, Primary"),
                     "ventricle": ("85756007", "85756007", "Tissue")}  # Slicer's generic default
    # The .seg.nrrd (what DICOM SEG export and other tools read) keeps the codes.
    path = tmp_path / "brats.seg.nrrd"
    mrml.save_node(nodes["segmentation"], str(path))
    header = path.read_bytes()[:20000].decode("latin-1")
    assert "SCT^79654002^Edema" in header and "SCT^6574001^Necrosis" in header


# ----------------------------------------------------------------------------- overlay display


@pytest.fixture
def review_nodes(mrml_scene, rng):  # noqa: F811
    """A result with an entropy map 0..2 bits (a ramp along x) on a 4x6x10 grid."""
    shape = (4, 6, 10)
    entropy = np.broadcast_to(np.linspace(0.0, 2.0, shape[2], dtype=np.float32), shape).copy()
    labels = (entropy > 1.0).astype(np.uint8)
    classes = [LabelClass(1, "lesion", (1.0, 0.0, 0.0))]
    input_node = mrml.add_volume_node(Volume(rng.random(shape).astype(np.float32), GEOMETRY), "T2")
    result = Result(method="heal", labels=labels, classes=classes, geometry=GEOMETRY,
                    maps={"entropy": entropy, "nig_variance": entropy / 2.0})
    return input_node, mrml.add_result_to_scene(result, input_node)


def test_overlay_is_transparent_below_the_movable_threshold(review_nodes) -> None:
    _, nodes = review_nodes
    entropy = nodes["map_entropy"]
    assert overlay_display.map_range(entropy) == (0.0, 2.0)
    assert overlay_display.set_transparent_below(entropy, 0.25) == pytest.approx(0.5)
    display = entropy.GetDisplayNode()
    assert display.GetApplyThreshold() == 1 and display.GetAutoThreshold() == 0
    assert (display.GetLowerThreshold(), display.GetUpperThreshold()) == pytest.approx((0.5, 2.0))
    assert overlay_display.set_transparent_below(entropy, 0.6) == pytest.approx(1.2)
    assert display.GetLowerThreshold() == pytest.approx(1.2)  # the user moved the slider
    assert overlay_display.set_transparent_below(entropy, 7.0) == pytest.approx(2.0)  # clamped
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 2.0))


def test_review_shows_a_legend_and_the_outline_above_the_overlay(review_nodes, mrml_scene) -> None:
    input_node, nodes = review_nodes
    composite = mrml_scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    overlay_display.show_review(input_node, nodes["map_entropy"], nodes["segmentation"], 0.4,
                                0.1, "Voxel entropy (bits)",
                                (nodes["map_entropy"], nodes["map_nig_variance"]))
    assert composite.GetBackgroundVolumeID() == input_node.GetID()
    assert composite.GetForegroundVolumeID() == nodes["map_entropy"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    legend = overlay_display.legend_of(nodes["map_entropy"])
    assert legend.IsA("vtkMRMLColorLegendDisplayNode") and legend.GetVisibility()
    assert legend.GetTitleText() == "Voxel entropy (bits)"
    assert legend.GetPrimaryDisplayNode() is nodes["map_entropy"].GetDisplayNode()
    assert nodes["map_entropy"].GetDisplayNode().GetLowerThreshold() == pytest.approx(0.2)
    segmentation = nodes["segmentation"].GetDisplayNode()
    assert segmentation.GetVisibility() and segmentation.GetVisibility2DOutline()
    assert segmentation.GetOpacity2DOutline() == 1.0 and not segmentation.GetVisibility2DFill()
    assert segmentation.GetSliceIntersectionThickness() == overlay_display.OUTLINE_THICKNESS

    # Switching to the other map hides the first legend and shows one for the second.
    overlay_display.show_review(input_node, nodes["map_nig_variance"], nodes["segmentation"], 0.4,
                                0.5, "NIG variance", (nodes["map_entropy"], nodes["map_nig_variance"]))
    assert not legend.GetVisibility()
    assert overlay_display.legend_of(nodes["map_nig_variance"]).GetVisibility()
    assert nodes["map_nig_variance"].GetDisplayNode().GetLowerThreshold() == pytest.approx(0.5)
    assert composite.GetForegroundVolumeID() == nodes["map_nig_variance"].GetID()
    # The legend goes with its map when the run is removed (no orphan display nodes).
    before = mrml_scene.GetNumberOfNodes()
    mrml.remove_nodes([nodes["map_entropy"]])
    assert mrml_scene.GetNumberOfNodes() == before - 3  # map, its display node, its legend
