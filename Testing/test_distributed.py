"""torch.distributed, as a user launches it: ``torchrun`` with two CPU processes (gloo, on
127.0.0.1 only) runs ``train-source`` (segmentation and diffusion, resuming a one-process run)
and ``adapt --cohort``, and gets what one process gets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SFUDASegmentLib import cli
from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.data.synthetic import make_phantom_set
from SFUDASegmentLib.errors import OperationCancelled
from SFUDASegmentLib.results.staging import OutputTransaction
from SFUDASegmentLib.utils.progress import ProgressReporter
from tiny_models import TINY_SHAPE, single_thread, tiny_full_model  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
LOOPBACK_INTERFACE = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this PyTorch build has no torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m SFUDASegmentLib.cli --progress none ARGV`` on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if LOOPBACK_INTERFACE:
        env["GLOO_SOCKET_IFNAME"] = LOOPBACK_INTERFACE
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "SFUDASegmentLib.cli", "--progress", "none", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--progress", "none", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_source_on_two_processes_resumes_and_equals_one_process(capsys, tmp_path):
    """A one-process run is stopped after epoch 1; two processes resume it (each loads the
    state, rank 0 rewrites it and writes the checkpoint) and train the diffusion model: the
    weights equal an uninterrupted one-process run with the same global batch."""
    argv = ["train-source", "--labels", "1:organ,2:vessel,3:lesion", "--dims", "2d", "--iterations", "3",
            "--batch-size", "4", "--channels", "4,8", "--patch-size", "32,32", "--device", "cpu", "--seed", "3",
            "--diffusion", "--diffusion-iterations", "3", "--diffusion-channels", "8,8"]
    for i, phantom in enumerate(make_phantom_set(4, (32, 32), seed=31)):
        argv += ["--image", str(write_image(phantom.source, tmp_path / f"case{i}.nii.gz")),
                 "--label", str(write_image(phantom.labels, tmp_path / f"case{i}_seg.nii.gz"))]
    code, out, err = run(capsys, *argv, "--epochs", "2", "--out", str(tmp_path / "straight.sfuda"))
    assert code == 0, err
    straight = json.loads(out)
    # the same command, stopped (as by Ctrl-C) when epoch 2 begins: the state of epoch 1 is on disk
    args = cli.build_parser().parse_args([*argv, "--epochs", "2", "--resume", "--out", str(tmp_path / "resumed.sfuda")])
    stop = ProgressReporter(lambda event: None,
                            should_cancel=lambda: (tmp_path / "resumed.sfuda.train-state").is_file())
    with pytest.raises(OperationCancelled), OutputTransaction() as outputs:
        cli.cmd_train_source(args, stop, outputs)
    assert not (tmp_path / "resumed.sfuda").exists()
    done = torchrun(*argv, "--epochs", "2", "--resume", "--out", str(tmp_path / "resumed.sfuda"))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # rank 0 alone prints
    assert [h["epoch"] for h in printed["history"]] == [1, 2]
    np.testing.assert_allclose([h["loss"] for h in printed["history"]], [h["loss"] for h in straight["history"]],
                               rtol=1e-5)
    np.testing.assert_allclose([h["val_dice"] for h in printed["history"]],
                               [h["val_dice"] for h in straight["history"]], rtol=1e-6)
    one, two = SourceCheckpoint.load(tmp_path / "straight.sfuda"), SourceCheckpoint.load(tmp_path / "resumed.sfuda")
    assert_same_weights(one.seg_state, two.seg_state)
    assert_same_weights(one.diffusion.state_dict, two.diffusion.state_dict)
    assert two.provenance["processes"] == 2 and one.provenance["processes"] == 1
    state = torch.load(tmp_path / "resumed.sfuda.train-state", weights_only=True)
    assert state["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("case")) == [
        "resumed.sfuda", "resumed.sfuda.report.json", "resumed.sfuda.train-state", "straight.sfuda",
        "straight.sfuda.report.json"]  # rank 0 alone writes the checkpoint and its report


def _folder_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): read_image(p).array for p in sorted(folder.rglob("*.nii.gz"))}


def test_cohort_of_four_images_on_two_processes_equals_one_process(capsys, tmp_path, tiny_full_model):
    images = [write_image(p.target, tmp_path / f"scan_{i}.nii.gz")
              for i, p in enumerate(make_phantom_set(4, TINY_SHAPE, seed=12, gap=0.3))]
    argv = ["adapt", "--cohort", "--method", "heal", "--stages", "heal", "--candidates", "2", "--steps", "3", "--seed", "1",
            "--checkpoint", str(tiny_full_model.path), "--device", "cpu"]
    for image in images:
        argv += ["--image", str(image)]
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "one"))
    assert code == 0, err
    one = json.loads(out)
    done = torchrun(*argv, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout)
    assert (one["processes"], two["processes"]) == (1, 2) and one["succeeded"] == two["succeeded"] == 4
    assert [c["rank"] for c in two["cases"]] == [0, 1, 0, 1]
    assert [Path(c["out"]).name for c in two["cases"]] == [f"case_{i:03d}_scan_{i}" for i in range(4)]
    assert json.loads((tmp_path / "two" / "cohort.json").read_text()) == two
    for a, b in zip(one["cases"], two["cases"]):
        assert a["result"]["selected_index"] == b["result"]["selected_index"]
        assert a["result"]["structures"] == pytest.approx(b["result"]["structures"])
    arrays_one, arrays_two = _folder_arrays(tmp_path / "one"), _folder_arrays(tmp_path / "two")
    assert arrays_one.keys() == arrays_two.keys() and len(arrays_one) >= 4 * 8
    for name, array in arrays_one.items():
        if name.endswith("segmentation.nii.gz") or "labels" in name:
            np.testing.assert_array_equal(array, arrays_two[name], err_msg=name)
        else:
            np.testing.assert_allclose(array, arrays_two[name], atol=1e-5, err_msg=name)


def test_cohort_records_a_failed_image_and_goes_on(capsys, tmp_path, tiny_full_model):
    good = write_image(make_phantom_set(1, TINY_SHAPE, seed=12, gap=0.3)[0].target, tmp_path / "good.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    code, out, err = run(capsys, "adapt", "--cohort", "--method", "none", "--checkpoint", str(tiny_full_model.path),
                         "--image", str(broken), "--image", str(good), "--out", str(tmp_path / "out"),
                         "--device", "cpu")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: 1 of 2 images failed (") and str(broken) in err
    summary = json.loads((tmp_path / "out" / "cohort.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (1, 1)
    assert [c["status"] for c in summary["cases"]] == ["failed", "ok"]
    assert "broken.nii.gz" in summary["cases"][0]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_001_good", "cohort.json"]
    assert (tmp_path / "out" / "case_001_good" / "segmentation.nii.gz").is_file()
    code, _, err = run(capsys, "adapt", "--cohort", "--method", "gmm", "--checkpoint", str(tiny_full_model.path),
                       "--image", str(good), "--out", str(tmp_path / "x"), "--save-adapted", str(tmp_path / "a.sfuda"))
    assert code == 2 and "--save-adapted cannot be combined with --cohort" in err
