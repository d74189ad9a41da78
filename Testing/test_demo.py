"""``sfuda demo --quick``: the end-to-end demo (no adaptation, HEAL, GMM on a target-modality
phantom) writes its overview PNG, metrics.json and NIfTI files, all or nothing.

The demo loads ``Resources/SampleData/phantom_demo.sfuda`` when it is bundled. Where the checkout
has no bundled checkpoint, the tiny full model (2D, diffusion T = 20, prototypes) stands in for
it, so that the demo logic is covered either way without training in the test (``--train
--quick`` trains for about half a minute on two CPU cores, too long for this suite).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from SFUDASegmentLib import cli, demo
from SFUDASegmentLib.data.io import read_image
from SFUDASegmentLib.data.synthetic import make_phantom
from SFUDASegmentLib.results.result import Result
from tiny_models import dice, single_thread, tiny_full_model, tree_snapshot  # noqa: F401

METHODS = ("none", "heal", "heal_diffusion", "gmm")
NIFTI = ["target_image", "same_case_in_source_modality", "reference_labels", "segmentation_none",
         "segmentation_heal", "segmentation_heal_diffusion", "segmentation_gmm", "heal_entropy",
         "heal_nig_variance", "heal_refined_labels"]


def _stand_in(folder: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> Path:
    """Make ``folder`` the demo's bundled sample data, holding ``checkpoint``."""
    (folder / "phantom_demo.sfuda").write_bytes(checkpoint.read_bytes())
    monkeypatch.setattr(demo, "bundled_resources", lambda: folder)
    return folder


@pytest.fixture
def bundle(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tiny_full_model) -> Path:
    """The bundled sample-data folder, or a stand-in holding the tiny full checkpoint."""
    real = demo.bundled_resources()
    if real is not None:
        return real
    return _stand_in(tmp_path_factory.mktemp("SampleData"), monkeypatch, tiny_full_model.path)


@pytest.fixture
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tiny_full_model) -> Path:
    """Always the tiny stand-in (the all-or-nothing test runs the demo twice)."""
    return _stand_in(tmp_path_factory.mktemp("SampleData"), monkeypatch, tiny_full_model.path)


def run_demo(capsys: pytest.CaptureFixture, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["--progress", "none", "demo", "--quick", "--out", str(out), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_quick_writes_overview_metrics_and_nifti(capsys, bundle, tmp_path):
    checkpoint_bytes = (bundle / "phantom_demo.sfuda").read_bytes()
    out = tmp_path / "demo"
    code, stdout, err = run_demo(capsys, out)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{n}.nii.gz" for n in NIFTI] + ["metrics.json", "overview.png", "report.json"])
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "demo" and sorted(report["files"]) == names
    assert (bundle / "phantom_demo.sfuda").read_bytes() == checkpoint_bytes

    case = demo.demo_target(demo.DemoSettings())
    target = read_image(out / "target_image.nii.gz")
    np.testing.assert_array_equal(target.array, case.target.array)
    for name in NIFTI:
        volume = read_image(out / f"{name}.nii.gz")
        assert volume.array.shape == case.target.array.shape and volume.geometry.matches(case.target.geometry), name
    np.testing.assert_array_equal(read_image(out / "reference_labels.nii.gz").array, case.labels.array)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(bundle / "phantom_demo.sfuda")
    assert set(metrics["mean_dice"]) == set(METHODS)
    for method in METHODS:  # mean Dice over organ, vessel, lesion, recomputed from the files
        labels = read_image(out / f"segmentation_{method}.nii.gz").array
        expected = np.mean([dice(labels == c.value, case.labels.array == c.value) for c in case.classes])
        assert metrics["mean_dice"][method] == pytest.approx(expected, abs=1e-9)
    assert len(metrics["heal_diffusion"]["scores"]) == demo.QUICK.candidates
    assert metrics["heal_diffusion"]["selected"] == int(np.argmax(metrics["heal_diffusion"]["scores"]))
    assert metrics["heal"]["settings"]["stages"] == "hd" and metrics["heal"]["settings"]["denoise"] == "components"
    for method in METHODS[1:]:  # every adapted method is compared with no adaptation, in words too
        change = metrics["mean_dice"][method] - metrics["mean_dice"]["none"]
        assert metrics["versus_none"][method] == pytest.approx(change)
        assert f"({change:+.3f})" in metrics["verdicts"][method]
    assert metrics["gmm"]["swd_before"] > 0 and metrics["gmm"]["swd_after"] > 0
    assert set(metrics["seconds"]) == {"checkpoint", *METHODS}
    summary = json.loads(stdout)
    assert summary["mean_dice"] == metrics["mean_dice"] and summary["out"] == str(out)

    overview = cv2.imread(str(out / "overview.png"))
    assert overview is not None and overview.ndim == 3
    # 2 + 4 method panels + entropy, NIG variance, selected candidate = 9 tiles, 4 per row
    tile_h, tile_w = case.target.array.shape[1] * 3 + 24, case.target.array.shape[2] * 3 + 8
    assert overview.shape == (3 * tile_h, 4 * tile_w, 3)
    assert overview.std() > 10


def test_failing_demo_leaves_no_output_folder(capsys, tiny_bundle, tmp_path, monkeypatch):
    def broken(*args, **kwargs) -> np.ndarray:
        raise RuntimeError("overview failed")
    monkeypatch.setattr(demo, "overview_png", broken)  # fails while the files are being staged
    out = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="overview failed"):
        run_demo(capsys, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    previous = tmp_path / "previous"  # a folder from an earlier run keeps its files
    previous.mkdir()
    (previous / "metrics.json").write_text('{"earlier": true}')
    before = tree_snapshot(previous)
    with pytest.raises(RuntimeError, match="overview failed"):
        run_demo(capsys, previous, "--overwrite")
    assert tree_snapshot(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def test_demo_overview_shows_the_heal_maps():
    """The overview puts the entropy and NIG variance maps and the selected candidate of the
    HEAL result in its panels (checked on hand-made results)."""
    case = make_phantom((16, 32, 32), 3, gap=0.3)
    labels = case.labels.array
    heal = Result("heal", labels, case.classes, case.target.geometry,
                  maps={"entropy": np.zeros(labels.shape, np.float32),
                        "nig_variance": np.ones(labels.shape, np.float32)},
                  candidates=np.stack([case.source.array, case.target.array]), selected_index=1)
    image = demo.overview_png(case, {"none": heal, "heal": heal}, {"none": 0.5, "heal": 1.0})
    z = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    tile_h, tile_w = 32 * 3 + 24, 32 * 3 + 8
    assert image.shape == (2 * tile_h, 4 * tile_w, 3)
    entropy_tile = image[tile_h + 24:2 * tile_h, 0 * tile_w + 4:1 * tile_w - 4]
    variance_tile = image[tile_h + 24:2 * tile_h, 1 * tile_w + 4:2 * tile_w - 4]
    candidate_tile = image[tile_h + 24:2 * tile_h, 2 * tile_w + 4:3 * tile_w - 4]
    assert np.ptp(entropy_tile.reshape(-1, 3), axis=0).max() == 0  # a constant map is one colour
    assert not np.array_equal(entropy_tile[0, 0], variance_tile[0, 0])  # 0 and 1 differ in the colour map
    expected = cv2.resize(demo._grey_panel(case.target.array[z]), None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(candidate_tile, expected)


def test_verdicts_say_gain_loss_or_nothing_with_the_change():
    said = demo.verdicts({"none": 0.5, "heal": 0.502, "heal_diffusion": 0.2, "gmm": 0.61})
    assert set(said) == {"heal", "heal_diffusion", "gmm"}
    assert said["heal"] == ("HEAL (default: denoising) changes nothing on this demo scan: mean Dice 0.502 against "
                            "0.500 without adaptation (+0.002).")
    assert " loses " in said["heal_diffusion"] and "(-0.300)" in said["heal_diffusion"]
    assert said["gmm"].startswith("GMM gains") and "(+0.110)" in said["gmm"]
