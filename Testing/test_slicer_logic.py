"""``SFUDASegmentLogic`` (the console scripting API) on a real MRML scene, outside Slicer.

The module file is loaded with stand-ins for Slicer's application parts *in this test only*
(``slicer_module_loader.py``). The child process runs a stand-in of ``sfuda adapt`` that writes
a genuine result folder, so the test checks the whole path: volume node -> temporary NRRD ->
command line -> child -> result files -> new nodes, and the blocking, non-blocking, failing and
cancelled cases. A last test runs what the panel does when it opens (model card, devices) and
applies, in a process where importing PyTorch fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from mrml_scene import mrml_scene  # noqa: F401
from slicer_module_loader import STAND_IN, load_module_file, stand_in_modules, write_stand_in

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "Resources" / "SampleData" / "phantom_demo.sfuda"

@pytest.fixture
def sfuda_module(monkeypatch: pytest.MonkeyPatch, mrml_scene, tmp_path: Path):  # noqa: F811
    """The module file imported with stand-ins for the Slicer-application parts."""
    import slicer

    for name, module in stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    module = load_module_file()
    assert not hasattr(slicer, "app")  # the logic must work without the application
    return module


@pytest.fixture
def setup(sfuda_module, mrml_scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """A logic running the stand-in, an input volume node, a checkpoint file, a clean temp."""
    from SFUDASegmentLib.data.geometry import Geometry, Volume
    from SFUDASegmentLib.slicer_bridge import mrml

    environment = write_stand_in(tmp_path / "standin")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    logic = sfuda_module.SFUDASegmentLogic()
    logic.jobModule = STAND_IN
    logic.jobEnvironment = environment
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


def test_panel_opens_shows_the_card_and_applies_without_importing_torch(tmp_path: Path) -> None:
    pytest.importorskip("slicer_core", reason="the slicer-core wheel is not installed")
    import torch

    done = subprocess.run([sys.executable, str(REPO / "Testing" / "panel_without_torch.py"),
                           str(tmp_path), str(DEMO_CHECKPOINT)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch_imported"] == []  # and every attempt would have raised
    assert seen["torch_version"] == torch.__version__ and seen["torch_ok"]
    assert not seen["card_was_cached"]
    assert seen["card_classes"] == ["organ", "vessel", "lesion"]
    assert "<b>Methods:</b> No adaptation, HEAL (learning-free), GMM-adapted inference (SFS)" in \
        seen["card_text"]
    assert seen["warnings"] == []
    expected = "cuda:0" if torch.cuda.is_available() else f"PyTorch {torch.__version__}, CPU-only"
    assert expected in seen["devices_text"]
    assert seen["plan_stages"][:3] == ["preprocess", "inference", "denoising"]
    assert {"segmentation", "map_entropy", "candidates", "statistics"} <= set(seen["nodes"])
    assert seen["folder"] == "HEAL (learning-free): target"
