"""Bad input (issue 2, item 11), through the ``sfuda`` CLI and through the library.

Every case must give exit code 2 (or the library's typed error) with a message that names the
problem, write nothing in ``--out`` (absent stays absent, an existing folder keeps its files
byte for byte, also with ``--overwrite``) and leave the input files' bytes unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SFUDASegmentLib import cli
from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import InferenceConfig, InputSpec, LabelClass
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import read_image, read_label, write_image
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, make_phantom_set
from SFUDASegmentLib.errors import CheckpointError, DeviceError, InputError
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.training.segmentation import train_source
from tiny_models import (file_digest, single_thread, tiny_model, tiny_training_config,  # noqa: F401
                         tree_snapshot, untrained_checkpoint)

LABELS = "1:organ,2:vessel,3:lesion"
GEOMETRY = Geometry((2.0, 0.9, 0.9), (5.0, -7.5, 12.0))
TRAIN_FLAGS = ["--dims", "2d", "--epochs", "1", "--iterations", "1", "--batch-size", "1",
               "--channels", "4,8", "--patch-size", "32,32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> dict[str, Path]:
    """Every bad (and one good) input as a file."""
    folder = tmp_path_factory.mktemp("inputs")
    phantom = make_phantom_set(1, (16, 32, 32), seed=61)[0]
    source, label_map = phantom.source.array[4:12].copy(), phantom.labels.array[4:12].copy()
    image = Volume(source, GEOMETRY)
    labels = Volume(label_map, GEOMETRY)
    paths = {"image": write_image(image, folder / "image.nii.gz"),
             "label": write_image(labels, folder / "label.nii.gz")}
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(source[:4]) for _ in range(3)])
    sitk.WriteImage(four_d, str(folder / "four_d.nii.gz"))
    paths["four_d"] = folder / "four_d.nii.gz"
    samples = np.linspace(0, 1, 16, dtype="<f4")
    paths["one_d"] = folder / "one_d.nrrd"
    paths["one_d"].write_bytes(b"NRRD0004\ntype: float\ndimension: 1\nsizes: 16\nspacings: 1\n"
                               b"encoding: raw\nendian: little\n\n" + samples.tobytes())
    nan = source.copy()
    nan[2, 10, 10] = np.nan
    nan[3, 5, 5] = np.inf
    # NRRD keeps NaN/Inf; ITK's NIfTI reader silently turns them into 0 (reported to the lead)
    paths["nan"] = write_image(Volume(nan, GEOMETRY), folder / "nan.nrrd")
    paths["constant"] = write_image(Volume(np.full((8, 32, 32), 7.0, np.float32), GEOMETRY),
                                    folder / "constant.nii.gz")
    shifted = Geometry(GEOMETRY.spacing, (5.0, -7.5, 20.0), GEOMETRY.direction)
    paths["shifted_label"] = write_image(Volume(label_map, shifted), folder / "shifted_label.nii.gz")
    extra = label_map.copy()
    extra[0, :2, :2] = 5
    paths["label_5"] = write_image(Volume(extra, GEOMETRY), folder / "label_5.nii.gz")
    paths["image_2d"] = write_image(Volume(source[4], Geometry((0.9, 0.9))), folder / "image_2d.nii.gz")
    ckpt_3d = untrained_checkpoint(InputSpec(dims="3d", patch_size=(8, 16, 16)))
    paths["ckpt_3d"] = ckpt_3d.save(folder / "model_3d.sfuda")
    paths["ckpt_2d"] = tiny_model.path
    paths["missing"] = folder / "does_not_exist.nii.gz"
    return paths


def _expect_exit_2(capsys: pytest.CaptureFixture, argv: list[str], words: list[str],
                   inputs: list[Path], out: Path) -> str:
    """Run ``sfuda --progress none ARGV``; check exit 2, ``words`` in stderr, out and inputs
    untouched and no staging debris beside ``out``. Returns stderr."""
    watched = [p for p in inputs if p.exists()]
    digests = [file_digest(p) for p in watched]
    out_before = tree_snapshot(out) if out.is_dir() else (file_digest(out) if out.exists() else None)
    siblings = sorted(p.name for p in out.parent.iterdir())
    code = cli.main(["--progress", "none", *argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("error: ") and captured.out == ""
    for word in words:
        assert word.lower() in captured.err.lower(), f"'{word}' not in: {captured.err}"
    assert [file_digest(p) for p in watched] == digests
    out_after = tree_snapshot(out) if out.is_dir() else (file_digest(out) if out.exists() else None)
    assert out_after == out_before
    assert sorted(p.name for p in out.parent.iterdir()) == siblings
    return captured.err


@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    """An output folder holding the result of an earlier run, which must survive."""
    out = tmp_path / "previous_result"
    out.mkdir()
    (out / "segmentation.nii.gz").write_bytes(b"an earlier segmentation")
    (out / "report.json").write_text('{"earlier": true}')
    return out


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this machine has no CUDA GPU (also on a machine that has one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- segment (CLI)

SEGMENT_CASES = [
    # (image, checkpoint, extra args, words naming the problem)
    ("four_d", "ckpt_3d", [], ["4D image", "select one channel/time point"]),
    ("one_d", "ckpt_3d", [], ["1D signal", "3D scalar volume"]),
    ("nan", "ckpt_3d", [], ["1 NaN and 1 Inf voxels", "replace them"]),
    ("constant", "ckpt_3d", [], ["constant", "every voxel is 7"]),
    ("missing", "ckpt_3d", [], ["does_not_exist.nii.gz", "not found"]),
    ("image_2d", "ckpt_3d", [], ["2D image", "3D model", "2D or 2.5D checkpoint"]),
    ("image", "missing", [], ["does_not_exist.nii.gz", "not found"]),
]


@pytest.mark.parametrize("image, checkpoint, extra, words", SEGMENT_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in SEGMENT_CASES])
@pytest.mark.parametrize("out_exists", [False, True])
def test_segment_refuses_bad_input(capsys, files, tmp_path, existing_out, image, checkpoint, extra,
                                   words, out_exists):
    out = existing_out if out_exists else tmp_path / "new_result"
    argv = ["segment", "--checkpoint", str(files[checkpoint]), "--image", str(files[image]),
            "--out", str(out), "--device", "cpu", *extra, *(["--overwrite"] if out_exists else [])]
    _expect_exit_2(capsys, argv, words, [files[image], files[checkpoint]], out)


@pytest.mark.parametrize("command", ["segment", "adapt"])
def test_cuda_requested_without_cuda(capsys, files, tmp_path, no_cuda, command):
    out = tmp_path / "cuda_result"
    argv = [command, "--checkpoint", str(files["ckpt_2d"]), "--image", str(files["image"]),
            "--out", str(out), "--device", "cuda"] + (["--method", "none"] if command == "adapt" else [])
    _expect_exit_2(capsys, argv, ["cuda", "no CUDA GPU is available", "device 'cpu'"],
                   [files["image"], files["ckpt_2d"]], out)


def test_adapt_refuses_nan_volume(capsys, files, existing_out):
    argv = ["adapt", "--method", "none", "--checkpoint", str(files["ckpt_2d"]), "--image",
            str(files["nan"]), "--out", str(existing_out), "--device", "cpu", "--overwrite"]
    _expect_exit_2(capsys, argv, ["NaN"], [files["nan"]], existing_out)


# --------------------------------------------------------------------------- train-source (CLI)

TRAIN_CASES = [
    ("four_d", "label", [], ["4D image"]),
    ("one_d", "label", [], ["1D signal"]),
    ("nan", "label", [], ["NaN", "Inf"]),
    ("constant", "label", [], ["constant"]),
    ("image", "shifted_label", [], ["not on the image's voxel grid", "origin", "resample"]),
    ("image", "label_5", [], ["unexpected label values [5]", "allowed values are [0, 1, 2, 3]"]),
    ("missing", "label", [], ["does_not_exist.nii.gz", "not found"]),
    ("image", "missing", [], ["does_not_exist.nii.gz", "not found"]),
    ("image", "label", ["--labels", "1:organ,0:nothing"], ["bad label entry", "0 is the background"]),
]


@pytest.mark.parametrize("image, label, extra, words", TRAIN_CASES,
                         ids=[f"{c[0]}-{c[1]}{'-labels' if c[2] else ''}" for c in TRAIN_CASES])
@pytest.mark.parametrize("model_exists", [False, True])
def test_train_source_refuses_bad_input(capsys, files, tmp_path, image, label, extra, words, model_exists):
    out = tmp_path / "model.sfuda"
    if model_exists:
        out.write_bytes(b"an earlier model")
    argv = ["train-source", "--image", str(files[image]), "--label", str(files[label]),
            "--out", str(out), "--device", "cpu", *TRAIN_FLAGS, *(extra or ["--labels", LABELS]),
            *(["--overwrite"] if model_exists else [])]
    _expect_exit_2(capsys, argv, words, [files[image], files[label]], out)
    assert not out.with_suffix(".sfuda.train-state").exists()


def test_train_source_cuda_requested_without_cuda(capsys, files, tmp_path, no_cuda):
    out = tmp_path / "model.sfuda"
    argv = ["train-source", "--image", str(files["image"]), "--label", str(files["label"]),
            "--labels", LABELS, "--out", str(out), "--device", "cuda", *TRAIN_FLAGS]
    _expect_exit_2(capsys, argv, ["no CUDA GPU is available"], [files["image"], files["label"]], out)


def test_train_source_missing_pairs_csv(capsys, tmp_path):
    out = tmp_path / "model.sfuda"
    argv = ["train-source", "--pairs", str(tmp_path / "nope.csv"), "--labels", LABELS, "--out", str(out)]
    _expect_exit_2(capsys, argv, ["pairs file not found", "nope.csv"], [], out)


def test_evaluate_refuses_mismatched_geometry(capsys, files, tmp_path):
    json_out = tmp_path / "scores.json"
    argv = ["evaluate", "--pred", str(files["shifted_label"]), "--gt", str(files["label"]), "--json", str(json_out)]
    _expect_exit_2(capsys, argv, ["voxel grid", "origin"], [files["shifted_label"], files["label"]], json_out)


def test_info_refuses_a_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.sfuda"
    bad.write_bytes(np.random.default_rng(1).bytes(2048))
    code = cli.main(["--progress", "none", "info", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt" in err and "bad.sfuda" in err


# --------------------------------------------------------------------------- library


def _image(array: np.ndarray, geometry: Geometry = GEOMETRY) -> Volume:
    return Volume(array, geometry)


def _raises_keeping_input(error: type[Exception], words: list[str], fn: Callable[[], object],
                          *arrays: np.ndarray) -> None:
    """``fn()`` raises ``error`` naming ``words``; ``arrays`` are unchanged afterwards."""
    copies = [a.copy() for a in arrays]
    with pytest.raises(error) as info:
        fn()
    for word in words:
        assert word.lower() in str(info.value).lower(), f"'{word}' not in: {info.value}"
    for array, copy in zip(arrays, copies):
        np.testing.assert_array_equal(array, copy)


@pytest.fixture(scope="module")
def ckpt_3d() -> SourceCheckpoint:
    return untrained_checkpoint(InputSpec(dims="3d", patch_size=(8, 16, 16)))


@pytest.mark.parametrize("case, words", [
    ("4d", ["4 dimensions", "select one channel or time point"]),
    ("1d", ["1 dimensions"]),
    ("nan", ["NaN", "np.nan_to_num"]),
    ("inf", ["Inf"]),
    ("constant", ["constant"]),
    ("empty", ["empty"]),
    ("bad_spacing", ["invalid spacing"]),
])
def test_segment_library_refuses_bad_volumes(ckpt_3d, case, words):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 16, 16)).astype(np.float32)
    volumes = {
        "4d": _image(rng.normal(size=(2, 8, 16, 16)).astype(np.float32)),
        "1d": _image(base[0, 0]),
        "nan": _image(np.where(base > 2, np.nan, base).astype(np.float32)),
        "inf": _image(np.where(base > 2, np.inf, base).astype(np.float32)),
        "constant": _image(np.zeros((8, 16, 16), np.float32)),
        "empty": _image(np.zeros((0, 16, 16), np.float32)),
        "bad_spacing": _image(base, Geometry((0.0, 1.0, 1.0))),
    }
    volume = volumes[case]
    _raises_keeping_input(InputError, words,
                          lambda: segment(ckpt_3d, volume, InferenceConfig(device="cpu"), "labels"),
                          volume.array)


def test_library_wrong_dims_and_device(ckpt_3d, tiny_model, no_cuda):
    image_2d = _image(np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32), Geometry((1.0, 1.0)))
    _raises_keeping_input(InputError, ["2D image", "3D model"],
                          lambda: segment(ckpt_3d, image_2d, InferenceConfig(device="cpu")), image_2d.array)
    phantom = tiny_model.held_out[0]
    _raises_keeping_input(DeviceError, ["no CUDA GPU"],
                          lambda: segment(tiny_model.checkpoint, phantom.source, InferenceConfig(device="cuda")),
                          phantom.source.array)
    _raises_keeping_input(DeviceError, ["Unknown device 'tpu'"],
                          lambda: segment(tiny_model.checkpoint, phantom.source, InferenceConfig(device="tpu")),
                          phantom.source.array)


def test_train_source_library_refuses_bad_labels_and_geometry(no_cuda):
    phantom = make_phantom_set(1, (32, 32), seed=71)[0]
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    classes = list(PHANTOM_CLASSES)
    config = tiny_training_config(1, 1)
    shifted = Volume(phantom.labels.array, Geometry((1.0, 1.0), (3.0, 0.0)))
    _raises_keeping_input(InputError, ["voxel grid", "origin"],
                          lambda: train_source([phantom.source], [shifted], classes, spec, config),
                          phantom.source.array, phantom.labels.array)
    only_organ = [LabelClass(1, "organ")]
    _raises_keeping_input(InputError, ["label values [2, 3]", "not in the class list [1]"],
                          lambda: train_source([phantom.source], [phantom.labels], only_organ, spec, config),
                          phantom.source.array, phantom.labels.array)
    cuda = tiny_training_config(1, 1)
    cuda.device = "cuda"
    _raises_keeping_input(DeviceError, ["no CUDA GPU"],
                          lambda: train_source([phantom.source], [phantom.labels], classes, spec, cuda),
                          phantom.source.array)


def test_io_library_errors(files, tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(files["missing"])
    with pytest.raises(InputError, match=r"unexpected label values \[5\]"):
        read_label(files["label_5"], allowed_values={1, 2, 3})
    with pytest.raises(CheckpointError, match="not found"):
        SourceCheckpoint.load(tmp_path / "none.sfuda")
