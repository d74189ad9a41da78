"""The ``sfuda diffuse-uda`` and ``sfuda synthesize`` commands on tiny 2D phantom files.

One tiny Diffuse-UDA run (module fixture) writes a checkpoint and a resumable workdir; the
tests then check the checkpoint, a rerun that loads every stage, the no-synthesis ablation,
bad input that must exit 2 and write nothing, and synthesis from a label map with and without
deformation. Sizes: 32 x 32 images, U-Nets of width 4-16, a few iterations.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.cli import main
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, make_phantom_set
from SFUDASegmentLib.diffuse_uda.synthesis import read_synthetic_dataset
from tiny_models import single_thread  # noqa: F401

LABELS = ",".join(f"{c.value}:{c.name}" for c in PHANTOM_CLASSES)
CLASS_VALUES = {0} | {c.value for c in PHANTOM_CLASSES}
N_SOURCE = 3
TINY = ["--dims", "2d", "--patch-size", "32,32", "--iterations", "2", "--diffusion-iterations", "2",
        "--batch-size", "2", "--channels", "4,8", "--diffusion-channels", "8,16", "--steps", "2",
        "--device", "cpu", "--seed", "3"]


def _run(argv: list[str]) -> tuple[int, dict]:
    """``sfuda --progress none ARGV`` with stdout captured; returns the exit code and its JSON."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--progress", "none", *argv])
    return code, json.loads(out.getvalue()) if code == 0 else {}


@pytest.fixture(scope="module")
def files(tmp_path_factory, single_thread) -> dict:
    """Phantom source images + labels and target images (32 x 32, NIfTI) written to disk."""
    folder = tmp_path_factory.mktemp("phantoms")
    sources = make_phantom_set(N_SOURCE, (32, 32), 11, gap=0.8)
    targets = make_phantom_set(2, (32, 32), 12, gap=0.8)
    out: dict = {"folder": folder, "source_image": [], "source_label": [],
                 "target_image": []}
    for i, p in enumerate(sources):
        out["source_image"].append(str(write_image(p.source, folder / f"src{i}.nii.gz")))
        out["source_label"].append(str(write_image(p.labels, folder / f"src{i}_seg.nii.gz")))
    for i, p in enumerate(targets):
        out["target_image"].append(str(write_image(p.target, folder / f"tgt{i}.nii.gz")))
    return out


def _data_args(files: dict, sources: int = N_SOURCE, labels: int = N_SOURCE) -> list[str]:
    argv: list[str] = []
    for path in files["source_image"][:sources]:
        argv += ["--source-image", path]
    for path in files["source_label"][:labels]:
        argv += ["--source-label", path]
    for path in files["target_image"]:
        argv += ["--target-image", path]
    return argv + ["--labels", LABELS]


@pytest.fixture(scope="module")
def first_run(files) -> dict:
    """The first tiny ``diffuse-uda`` run: synthetic scale 1 -> one pair per source slice."""
    work = files["folder"] / "work"
    out = files["folder"] / "model.sfuda"
    code, printed = _run(["diffuse-uda", *_data_args(files), *TINY, "--synthetic-scale", "1",
                          "--workdir", str(work), "--out", str(out)])
    assert code == 0
    return {"work": work, "out": out, "printed": printed}


def test_diffuse_uda_writes_a_loadable_checkpoint_with_a_diffusion_model(first_run):
    printed = first_run["printed"]
    assert printed["stages"] == {s: "ran" for s in ("ascplus", "pseudo_labels", "diffusion", "synthesis",
                                                     "retrain")}
    assert printed["checkpoint"] == str(first_run["out"])
    assert set(printed["timings"]["seconds"]) >= {"prepare", "ascplus", "diffusion", "retrain"}
    checkpoint = SourceCheckpoint.load(first_run["out"])
    checkpoint.validate()
    assert [c.value for c in checkpoint.classes] == [1, 2, 3]
    assert checkpoint.input_spec.dims == "2d" and tuple(checkpoint.input_spec.patch_size) == (32, 32)
    # the new size options reach the networks
    assert tuple(checkpoint.seg_config.channels) == (4, 8)
    assert checkpoint.diffusion is not None
    assert checkpoint.diffusion.net_config.base_channels == 8
    assert tuple(checkpoint.diffusion.net_config.channel_mults) == (1, 2)
    config = checkpoint.provenance["config"]
    assert config["batch_size"] == 2 and config["steps"] == 2 and config["seed"] == 3
    assert config["ascplus_iterations"] == config["retrain_iterations"] == 2
    # round(1.0 * 3 source slices) synthetic pairs, written as a dataset in the workdir
    assert checkpoint.provenance["synthetic_pairs"] == N_SOURCE
    manifest = Path(printed["synthetic_dataset"])
    assert manifest.parent.parent == first_run["work"]
    classes, cases = read_synthetic_dataset(manifest)
    assert len(cases) == N_SOURCE and [c.value for c in classes] == [1, 2, 3]
    report = json.loads(first_run["out"].with_name("model.sfuda.report.json").read_text())
    assert report["command"] == "diffuse-uda" and report["stages"] == printed["stages"]
    assert report["arguments"]["workdir"] == str(first_run["work"])


def test_rerun_with_the_same_workdir_loads_every_stage(first_run, files, capsys):
    out = files["folder"] / "again.sfuda"
    code = main(["--progress", "none", "diffuse-uda", *_data_args(files), *TINY, "--synthetic-scale", "1",
                 "--workdir", str(first_run["work"]), "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["stages"].values()) == {"loaded"} and len(printed["stages"]) == 5
    first, again = SourceCheckpoint.load(first_run["out"]), SourceCheckpoint.load(out)
    for name, value in first.seg_state.items():
        assert torch.equal(again.seg_state[name], value)
    for name, value in first.diffusion.state_dict.items():
        assert torch.equal(again.diffusion.state_dict[name], value)


def test_synthetic_scale_zero_trains_without_diffusion_or_synthesis(first_run, files, capsys):
    out = files["folder"] / "no_synthesis.sfuda"
    code = main(["--progress", "none", "diffuse-uda", *_data_args(files), *TINY, "--synthetic-scale", "0",
                 "--workdir", str(first_run["work"]), "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    # stages 1-2 are shared with the first run, the retraining differs (no synthetic data)
    assert printed["stages"] == {"ascplus": "loaded", "pseudo_labels": "loaded", "diffusion": "disabled",
                                 "synthesis": "disabled", "retrain": "ran"}
    assert printed["synthetic_dataset"] is None
    checkpoint = SourceCheckpoint.load(out)
    assert checkpoint.diffusion is None and checkpoint.provenance["synthetic_pairs"] == 0

    # such a checkpoint cannot synthesize: exit 2 with a message, no dataset written
    target = files["folder"] / "no_dataset"
    code = main(["--progress", "none", "synthesize", "--checkpoint", str(out), "--label",
                 files["source_label"][0], "--out", str(target), "--device", "cpu"])
    assert code == 2 and "no diffusion model" in capsys.readouterr().err
    assert not target.exists()


@pytest.mark.parametrize("case", ["counts", "label value", "diffusion channels"])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(case, files, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "model.sfuda"
    data = _data_args(files, sources=2, labels=1) if case == "counts" else _data_args(files)
    extra = ["--diffusion-channels", "8,12"] if case == "diffusion channels" else []
    if case == "label value":  # the phantom labels hold value 3, which this class list lacks
        data = [a if a != LABELS else "1:organ,2:vessel" for a in data]
    code = main(["--progress", "none", "diffuse-uda", *data, *TINY, *extra, "--workdir", str(work),
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    expected = {"counts": "2 --source-image and 1 --source-label", "label value": "unexpected label values [3]",
                "diffusion channels": "multiples of the first"}[case]
    assert expected in err
    assert not work.exists() and not out.exists()


def _synthesize(checkpoint: Path, label: str, out: Path, n: int, *extra: str) -> dict:
    code, printed = _run(["synthesize", "--checkpoint", str(checkpoint), "--label", label, "--n", str(n),
                          "--out", str(out), "--steps", "2", "--seed", "5", "--device", "cpu", *extra])
    assert code == 0
    return printed


def test_synthesize_writes_n_pairs_on_the_label_grid(first_run, files, tmp_path):
    label_path = files["source_label"][0]
    given = read_image(label_path)
    printed = _synthesize(first_run["out"], label_path, tmp_path / "plain", 3)
    manifest = Path(printed["manifest"])
    assert manifest == tmp_path / "plain" / "manifest.json"
    entries = json.loads(manifest.read_text())["cases"]
    assert len(entries) == 3
    classes, cases = read_synthetic_dataset(manifest)
    assert [c.value for c in classes] == [1, 2, 3]
    for image, label, body in cases:
        assert label.array.shape == image.array.shape == (32, 32)
        assert np.isfinite(image.array).all() and image.array.std() > 0
        assert label.geometry.matches(given.geometry)
        assert {int(v) for v in np.unique(label.array)} <= CLASS_VALUES
        # without --deform every pair is conditioned on the label map exactly as given
        np.testing.assert_array_equal(label.array, given.array)
        assert body is not None and body.array.all()  # no --image: the whole grid is body


def test_synthesize_with_deform_and_image_keeps_the_class_set(first_run, files, tmp_path):
    label_path, image_path = files["source_label"][1], files["source_image"][1]
    given = read_image(label_path).array
    printed = _synthesize(first_run["out"], label_path, tmp_path / "deformed", 2, "--deform",
                          "--image", image_path)
    _, cases = read_synthetic_dataset(printed["manifest"])
    assert len(cases) == 2
    labels = [np.asarray(label.array) for _, label, _ in cases]
    for (image, _, body), lab in zip(cases, labels):
        assert lab.shape == image.array.shape == (32, 32) and np.isfinite(image.array).all()
        assert {int(v) for v in np.unique(lab)} <= CLASS_VALUES
        # a smooth deformation moves the label map a little: changed, but mostly overlapping
        assert not np.array_equal(lab, given)
        overlap = np.logical_and(lab > 0, given > 0).sum() / max(1, (given > 0).sum())
        assert overlap > 0.5
        # the body mask comes from the image (not the whole grid) and follows the same field as
        # the labels, so they stay (up to the odd edge pixel of the foreground estimate) inside it
        inside = np.asarray(body.array) > 0
        assert 0 < inside.sum() < inside.size
        assert inside[lab > 0].mean() > 0.95
    assert not np.array_equal(labels[0], labels[1])  # one field per pair
