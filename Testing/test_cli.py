"""The ``sfuda`` command, driven in-process through ``cli.main`` on files in ``tmp_path``:
train-source (repeated --image/--label and a pairs CSV), info, segment, evaluate, adapt
--method none, and --help of every subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SFUDASegmentLib import cli
from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import InferenceConfig
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.data.synthetic import make_phantom_set
from SFUDASegmentLib.evaluation.metrics import evaluate, to_jsonable
from SFUDASegmentLib.inference.segment import segment
from tiny_models import file_digest, single_thread, tiny_model  # noqa: F401

LABELS = "1:organ,2:vessel,3:lesion"
TINY_FLAGS = ["--dims", "2d", "--modality", "T1c", "--epochs", "1", "--iterations", "2",
              "--batch-size", "2", "--channels", "4,8", "--patch-size", "32,32", "--device", "cpu",
              "--seed", "3"]
OBLIQUE = Geometry((2.5, 0.8, 0.9), (-12.5, 30.25, 8.0),
                   (0.8660254, -0.5, 0.0, 0.4698463, 0.8137977, -0.3420201, 0.1710101, 0.2961981, 0.9396926))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``sfuda --progress none ARGV``: exit code, stdout, stderr."""
    code = cli.main(["--progress", "none", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def training_files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """Three 2D 32x32 source phantoms and their label maps as NIfTI files."""
    folder = tmp_path_factory.mktemp("train")
    pairs = []
    for i, phantom in enumerate(make_phantom_set(3, (32, 32), seed=31)):
        image = write_image(phantom.source, folder / f"case{i}.nii.gz")
        label = write_image(phantom.labels, folder / f"case{i}_seg.nii.gz")
        pairs.append((image, label))
    return pairs


@pytest.fixture(scope="module")
def oblique_volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume]:
    """A 3D source phantom (6 x 48 x 48) in an anisotropic, oblique, shifted geometry, on disk."""
    phantom = make_phantom_set(1, (16, 48, 48), seed=41)[0]
    volume = Volume(phantom.source.array[5:11].copy(), OBLIQUE)
    path = write_image(volume, tmp_path_factory.mktemp("volume") / "scan.nii.gz")
    return path, read_image(path)


def _sitk_geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


# --------------------------------------------------------------------------- train-source


def test_train_source_with_image_and_label_flags(capsys, training_files, tmp_path):
    argv = ["train-source", "--labels", LABELS, "--out", str(tmp_path / "m.sfuda"), *TINY_FLAGS]
    for image, label in training_files:
        argv += ["--image", str(image), "--label", str(label)]
    before = [file_digest(p) for pair in training_files for p in pair]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads(out)
    assert report["checkpoint"] == str(tmp_path / "m.sfuda")
    assert [h["epoch"] for h in report["history"]] == [1]
    ckpt = SourceCheckpoint.load(tmp_path / "m.sfuda")
    assert [(c.value, c.name) for c in ckpt.classes] == [(1, "organ"), (2, "vessel"), (3, "lesion")]
    assert ckpt.input_spec.dims == "2d" and ckpt.input_spec.modality == "T1c"
    assert ckpt.input_spec.patch_size == (32, 32)
    assert ckpt.seg_config.channels == (4, 8)
    assert ckpt.provenance["cases"] == [image.name for image, _ in training_files]
    assert ckpt.provenance["training"]["seed"] == 3
    assert before == [file_digest(p) for pair in training_files for p in pair]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sfuda", "m.sfuda.report.json"]
    written = json.loads((tmp_path / "m.sfuda.report.json").read_text())
    assert written["command"] == "train-source" and written["history"] == report["history"]
    assert written["model_card"]["classes"] == [c for c in ckpt.describe()["classes"]]


def test_train_source_with_a_pairs_csv(capsys, training_files, tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,label\n" + "".join(f"{i},{l}\n" for i, l in training_files))
    code, out, err = run(capsys, "train-source", "--pairs", str(csv), "--labels", LABELS,
                         "--out", str(tmp_path / "csv.sfuda"), *TINY_FLAGS)
    assert code == 0, err
    ckpt = SourceCheckpoint.load(tmp_path / "csv.sfuda")
    assert ckpt.provenance["cases"] == [image.name for image, _ in training_files]
    assert len(ckpt.provenance["validation_cases"]) == 1


# --------------------------------------------------------------------------- info


def test_info_prints_the_model_card(capsys, tiny_model):
    code, out, err = run(capsys, "info", str(tiny_model.path))
    assert code == 0, err
    assert str(tiny_model.path) in out
    assert "modality: source-T1c" in out and "dims: 2d" in out
    assert "1:organ, 2:vessel, 3:lesion" in out
    assert "methods: none" in out
    params = tiny_model.checkpoint.describe()["segmentation_network"]["parameters"]
    assert f"{params:,} parameters" in out


def test_info_json_equals_describe(capsys, tiny_model):
    code, out, err = run(capsys, "info", str(tiny_model.path), "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card == json.loads(json.dumps(to_jsonable(SourceCheckpoint.load(tiny_model.path).describe())))
    assert card["dims"] == "2d" and [c["name"] for c in card["classes"]] == ["organ", "vessel", "lesion"]


# --------------------------------------------------------------------------- segment / adapt


def test_segment_writes_labels_in_the_input_geometry_and_a_report(capsys, tiny_model, oblique_volume, tmp_path):
    path, volume = oblique_volume
    before = file_digest(path)
    out_dir = tmp_path / "seg"
    code, out, err = run(capsys, "segment", "--checkpoint", str(tiny_model.path), "--image", str(path),
                         "--out", str(out_dir), "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["out"] == str(out_dir)
    seg_path = out_dir / "segmentation.nii.gz"
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.json", "segmentation.nii.gz"]
    size, spacing, origin, direction = _sitk_geometry(seg_path)
    in_size, in_spacing, in_origin, in_direction = _sitk_geometry(path)
    assert size == in_size
    np.testing.assert_allclose(spacing, in_spacing, rtol=1e-6)
    np.testing.assert_allclose(origin, in_origin, atol=1e-5)
    np.testing.assert_allclose(direction, in_direction, atol=1e-6)
    expected = segment(tiny_model.checkpoint, volume, InferenceConfig(device="cpu"), "labels").labels
    np.testing.assert_array_equal(read_image(seg_path).array, expected)
    report = json.loads((out_dir / "report.json").read_text())
    assert report["device"] == "cpu"
    assert report["timings"]["total_seconds"] > 0
    assert report["timings"]["peak_memory_mb"] and all(v > 0 for v in report["timings"]["peak_memory_mb"].values())
    assert report["shape"] == list(volume.array.shape)
    assert [s["name"] for s in report["structure_stats"]] == ["organ", "vessel", "lesion"]
    assert report["structure_stats"][0]["voxels"] == int((expected == 1).sum())
    assert file_digest(path) == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_adapt_none_writes_segmentation_and_entropy(capsys, tiny_model, oblique_volume, tmp_path):
    path, volume = oblique_volume
    out_dir = tmp_path / "adapt"
    code, out, err = run(capsys, "adapt", "--method", "none", "--checkpoint", str(tiny_model.path),
                         "--image", str(path), "--out", str(out_dir), "--device", "cpu")
    assert code == 0, err
    assert {"segmentation.nii.gz", "entropy.nii.gz", "report.json"} <= {p.name for p in out_dir.iterdir()}
    entropy = read_image(out_dir / "entropy.nii.gz")
    assert entropy.array.shape == volume.array.shape
    assert entropy.geometry.matches(volume.geometry)
    assert np.isfinite(entropy.array).all() and entropy.array.min() >= 0
    result = segment(tiny_model.checkpoint, volume, InferenceConfig(device="cpu"), "probabilities")
    np.testing.assert_allclose(entropy.array, result.maps["entropy"], atol=1e-5)
    report = json.loads((out_dir / "report.json").read_text())
    assert report["method"] == "none" and "entropy" in report["maps"]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_with_regions_and_json_equals_the_library(capsys, tmp_path):
    phantom = make_phantom_set(1, (16, 32, 32), seed=51)[0]
    ref = phantom.labels.array
    pred = ref.copy()
    pred[ndimage.binary_erosion(ref == 1) ^ (ref == 1)] = 0  # organ loses its rim
    pred[ref == 3] = 1  # lesion called organ
    geometry = Geometry((2.0, 0.75, 1.25), (4.0, -3.0, 9.5))
    gt_path = write_image(Volume(ref, geometry), tmp_path / "gt.nii.gz")
    pred_path = write_image(Volume(pred, geometry), tmp_path / "pred.nrrd")
    json_path = tmp_path / "scores" / "eval.json"
    regions = "WT=1,2,3;TC=1,3"
    code, out, err = run(capsys, "evaluate", "--pred", str(pred_path), "--gt", str(gt_path),
                         "--regions", regions, "--json", str(json_path))
    assert code == 0, err
    written = json.loads(json_path.read_text())
    assert json.loads(out) == written
    expected = to_jsonable(evaluate(pred.astype(np.int64), ref.astype(np.int64), (2.0, 0.75, 1.25),
                                    [1, 2, 3], {"WT": [1, 2, 3], "TC": [1, 3]}))
    assert written == json.loads(json.dumps(expected))
    assert set(written["regions"]) == {"WT", "TC"}
    assert written["labels"]["3"]["dice"] == 0.0  # every lesion voxel was called organ
    assert 0.5 < written["labels"]["1"]["dice"] < 1.0
    assert written["regions"]["TC"]["dice"] > written["labels"]["1"]["dice"]  # lesion back in


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command, option", [
    (None, "train-source"), ("train-source", "--labels"), ("segment", "--checkpoint"),
    ("adapt", "--method"), ("fit-prototypes", "--rho"), ("evaluate", "--regions"),
    ("info", "--json"), ("demo", "--out"), ("diffuse-uda", "--synthetic-scale"), ("synthesize", "--deform"),
    ("devices", "--json"), ("round-trip", "--slices"), ("fit-temperature", "--max-voxels"), ("uncertainty", "--maps"),
])
def test_help_of_every_subcommand_exits_0(capsys, command, option):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    assert option in capsys.readouterr().out


def test_every_subcommand_is_covered_by_the_help_test():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == {"train-source", "segment", "adapt", "fit-prototypes",
                                       "evaluate", "info", "demo", "diffuse-uda", "synthesize",
                                       "devices", "round-trip", "fit-temperature", "uncertainty"}
