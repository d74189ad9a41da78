"""The adaptation side of the ``sfuda`` command, in-process through ``cli.main``: ``adapt
--method heal|gmm|none`` (files in the input's exact geometry, report.json, the adapted
checkpoint), ``fit-prototypes``, ``train-source --diffusion --prototypes``, ``info`` on a full
checkpoint, and the errors (exit 2, nothing written, inputs untouched)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SFUDASegmentLib import cli

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import GMMConfig, HEALConfig, InferenceConfig
from SFUDASegmentLib.data import io
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import read_image, read_label, write_image
from SFUDASegmentLib.data.synthetic import make_phantom_set, render
from SFUDASegmentLib.evaluation.metrics import to_jsonable
from SFUDASegmentLib.gmm.fitting import fit_prototypes
from SFUDASegmentLib.gmm.prototypes import ClassPrototypes
from SFUDASegmentLib.heal.pipeline import heal_adapt
from SFUDASegmentLib.inference.segment import segment
from tiny_models import TINY_SHAPE, TINY_TIMESTEPS, file_digest, single_thread, tiny_full_model  # noqa: F401

OBLIQUE = Geometry((2.5, 0.8, 0.9), (-12.5, 30.25, 8.0),
                   (0.8660254, -0.5, 0.0, 0.4698463, 0.8137977, -0.3420201, 0.1710101, 0.2961981, 0.9396926))
HEAL_STAGE_FILES = {"segmentation", "entropy", "nig_variance", "pseudo_labels", "entropy_labels", "refined_labels"}


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``sfuda --progress none ARGV``: exit code, stdout, stderr."""
    code = cli.main(["--progress", "none", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_full_model) -> dict[str, Path]:
    """Target images (an oblique 3-slice volume and two 2D images), labelled source cases and
    checkpoints with and without the diffusion model / prototypes."""
    folder = tmp_path_factory.mktemp("cli_adapt")
    targets = make_phantom_set(3, TINY_SHAPE, seed=12, gap=0.2)
    volume = Volume(np.stack([p.target.array for p in targets]), OBLIQUE)
    paths = {"volume": write_image(volume, folder / "volume.nii.gz"),
             "image_a": write_image(targets[0].target, folder / "image_a.nii.gz"),
             "image_b": write_image(targets[1].target, folder / "image_b.nrrd"),
             "full": tiny_full_model.path}
    for i, (image, label) in enumerate(zip(tiny_full_model.train_images, tiny_full_model.train_labels)):
        paths[f"source_{i}"] = write_image(image, folder / f"source_{i}.nii.gz")
        paths[f"source_{i}_seg"] = write_image(label, folder / f"source_{i}_seg.nii.gz")
    checkpoint = tiny_full_model.checkpoint
    paths["no_diffusion"] = replace(checkpoint, diffusion=None).save(folder / "no_diffusion.sfuda")
    paths["no_prototypes"] = replace(checkpoint, prototypes=None).save(folder / "no_prototypes.sfuda")
    return paths


def sitk_geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_same_geometry(path: Path, reference: Path) -> None:
    size, spacing, origin, direction = sitk_geometry(path)
    ref_size, ref_spacing, ref_origin, ref_direction = sitk_geometry(reference)
    assert size == ref_size, path.name
    np.testing.assert_allclose(spacing, ref_spacing, rtol=1e-6)
    np.testing.assert_allclose(origin, ref_origin, atol=1e-5)
    np.testing.assert_allclose(direction, ref_direction, atol=1e-6)


# --------------------------------------------------------------------------- HEAL


def test_adapt_heal_writes_every_map_in_the_input_geometry_and_a_report(capsys, files, tmp_path):
    before = [file_digest(files["volume"]), file_digest(files["full"])]
    out = tmp_path / "heal"
    code, stdout, err = run(capsys, "adapt", "--method", "heal", "--checkpoint", str(files["full"]),
                            "--image", str(files["volume"]), "--out", str(out), "--candidates", "2",
                            "--steps", "3", "--seed", "4", "--device", "cpu", "--stages", "heal", "--denoise", "paper")
    assert code == 0, err
    names = {p.name.split(".")[0] for p in out.iterdir()}
    assert names == HEAL_STAGE_FILES | {"selected_segmentation", "candidate_00", "candidate_01", "report"}
    for path in out.glob("*.nii.gz"):
        assert_same_geometry(path, files["volume"])
    report = json.loads((out / "report.json").read_text())
    scores = report["candidate_scores"]
    assert len(scores) == 2 and report["candidates"] == 2
    assert report["selected_index"] == int(np.argmax(scores)) == json.loads(stdout)["selected_index"]
    timings = report["timings"]
    assert set(timings["seconds"]) == {"preprocess", "source_prediction", "denoising", "diffusion", "selection",
                                       "source_on_selected", "fusion", "postprocess"}
    assert all(v >= 0 for v in timings["seconds"].values()) and timings["seconds"]["diffusion"] > 0
    assert set(timings["peak_memory_mb"]) == set(timings["seconds"])
    assert all(v > 0 for v in timings["peak_memory_mb"].values())
    assert report["device"] == "cpu" == timings["device"]
    assert report["heal"] == {"stages": "heal", "denoise": "paper", "sampler": "ddim", "steps": 3, "candidates": 2, "seed": 4,
                              "tau1": 0.2, "tau2": 0.2}
    # the files hold what the library computes with the same settings
    volume = read_image(files["volume"])
    expected = heal_adapt(volume, SourceCheckpoint.load(files["full"]),
                          HEALConfig(candidates=2, steps=3, seed=4, stages="heal", denoise="paper"),
                          InferenceConfig(device="cpu"))
    np.testing.assert_array_equal(read_image(out / "segmentation.nii.gz").array, expected.labels)
    np.testing.assert_array_equal(read_image(out / "refined_labels.nii.gz").array,
                                  expected.label_maps["refined_labels"])
    np.testing.assert_allclose(read_image(out / "candidate_01.nii.gz").array, expected.candidates[1], atol=1e-6)
    np.testing.assert_allclose(read_image(out / "nig_variance.nii.gz").array, expected.maps["nig_variance"], atol=1e-6)
    assert [file_digest(files["volume"]), file_digest(files["full"])] == before


@pytest.mark.parametrize("flags, candidates, steps", [
    (["--stages", "hd"], 0, None),
    (["--stages", "hd+egs", "--sampler", "ddpm", "--candidates", "1"], 1, TINY_TIMESTEPS),
])
def test_adapt_heal_stage_and_sampler_flags(capsys, files, tmp_path, flags, candidates, steps):
    out = tmp_path / "heal"
    code, _, err = run(capsys, "adapt", "--method", "heal", "--checkpoint", str(files["full"]),
                       "--image", str(files["image_a"]), "--out", str(out), "--device", "cpu", *flags)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["candidates"] == candidates == len(list(out.glob("candidate_*.nii.gz")))
    assert HEAL_STAGE_FILES <= {p.name.split(".")[0] for p in out.iterdir()}
    segmentation = read_image(out / "segmentation.nii.gz").array
    if candidates == 0:
        np.testing.assert_array_equal(segmentation, read_image(out / "refined_labels.nii.gz").array)
    else:
        assert report["heal"]["steps"] == steps and report["heal"]["sampler"] == "ddpm"
        np.testing.assert_array_equal(segmentation, read_image(out / "selected_segmentation.nii.gz").array)
    assert_same_geometry(out / "segmentation.nii.gz", files["image_a"])


@pytest.mark.parametrize("flags", [[], ["--render-all-slices"]])
def test_adapt_heal_renders_slices_with_denoised_labels_unless_all_are_asked(capsys, files, tmp_path, flags):
    phantom = make_phantom_set(1, TINY_SHAPE, seed=12, gap=0.2)[0]
    body_only = render(np.zeros_like(phantom.labels.array), phantom.body, "target",
                       np.random.default_rng(5), gap=0.2)
    image = write_image(Volume(np.stack([phantom.target.array, body_only]), OBLIQUE),
                        tmp_path / "two_slices.nii.gz")
    out = tmp_path / "heal"
    code, _, err = run(capsys, "adapt", "--method", "heal", "--checkpoint", str(files["full"]),
                       "--image", str(image), "--out", str(out), "--device", "cpu",
                       "--candidates", "1", "--steps", "2", "--stages", "hd+egs", "--denoise", "paper", *flags)
    assert code == 0, err
    refined = read_image(out / "refined_labels.nii.gz").array
    assert refined[0].any() and not refined[1].any()  # the case this test is about
    report = json.loads((out / "report.json").read_text())
    assert report["rendered_slices"] == (2 if flags else 1)
    candidate = read_image(out / "candidate_00.nii.gz").array
    assert (np.ptp(candidate[1]) > 0) == bool(flags)


def test_adapt_none_on_a_2d_image(capsys, files, tmp_path):
    out = tmp_path / "none"
    code, _, err = run(capsys, "adapt", "--method", "none", "--checkpoint", str(files["full"]),
                       "--image", str(files["image_a"]), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["entropy.nii.gz", "report.json", "segmentation.nii.gz"]
    image = read_image(files["image_a"])
    expected = segment(SourceCheckpoint.load(files["full"]), image, InferenceConfig(device="cpu"), "probabilities")
    np.testing.assert_array_equal(read_image(out / "segmentation.nii.gz").array, expected.labels)
    assert_same_geometry(out / "segmentation.nii.gz", files["image_a"])
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "none" and report["candidates"] == 0 and report["selected_index"] is None


# --------------------------------------------------------------------------- GMM


@pytest.fixture
def no_label_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """GMM adaptation must never read a label file: make every label reader fail."""
    def refuse(*args, **kwargs):
        raise AssertionError("a label file was read during adaptation")
    monkeypatch.setattr(io, "read_label", refuse)


def test_adapt_gmm_saves_a_new_checkpoint_and_leaves_the_source_file(capsys, files, tmp_path, no_label_reading):
    source_digest = file_digest(files["full"])
    adapted_path = tmp_path / "adapted.sfuda"
    out = tmp_path / "gmm"
    code, _, err = run(capsys, "adapt", "--method", "gmm", "--checkpoint", str(files["full"]),
                       "--image", str(files["image_a"]), "--out", str(out), "--iterations", "5",
                       "--lr", "1e-3", "--lambda", "0.7", "--save-adapted", str(adapted_path), "--device", "cpu")
    assert code == 0, err
    assert file_digest(files["full"]) == source_digest
    source, adapted = SourceCheckpoint.load(files["full"]), SourceCheckpoint.load(adapted_path)
    entry = adapted.provenance["gmm_adaptation"]
    assert entry["targets"] == [str(files["image_a"])] and entry["config"]["lam"] == 0.7
    assert len(entry["loss_curve"]) == 5 and "gmm_adaptation" not in source.provenance
    assert any(not torch.equal(adapted.seg_state[k], source.seg_state[k]) for k in source.seg_state)
    assert adapted.prototypes is not None and adapted.diffusion is not None
    assert sorted(p.name for p in out.iterdir()) == ["disagreement.nii.gz", "embeddings_pca.png", "ensemble_entropy.nii.gz",
                                                     "entropy.nii.gz", "nig_variance.nii.gz", "report.json",
                                                     "segmentation.nii.gz"]
    for path in out.glob("*.nii.gz"):
        assert_same_geometry(path, files["image_a"])
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gmm" and len(report["loss_curve"]) == 5
    assert report["swd_before"] > 0 and report["swd_after"] > 0 and len(report["class_proportions"]) == 3
    assert report["gmm"]["iterations"] == 5 and report["gmm"]["lam"] == 0.7
    assert report["timings"]["seconds"]["adaptation"] > 0 and report["timings"]["peak_memory_mb"]["adaptation"] > 0
    # segmentation = the adapted checkpoint applied to the image
    expected = segment(adapted, read_image(files["image_a"]), InferenceConfig(device="cpu"), "labels").labels
    np.testing.assert_array_equal(read_image(out / "segmentation.nii.gz").array, expected)
    png = cv2.imread(str(out / "embeddings_pca.png"))
    assert png is not None and png.shape == (420, 810, 3) and len(np.unique(png.reshape(-1, 3), axis=0)) > 3


def test_adapt_gmm_with_several_images_writes_one_folder_each(capsys, files, tmp_path, no_label_reading):
    out = tmp_path / "multi"
    code, stdout, err = run(capsys, "adapt", "--method", "gmm", "--checkpoint", str(files["full"]),
                            "--image", str(files["image_a"]), "--image", str(files["image_b"]),
                            "--out", str(out), "--iterations", "2", "--no-flip-uncertainty", "--device", "cpu")
    assert code == 0, err
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["case_000_image_a", "case_001_image_b", "report.json"]
    folders = folders[:2]
    summary = json.loads((out / "report.json").read_text())
    assert summary["method_choice"]["method"] == "gmm" and len(summary["cases"]) == 2
    for folder, image in zip(folders, ("image_a", "image_b")):
        assert {p.name for p in (out / folder).iterdir()} == {"segmentation.nii.gz", "entropy.nii.gz",
                                                              "disagreement.nii.gz", "nig_variance.nii.gz",
                                                              "report.json", "embeddings_pca.png"}  # no ensemble
        assert_same_geometry(out / folder / "segmentation.nii.gz", files[image])
        assert json.loads((out / folder / "report.json").read_text())["input"] == str(files[image])
    assert [entry["out"] for entry in json.loads(stdout)] == [str(out / f) for f in folders]
    reports = [json.loads((out / f / "report.json").read_text()) for f in folders]
    assert reports[0]["loss_curve"] == reports[1]["loss_curve"]  # one adaptation on both images


# --------------------------------------------------------------------------- errors


def _argv(files: dict[str, Path], tmp_path: Path, checkpoint: str, *extra: str, images=("image_a",)) -> list[str]:
    argv = ["adapt", "--checkpoint", str(files[checkpoint]), "--out", str(tmp_path / "out"), "--device", "cpu"]
    for image in images:
        argv += ["--image", str(files[image])]
    return argv + list(extra)


ERROR_CASES = [
    ("heal-without-diffusion", "no_diffusion", ["--method", "heal", "--stages", "heal"], ("image_a",),
     ["diffusion model", "--diffusion"]),
    ("hd+egs-without-diffusion", "no_diffusion", ["--method", "heal", "--stages", "hd+egs"], ("image_a",),
     ["--diffusion", "--stages hd"]),
    ("zero-candidates", "full", ["--method", "heal", "--stages", "heal", "--candidates", "0"], ("image_a",), ["candidates", "at least 1"]),
    ("steps-above-T", "full", ["--method", "heal", "--stages", "heal", "--steps", "21"], ("image_a",), ["T = 20", "got 21"]),
    ("gmm-without-prototypes", "no_prototypes", ["--method", "gmm"], ("image_a",), ["no GMM prototypes",
                                                                                    "sfuda fit-prototypes"]),
    ("zero-iterations", "full", ["--method", "gmm", "--iterations", "0"], ("image_a",), ["at least 1 iteration"]),
    ("heal-two-images", "full", ["--method", "heal"], ("image_a", "image_b"), ["one image at a time"]),
    ("none-two-images", "full", ["--method", "none"], ("image_a", "image_b"), ["one image at a time"]),
    ("save-over-source", "full", ["--method", "gmm", "--save-adapted", "SOURCE"], ("image_a",),
     ["is the input", "never overwritten"]),
    ("save-with-heal", "full", ["--method", "heal", "--save-adapted", "x.sfuda"], ("image_a",), ["--method gmm"]),
]


@pytest.mark.parametrize("checkpoint, extra, images, words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_adapt_errors_exit_2_and_write_nothing(capsys, files, tmp_path, checkpoint, extra, images, words):
    extra = [str(files[checkpoint]) if e == "SOURCE" else e for e in extra]
    watched = [files[checkpoint]] + [files[i] for i in images]
    digests = [file_digest(p) for p in watched]
    code, stdout, err = run(capsys, *_argv(files, tmp_path, checkpoint, *extra, images=images))
    assert code == 2 and stdout == "" and err.startswith("error: ")
    for word in words:
        assert word in err, f"'{word}' not in: {err}"
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging debris, no checkpoint
    assert [file_digest(p) for p in watched] == digests


# --------------------------------------------------------------------------- fit-prototypes, train-source, info


def test_fit_prototypes_adds_them_to_a_new_checkpoint(capsys, files, tmp_path):
    before = file_digest(files["no_prototypes"])
    out = tmp_path / "fitted.sfuda"
    argv = ["fit-prototypes", "--checkpoint", str(files["no_prototypes"]), "--out", str(out), "--rho", "0.5",
            "--device", "cpu"]
    for i in (0, 1):
        argv += ["--image", str(files[f"source_{i}"]), "--label", str(files[f"source_{i}_seg"])]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert file_digest(files["no_prototypes"]) == before
    assert SourceCheckpoint.load(files["no_prototypes"]).prototypes is None
    fitted = SourceCheckpoint.load(out)
    printed = json.loads(stdout)
    assert printed["checkpoint"] == str(out)
    assert printed["prototypes"] == json.loads(json.dumps(to_jsonable(fitted.describe()["prototypes"])))
    expected = fit_prototypes(SourceCheckpoint.load(files["no_prototypes"]),
                              [read_image(files[f"source_{i}"]) for i in (0, 1)],
                              [read_label(files[f"source_{i}_seg"]) for i in (0, 1)], GMMConfig(rho=0.5), device="cpu")
    got, want = ClassPrototypes.from_state(fitted.prototypes), ClassPrototypes.from_state(expected.prototypes)
    assert got.counts == want.counts and torch.equal(got.means, want.means)
    assert fitted.describe()["methods"] == ["none", "heal", "gmm"]


def test_fit_prototypes_needs_one_label_per_image(capsys, files, tmp_path):
    code, stdout, err = run(capsys, "fit-prototypes", "--checkpoint", str(files["no_prototypes"]),
                            "--out", str(tmp_path / "x.sfuda"), "--image", str(files["source_0"]),
                            "--image", str(files["source_1"]), "--label", str(files["source_0_seg"]))
    assert code == 2 and "one --label per --image" in err and list(tmp_path.iterdir()) == []


def test_train_source_with_diffusion_and_prototypes_then_info(capsys, files, tmp_path):
    out = tmp_path / "trained.sfuda"
    argv = ["train-source", "--labels", "1:organ,2:vessel", "--out", str(out), "--dims", "2d",
            "--epochs", "4", "--iterations", "20", "--batch-size", "4", "--lr", "3e-3", "--channels", "8,16,32",
            "--patch-size", "48,48", "--diffusion", "--diffusion-iterations", "2", "--prototypes", "--rho", "0.5",
            "--device", "cpu"]
    for i in range(6):
        argv += ["--image", str(files[f"source_{i}"]), "--label", str(files[f"source_{i}_seg"])]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    checkpoint = SourceCheckpoint.load(out)
    assert checkpoint.diffusion is not None and checkpoint.diffusion.net_config.spatial_dims == 2
    assert checkpoint.diffusion.net_config.cond_channels == 4
    assert checkpoint.provenance["diffusion_training"]["iterations"] == 2
    prototypes = ClassPrototypes.from_state(checkpoint.prototypes)
    assert prototypes.rho == 0.5 and prototypes.class_indices == (0, 1, 2)
    assert prototypes.embedding_dim == 8
    code, stdout, err = run(capsys, "info", str(out))
    assert code == 0, err
    assert "methods: none, heal, gmm" in stdout
    assert f"T = {checkpoint.diffusion.schedule.timesteps}" in stdout


def test_info_shows_the_diffusion_model_and_the_prototypes(capsys, files, tiny_full_model):
    code, stdout, err = run(capsys, "info", str(files["full"]))
    assert code == 0, err
    assert "diffusion model: 2D, base 8, T = 20" in stdout
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if "class prototypes" in l)
    assert "8-D" in lines[header] and "confidence > 0.5" in lines[header]
    rows = [l.split() for l in lines[header + 2:header + 5]]  # one row per class, background first
    prototypes = ClassPrototypes.from_state(tiny_full_model.checkpoint.prototypes)
    assert [r[0] for r in rows] == ["background"] + [c.name for c in tiny_full_model.checkpoint.classes]
    assert [int(r[3].replace(",", "")) for r in rows] == [int(n) for n in prototypes.counts]
    assert [float(r[1]) for r in rows] == pytest.approx([float(w) for w in prototypes.weights], abs=1e-4)
    assert "methods: none, heal, gmm" in stdout and "HEAL unavailable" not in stdout
    code, stdout, _ = run(capsys, "info", str(files["full"]), "--json")
    card = json.loads(stdout)
    assert card["diffusion_model"]["schedule"]["timesteps"] == 20 and card["prototypes"]["rho"] == 0.5
    assert card == json.loads(json.dumps(to_jsonable(tiny_full_model.checkpoint.describe())))


def test_adapt_heal_denoise_components_and_warnings_on_stderr(capsys, files, tmp_path):
    paper_out, components_out = tmp_path / "paper", tmp_path / "components"
    common = ["adapt", "--method", "heal", "--checkpoint", str(files["full"]), "--image", str(files["image_a"]),
              "--stages", "hd", "--device", "cpu"]
    code, _, err = run(capsys, *common, "--out", str(paper_out), "--denoise", "paper")
    assert code == 0, err
    code, _, err = run(capsys, *common, "--out", str(components_out), "--denoise", "components",
                       "--component-markers", "nig")
    assert code == 0, err
    paper = read_image(paper_out / "refined_labels.nii.gz").array
    components = read_image(components_out / "refined_labels.nii.gz").array
    pseudo = read_image(components_out / "pseudo_labels.nii.gz").array
    np.testing.assert_array_equal(read_image(components_out / "nig_labels.nii.gz").array, paper)
    assert np.all((components == 0) | (components == pseudo)) and (components > 0).sum() >= (paper > 0).sum()
    report = json.loads((components_out / "report.json").read_text())
    assert report["denoising"]["mode"] == "components" and report["denoising"]["markers"] == "nig"
    assert report["heal"]["denoise"] == "components"
    # past the denoising, the missing round-trip figure of this checkpoint is a warning on stderr
    code, _, err = run(capsys, "adapt", "--method", "heal", "--checkpoint", str(files["full"]), "--image",
                       str(files["image_a"]), "--stages", "hd+egs", "--candidates", "2", "--steps", "2",
                       "--device", "cpu", "--out", str(tmp_path / "egs"))
    assert code == 0, err
    assert "warning: image_a.nii.gz: This checkpoint's diffusion model has no round-trip figure" in err
    assert json.loads((tmp_path / "egs" / "report.json").read_text())["warnings"]


def test_adapt_gmm_guard_flag_keeps_the_source_segmentation(capsys, files, tmp_path):
    common = ["adapt", "--method", "gmm", "--checkpoint", str(files["full"]), "--image", str(files["image_a"]),
              "--iterations", "3", "--lr", "1e-3", "--device", "cpu"]
    code, _, err = run(capsys, *common, "--out", str(tmp_path / "guarded"), "--guard-agreement", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "guarded" / "report.json").read_text())
    assert report["guard"]["fired"] and report["guard"]["kept"] == "source"
    assert "warning: image_a.nii.gz: GMM adaptation changed" in err
    code, _, err = run(capsys, "adapt", "--method", "none", "--checkpoint", str(files["full"]), "--image",
                       str(files["image_a"]), "--device", "cpu", "--out", str(tmp_path / "none"))
    np.testing.assert_array_equal(read_image(tmp_path / "guarded" / "segmentation.nii.gz").array,
                                  read_image(tmp_path / "none" / "segmentation.nii.gz").array)


def test_round_trip_is_stored_in_a_new_checkpoint_read_back_and_warned_about(capsys, files, tmp_path, tiny_full_model):
    out = tmp_path / "checked.sfuda"
    code, stdout, err = run(capsys, "round-trip", "--checkpoint", str(files["full"]), "--image",
                            str(files["source_0"]), "--label", str(files["source_0_seg"]), "--image",
                            str(files["source_1"]), "--label", str(files["source_1_seg"]), "--slices", "2",
                            "--candidates", "2", "--steps", "3", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    figure = json.loads(stdout)["diffusion_round_trip"]
    stored = SourceCheckpoint.load(out).provenance["diffusion_round_trip"]
    assert stored == figure and stored["slices"] == 2 and stored["cases"] == ["source_0.nii.gz", "source_1.nii.gz"]
    assert 0 <= stored["round_trip_dice"] <= 1 and 0 < stored["source_dice"] <= 1
    assert file_digest(files["full"]) == file_digest(tiny_full_model.path)  # the input is untouched
    code, stdout, _ = run(capsys, "info", str(out))
    assert f"diffusion round trip: mean Dice {stored['round_trip_dice']:.3f}" in stdout
    from SFUDASegmentLib.heal.diffusion_quality import round_trip_warning

    expected = round_trip_warning(stored)
    assert (expected is not None) == ("warning: The diffusion model's round trip is far below" in err)
    # A checkpoint whose figure is far below its source Dice: HEAL's report and stderr say so.
    checked = SourceCheckpoint.load(out)
    low = replace(checked, provenance={**checked.provenance, "diffusion_round_trip": {
        **stored, "round_trip_dice": 0.05, "source_dice": 0.9}}).save(tmp_path / "low.sfuda")
    code, _, err = run(capsys, "adapt", "--method", "heal", "--checkpoint", str(low), "--image", str(files["image_a"]),
                       "--stages", "hd+egs", "--candidates", "2", "--steps", "2", "--device", "cpu",
                       "--out", str(tmp_path / "low_out"))
    assert code == 0, err
    assert "round trip is far below the source model: the source model finds 0.05 mean Dice" in err
    assert "far below" in json.loads((tmp_path / "low_out" / "report.json").read_text())["warnings"][0]
