"""Model cards and the device list read in child processes (slicer_bridge.child_queries), so
that Slicer's process never imports PyTorch; the ``sfuda devices`` command they use."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.cli import main
from SFUDASegmentLib.errors import CheckpointError
from SFUDASegmentLib.slicer_bridge.child_queries import (DeviceInventory, JsonQuery, ModelCards,
                                                         checkpoint_key)
from SFUDASegmentLib.utils.device import device_inventory

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "phantom_demo.sfuda"


def _until(done, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "no answer from the child"
        time.sleep(0.05)


def test_checkpoint_key_names_one_version_of_one_file(tmp_path: Path) -> None:
    for nothing in (None, "", ".", tmp_path, tmp_path / "missing.sfuda"):
        assert checkpoint_key(nothing) is None
    path = tmp_path / "m.sfuda"
    path.write_bytes(b"12345")
    key = checkpoint_key(path)
    assert key[0] == str(path.resolve()) and key[2] == 5
    os.utime(path, ns=(key[1] + 10**9, key[1] + 10**9))
    assert checkpoint_key(path)[1] == key[1] + 10**9
    path.write_bytes(b"123456")
    assert checkpoint_key(path)[2] == 6


def test_model_card_comes_from_a_child_and_is_read_once_per_file_version(tmp_path: Path) -> None:
    path = tmp_path / "model.sfuda"
    shutil.copy(DEMO, path)
    cards = ModelCards()
    assert cards.request(path) is None and cards.pending
    assert cards.request(path) is None and len(cards._queries) == 1  # one child per file
    _until(lambda: not cards.poll() and not cards.pending)
    answer = cards.request(path)
    assert answer.ok
    expected = json.loads(json.dumps(SourceCheckpoint.load(path).describe()))
    assert answer.value == expected  # the card the library computes, through JSON
    assert cards.request(str(path)) is answer and not cards.pending  # cached

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was rewritten
    assert cards.request(path) is None and cards.pending
    assert cards.get(path).value == expected  # scripting waits for the child
    cards.clear()
    assert cards.request(path) is None
    cards.cancel()
    assert not cards.pending
    with pytest.raises(FileNotFoundError, match="not found"):
        cards.request(tmp_path / "missing.sfuda")


def test_a_damaged_checkpoint_answers_with_the_library_message(tmp_path: Path) -> None:
    path = tmp_path / "damaged.sfuda"
    path.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(CheckpointError) as raised:
        SourceCheckpoint.load(path)
    answer = ModelCards().get(path)
    assert not answer.ok and answer.error == str(raised.value)


def test_device_inventory_is_the_library_s_and_is_asked_again_when_stale() -> None:
    devices = DeviceInventory(max_age=3600.0)
    assert devices.request() is None and devices.pending
    _until(devices.poll)
    answer = devices.request()
    assert not devices.pending  # fresh: no new child
    expected = device_inventory()
    assert answer.ok and answer.value["torch"] == expected["torch"]
    assert answer.value["cuda_build"] == expected["cuda_build"]
    assert [g["device"] for g in answer.value["gpus"]] == [g["device"] for g in expected["gpus"]]
    devices.refresh()
    assert devices.request() is answer and devices.pending  # old answer shown while asking
    devices.cancel()
    assert not devices.pending


def test_a_child_that_prints_no_json_answers_with_an_error(tmp_path: Path) -> None:
    (tmp_path / "chatty.py").write_text("print('hello, not json')\n")
    query = JsonQuery(["x"], module="chatty", env={"PYTHONPATH": str(tmp_path)}).start()
    answer = query.wait(120)
    assert not answer.ok and "printed no JSON answer: hello, not json" in answer.error
    (tmp_path / "slow.py").write_text("import time; time.sleep(60)\n")
    slow = JsonQuery(["x"], module="slow", env={"PYTHONPATH": str(tmp_path)}).start()
    with pytest.raises(TimeoutError, match="did not answer within 0.2 s"):
        slow.wait(0.2)
    assert not slow.job.running


def test_devices_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["devices", "--json"]) == 0
    inventory = json.loads(capsys.readouterr().out)
    assert set(inventory) == {"torch", "cuda_build", "cuda_available", "cpu_threads", "gpus"}
    assert main(["devices"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"PyTorch {inventory['torch']} (")
    assert f"{inventory['cpu_threads']} CPU threads" in text
    assert ("no CUDA GPU" in text) == (not inventory["gpus"])
