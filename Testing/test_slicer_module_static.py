"""The Slicer module checked without Slicer: the .ui, the module file (read with ``ast``, never
imported: it needs Slicer's Qt), and the pure helpers it delegates to (``slicer_bridge.panel_support``).

What only runs inside the Slicer application (the widget, PythonQt, slice views, the self-test)
is checked statically here: widget names, parameter bindings, imports and the ``slicer`` API
names the module uses.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from SFUDASegmentLib.config import GMMConfig, HEALConfig
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.slicer_bridge import overlay_display
from SFUDASegmentLib.slicer_bridge import panel_support as support
from SFUDASegmentLib.slicer_bridge.child_queries import Answer

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "SFUDASegment" / "SFUDASegment.py"
UI_FILE = REPO / "Resources" / "UI" / "SFUDASegment.ui"


# ----------------------------------------------------------------------------- readers


@dataclass
class UiWidget:
    """One widget of the .ui file."""

    name: str
    cls: str
    properties: dict[str, Any] = field(default_factory=dict)


def _property_value(prop: ET.Element) -> Any:
    child = prop[0]
    if child.tag == "stringlist":
        return [s.text or "" for s in child.findall("string")]
    if child.tag in ("double", "number"):
        return float(child.text)
    if child.tag == "bool":
        return child.text == "true"
    return child.text


@pytest.fixture(scope="module")
def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)


@pytest.fixture(scope="module")
def ui_widgets(ui_tree: ET.ElementTree) -> dict[str, UiWidget]:
    widgets = {}
    for element in ui_tree.getroot().iter("widget"):
        props = {p.get("name"): _property_value(p) for p in element.findall("property") if len(p)}
        widgets[element.get("name")] = UiWidget(element.get("name"), element.get("class"), props)
    return widgets


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


@dataclass
class Field:
    """One field of the parameter node class: base type, validators, default."""

    base: str
    validators: dict[str, list[Any]]
    default: Any


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"class {name} not defined in {MODULE_FILE.name}"
    return found[0]


@pytest.fixture(scope="module")
def fields(module_tree: ast.Module) -> dict[str, Field]:
    result = {}
    for stmt in _class(module_tree, "SFUDASegmentParameterNode").body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        annotation, validators = stmt.annotation, {}
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            base, *extras = annotation.slice.elts
            for extra in extras:
                validators[ast.unparse(extra.func)] = [ast.literal_eval(a) for a in extra.args]
            annotation = base
        default = ast.literal_eval(stmt.value) if stmt.value is not None else None
        result[stmt.target.id] = Field(ast.unparse(annotation), validators, default)
    return result


def _ui_names_used(tree: ast.Module) -> set[str]:
    """Every ``X`` of ``self.ui.X`` in the module."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"}


# ----------------------------------------------------------------------------- the .ui


REQUIRED_WIDGETS = {
    "inputVolumeSelector": "qMRMLNodeComboBox", "checkpointPathLineEdit": "ctkPathLineEdit",
    "modelCardLabel": "QLabel", "compatibilityWarningLabel": "QLabel",
    "methodComboBox": "QComboBox", "deviceComboBox": "QComboBox", "gpuMemoryLabel": "QLabel",
    "tau1SliderWidget": "ctkSliderWidget", "tau2SliderWidget": "ctkSliderWidget",
    "candidatesSpinBox": "QSpinBox", "samplerComboBox": "QComboBox", "stepsSpinBox": "QSpinBox",
    "seedSpinBox": "QSpinBox", "gmmIterationsSpinBox": "QSpinBox",
    "gmmLambdaSliderWidget": "ctkSliderWidget", "denoiseComboBox": "QComboBox",
    "gmmGuardSliderWidget": "ctkSliderWidget", "resultNotesLabel": "QLabel", "applyButton": "QPushButton",
    "progressBar": "QProgressBar", "stageLabel": "QLabel", "statusLabel": "QLabel",
    "timeLabel": "QLabel", "logCollapsibleGroupBox": "ctkCollapsibleGroupBox",
    "logTextEdit": "QPlainTextEdit", "overlayComboBox": "QComboBox",
    "opacitySlider": "ctkSliderWidget", "overlayThresholdSlider": "ctkSliderWidget",
    "colorLegendLabel": "QLabel", "candidateTableView": "qMRMLTableView",
    "candidateSeekWidget": "qMRMLSequenceBrowserSeekWidget", "statisticsTableView": "qMRMLTableView",
}


def test_ui_parses_with_the_panel_sections_and_widgets(ui_tree: ET.ElementTree,
                                                       ui_widgets: dict[str, UiWidget]) -> None:
    root = ui_tree.getroot().find("widget")
    assert root.get("class") == "qMRMLWidget"
    for name, cls in REQUIRED_WIDGETS.items():
        assert name in ui_widgets, name
        assert ui_widgets[name].cls == cls, name
    sections = {w.properties.get("text"): w for w in ui_widgets.values()
                if w.cls == "ctkCollapsibleButton"}
    assert set(sections) == {"Inputs", "Parameters", "Run", "Review"}
    assert sections["Parameters"].properties.get("collapsed") is True
    log = ui_widgets["logCollapsibleGroupBox"]
    assert log.properties.get("title") == "Log" and log.properties.get("collapsed") is True
    assert ui_widgets["logTextEdit"].properties.get("readOnly") is True


def test_ui_declares_custom_widgets_and_scene_connections(ui_tree: ET.ElementTree,
                                                          ui_widgets: dict[str, UiWidget]) -> None:
    declared = {c.findtext("class") for c in ui_tree.getroot().iter("customwidget")}
    used = {w.cls for w in ui_widgets.values() if not w.cls.startswith("Q")}
    assert used <= declared, used - declared
    receivers = {c.findtext("receiver") for c in ui_tree.getroot().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml_widgets = {w.name for w in ui_widgets.values()
                    if w.cls in ("qMRMLNodeComboBox", "qMRMLTableView",
                                 "qMRMLSequenceBrowserSeekWidget")}
    assert receivers == mrml_widgets


def test_every_ui_name_the_module_uses_exists(module_tree: ast.Module,
                                              ui_widgets: dict[str, UiWidget]) -> None:
    used = _ui_names_used(module_tree)
    assert {"applyButton", "progressBar", "statusLabel", "candidateTableView",
            "candidateSeekWidget", "statisticsTableView", "modelCardLabel", "timeLabel",
            "logTextEdit", "gpuMemoryLabel", "colorLegendLabel"} <= used
    assert not used - set(ui_widgets), f"not in the .ui: {sorted(used - set(ui_widgets))}"


# A widget class -> the check that Slicer's parameterNodeWrapper GUI connectors make
# (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py): without a matching connector,
# connectGui raises at run time.
def _connector_problem(widget: UiWidget, f: Field) -> Optional[str]:
    bounded = "WithinRange" in f.validators
    if widget.cls == "QComboBox":
        return None if f.base in ("str", "int", "float", "bool") and "Choice" in f.validators \
            else "a combo box needs an Annotated str/int/float/bool with Choice"
    if widget.cls == "ctkSliderWidget":
        return None if f.base in ("float", "int") and bounded else "needs a float with WithinRange"
    if widget.cls in ("QSpinBox", "QSlider"):
        return None if f.base == "int" else "needs an int"
    if widget.cls == "ctkPathLineEdit":
        return None if f.base in ("pathlib.Path", "Path") else "needs pathlib.Path"
    if widget.cls == "qMRMLNodeComboBox":
        types = widget.properties.get("nodeTypes", [])
        return None if f.base.startswith("vtkMRML") and f.base in types else \
            f"node type {f.base} not in the combo box's nodeTypes {types}"
    return f"no parameter connector for a {widget.cls}"


def test_every_slicer_parameter_name_is_a_field_with_a_matching_connector(
        ui_widgets: dict[str, UiWidget], fields: dict[str, Field]) -> None:
    bound = {w.properties["SlicerParameterName"]: w for w in ui_widgets.values()
             if "SlicerParameterName" in w.properties}
    assert {"inputVolume", "checkpointPath", "method", "device", "tau1", "tau2", "candidates",
            "sampler", "steps", "seed", "gmmIterations", "gmmLambda", "healDenoise", "gmmGuard", "overlayMap",
            "overlayOpacity", "overlayThreshold"} <= set(bound)
    for name, widget in bound.items():
        assert name in fields, f"{widget.name}: SlicerParameterName '{name}' is not a field"
        problem = _connector_problem(widget, fields[name])
        assert problem is None, f"{widget.name} -> {name}: {problem}"
    # Every value-like widget of the Parameters/Inputs/Review sections is bound.
    for name in ("methodComboBox", "deviceComboBox", "tau1SliderWidget", "candidatesSpinBox",
                 "stepsSpinBox", "seedSpinBox", "gmmLambdaSliderWidget", "opacitySlider",
                 "overlayThresholdSlider"):
        assert "SlicerParameterName" in ui_widgets[name].properties, name


def test_field_defaults_are_valid_and_match_the_library(fields: dict[str, Field]) -> None:
    for name, f in fields.items():
        if "Choice" in f.validators:
            assert f.default in f.validators["Choice"][0], name
        if "WithinRange" in f.validators:
            low, high = f.validators["WithinRange"]
            assert low <= f.default <= high, name
    heal, gmm = HEALConfig(), GMMConfig()
    assert (fields["tau1"].default, fields["tau2"].default) == (heal.tau1, heal.tau2)
    assert fields["candidates"].default == heal.candidates
    assert fields["sampler"].default == heal.sampler
    assert fields["steps"].default == heal.steps
    assert fields["healStages"].default == heal.stages
    assert fields["seed"].default == heal.seed
    assert fields["gmmIterations"].default == gmm.iterations
    assert fields["gmmLambda"].default == gmm.lam
    assert fields["healDenoise"].default == heal.denoise
    assert fields["gmmGuard"].default == gmm.guard_agreement
    assert fields["overlayThreshold"].default == overlay_display.DEFAULT_HIDE_BELOW


def test_combo_box_choices_are_the_support_constants_in_label_order(fields: dict[str, Field]) -> None:
    # The widget relabels the items by index, so the orders must agree.
    expected = {"method": (support.METHODS, support.METHOD_LABELS),
                "device": (support.DEVICES, support.DEVICE_LABELS),
                "sampler": (support.SAMPLERS, support.SAMPLER_LABELS),
                "healStages": (support.HEAL_STAGES, support.STAGE_LABELS),
                "healDenoise": (support.DENOISE_MODES, support.DENOISE_LABELS),
                "overlayMap": (tuple(support.OVERLAY_NODE_KEYS), support.OVERLAY_LABELS)}
    for name, (values, labels) in expected.items():
        assert tuple(fields[name].validators["Choice"][0]) == tuple(values), name
        assert set(labels) == set(values), name


# ----------------------------------------------------------------------------- the module file


def test_module_defines_the_template_classes(module_tree: ast.Module) -> None:
    bases = {name: [ast.unparse(b) for b in _class(module_tree, name).bases] for name in
             ("SFUDASegment", "SFUDASegmentWidget", "SFUDASegmentLogic", "SFUDASegmentTest")}
    assert bases == {"SFUDASegment": ["ScriptedLoadableModule"],
                     "SFUDASegmentWidget": ["ScriptedLoadableModuleWidget", "VTKObservationMixin"],
                     "SFUDASegmentLogic": ["ScriptedLoadableModuleLogic"],
                     "SFUDASegmentTest": ["ScriptedLoadableModuleTest"]}
    wrapper = _class(module_tree, "SFUDASegmentParameterNode")
    assert [ast.unparse(d) for d in wrapper.decorator_list] == ["parameterNodeWrapper"]
    logic_methods = {n.name: n for n in _class(module_tree, "SFUDASegmentLogic").body
                     if isinstance(n, ast.FunctionDef)}
    assert {"process", "finishJob", "discardJob", "ensureDependencies", "getParameterNode"} <= set(
        logic_methods)
    process_args = [a.arg for a in logic_methods["process"].args.args]
    assert process_args == ["self", "inputVolume", "checkpointPath", "method", "parameters",
                            "waitForCompletion", "onProgress", "device"]
    tests = [n.name for n in _class(module_tree, "SFUDASegmentTest").body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert tests == ["test_NoAdaptationAndHeal", "test_CancelLeavesSceneUnchanged"]


def _module_constant(tree: ast.Module, name: str):
    found = [n.value for n in tree.body if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
    assert found, f"{name} is not set in {MODULE_FILE.name}"
    return ast.literal_eval(found[0])


def test_progress_bar_range_is_the_module_s(module_tree: ast.Module,
                                            ui_widgets: dict[str, UiWidget]) -> None:
    assert ui_widgets["progressBar"].properties["maximum"] == _module_constant(
        module_tree, "PROGRESS_STEPS")


def test_module_metadata_and_citations(module_tree: ast.Module) -> None:
    init = next(n for n in _class(module_tree, "SFUDASegment").body
                if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assigned = {ast.unparse(s.targets[0]): s.value for s in init.body if isinstance(s, ast.Assign)}
    assert ast.literal_eval(assigned["self.parent.title"]) == "SFUDA Segment"
    assert ast.literal_eval(assigned["self.parent.categories"]) == ["Segmentation"]
    help_text = ast.unparse(assigned["self.parent.helpText"])
    assert "README" in help_text and "folder" in help_text
    thanks = ast.literal_eval(assigned["self.parent.acknowledgementText"])
    for words in ("HEAL", "Stan", "Rostami", "Diffuse-UDA", "Gong", "prototypical"):
        assert words in thanks, words
    source = MODULE_FILE.read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert "registerCustomSampleDataSource" in source


def test_no_address_is_invented_anywhere() -> None:
    # The project has no public repository: its addresses are set in one place when it is
    # published (the top of CMakeLists.txt, from two empty variables), and nothing names one.
    files = [MODULE_FILE, REPO / "README.md", REPO / "CMakeLists.txt", UI_FILE,
             *REPO.glob("SFUDASegmentLib/**/*.py")]
    for path in files:
        for address in re.findall(r"https?://[^\s\"'<>)\]`]+", path.read_text()):
            assert "sfuda" not in address.lower(), (path.name, address)


def test_sample_data_has_a_readable_name_and_the_file_checksum(module_tree: ast.Module) -> None:
    assert _module_constant(module_tree, "SAMPLE_NAME") == "SFUDA phantom target"
    scan = REPO / "Resources" / "SampleData" / _module_constant(module_tree, "SAMPLE_SCAN_FILE")
    assert hashlib.sha256(scan.read_bytes()).hexdigest() == _module_constant(
        module_tree, "SAMPLE_SCAN_SHA256")
    register = next(n for n in ast.walk(module_tree) if isinstance(n, ast.Call)
                    and ast.unparse(n.func).endswith("registerCustomSampleDataSource"))
    keywords = {k.arg: ast.unparse(k.value) for k in register.keywords}
    assert keywords["checksums"] == "f'SHA256:{SAMPLE_SCAN_SHA256}'"
    assert keywords["sampleName"] == keywords["nodeNames"] == "SAMPLE_NAME"
    assert "SFUDA phantom target" in (REPO / "README.md").read_text()


def _library_imports(tree: ast.AST) -> list[str]:
    """Every ``SFUDASegmentLib`` module imported in ``tree`` (``from X import Y`` gives
    ``X.Y`` when that is a module, else ``X``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "SFUDASegmentLib"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "SFUDASegmentLib":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append(candidate if (REPO / (candidate.replace(".", "/") + ".py")).is_file()
                             else node.module)
    return sorted(set(found))


def test_slicer_process_never_imports_torch_through_the_module_file(module_tree: ast.Module) -> None:
    for node in module_tree.body:
        if isinstance(node, ast.Import):
            assert not [a.name for a in node.names if a.name.split(".")[0] == "torch"]
        elif isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] != "torch"
    # Every library module the module imports, at the top or in any function of the panel and
    # the logic (the self-test aside), imports in a process where importing torch fails.
    outside_test = ast.Module(body=[n for n in module_tree.body if not (
        isinstance(n, ast.ClassDef) and n.name == "SFUDASegmentTest")], type_ignores=[])
    modules = _library_imports(outside_test)
    assert {"SFUDASegmentLib.slicer_bridge.panel_support", "SFUDASegmentLib.results.files",
            "SFUDASegmentLib.slicer_bridge.mrml", "SFUDASegmentLib.data.io"} <= set(modules)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'slicer', 'qt', 'vtk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", (modules, out.stdout)


def test_module_file_compiles_for_python_3_9(module_tree: ast.Module) -> None:
    compile(MODULE_FILE.read_text(), str(MODULE_FILE), "exec")
    # Slicer 5.4-5.6 run Python 3.9: no ``X | Y`` in evaluated annotations, no ``match``.
    for node in ast.walk(module_tree):
        assert not isinstance(node, ast.Match)
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign)):
            annotations = ([node.returns] + [a.annotation for a in node.args.args]
                           if isinstance(node, ast.FunctionDef) else [node.annotation])
            for annotation in (a for a in annotations if a is not None):
                assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), \
                    ast.unparse(annotation)


def test_slicer_api_names_the_module_uses_exist_in_slicer_core(module_tree: ast.Module) -> None:
    pytest.importorskip("slicer_core", reason="the slicer-core wheel is not installed")
    import slicer
    import slicer.util

    checked = 0
    for node in ast.walk(module_tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "slicer"):
            continue
        owner = node.value.attr
        if owner == "util" or owner.startswith("vtk"):
            assert hasattr(getattr(slicer, owner), node.attr), f"slicer.{owner}.{node.attr}"
            checked += 1
    for node in module_tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "slicer":
            for alias in node.names:
                assert hasattr(slicer, alias.name), alias.name
    assert checked >= 8


# ----------------------------------------------------------------------------- build_adapt_arguments


def test_build_adapt_arguments_for_each_method() -> None:
    parameters = {"tau1": 0.25, "tau2": 0.1, "candidates": 2, "sampler": "ddim", "steps": 5,
                  "stages": "hd+egs", "denoise": "components", "seed": 7, "iterations": 30, "lambda": 0.75,
                  "guard_agreement": 0.5}
    head = ["--checkpoint", "/m/model.sfuda", "--image", "/t/in put.nrrd", "--out", "/t/out"]
    args = ("/m/model.sfuda", "/t/in put.nrrd", "/t/out", parameters)
    assert support.build_adapt_arguments("none", *args, device="cpu") == [
        "adapt", "--method", "none", *head, "--device", "cpu"]
    assert support.build_adapt_arguments("heal", *args, device="auto") == [
        "adapt", "--method", "heal", *head, "--device", "auto", "--tau1", "0.25", "--tau2",
        "0.1", "--candidates", "2", "--sampler", "ddim", "--steps", "5", "--stages", "hd+egs",
        "--denoise", "components", "--seed", "7"]
    assert support.build_adapt_arguments("gmm", *args, device="cuda:1") == [
        "adapt", "--method", "gmm", *head, "--device", "cuda:1", "--seed", "7",
        "--iterations", "30", "--lambda", "0.75", "--guard-agreement", "0.5"]


def test_build_adapt_arguments_leaves_out_missing_values_and_keeps_paths() -> None:
    out = support.build_adapt_arguments("heal", Path("a.sfuda"), Path("b.nrrd"), Path("c"),
                                        {"candidates": 3.0, "sampler": None})
    assert out == ["adapt", "--method", "heal", "--checkpoint", "a.sfuda", "--image", "b.nrrd",
                   "--out", "c", "--device", "auto", "--candidates", "3"]


@pytest.mark.parametrize("method, parameters, device, words", [
    ("fancy", {}, "auto", "Unknown method 'fancy'"),
    ("heal", {"tau3": 1}, "auto", "Unknown parameter(s) tau3"),
    ("heal", {"tau1": 1.5}, "auto", "'tau1' must be in [0, 1]"),
    ("heal", {"candidates": 0}, "auto", "'candidates' must be >= 1"),
    ("heal", {"candidates": 2.5}, "auto", "whole number"),
    ("heal", {"steps": True}, "auto", "must be a number"),
    ("heal", {"sampler": "euler"}, "auto", "'sampler' must be one of ddim, ddpm"),
    ("heal", {"stages": "all"}, "auto", "'stages' must be one of heal, hd+egs, hd"),
    ("gmm", {"lambda": -1}, "auto", "'lambda' must be >= 0"),
    ("heal", {"denoise": "erode"}, "auto", "'denoise' must be one of components, paper"),
    ("gmm", {"guard_agreement": 1.5}, "auto", "'guard_agreement' must be in [0, 1]"),
    ("none", {}, "tpu", "Unknown device 'tpu'"),
])
def test_build_adapt_arguments_rejects_bad_input(method: str, parameters: dict, device: str,
                                                 words: str) -> None:
    with pytest.raises(InputError) as info:
        support.build_adapt_arguments(method, "m", "i", "o", parameters, device)
    assert words in str(info.value)


def test_result_notes_from_a_heal_and_a_gmm_report() -> None:
    heal = {"warnings": ["round trip far below"],
            "denoising": {"mode": "components", "note": "cannot add", "orphan_rule": "keep",
                          "classes_without_markers": ["enhancing"],
                          "classes": [{"name": "edema", "kept_ml": 12.25, "source_ml": 15.0},
                                      {"name": "enhancing", "kept_ml": 1.0, "source_ml": 1.0}]}}
    notes = support.result_notes(heal)
    assert notes[0] == ("warning", "round trip far below")
    assert ("info", "Denoising (Components of the source labels (keeps boundaries)): edema 12.2 of 15.0 ml "
                    "kept; enhancing 1.0 of 1.0 ml kept.") in notes
    assert any("No confident voxel of enhancing" in text for _, text in notes)
    assert notes[-1] == ("info", "cannot add")
    fired = {"warnings": ["kept the source"], "guard": {"fired": True, "signals": {"foreground_agreement": 0.3}}}
    assert support.result_notes(fired) == [("warning", "kept the source")]
    kept = {"warnings": [], "guard": {"fired": False, "signals": {"foreground_agreement": 0.83}}}
    assert "Dice 0.83" in support.result_notes(kept)[0][1]
    assert support.result_notes({}) == []
    reliability = {"map": "disagreement", "text": "The 'disagreement' overlay marks ...",
                   "warnings": ["adapted entropy misleads"]}
    assert support.result_notes(kept, reliability) == [
        ("warning", "adapted entropy misleads"), ("info", "The 'disagreement' overlay marks ..."),
        support.result_notes(kept)[0]]
    legend = support.overlay_legend_text("recommended", 0.0, 1.0, "Inferno", None, "disagreement")
    assert legend.startswith("Recommended: Source vs adapted disagreement, colour table Inferno")


# ----------------------------------------------------------------------------- model card checks


CARD_3D_T2 = {"dims": "3d", "modality": "T2", "input_spec": {"image_channels": 1},
              "methods": ["none", "heal"]}


def test_no_warning_when_model_and_volume_fit() -> None:
    assert support.checkpoint_warnings(CARD_3D_T2, (40, 128, 128), "Patient7_T2w_axial") == []
    assert support.checkpoint_warnings(CARD_3D_T2, (40, 128, 128), "scan", "MR") == []
    assert support.checkpoint_warnings(CARD_3D_T2, (40, 128, 128), "PhantomTarget") == []
    card_2d = {**CARD_3D_T2, "dims": "2d", "modality": "MR"}
    assert support.checkpoint_warnings(card_2d, (1, 256, 256), "BraTS_t1ce") == []


def test_3d_model_on_a_2d_image_warns() -> None:
    warnings = support.checkpoint_warnings(CARD_3D_T2, (1, 256, 256), "frame_T2")
    assert len(warnings) == 1
    assert "3D" in warnings[0] and "2D image" in warnings[0] and "(1, 256, 256)" in warnings[0]
    card_25d = {**CARD_3D_T2, "dims": "2.5d"}
    assert "neighbouring slices" in support.checkpoint_warnings(card_25d, (1, 64, 64), "x")[0]


def test_modality_mismatch_warns_from_the_name_or_dicom() -> None:
    by_name = support.checkpoint_warnings(CARD_3D_T2, (40, 128, 128), "BraTS_T1c_case3")
    assert len(by_name) == 1
    assert "trained on T2" in by_name[0] and "looks like T1C" in by_name[0]
    by_camel_case = support.checkpoint_warnings(CARD_3D_T2, (40, 128, 128), "CTChest")
    assert "looks like CT" in by_camel_case[0]
    by_dicom = support.checkpoint_warnings(CARD_3D_T2, (40, 128, 128), "Series 4", "CT")
    assert "looks like CT" in by_dicom[0]
    both = support.checkpoint_warnings(CARD_3D_T2, (1, 64, 64), "slice_FLAIR")
    assert len(both) == 2


def test_modality_words_and_compatibility() -> None:
    assert support.name_modalities("MR_T2_axial") == {"T2"}
    assert support.name_modalities("MRHead") == {"MR"}
    assert support.name_modalities("t1ce-brain") == {"T1C"}
    assert support.name_modalities("Abdomen CT portal") == {"CT"}
    assert support.name_modalities("patient_07") == set()
    generic_mr = {**CARD_3D_T2, "modality": "MR"}
    assert support.checkpoint_warnings(generic_mr, (9, 9, 9), "case_FLAIR") == []


def test_colour_model_on_a_grey_volume_warns() -> None:
    rgb = {**CARD_3D_T2, "dims": "2d", "modality": "endoscopy", "input_spec": {"image_channels": 3}}
    warnings = support.checkpoint_warnings(rgb, (1, 64, 64), "frame")
    assert len(warnings) == 1 and "3-channel" in warnings[0]


def test_method_availability_follows_the_card() -> None:
    assert support.methods_available(None) == support.METHODS
    assert support.methods_available(CARD_3D_T2) == ("none", "heal")
    assert support.method_unavailable_reason(CARD_3D_T2, "heal") is None
    assert "prototypes" in support.method_unavailable_reason(CARD_3D_T2, "gmm")
    denoising_only = {"methods": ["none", "heal"], "heal_stages": ["hd"]}
    assert support.method_unavailable_reason(denoising_only, "heal", "hd") is None
    for stages in ("hd+egs", "heal"):
        assert "diffusion model" in support.method_unavailable_reason(denoising_only, "heal", stages)
        assert support.method_unavailable_reason({**denoising_only, "heal_stages": ["hd", "hd+egs", "heal"]},
                                                 "heal", stages) is None


# ----------------------------------------------------------------------------- texts, dependencies


def test_model_card_text_of_a_real_checkpoint(tmp_path: Path) -> None:
    from SFUDASegmentLib.checkpoint import SourceCheckpoint
    from SFUDASegmentLib.config import InputSpec, LabelClass
    from SFUDASegmentLib.nets.unet import ResidualUNet
    from SFUDASegmentLib.training.segmentation import default_seg_config

    spec = InputSpec(dims="3d", modality="T2", patch_size=(16, 16, 16))
    classes = [LabelClass(1, "liver", (1.0, 0.5, 0.0)), LabelClass(3, "tumour <core>", (0, 0, 1))]
    config = default_seg_config(spec, 3, (4, 8))
    net = ResidualUNet.from_config(config)
    path = SourceCheckpoint(classes, spec, config, net.state_dict(),
                            provenance={"data": "12 phantoms", "validation_mean_dice": 0.81234}
                            ).save(tmp_path / "m.sfuda")
    card = SourceCheckpoint.load(path).describe()
    text = support.format_model_card(card)
    assert '<span style="color:#ff8000">&#9632;</span> 1&nbsp;liver' in text
    assert "3&nbsp;tumour &lt;core&gt;" in text  # names are escaped
    assert "<b>Modality:</b> T2" in text and "<b>Dims:</b> 3D" in text
    n_parameters = sum(p.numel() for p in net.parameters())
    assert f"3D U-Net (4,8), {n_parameters:,} parameters" in text
    assert "none (HEAL denoising only; its diffusion stages unavailable)" in text and "none (GMM unavailable)" in text
    assert "<b>Methods:</b> No adaptation, HEAL (learning-free)<br>" in text
    assert "12 phantoms; validation mean Dice 0.812" in text
    assert support.checkpoint_warnings(card, (20, 30, 30), "target_T2") == []
    assert support.checkpoint_warnings(card, (1, 30, 30), "target_T2") != []


def test_short_texts() -> None:
    assert support.devices_text(None) == "Looking for GPUs..."
    cpu = Answer({"torch": "2.3.1+cpu", "cuda_build": None, "gpus": []})
    assert support.devices_text(cpu) == ("No CUDA GPU found (PyTorch 2.3.1+cpu, CPU-only build): "
                                         "the methods run on the CPU (slower).")
    gpus = Answer({"torch": "2.5.0", "cuda_build": "12.4", "gpus": [
        {"device": "cuda:0", "name": "RTX <A>", "free_mib": 3 * 1024.0, "total_mib": 8 * 1024.0},
        {"device": "cuda:1", "name": "H100", "free_mib": 70 * 1024.0, "total_mib": 80 * 1024.0}]})
    assert support.devices_text(gpus) == ("cuda:0: RTX &lt;A&gt;, 3.0 GiB free of 8.0 GiB<br>"
                                          "cuda:1: H100, 70.0 GiB free of 80.0 GiB")
    assert "no usable GPU" in support.devices_text(Answer({"torch": "2.5", "cuda_build": "12.4"}))
    assert support.devices_text(Answer(error="boom")).endswith("boom")
    legend = support.overlay_legend_text("entropy", 0.0, math.log2(3), "Inferno", 0.158)
    assert "Voxel entropy (bits)" in legend and "0 (confident)" in legend and "1.58" in legend
    assert "Transparent below 0.158" in legend
    assert "Transparent" not in support.overlay_legend_text("entropy", 0.0, 1.0, "Inferno", 0.0)
    assert "candidate" in support.overlay_legend_text("candidate", 0, 1, "Grey")


def test_model_card_shows_terminology_and_unusable_entries() -> None:
    card = {"classes": [{"value": 1, "name": "necrosis", "color": [1, 0, 0]},
                        {"value": 2, "name": "vessel", "color": [0, 0, 1]}],
            "provenance": {"terminology": {"vessel": {"category": "SCT^85756007^Tissue",
                                                      "type": "SCT^59820001^Blood vessel"},
                                           "lesion": "not an entry"}}}
    text = support.format_model_card(card)
    assert "<b>Terminology:</b> necrosis = Necrosis (SCT 6574001), vessel = Blood vessel " \
           "(SCT 59820001)" in text
    assert "Terminology of class &#x27;lesion&#x27; ignored" in text
