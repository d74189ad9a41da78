"""Nothing a user owns is ever overwritten, output is all or nothing, every failure is one line
(issue 12), each case driven through the ``sfuda`` command (``cli.main`` in-process, or a child
process where a signal or a real file system is needed).

Every failing case shows: the exit code (2, or 130 / 143 for Ctrl-C / SIGTERM) and exactly one
line on stderr; the inputs' SHA-256 unchanged; and no output at all (no file, no staging folder)
or, where an earlier output existed, that output byte for byte. Every succeeding case shows the
complete output. Failures at each step of writing (write, verify, flush, rename) are produced
with monkeypatched writers and a fake ``shutil.disk_usage``; a full disk, a read-only parent and
an output folder that is a mount point are also run on real tmpfs mounts when this machine
allows user namespaces (``unshare -r -m``), and skipped elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from SFUDASegmentLib import cli
from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import InferenceConfig
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.results import staging
from tiny_models import file_digest, single_thread, tiny_full_model, tree_snapshot  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--dims", "2d", "--epochs", "1", "--iterations", "2", "--batch-size", "2",
              "--channels", "4,8", "--patch-size", "32,32", "--device", "cpu"]
GEOMETRY = Geometry((0.8, 0.8), (3.0, -4.0))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``sfuda --progress none ARGV``: exit code, stdout, stderr."""
    code = cli.main(["--progress", "none", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The single line of ``err`` (fails when there are more)."""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"expected one line on stderr, got: {err!r}"
    return lines[0]


def digests(paths: list[Path]) -> list[str]:
    return [file_digest(p) for p in paths]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, tiny_full_model) -> dict[str, Path]:
    """Inputs in their own folder: copies of the tiny full checkpoint (diffusion + prototypes)
    and of checkpoints with less, a 2D target image, a labelled source case."""
    folder = tmp_path_factory.mktemp("inputs")
    checkpoint = tiny_full_model.checkpoint
    image, labels = tiny_full_model.held_out[0]
    return {
        "checkpoint": checkpoint.save(folder / "full.sfuda"),
        "prototypes_only": replace(checkpoint, diffusion=None).save(folder / "prototypes_only.sfuda"),
        "plain": replace(checkpoint, diffusion=None, prototypes=None).save(folder / "plain.sfuda"),
        "image": write_image(Volume(image.array, GEOMETRY), folder / "image.nii.gz"),
        "labels": write_image(Volume(labels.array, GEOMETRY), folder / "labels.nii.gz"),
        "source": write_image(Volume(tiny_full_model.train_images[0].array, GEOMETRY), folder / "source.nii.gz"),
        "source_seg": write_image(Volume(tiny_full_model.train_labels[0].array, GEOMETRY),
                                  folder / "source_seg.nii.gz"),
    }


@pytest.fixture
def work(tmp_path: Path, case: dict[str, Path]) -> dict[str, Path]:
    """A fresh copy of the inputs in ``tmp_path/in`` (tests may point outputs at them)."""
    folder = tmp_path / "in"
    folder.mkdir()
    return {name: Path(shutil.copy2(path, folder / path.name)) for name, path in case.items()}


def segment_argv(work: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["segment", "--checkpoint", str(work["checkpoint"]), "--image", str(work["image"]),
            "--out", str(out), "--device", "cpu", *extra]


def assert_complete_segmentation(out: Path, work: dict[str, Path]) -> None:
    """``out`` holds exactly the segment command's files, complete and correct."""
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "segmentation.nii.gz"]
    expected = segment(SourceCheckpoint.load(work["checkpoint"]), read_image(work["image"]),
                       InferenceConfig(device="cpu"), "labels").labels
    np.testing.assert_array_equal(read_image(out / "segmentation.nii.gz").array, expected)
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "segment" and report["files"] == {"segmentation": "segmentation.nii.gz"}


# --------------------------------------------------------------------------- inputs are never outputs

def _input_as_output_cases(w: dict[str, Path]) -> dict[str, tuple[list[str], list[Path], str]]:
    """command line, inputs to watch, words of the message (issue 12's list, and more)."""
    folder = w["image"].parent
    seg_in_folder = Path(shutil.copy2(w["labels"], folder / "segmentation.nii.gz"))
    return {
        "fit-prototypes --out = --checkpoint": (
            ["fit-prototypes", "--checkpoint", str(w["checkpoint"]), "--image", str(w["source"]),
             "--label", str(w["source_seg"]), "--out", str(w["checkpoint"]), "--overwrite"],
            [w["checkpoint"]], "is the input"),
        "segment --image DIR/segmentation.nii.gz --out DIR": (
            ["segment", "--checkpoint", str(w["checkpoint"]), "--image", str(seg_in_folder),
             "--out", str(folder), "--overwrite"], [seg_in_folder, w["checkpoint"]], "contains the input"),
        "train-source --out its own label file": (
            ["train-source", "--image", str(w["source"]), "--label", str(w["source_seg"]),
             "--labels", "1:organ,2:vessel", "--out", str(w["source_seg"]), "--overwrite", *TINY_TRAIN],
            [w["source"], w["source_seg"]], "is the input"),
        "evaluate --json = --pred": (
            ["evaluate", "--pred", str(w["labels"]), "--gt", str(w["source_seg"]), "--json", str(w["labels"]),
             "--overwrite"], [w["labels"], w["source_seg"]], "is the input"),
        "adapt --save-adapted = --checkpoint": (
            ["adapt", "--method", "gmm", "--checkpoint", str(w["checkpoint"]), "--image", str(w["image"]),
             "--out", str(folder.parent / "adapted"), "--save-adapted", str(w["checkpoint"])],
            [w["checkpoint"], w["image"]], "is the input"),
        "adapt --out inside the image file": (
            ["adapt", "--method", "none", "--checkpoint", str(w["checkpoint"]), "--image", str(w["image"]),
             "--out", str(w["image"] / "result")], [w["checkpoint"], w["image"]], "inside the input"),
        "synthesize --out the folder of its label map": (
            ["synthesize", "--checkpoint", str(w["checkpoint"]), "--label", str(w["labels"]),
             "--out", str(folder), "--overwrite"], [w["checkpoint"], w["labels"]], "contains the input"),
        "diffuse-uda --out = --target-image": (
            ["diffuse-uda", "--source-image", str(w["source"]), "--source-label", str(w["source_seg"]),
             "--target-image", str(w["image"]), "--labels", "1:organ,2:vessel", "--out", str(w["image"]),
             "--overwrite"], [w["source"], w["source_seg"], w["image"]], "is the input"),
    }


CASE_NAMES = ["fit-prototypes --out = --checkpoint", "segment --image DIR/segmentation.nii.gz --out DIR",
              "train-source --out its own label file", "evaluate --json = --pred",
              "adapt --save-adapted = --checkpoint", "adapt --out inside the image file",
              "synthesize --out the folder of its label map", "diffuse-uda --out = --target-image"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_an_input_is_never_an_output_even_with_overwrite(capsys, work, tmp_path, name):
    argv, watched, words = _input_as_output_cases(work)[name]
    before, tree = digests(watched), tree_snapshot(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert words in one_line(err) and "never" in err
    assert digests(watched) == before
    assert tree_snapshot(tmp_path) == tree  # nothing written anywhere, no staging debris


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_symlink_or_hard_link_to_an_input_is_the_input(capsys, work, tmp_path):
    link = tmp_path / "link.nii.gz"
    link.symlink_to(work["labels"])
    hard = tmp_path / "hard.json"
    os.link(work["labels"], hard)
    before = digests([work["labels"]])
    for target in (link, hard):
        code, _, err = run(capsys, "evaluate", "--pred", str(work["labels"]), "--gt", str(work["source_seg"]),
                           "--json", str(target), "--overwrite")
        assert code == 2 and "is the input" in one_line(err)
    linked_dir = tmp_path / "linked_folder"
    linked_dir.symlink_to(work["image"].parent, target_is_directory=True)
    code, _, err = run(capsys, *segment_argv(work, linked_dir, "--overwrite"))
    assert code == 2 and "contains the input" in one_line(err)
    assert digests([work["labels"]]) == before


# --------------------------------------------------------------------------- existing outputs

@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """An output folder of an earlier HEAL run, which must survive any failed run."""
    folder = tmp_path / "result"
    folder.mkdir()
    for name in ("segmentation.nii.gz", "candidate_00.nii.gz", "nig_variance.nii.gz"):
        (folder / name).write_bytes(b"earlier " + name.encode())
    (folder / "report.json").write_text('{"method": "heal"}')
    return folder


def test_an_existing_output_folder_is_refused_without_overwrite(capsys, work, previous):
    before, inputs = tree_snapshot(previous), digests([work["image"], work["checkpoint"]])
    code, _, err = run(capsys, *segment_argv(work, previous))
    assert code == 2 and "already holds 4 item(s)" in one_line(err) and "--overwrite" in err
    assert tree_snapshot(previous) == before and digests([work["image"], work["checkpoint"]]) == inputs


def test_overwrite_replaces_the_folder_whole(capsys, work, previous):
    """No candidate or map of the earlier HEAL run stays beside the new result."""
    code, _, err = run(capsys, *segment_argv(work, previous, "--overwrite"))
    assert code == 0, err
    assert_complete_segmentation(previous, work)
    assert not [p for p in previous.parent.iterdir() if "staging" in p.name]


def test_an_empty_existing_folder_is_used_without_overwrite(capsys, work, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run(capsys, *segment_argv(work, out))
    assert code == 0, err
    assert_complete_segmentation(out, work)


def test_a_parent_folder_another_process_makes_meanwhile_is_used(tmp_path, monkeypatch):
    """Two torchrun ranks writing cohort images into one new folder: the rank that loses the race
    to create it writes into it rather than failing (the CI failure of a two-process cohort)."""
    shared = tmp_path / "cohort"
    real_mkdir = Path.mkdir

    def other_rank_first(self, *args, **kwargs):
        if self == shared and not shared.exists():
            real_mkdir(self)  # the other process wins between the existence check and mkdir
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_rank_first)
    with staging.OutputTransaction() as outputs:
        folder = outputs.folder(shared / "case_000")
        (folder / "segmentation.txt").write_text("labels")
    assert (shared / "case_000" / "segmentation.txt").read_text() == "labels"
    assert sorted(p.name for p in shared.iterdir()) == ["case_000"]


def test_an_existing_file_as_out_folder_is_refused(capsys, work, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, *segment_argv(work, out, *extra))
        assert code == 2 and "is an existing file" in one_line(err)
        assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["in", "notes.txt"]


def test_an_existing_output_file_needs_overwrite_which_replaces_it_and_its_report(capsys, work, tmp_path):
    out = tmp_path / "fitted.sfuda"
    out.write_bytes(b"an earlier model")
    argv = ["fit-prototypes", "--checkpoint", str(work["checkpoint"]), "--image", str(work["source"]),
            "--label", str(work["source_seg"]), "--out", str(out), "--rho", "0.5", "--device", "cpu"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already exists" in one_line(err) and out.read_bytes() == b"an earlier model"
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert SourceCheckpoint.load(out).prototypes is not None
    report = json.loads((tmp_path / "fitted.sfuda.report.json").read_text())
    assert report["command"] == "fit-prototypes" and report["checkpoint"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fitted.sfuda", "fitted.sfuda.report.json", "in"]


# --------------------------------------------------------------------------- failures at each step of writing

def _truncating_writer(real: Any) -> Any:
    """SimpleITK's writer on a full disk: no exception, a file cut short."""
    def write(image: Any, path: str, *args: Any) -> None:
        real(image, path, *args)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    return write


def _failing_step(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one step of writing fail the way a full or broken disk does."""
    import SimpleITK as sitk

    if step == "write raises":
        def fail(*args: Any) -> None:
            raise RuntimeError("ImageFileWriter: No space left on device")
        monkeypatch.setattr(sitk, "WriteImage", fail)
    elif step == "write is cut short silently":
        monkeypatch.setattr(sitk, "WriteImage", _truncating_writer(sitk.WriteImage))
    elif step == "flush fails":
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync)
    elif step == "report cannot be written":
        real = Path.write_text

        def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if self.name == "report.json":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, data, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", write_text)


STEPS = ["write raises", "write is cut short silently", "flush fails", "report cannot be written"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("earlier", [False, True], ids=["new-folder", "earlier-output-with-overwrite"])
def test_a_failure_at_any_step_of_writing_leaves_no_output(capsys, work, tmp_path, previous, monkeypatch,
                                                          step, earlier):
    out = previous if earlier else tmp_path / "new"
    before_out, before_in = tree_snapshot(previous), digests([work["image"], work["checkpoint"]])
    _failing_step(step, monkeypatch)
    code, stdout, err = run(capsys, *segment_argv(work, out, "--overwrite"))
    monkeypatch.undo()
    assert code == 2 and stdout == "" and one_line(err).startswith("error: ")
    assert "nothing was written" in err.lower() or "could not write" in err.lower()
    assert tree_snapshot(previous) == before_out and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "result"]  # no staging debris
    assert digests([work["image"], work["checkpoint"]]) == before_in


def _count_renames(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> list[tuple[str, str]]:
    """Record the commit's renames and fail the ``fail_at``-th one (-1: none fails)."""
    real = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src: Any, dst: Any) -> None:
        if Path(src).parent.name in ("content", "replaced") or Path(dst).parent.name == "replaced":
            calls.append((str(src), str(dst)))
            if len(calls) - 1 == fail_at:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_failed_rename_at_any_point_of_the_commit_restores_the_earlier_output(capsys, work, previous,
                                                                                 tmp_path, monkeypatch):
    before = tree_snapshot(previous)
    backup = shutil.copytree(previous, tmp_path.parent / f"{tmp_path.name}_backup")
    renames = _count_renames(monkeypatch, -1)
    code, _, err = run(capsys, *segment_argv(work, previous, "--overwrite"))
    assert code == 0, err
    total = len(renames)
    assert total == 4 + 2  # 4 earlier entries set aside, 2 new ones moved in
    for fail_at in range(total):
        shutil.rmtree(previous)
        shutil.copytree(backup, previous)  # the earlier output again
        monkeypatch.undo()
        _count_renames(monkeypatch, fail_at)
        code, _, err = run(capsys, *segment_argv(work, previous, "--overwrite"))
        assert code == 2 and "nothing was written" in one_line(err).lower(), fail_at
        assert tree_snapshot(previous) == before, fail_at
        assert sorted(p.name for p in previous.parent.iterdir()) == ["in", "result"]


def test_the_gmm_plot_is_staged_so_its_failure_leaves_no_output(capsys, work, tmp_path, monkeypatch):
    from SFUDASegmentLib.gmm import plots

    monkeypatch.setattr(plots.cv2, "imwrite", lambda *args, **kwargs: False)
    out = tmp_path / "gmm"
    code, _, err = run(capsys, "adapt", "--method", "gmm", "--checkpoint", str(work["checkpoint"]),
                       "--image", str(work["image"]), "--out", str(out), "--iterations", "2", "--device", "cpu")
    assert code == 2 and "embeddings_pca.png" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_full_disk_is_refused_before_the_work(capsys, work, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
    import SFUDASegmentLib.inference.segment as segment_module

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the work started although the disk is full")
    monkeypatch.setattr(segment_module, "segment", never)
    code, _, err = run(capsys, *segment_argv(work, tmp_path / "out", "--uncertainty"))
    assert code == 2 and "0.0 MB free" in one_line(err) and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_refused_before_training(capsys, work, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2000))
    code, _, err = run(capsys, "train-source", "--image", str(work["source"]), "--label", str(work["source_seg"]),
                       "--labels", "1:organ,2:vessel", "--out", str(tmp_path / "m.sfuda"), *TINY_TRAIN)
    assert code == 2 and "the checkpoint needs about" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_an_unwritable_location_is_refused_before_the_work(capsys, work, tmp_path, monkeypatch):
    def read_only(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
    monkeypatch.setattr(staging.tempfile, "mkdtemp", read_only)
    code, _, err = run(capsys, *segment_argv(work, tmp_path / "sub" / "out"))
    assert code == 2 and "Read-only file system" in one_line(err) and "cannot be written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # the missing parent is not left behind


def test_an_output_folder_on_another_device_is_written_on_that_device(capsys, work, tmp_path, monkeypatch):
    """An existing output folder that is a mount point (a container's /out): a rename between it
    and its parent fails with EXDEV, as on a real mount, so staging must happen inside it."""
    mount = (tmp_path / "mnt").resolve()
    mount.mkdir()
    real_replace, real_rename = os.replace, os.rename

    def same_device(src: Any, dst: Any) -> None:
        if (mount in Path(src).resolve().parents) != (mount in Path(dst).resolve().parents):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
    monkeypatch.setattr(os, "replace", lambda s, d: (same_device(s, d), real_replace(s, d))[1])
    monkeypatch.setattr(os, "rename", lambda s, d: (same_device(s, d), real_rename(s, d))[1])
    code, _, err = run(capsys, *segment_argv(work, mount))
    monkeypatch.undo()
    assert code == 0, err
    assert_complete_segmentation(mount, work)


def test_a_writable_output_folder_in_a_read_only_parent_is_written(capsys, work, tmp_path, monkeypatch):
    parent = (tmp_path / "read_only_parent").resolve()
    out = parent / "out"
    out.mkdir(parents=True)
    real_mkdir, real_replace = os.mkdir, os.replace

    def refuse(path: Any) -> None:
        if Path(path).resolve().parent == parent:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: (refuse(p), real_mkdir(p, *a, **k))[1])
    monkeypatch.setattr(os, "replace", lambda s, d: (refuse(s), refuse(d), real_replace(s, d))[2])
    code, _, err = run(capsys, *segment_argv(work, out))
    monkeypatch.undo()
    assert code == 0, err
    assert_complete_segmentation(out, work)


# --------------------------------------------------------------------------- real file systems

_REAL_FS_DRIVER = textwrap.dedent('''
    import hashlib, json, os, shutil, subprocess, sys
    from pathlib import Path
    from SFUDASegmentLib import cli

    base, checkpoint, image = (Path(a) for a in sys.argv[1:4])
    def sh(*cmd):
        subprocess.run(cmd, check=True)
    def sha(p):
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()
    def segment(out, *extra):
        before = [sha(checkpoint), sha(image)]
        code = cli.main(["--progress", "none", "segment", "--checkpoint", str(checkpoint), "--image",
                         str(image), "--out", str(out), "--device", "cpu", *extra])
        return {"code": code, "inputs_unchanged": before == [sha(checkpoint), sha(image)]}
    results = {}
    (base / "full").mkdir(); sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(base / "full"))
    # leave two pages free: more than the check before the work asks, less than the files take
    ballast = shutil.disk_usage(base / "full").free - 8192
    (base / "full" / "ballast").write_bytes(b"x" * ballast)
    results["full disk"] = segment(base / "full" / "seg", "--uncertainty")
    results["full disk"]["left"] = sorted(os.listdir(base / "full"))
    (base / "mnt").mkdir(); sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(base / "mnt"))
    results["mount point"] = segment(base / "mnt")
    results["mount point"]["left"] = sorted(os.listdir(base / "mnt"))
    (base / "ro").mkdir(); sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(base / "ro"))
    (base / "ro" / "out").mkdir(); sh("mount", "--bind", str(base / "ro" / "out"), str(base / "ro" / "out"))
    sh("mount", "-o", "remount,bind,ro", str(base / "ro"))
    results["read-only parent"] = segment(base / "ro" / "out")
    results["read-only parent"]["left"] = sorted(os.listdir(base / "ro" / "out"))
    results["read-only"] = segment(base / "ro" / "new")
    results["read-only"]["left"] = sorted(os.listdir(base / "ro"))
    print("RESULT " + json.dumps(results))
''')


def _user_namespaces() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def real_fs(case: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenarios of :data:`_REAL_FS_DRIVER`, run once in a private mount namespace."""
    if not _user_namespaces():
        pytest.skip("no user namespaces here (unshare -r -m); the monkeypatched tests cover the cases")
    base = tmp_path_factory.mktemp("real_fs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["unshare", "-r", "-m", sys.executable, "-c", _REAL_FS_DRIVER, str(base),
                           str(case["checkpoint"]), str(case["image"])],
                          capture_output=True, text=True, env=env, timeout=300)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, done.stderr
    results = json.loads(line[len("RESULT "):])
    results["stderr"] = done.stderr
    return results


def test_real_full_disk_exits_2_with_one_line_and_leaves_nothing(real_fs):
    result = real_fs["full disk"]
    assert result["code"] == 2 and result["inputs_unchanged"] and result["left"] == ["ballast"]
    assert "error: the disk is full" in real_fs["stderr"] or "Writing 'entropy.nii.gz' failed" in real_fs["stderr"]


def test_real_mount_point_and_read_only_parent_get_the_complete_output(real_fs):
    for name in ("mount point", "read-only parent"):
        assert real_fs[name]["code"] == 0 and real_fs[name]["inputs_unchanged"], real_fs["stderr"]
        assert real_fs[name]["left"] == ["report.json", "segmentation.nii.gz"]


def test_real_read_only_disk_is_refused_before_the_work(real_fs):
    assert real_fs["read-only"]["code"] == 2 and real_fs["read-only"]["left"] == ["out"]
    assert "Read-only file system" in real_fs["stderr"]


# --------------------------------------------------------------------------- signals and killed runs

def test_ctrl_c_exits_130_with_one_line_and_no_output(capsys, work, tmp_path, monkeypatch):
    import SFUDASegmentLib.results.files as files

    real = files.write_image

    def interrupted(volume: Volume, path: Path, **kwargs: Any) -> Path:
        real(volume, path, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C while the output is being written
    monkeypatch.setattr(files, "write_image", interrupted)
    code, out, err = run(capsys, *segment_argv(work, tmp_path / "out"))
    assert code == 130 and out == ""
    assert one_line(err) == "cancelled: interrupted (Ctrl-C); nothing was written."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


_CHILD = textwrap.dedent('''
    import os, signal, sys, time
    import SFUDASegmentLib.results.files as files
    from SFUDASegmentLib import cli

    real = files.write_image
    def write_then(volume, path, **kwargs):
        real(volume, path, **kwargs)
        if sys.argv[1] == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        print("STAGED", flush=True)
        time.sleep(120)
    files.write_image = write_then
    sys.exit(cli.main(["--progress", "none", *sys.argv[2:]]))
''')


def _child(mode: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_while_writing_exits_143_with_one_line_and_leaves_nothing(work, tmp_path):
    before = digests([work["image"], work["checkpoint"]])
    child = _child("term", segment_argv(work, tmp_path / "out"))
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr
    assert one_line(stderr) == "terminated: stopped by SIGTERM; nothing was written."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no hidden staging folder
    assert digests([work["image"], work["checkpoint"]]) == before


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_staging_of_a_killed_run_is_removed_by_the_next_run(capsys, work, tmp_path):
    child = _child("kill", segment_argv(work, tmp_path / "out"))
    assert child.stdout.readline().strip() == "STAGED"
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p.name != "in"]
    assert len(left) == 1 and left[0].startswith(".out.sfuda-staging-")  # what SIGKILL leaves
    code, _, err = run(capsys, *segment_argv(work, tmp_path / "out"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert_complete_segmentation(tmp_path / "out", work)


def test_staging_of_a_live_run_is_left_alone(capsys, work, tmp_path):
    live = tmp_path / ".out.sfuda-staging-live"
    live.mkdir()
    lock = staging._Lock(live / staging.LOCK_NAME)
    assert lock.try_acquire()
    stale = tmp_path / ".out.sfuda-staging-stale"
    stale.mkdir()
    (stale / staging.LOCK_NAME).write_bytes(b"")
    try:
        code, _, err = run(capsys, *segment_argv(work, tmp_path / "out"))
    finally:
        lock.close()
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.sfuda-staging-live", "in", "out"]


# --------------------------------------------------------------------------- one-line errors on bad files

@pytest.mark.parametrize("name", ["image.nii.gz", "image.nii"])
def test_a_truncated_nifti_is_one_line(capsys, work, tmp_path, name):
    full = write_image(read_image(work["image"]), tmp_path / f"full_{name}")
    data = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * 0.6)])
    code, _, err = run(capsys, "segment", "--checkpoint", str(work["checkpoint"]), "--image", str(cut),
                       "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "truncated" in one_line(err) and "copy or export the file again" in err
    assert not (tmp_path / "out").exists()


def _with_card(source: Path, target: Path, change: Any) -> Path:
    payload = torch.load(source, weights_only=True)
    meta = json.loads(payload["metadata"])
    change(meta)
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, target)
    return target


@pytest.mark.parametrize("field, value, words", [
    ("channels", [65536, 131072, 262144], "declares width = 65536"),
    ("channels", [2048] * 6, "do not match its stored architecture"),
    ("out_channels", 10 ** 6, "declares output channels = 1000000"),
])
def test_a_hostile_model_card_is_refused_before_any_allocation(capsys, work, tmp_path, field, value, words):
    """``sfuda info`` used to try to allocate 618 GB for such a card."""
    path = _with_card(work["checkpoint"], tmp_path / "hostile.sfuda",
                      lambda meta: meta["seg_config"].__setitem__(field, value))
    start = time.perf_counter()
    code, _, err = run(capsys, "info", str(path))
    assert code == 2 and words in one_line(err)
    assert "refused" in err or "re-export it" in err
    assert time.perf_counter() - start < 10


class _Named:
    """An object that a weights-only unpickler must refuse (it names a class of this module)."""


@pytest.mark.parametrize("payload", [_Named(), slice(1, 2), frozenset({1}), int, eval],
                         ids=["class", "slice", "frozenset", "type", "builtin"])
def test_hostile_pickles_are_refused_without_advising_unsafe_loading(capsys, tmp_path, payload):
    path = tmp_path / "hostile.sfuda"
    torch.save({"format": "sfuda-checkpoint", "x": payload}, path)
    code, _, err = run(capsys, "info", str(path))
    line = one_line(err)
    assert code == 2 and "Refused to load" in line
    for advice in ("weights_only", "safe_globals", "allowlist"):
        assert advice not in line


def test_a_missing_label_file_is_named_a_label_file(capsys, work, tmp_path):
    code, _, err = run(capsys, "train-source", "--image", str(work["source"]), "--label",
                       str(tmp_path / "gone_seg.nii.gz"), "--labels", "1:organ,2:vessel",
                       "--out", str(tmp_path / "m.sfuda"), *TINY_TRAIN)
    assert code == 2 and one_line(err).startswith("error: Label file ") and "gone_seg.nii.gz' is not found" in err


def _png(path: Path, grey: np.ndarray, colour_shift: int = 0) -> Path:
    bgr = np.repeat(grey[..., None], 3, axis=2)
    bgr[..., 0] = np.clip(bgr[..., 0].astype(int) + colour_shift, 0, 255)
    assert cv2.imwrite(str(path), bgr)
    return path


def test_a_grey_png_saved_with_three_equal_channels_is_grey(capsys, work, tmp_path):
    array = read_image(work["image"]).array
    grey = np.clip((array - array.min()) / (array.max() - array.min()) * 255, 0, 255).astype(np.uint8)
    rgb = _png(tmp_path / "grey_as_rgb.png", grey)
    assert read_image(rgb).is_rgb  # the file really holds three channels
    code, _, err = run(capsys, "segment", "--checkpoint", str(work["checkpoint"]), "--image", str(rgb),
                       "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 0, err
    expected = segment(SourceCheckpoint.load(work["checkpoint"]), Volume(grey, read_image(rgb).geometry),
                       InferenceConfig(device="cpu"), "labels").labels
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "segmentation.nii.gz").array, expected)
    colour = _png(tmp_path / "colour.png", grey, colour_shift=40)
    code, _, err = run(capsys, "segment", "--checkpoint", str(work["checkpoint"]), "--image", str(colour),
                       "--out", str(tmp_path / "out2"), "--device", "cpu")
    assert code == 2 and "3 channel(s) but the checkpoint expects 1" in one_line(err)


def test_training_on_grey_pngs_saved_as_rgb_gives_a_grey_model(capsys, work, tmp_path):
    array = read_image(work["source"]).array
    grey = np.clip((array - array.min()) / (array.max() - array.min()) * 255, 0, 255).astype(np.uint8)
    image = _png(tmp_path / "source.png", grey)
    labels = write_image(Volume(read_image(work["source_seg"]).array.astype(np.uint8), Geometry((1.0, 1.0))),
                         tmp_path / "source_seg.png")
    code, _, err = run(capsys, "train-source", "--image", str(image), "--label", str(labels),
                       "--labels", "1:organ,2:vessel", "--out", str(tmp_path / "m.sfuda"), *TINY_TRAIN)
    assert code == 0, err
    assert SourceCheckpoint.load(tmp_path / "m.sfuda").input_spec.image_channels == 1


# --------------------------------------------------------------------------- a report from every command

def test_every_writing_command_writes_its_report(capsys, work, tmp_path):
    """segment, adapt, fit-prototypes, train-source, evaluate, round-trip and synthesize here; demo and
    diffuse-uda in test_demo.py and test_cli_diffuse_uda.py."""
    runs = {
        "segment": (segment_argv(work, tmp_path / "seg"), tmp_path / "seg" / "report.json"),
        "adapt": (["adapt", "--method", "none", "--checkpoint", str(work["checkpoint"]), "--image",
                   str(work["image"]), "--out", str(tmp_path / "adapt"), "--device", "cpu"],
                  tmp_path / "adapt" / "report.json"),
        "fit-prototypes": (["fit-prototypes", "--checkpoint", str(work["plain"]), "--image", str(work["source"]),
                            "--label", str(work["source_seg"]), "--out", str(tmp_path / "p.sfuda"), "--rho", "0.5",
                            "--device", "cpu"], tmp_path / "p.sfuda.report.json"),
        "train-source": (["train-source", "--image", str(work["source"]), "--label", str(work["source_seg"]),
                          "--labels", "1:organ,2:vessel", "--out", str(tmp_path / "m.sfuda"), *TINY_TRAIN],
                         tmp_path / "m.sfuda.report.json"),
        "evaluate": (["evaluate", "--pred", str(work["labels"]), "--gt", str(work["source_seg"]),
                      "--json", str(tmp_path / "scores.json")], tmp_path / "scores.json.report.json"),
        "round-trip": (["round-trip", "--checkpoint", str(work["checkpoint"]), "--image", str(work["source"]),
                        "--label", str(work["source_seg"]), "--slices", "1", "--candidates", "1", "--steps", "2",
                        "--out", str(tmp_path / "rt.sfuda"), "--device", "cpu"], tmp_path / "rt.sfuda.report.json"),
        "synthesize": (["synthesize", "--checkpoint", str(work["checkpoint"]), "--label", str(work["labels"]),
                        "--n", "1", "--steps", "2", "--out", str(tmp_path / "syn"), "--device", "cpu"],
                       tmp_path / "syn" / "report.json"),
    }
    for command, (argv, report_path) in runs.items():
        code, out, err = run(capsys, *argv)
        assert code == 0, (command, err)
        report = json.loads(report_path.read_text())
        assert report["command"] == command and report["versions"]["torch"] == torch.__version__
        assert report["arguments"]["device" if command != "evaluate" else "pred"]
    assert json.loads((tmp_path / "scores.json").read_text())["mean_dice"] == pytest.approx(
        json.loads((tmp_path / "scores.json.report.json").read_text())["mean_dice"])
    assert json.loads((tmp_path / "syn" / "report.json").read_text())["manifest"] == str(
        tmp_path / "syn" / "manifest.json")


@pytest.mark.parametrize("checkpoint", ["checkpoint", "prototypes_only", "plain"])
def test_adapt_without_method_runs_heal_s_default_on_any_checkpoint(capsys, work, tmp_path, checkpoint):
    out = tmp_path / "adapted"
    code, _, err = run(capsys, "adapt", "--checkpoint", str(work[checkpoint]), "--image", str(work["image"]),
                       "--out", str(out), "--device", "cpu", "--candidates", "1", "--steps", "2",
                       "--iterations", "2")
    assert code == 0, err
    choice, *warnings = err.strip("\n").split("\n")
    assert choice == f"adapt: method heal, chosen because {cli.AUTO_REASON} (--method chooses another)"
    assert all(line.startswith("warning: ") for line in warnings)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "heal" and report["heal"]["stages"] == "hd" and report["heal"]["denoise"] == "components"
    assert report["method_choice"] == {"method": "heal", "chosen": "automatically", "reason": cli.AUTO_REASON}
