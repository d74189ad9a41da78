"""``sfuda fit-temperature`` and ``sfuda uncertainty``, in-process through ``cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import InferenceConfig
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.inference.preparation import prepare_input
from SFUDASegmentLib.uncertainty.entropy import voxel_entropy
from SFUDASegmentLib.uncertainty.flip_tta import flip_tta
from tiny_models import file_digest, single_thread, tiny_full_model, tree_snapshot  # noqa: F401
from tiny_models import run_sfuda as run



@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_full_model) -> dict[str, Path]:
    """Two labelled source cases, a target image and the tiny full checkpoint, on disk."""
    folder = tmp_path_factory.mktemp("cli_uncertainty")
    paths = {"checkpoint": tiny_full_model.path,
             "target": write_image(tiny_full_model.held_out[0][0], folder / "target.nii.gz")}
    for i in range(2):
        paths[f"source_{i}"] = write_image(tiny_full_model.train_images[i], folder / f"source_{i}.nii.gz")
        paths[f"label_{i}"] = write_image(tiny_full_model.train_labels[i], folder / f"label_{i}.nii.gz")
    return paths


def test_fit_temperature_writes_a_new_checkpoint_with_t(capsys, files, tmp_path):
    before = file_digest(files["checkpoint"])
    code, out, _ = run(capsys, "fit-temperature", "--checkpoint", str(files["checkpoint"]),
                       "--image", str(files["source_0"]), "--label", str(files["label_0"]),
                       "--image", str(files["source_1"]), "--label", str(files["label_1"]),
                       "--out", str(tmp_path / "t.sfuda"), "--device", "cpu")
    assert code == 0
    printed = json.loads(out)
    fitted = SourceCheckpoint.load(tmp_path / "t.sfuda")
    assert fitted.temperature == pytest.approx(printed["temperature"]) and printed["cases"] == 2
    assert file_digest(files["checkpoint"]) == before
    code, _, err = run(capsys, "fit-temperature", "--checkpoint", str(files["checkpoint"]),
                       "--image", str(files["source_0"]), "--label", str(files["label_0"]),
                       "--out", str(files["checkpoint"]))
    assert code == 2 and "never overwritten" in err and file_digest(files["checkpoint"]) == before


def test_uncertainty_adds_maps_queue_and_statement_to_a_new_folder(capsys, files, tmp_path):
    result = tmp_path / "segmented"
    assert run(capsys, "segment", "--checkpoint", str(files["checkpoint"]), "--image", str(files["target"]),
               "--out", str(result), "--uncertainty", "--device", "cpu")[0] == 0
    segmented = json.loads((result / "report.json").read_text())
    assert segmented["reliability"]["map"] == "entropy" and "review_queue" in segmented
    snapshot = tree_snapshot(result)
    code, out, _ = run(capsys, "uncertainty", "--checkpoint", str(files["checkpoint"]), "--image", str(files["target"]),
                       "--result", str(result), "--out", str(tmp_path / "more"), "--maps", "flip_entropy,mahalanobis",
                       "--device", "cpu")
    assert code == 0 and tree_snapshot(result) == snapshot
    report = json.loads((tmp_path / "more" / "report.json").read_text())
    assert {"entropy", "flip_entropy", "mahalanobis"} <= set(report["maps"]) == set(json.loads(out)["maps"])
    assert report["reliability"]["text"] and isinstance(report["review_queue"], list)
    checkpoint = SourceCheckpoint.load(files["checkpoint"])
    prepared = prepare_input(read_image(files["target"]), checkpoint.input_spec)
    tta = flip_tta(checkpoint.build_segmentation_net("cpu"), prepared.image, checkpoint.input_spec, 3,
                   InferenceConfig(device="cpu"), torch.device("cpu"))
    written = read_image(tmp_path / "more" / "flip_entropy.nii.gz").array
    np.testing.assert_allclose(written, voxel_entropy(tta.mean)[0], atol=1e-5)


@pytest.mark.parametrize("extra, words", [(["--maps", "nonsense"], "Unknown uncertainty map"),
                                          (["--maps", "disagreement"], "adapted checkpoint"),
                                          (["--maps", "ensemble_entropy"], "adapted checkpoint"),
                                          (["--same-out"], "Inputs are never overwritten")])
def test_uncertainty_errors_exit_2(capsys, files, tmp_path, extra, words):
    result = tmp_path / "segmented"
    assert run(capsys, "segment", "--checkpoint", str(files["checkpoint"]), "--image", str(files["target"]),
               "--out", str(result), "--uncertainty", "--device", "cpu")[0] == 0
    out = str(result) if extra == ["--same-out"] else str(tmp_path / "more")
    args = [] if extra == ["--same-out"] else extra
    code, _, err = run(capsys, "uncertainty", "--checkpoint", str(files["checkpoint"]), "--image", str(files["target"]),
                       "--result", str(result), "--out", out, "--device", "cpu", *args)
    assert code == 2 and words in err and not (tmp_path / "more").exists()


def test_uncertainty_needs_a_result_folder(capsys, files, tmp_path):
    code, _, err = run(capsys, "uncertainty", "--checkpoint", str(files["checkpoint"]), "--image",
                       str(files["target"]), "--result", str(tmp_path), "--out", str(tmp_path / "x"))
    assert code == 2 and "no report.json" in err
