"""``train-source`` options for the machine at hand: ``--spacing``, ``--diffusion-channels``,
device-aware diffusion defaults recorded in the model card, the validation options, and the
warning (and card entry, shown by ``sfuda info``) when no case is held out for validation; and
the OpenMP wait policy that ``sfuda`` sets for shared CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SFUDASegmentLib import cli
from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import HEALConfig, InferenceConfig
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.data.synthetic import make_phantom_set
from SFUDASegmentLib.diffusion.training import (CPU_DIFFUSION_DEFAULTS, GPU_DIFFUSION_DEFAULTS, diffusion_defaults,
                                                parse_diffusion_widths)
from SFUDASegmentLib.heal.diffusion_quality import ROUND_TRIP_KEY, round_trip_warning
from SFUDASegmentLib.heal.round_trip import diffusion_round_trip
from SFUDASegmentLib.inference.preparation import prepare_input
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.training.segmentation import VALIDATION_ON_TRAINING
from tiny_models import run_sfuda as run
from tiny_models import single_thread  # noqa: F401

LABELS = "1:organ,2:vessel,3:lesion"
TINY = ["--labels", LABELS, "--dims", "2d", "--epochs", "1", "--iterations", "2", "--batch-size", "2",
        "--channels", "4,8", "--device", "cpu", "--seed", "1"]



@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--image/--label`` flags of three 48x48 phantoms at 1 mm."""
    folder = tmp_path_factory.mktemp("pairs")
    flags = []
    for i, phantom in enumerate(make_phantom_set(3, (48, 48), seed=7)):
        flags += ["--image", str(write_image(phantom.source, folder / f"p{i}.nii.gz")),
                  "--label", str(write_image(phantom.labels, folder / f"p{i}_seg.nii.gz"))]
    return flags


def test_spacing_and_diffusion_channels_reach_the_card_and_the_network(capsys, pairs, tmp_path):
    out = tmp_path / "m.sfuda"
    code, stdout, err = run(capsys, "train-source", *TINY, *pairs, "--spacing", "2,2", "--patch-size", "24,24",
                            "--diffusion", "--diffusion-channels", "8,16", "--diffusion-iterations", "2",
                            "--out", str(out))
    assert code == 0, err
    checkpoint = SourceCheckpoint.load(out)
    assert checkpoint.input_spec.target_spacing == (2.0, 2.0)
    net = checkpoint.diffusion.net_config
    assert (net.base_channels, net.channel_mults, net.spatial_dims, net.num_res_blocks) == (8, (1, 2), 2, 1)
    record = checkpoint.provenance["diffusion_training"]
    assert record["iterations"] == 2 and record["lr"] == CPU_DIFFUSION_DEFAULTS.lr
    assert record["defaults"] == {**CPU_DIFFUSION_DEFAULTS.to_dict(), "overridden": ["widths", "iterations"]}
    assert checkpoint.provenance["timings"]["diffusion"]["iterations"] == 2
    assert json.loads(stdout)["timings"]["segmentation"]["iterations"] == 2
    # the network sees 24x24 grids of the 48x48, 1 mm images; results come back on the 48x48 grid
    image = read_image(pairs[1])
    assert prepare_input(image, checkpoint.input_spec).image.shape == (1, 1, 24, 24)
    result = segment(checkpoint, image, InferenceConfig(device="cpu"), "labels")
    assert result.labels.shape == (48, 48) and result.geometry.matches(image.geometry)


def test_the_cpu_defaults_are_used_and_recorded(capsys, pairs, tmp_path):
    out = tmp_path / "d.sfuda"
    code, _, err = run(capsys, "train-source", *TINY, *pairs, "--patch-size", "48,48", "--diffusion",
                       "--diffusion-iterations", "1", "--out", str(out))
    assert code == 0, err
    checkpoint = SourceCheckpoint.load(out)
    net = checkpoint.diffusion.net_config
    widths = tuple(net.base_channels * m for m in net.channel_mults)
    assert widths == CPU_DIFFUSION_DEFAULTS.widths == (16, 32, 32) and net.num_res_blocks == 1
    assert checkpoint.provenance["diffusion_training"]["defaults"]["overridden"] == ["iterations"]
    assert checkpoint.provenance["diffusion_training"]["defaults"]["device"] == "cpu"


@pytest.mark.parametrize("slices", [2, 0])
def test_the_round_trip_on_held_out_cases_is_stored_and_read_back(capsys, pairs, tmp_path, monkeypatch, slices):
    """train-source --diffusion trains the diffusion model without the held-out validation case,
    renders that case's slices from its labels and stores the round trip in the card; the figure
    equals one measured afterwards on the same case with the same settings, and ``info`` shows it.
    With --round-trip-slices 0 nothing is measured and the diffusion model trains on every case."""
    import SFUDASegmentLib.diffusion.training as diffusion_training

    trained_on = []
    real_train = diffusion_training.train_diffusion

    def counting_train(samples, *args, **kwargs):
        trained_on.append(len(samples))
        return real_train(samples, *args, **kwargs)

    monkeypatch.setattr(diffusion_training, "train_diffusion", counting_train)
    out = tmp_path / "r.sfuda"
    code, stdout, err = run(capsys, "train-source", *TINY, *pairs, "--patch-size", "48,48", "--diffusion",
                            "--diffusion-channels", "8,16", "--diffusion-iterations", "2",
                            "--round-trip-slices", str(slices), "--out", str(out))
    assert code == 0, err
    checkpoint = SourceCheckpoint.load(out)
    held_out = checkpoint.provenance["validation_cases"]
    assert len(held_out) == 1 and checkpoint.provenance["validation"] != VALIDATION_ON_TRAINING
    if slices == 0:
        assert trained_on == [3] and ROUND_TRIP_KEY not in checkpoint.provenance
        assert json.loads(stdout)[ROUND_TRIP_KEY] is None
        return
    assert trained_on == [2]
    stored = checkpoint.provenance[ROUND_TRIP_KEY]
    assert stored["cases"] == held_out and stored["slices"] == 1 and stored["candidates"] == 4
    index = [f"p{i}.nii.gz" for i in range(3)].index(held_out[0])
    image, labels = read_image(pairs[4 * index + 1]), read_image(pairs[4 * index + 3])
    again = diffusion_round_trip(checkpoint, [image], [labels], HEALConfig(candidates=4), InferenceConfig(device="cpu"),
                                 slices, held_out)
    assert again["round_trip_dice"] == pytest.approx(stored["round_trip_dice"])
    assert again["source_dice"] == pytest.approx(stored["source_dice"])
    assert json.loads(stdout)[ROUND_TRIP_KEY] == stored
    assert ("far below" in err) == (round_trip_warning(checkpoint.provenance) is not None)
    code, shown, _ = run(capsys, "info", str(out))
    assert code == 0 and f"diffusion round trip: mean Dice {stored['round_trip_dice']:.3f}" in shown


def test_defaults_follow_the_device_and_the_help_names_them():
    assert diffusion_defaults(torch.device("cpu")) == CPU_DIFFUSION_DEFAULTS
    gpu = diffusion_defaults(torch.device("cuda", 1))
    assert gpu == GPU_DIFFUSION_DEFAULTS and gpu.widths == (64, 64, 128, 192, 256)  # Med-DDPM: 64 x (1, 1, 2, 3, 4)
    assert (gpu.num_res_blocks, gpu.iterations, gpu.lr) == (2, 100_000, 1e-5)
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train-source"].format_help()
    flat = " ".join(help_text.split())
    for defaults in (CPU_DIFFUSION_DEFAULTS, GPU_DIFFUSION_DEFAULTS):
        assert ",".join(map(str, defaults.widths)) in flat and str(defaults.iterations) in flat


@pytest.mark.parametrize("value, dims, expected", [
    ("2,2", "2d", (2.0, 2.0)), ("0.8x0.8", "2.5d", (0.8, 0.8)), ("1,2,2", "3d", (1.0, 2.0, 2.0)),
    ("2,2", "3d", (2.0, 2.0))])
def test_spacing_values(value, dims, expected):
    assert cli._spacing(value, dims) == expected


@pytest.mark.parametrize("flags, words", [
    (["--spacing", "2"], "--spacing takes the network spacing"),
    (["--spacing", "0,2"], "--spacing takes the network spacing"),
    (["--spacing", "a,b"], "--spacing takes the network spacing"),
    (["--spacing", "1,2,2"], "(3D only)"),
    (["--diffusion", "--diffusion-channels", "16,24"], "multiples of the first"),
    (["--diffusion", "--diffusion-channels", "x"], "--diffusion-channels takes positive widths"),
    (["--diffusion", "--round-trip-slices", "-1"], "--round-trip-slices must be 0"),
])
def test_bad_options_are_one_line_errors_before_any_work(capsys, pairs, tmp_path, flags, words):
    code, stdout, err = run(capsys, "train-source", *TINY, *pairs, *flags, "--out", str(tmp_path / "x.sfuda"))
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_diffuse_uda_and_train_source_share_the_widths_parser(capsys, tmp_path):
    assert parse_diffusion_widths("16,32,32") == (16, 32, 32)
    code, _, err = run(capsys, "diffuse-uda", "--source-image", "a.nii.gz", "--source-label", "b.nii.gz",
                       "--target-image", "c.nii.gz", "--labels", LABELS, "--out", str(tmp_path / "o.sfuda"),
                       "--diffusion-channels", "16,24")
    assert code == 2 and "--diffusion-channels takes positive widths" in err


def test_validation_options_reach_the_training(capsys, pairs, tmp_path):
    out = tmp_path / "v.sfuda"
    code, stdout, err = run(capsys, "train-source", *TINY, *pairs, "--epochs", "3", "--validation-interval", "2",
                            "--validation-samples", "0", "--patch-size", "48,48", "--out", str(out))
    assert code == 0, err
    history = json.loads(stdout)["history"]
    assert [h["val_mean_dice"] is not None for h in history] == [False, True, True]
    training = SourceCheckpoint.load(out).provenance["training"]
    assert (training["validation_interval"], training["validation_samples"]) == (2, 0)


def test_one_case_warns_records_and_info_shows_it(capsys, pairs, tmp_path):
    out = tmp_path / "one.sfuda"
    code, stdout, err = run(capsys, "train-source", *TINY, *pairs[:4], "--patch-size", "48,48", "--out", str(out))
    assert code == 0, err
    name = Path(pairs[1]).name
    assert f"warning: validation runs on training case(s) {name}" in err
    printed = json.loads(stdout)
    assert printed["validation"] == VALIDATION_ON_TRAINING and len(printed["warnings"]) == 1
    assert SourceCheckpoint.load(out).provenance["validation"] == VALIDATION_ON_TRAINING
    code, stdout, _ = run(capsys, "info", str(out))
    assert code == 0 and "on the training case (no held-out case)" in stdout
    code, stdout, err = run(capsys, "train-source", *TINY, *pairs, "--patch-size", "48,48", "--out", str(tmp_path / "3.sfuda"))
    assert code == 0 and "warning" not in err
    code, stdout, _ = run(capsys, "info", str(tmp_path / "3.sfuda"))
    assert "on the held-out case(s)" in stdout
    assert np.isfinite(SourceCheckpoint.load(tmp_path / "3.sfuda").provenance["validation_mean_dice"])


def test_sfuda_lets_waiting_threads_sleep_unless_the_user_chose(monkeypatch, capsys, tmp_path):
    """OMP_WAIT_POLICY=PASSIVE, set before PyTorch loads (importing the CLI does not load it)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    run(capsys, "info", str(tmp_path / "missing.sfuda"))
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run(capsys, "info", str(tmp_path / "missing.sfuda"))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    probe = subprocess.run([sys.executable, "-c", "import sys, SFUDASegmentLib.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120, cwd=Path(cli.__file__).parents[1])
    assert probe.stdout.strip() == "False", probe.stderr
