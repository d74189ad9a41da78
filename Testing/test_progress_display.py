"""The command line in a log (issue 12): progress in units a person reads, plain throttled lines
without escape codes when stderr is not a terminal, JSON lines that keep the Slicer job runner's
keys, ``--progress`` after the subcommand, and defaults in ``--help``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from SFUDASegmentLib import cli
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import write_image
from SFUDASegmentLib.slicer_bridge.jobs import parse_event_line
from SFUDASegmentLib.utils.progress import ProgressReporter
from SFUDASegmentLib.utils.progress_display import LogLines, TerminalBars, json_line, make_reporter
from tiny_models import single_thread, tiny_full_model  # noqa: F401

ESCAPE = re.compile(r"\x1b\[")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(display, clock: FakeClock, events: list[tuple[float, str, float, dict]]) -> None:
    """Send ``(time, stage, fraction, counts)`` events through a reporter with ``clock``."""
    reporter = ProgressReporter(display, clock=clock)
    for now, stage, fraction, counts in events:
        clock.now = now
        reporter.report(stage, fraction, "", **counts)


def test_log_lines_print_one_line_per_tenth_and_never_repeat_a_finished_stage():
    stream, clock = io.StringIO(), FakeClock()
    lines = LogLines(stream, interval=30.0, clock=clock)
    events = [(i * 0.1, "inference", i / 200, {"done": i, "total": 200, "unit": "slices"}) for i in range(1, 201)]
    events += [(21.0, "inference", 1.0, {"done": 200, "total": 200, "unit": "slices"})]  # finished again
    drive(lines, clock, events)
    lines.close()
    text = stream.getvalue()
    printed = text.splitlines()
    # the first event (0.5 %), then 10 %, 20 %, ... 100 %: 11 lines for 201 events
    assert [line.split()[1] for line in printed] == ["0%"] + [f"{p}%" for p in range(10, 101, 10)]
    assert printed[-1] == "inference  100%  200/200 slices  10.1 slices/s  00:19"  # 200 in 19.9 s
    assert not ESCAPE.search(text) and "\r" not in text and "‰" not in text


def test_log_lines_print_a_slow_stage_every_interval_and_a_stage_that_runs_again():
    stream, clock = io.StringIO(), FakeClock()
    lines = LogLines(stream, interval=30.0, clock=clock)
    slow = [(t, "diffusion", t / 1000, {"done": t, "total": 1000, "unit": "steps"}) for t in range(1, 91)]
    again = [(100.0, "diffusion", 0.5, {"done": 1, "total": 2, "unit": "steps"})]
    drive(lines, clock, slow + again)
    printed = [re.search(r"\d+/\d+ steps", line).group(0) for line in stream.getvalue().splitlines()]
    assert printed == ["1/1000 steps", "31/1000 steps", "61/1000 steps", "1/2 steps"]


def test_a_stage_that_runs_again_counts_its_seconds_from_its_new_start():
    events, clock = [], FakeClock()
    drive(events.append, clock, [(0.0, "inference", 0.5, {}), (10.0, "inference", 1.0, {}),
                                 (50.0, "inference", 0.5, {}), (54.0, "inference", 1.0, {})])
    assert [e.elapsed for e in events] == [0.0, 10.0, 0.0, 4.0]


def test_a_stage_without_counts_is_shown_in_percent():
    stream, clock = io.StringIO(), FakeClock()
    drive(LogLines(stream, clock=clock), clock, [(0.0, "denoising", 0.4, {}), (2.0, "denoising", 1.0, {})])
    assert stream.getvalue().splitlines() == ["denoising   40%  00:00", "denoising  100%  00:02"]


def test_terminal_bars_count_in_the_event_units():
    stream, clock = FakeTerminal(), FakeClock()
    bars = TerminalBars(stream)
    drive(bars, clock, [(1.0, "adaptation", 0.25, {"done": 25, "total": 100, "unit": "iterations"}),
                        (2.0, "denoising", 0.5, {})])
    bars.close()
    text = stream.getvalue()
    assert "25/100" in text and "iterations/s" in text and "denoising:  50%" in text and "‰" not in text


def test_json_lines_keep_the_job_runner_keys_and_add_the_counts():
    clock = FakeClock()
    events = []
    drive(events.append, clock, [(0.0, "synthesis", 0.0, {"done": 0, "total": 8, "unit": "pairs"}),
                                 (4.0, "synthesis", 0.5, {"done": 4, "total": 8, "unit": "pairs"})])
    event = parse_event_line(json_line(events[1]))
    assert event == {"type": "progress", "stage": "synthesis", "fraction": 0.5, "message": "", "done": 4,
                     "total": 8, "unit": "pairs", "elapsed": 4.0, "rate": 1.0}


def test_bar_mode_prints_plain_lines_when_stderr_is_not_a_terminal():
    log, terminal = io.StringIO(), FakeTerminal()
    assert isinstance(make_reporter("bar", log)[0].callback, LogLines)
    assert isinstance(make_reporter("bar", terminal)[0].callback, TerminalBars)
    assert make_reporter("none", log)[0] is None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, tiny_full_model) -> Path:
    """A 3-slice volume of the tiny model's held-out targets."""
    import numpy as np

    stack = np.stack([tiny_full_model.held_out[i][0].array for i in range(3)])
    return write_image(Volume(stack, Geometry((2.0, 0.8, 0.8))), tmp_path_factory.mktemp("img") / "scan.nii.gz")


def test_progress_after_the_subcommand_reaches_a_log_as_plain_lines(capsys, tiny_full_model, image, tmp_path):
    code = cli.main(["segment", "--checkpoint", str(tiny_full_model.path), "--image", str(image),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "1",
                     "--progress", "lines"])
    err = capsys.readouterr().err
    assert code == 0, err
    prefix = len("inference  100%  3/3 slices")
    assert [line[:prefix] for line in err.splitlines()] == [
        "inference   33%  1/3 slices", "inference   67%  2/3 slices", "inference  100%  3/3 slices"]
    assert not ESCAPE.search(err)


def test_progress_json_after_the_subcommand(capsys, tiny_full_model, image, tmp_path):
    code = cli.main(["segment", "--checkpoint", str(tiny_full_model.path), "--image", str(image),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--progress", "json"])
    err = capsys.readouterr().err
    assert code == 0, err
    events = [parse_event_line(line) for line in err.splitlines()]
    assert events and all(e["type"] == "progress" and e["unit"] == "slices" for e in events)
    assert events[-1]["done"] == events[-1]["total"] == 3 and events[-1]["fraction"] == 1.0


@pytest.mark.parametrize("command, shown", [
    ("adapt", ["--tau1 TAU1           entropy threshold (default: 0.2)", "(default: ddim)"]),
    ("train-source", ["(default: 20)", "(default: 16,32,64,128)"]),
    ("segment", ["(default: 0.5)", "(default: auto)"]),
])
def test_help_shows_the_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in shown:
        assert " ".join(words.split()) in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_json_error_line_and_one_plain_line(capsys, tmp_path):
    code = cli.main(["info", str(tmp_path / "missing.sfuda"), "--progress", "json"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 2
    assert json.loads(err[0])["error"] == "CheckpointError" and err[1].startswith("error: Checkpoint file not found")
