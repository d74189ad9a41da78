"""``SFUDASegmentLogic`` (the console scripting API) on a real MRML scene, outside Slicer.

The module file needs Slicer's ``ScriptedLoadableModule`` and ``parameterNodeWrapper``, which
the ``slicer-core`` wheel lacks; they are replaced by small stand-ins *in this test only*
(the logic uses nothing of them but the base class). The child process runs a stand-in of the
``sfuda adapt`` command (``logic.jobModule``) that writes a genuine result folder with
``write_result`` from a simple, known computation, so the test checks the whole path: volume
node -> temporary NRRD -> command line -> child -> result files -> new nodes, and the
blocking, non-blocking, failing and cancelled cases.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from mrml_scene import mrml_scene  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "SFUDASegment" / "SFUDASegment.py"

STAND_IN = "fake_adapt"

STAND_IN_SOURCE = textwrap.dedent('''
    """Stand-in for `sfuda adapt`: labels = voxels above the image mean, entropy = normalised
    intensity, HEAL candidates = the image times (i + 1)."""
    import argparse
    import json
    import os
    import sys
    import time

    import numpy as np

    from SFUDASegmentLib.config import LabelClass
    from SFUDASegmentLib.data.io import read_image
    from SFUDASegmentLib.results.files import write_result
    from SFUDASegmentLib.results.result import Result, structure_statistics

    parser = argparse.ArgumentParser()
    parser.add_argument("--progress")
    parser.add_argument("command")
    parser.add_argument("--method")
    parser.add_argument("--checkpoint")
    parser.add_argument("--image")
    parser.add_argument("--out")
    args, _ = parser.parse_known_args()

    def event(**data):
        sys.stderr.write(json.dumps(data) + "\\n")
        sys.stderr.flush()

    event(type="progress", stage="arguments", fraction=0.0, message=json.dumps(sys.argv[1:]))
    if os.environ.get("FAKE_ADAPT_MODE") == "fail":
        event(type="error", error="CheckpointError", message="The demo checkpoint is damaged.")
        sys.exit(2)
    if os.environ.get("FAKE_ADAPT_MODE") == "hang":
        while True:
            event(type="progress", stage="waiting", fraction=0.5, message="")
            time.sleep(0.05)

    volume = read_image(args.image)
    image = volume.array.astype(np.float32)
    labels = (image > image.mean()).astype(np.uint8)
    entropy = (image - image.min()) / (image.max() - image.min())
    classes = [LabelClass(1, "bright", (1.0, 0.2, 0.1))]
    maps = {"entropy": entropy}
    candidates = None
    if args.method == "heal":
        candidates = np.stack([image * (i + 1) for i in range(2)])
    result = Result(method=args.method, labels=labels, classes=classes, geometry=volume.geometry,
                    maps=maps, candidates=candidates,
                    candidate_scores=[0.25, 0.75] if candidates is not None else [],
                    selected_index=1 if candidates is not None else None,
                    structure_stats=structure_statistics(labels, classes, volume.geometry, maps))
    write_result(result, args.out, input_path=args.image, checkpoint_path=args.checkpoint)
    event(type="progress", stage="done", fraction=1.0, message="written")
''')


class _Base:
    """Stand-in of the ScriptedLoadableModule base classes (not in the slicer-core wheel)."""

    def __init__(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def sfuda_module(monkeypatch: pytest.MonkeyPatch, mrml_scene, tmp_path: Path):  # noqa: F811
    """The module file imported with stand-ins for the Slicer-application parts."""
    import slicer

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (_Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    spec = importlib.util.spec_from_file_location("SFUDASegment_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(slicer, "app")  # the logic must work without the application
    return module


@pytest.fixture
def setup(sfuda_module, mrml_scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """A logic running the stand-in, an input volume node, a checkpoint file, a clean temp."""
    from SFUDASegmentLib.data.geometry import Geometry, Volume
    from SFUDASegmentLib.slicer_bridge import mrml

    (tmp_path / "standin").mkdir()
    (tmp_path / "standin" / f"{STAND_IN}.py").write_text(STAND_IN_SOURCE)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    logic = sfuda_module.SFUDASegmentLogic()
    logic.jobModule = STAND_IN
    logic.jobEnvironment = {"PYTHONPATH": str(tmp_path / "standin")}
    rng = np.random.default_rng(5)
    array = rng.normal(100.0, 20.0, size=(3, 10, 12)).astype(np.float32)
    geometry = Geometry(spacing=(2.0, 0.5, 0.75), origin=(10.0, -5.0, 3.0),
                        direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    node = mrml.add_volume_node(Volume(array, geometry), "target_T2")
    checkpoint = tmp_path / "demo.sfuda"
    checkpoint.write_bytes(b"stand-in checkpoint")
    return types.SimpleNamespace(logic=logic, node=node, array=array, checkpoint=checkpoint,
                                 temp=temp, scene=mrml_scene)


def _leftover_folders(temp: Path) -> list[Path]:
    return sorted(temp.glob("SFUDASegment-*"))


def test_process_blocking_adds_the_result_and_leaves_the_input(setup) -> None:
    from SFUDASegmentLib.config import LabelClass
    from SFUDASegmentLib.slicer_bridge import mrml

    events: list[dict] = []
    nodes = setup.logic.process(setup.node, str(setup.checkpoint), method="heal",
                                parameters={"candidates": 2, "sampler": "ddim", "steps": 5,
                                            "seed": 0, "iterations": 9},
                                waitForCompletion=True, onProgress=events.append, device="cpu")
    argv = json.loads(events[0]["message"])
    image_path = argv[argv.index("--image") + 1]
    assert argv[:5] == ["--progress", "json", "adapt", "--method", "heal"]
    assert argv[argv.index("--checkpoint") + 1] == str(setup.checkpoint)
    assert image_path.endswith("input.nrrd") and argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--candidates") + 1] == "2" and "--iterations" not in argv
    assert events[-1]["stage"] == "done"

    expected_labels = (setup.array > setup.array.mean()).astype(np.uint8)
    classes = [LabelClass(1, "bright", (1.0, 0.2, 0.1))]
    labels = mrml.labels_from_segmentation_node(nodes["segmentation"], classes, setup.node)
    assert np.array_equal(labels, expected_labels)
    source = mrml.volume_from_node(setup.node)
    entropy = mrml.volume_from_node(nodes["map_entropy"])
    assert entropy.geometry.matches(source.geometry)
    lo, hi = setup.array.min(), setup.array.max()
    np.testing.assert_allclose(entropy.array, (setup.array - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert nodes["candidates"].GetNumberOfDataNodes() == 2
    assert nodes["candidate_scores"].GetNumberOfRows() == 2
    assert nodes["statistics"].GetNumberOfRows() == 1
    assert nodes["segmentation"].GetName() == "target_T2_heal_segmentation"

    assert np.array_equal(source.array, setup.array)  # the input node is unchanged
    assert not Path(image_path).exists() and _leftover_folders(setup.temp) == []

    again = setup.logic.process(setup.node, setup.checkpoint, method="none", device="cpu")
    assert again["segmentation"].GetName() != nodes["segmentation"].GetName()
    assert "candidates" not in again


def test_process_failure_raises_the_child_message_and_adds_nothing(setup) -> None:
    setup.logic.jobEnvironment["FAKE_ADAPT_MODE"] = "fail"
    count = setup.scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="The demo checkpoint is damaged."):
        setup.logic.process(setup.node, setup.checkpoint, method="none")
    assert setup.scene.GetNumberOfNodes() == count
    assert _leftover_folders(setup.temp) == []


def test_process_rejects_missing_inputs_before_starting(setup) -> None:
    with pytest.raises(ValueError, match="Select an input volume"):
        setup.logic.process(None, setup.checkpoint)
    with pytest.raises(ValueError, match="Checkpoint file not found"):
        setup.logic.process(setup.node, setup.checkpoint.with_name("missing.sfuda"))
    with pytest.raises(Exception, match="Unknown method 'fast'"):
        setup.logic.process(setup.node, setup.checkpoint, method="fast")
    assert _leftover_folders(setup.temp) == []


def test_background_job_then_finish_job(setup) -> None:
    count = setup.scene.GetNumberOfNodes()
    job = setup.logic.process(setup.node, setup.checkpoint, method="none",
                              waitForCompletion=False)
    assert len(_leftover_folders(setup.temp)) == 1
    assert setup.scene.GetNumberOfNodes() == count  # nothing is added before the job ends
    assert job.wait(timeout=120) == 0
    nodes = setup.logic.finishJob(job, setup.node)
    assert nodes["segmentation"].GetScene() is setup.scene
    assert setup.scene.GetNumberOfNodes() > count
    assert _leftover_folders(setup.temp) == []


def test_cancel_leaves_the_scene_as_it_was(setup) -> None:
    setup.logic.jobEnvironment["FAKE_ADAPT_MODE"] = "hang"
    count = setup.scene.GetNumberOfNodes()
    job = setup.logic.process(setup.node, setup.checkpoint, method="heal",
                              waitForCompletion=False)
    deadline = time.monotonic() + 60
    while not job.poll() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.running
    setup.logic.discardJob(job)
    assert not job.running and job.cancelled
    assert setup.scene.GetNumberOfNodes() == count
    assert _leftover_folders(setup.temp) == []
    with pytest.raises(RuntimeError, match="Cancelled"):
        setup.logic.finishJob(job, setup.node)
