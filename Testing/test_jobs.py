"""Background jobs (``SFUDASegmentLib.slicer_bridge.jobs``) without Slicer: real child processes.

A stand-in module written to ``tmp_path`` plays the part of the ``sfuda`` CLI where a test needs
a long, streaming child (with a grandchild) that costs no computation; the real CLI is run
where the test is about its error output.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from SFUDASegmentLib.slicer_bridge import jobs
from SFUDASegmentLib.slicer_bridge.jobs import BackgroundJob, JobOutcome, parse_event_line, run_job

STAND_IN = "fake_sfuda"

STAND_IN_SOURCE = textwrap.dedent('''
    """Stand-in for the sfuda CLI: JSON progress lines on stderr, optional grandchild."""
    import argparse
    import json
    import signal
    import subprocess
    import sys
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--progress")
    parser.add_argument("mode", choices=["stream", "fail-json", "fail-text"])
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"grandchild {child.pid}", flush=True)
    if args.mode == "fail-json":
        sys.stderr.write("loading...\\n")
        sys.stderr.write(json.dumps({"type": "error", "error": "CheckpointError",
                                     "message": "The checkpoint is damaged; re-export it."}) + "\\n")
        sys.exit(2)
    if args.mode == "fail-text":
        sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: boom in stage 3\\n")
        sys.exit(1)
    for i in range(args.count):
        sys.stderr.write(json.dumps({"type": "progress", "stage": "stand_in",
                                     "fraction": (i + 1) / args.count,
                                     "message": f"step {i + 1}"}) + "\\n")
        sys.stderr.flush()
        time.sleep(args.interval)
    print("result: done", flush=True)
''')


@pytest.fixture
def stand_in(tmp_path: Path) -> dict:
    """Keyword arguments that make a job run the stand-in module."""
    (tmp_path / f"{STAND_IN}.py").write_text(STAND_IN_SOURCE)
    return {"module": STAND_IN, "python": sys.executable, "env": {"PYTHONPATH": str(tmp_path)}}


def _alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_until(condition, seconds: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; its last value."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.02)
    return True


def _grandchild_pid(job: BackgroundJob) -> int:
    assert _wait_until(lambda: "grandchild" in job.stdout_text())
    line = next(ln for ln in job.stdout_text().splitlines() if ln.startswith("grandchild"))
    return int(line.split()[1])


# ----------------------------------------------------------------------------- the real CLI


def test_real_cli_error_reaches_the_caller_readably(tmp_path: Path) -> None:
    missing = tmp_path / "no such model.sfuda"
    events: list[dict] = []
    outcome = run_job(["info", str(missing)], on_event=events.append)
    assert isinstance(outcome, JobOutcome)
    assert outcome.returncode == 2 and not outcome.ok and not outcome.timed_out
    assert str(missing) in outcome.error_message
    assert "not found" in outcome.error_message
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error"] == "CheckpointError"
    assert events[0]["message"] == outcome.error_message
    assert outcome.events == events


# ----------------------------------------------------------------------------- streaming, cancel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see zombies")
def test_events_stream_while_running_and_cancel_kills_the_whole_tree(stand_in: dict) -> None:
    job = BackgroundJob(["stream", "--grandchild", "--interval", "0.05"], **stand_in).start()
    grandchild = _grandchild_pid(job)
    seen: list[dict] = []

    def three_events_seen() -> bool:
        seen.extend(job.poll())
        return len(seen) >= 3

    assert _wait_until(three_events_seen)
    assert job.running and job.returncode is None and job.error_message() is None
    assert [e["message"] for e in seen[:3]] == ["step 1", "step 2", "step 3"]
    assert all(e["type"] == "progress" and e["stage"] == "stand_in" for e in seen)
    assert job.last_progress() == seen[-1]
    assert _alive(job.pid) and _alive(grandchild)

    code = job.cancel()
    assert code != 0 and job.returncode == code
    assert not job.running and job.cancelled
    assert not _alive(job.pid)
    assert _wait_until(lambda: not _alive(grandchild), 10.0)
    assert "Cancelled" in job.error_message()
    assert job.wait(timeout=1) == code


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see zombies")
def test_cancel_escalates_to_sigkill_when_sigterm_is_ignored(stand_in: dict) -> None:
    job = BackgroundJob(["stream", "--ignore-term", "--grandchild"], **stand_in).start()
    grandchild = _grandchild_pid(job)
    code = job.cancel(grace_seconds=0.3)
    assert code == -9  # SIGKILL: the child ignored SIGTERM
    assert not _alive(job.pid)
    assert _wait_until(lambda: not _alive(grandchild), 10.0)


def test_wait_with_timeout_returns_none_while_running(stand_in: dict) -> None:
    job = BackgroundJob(["stream"], **stand_in).start()
    try:
        assert job.wait(timeout=0.2) is None
        assert job.running
    finally:
        job.cancel()
    assert not job.running


def test_finished_job_delivers_every_event_in_order_and_stdout(stand_in: dict) -> None:
    job = BackgroundJob(["stream", "--count", "4", "--interval", "0.01"], **stand_in).start()
    assert job.wait() == 0
    events = job.poll()
    assert [e["fraction"] for e in events] == [0.25, 0.5, 0.75, 1.0]
    assert job.poll() == []  # nothing arrives twice
    assert job.events == events
    assert job.stdout_text() == "result: done\n"
    assert job.error_message() is None


def test_json_error_line_is_the_error_message(stand_in: dict) -> None:
    outcome = run_job(["fail-json"], **stand_in)
    assert outcome.returncode == 2
    assert outcome.error_message == "The checkpoint is damaged; re-export it."


def test_plain_stderr_tail_is_the_error_message_without_a_json_line(stand_in: dict) -> None:
    outcome = run_job(["fail-text"], **stand_in)
    assert outcome.returncode == 1
    assert outcome.error_message.endswith("RuntimeError: boom in stage 3")
    assert outcome.events == []


def test_run_job_streams_to_the_callback_and_calls_between_polls(stand_in: dict) -> None:
    received: list[float] = []
    ticks: list[int] = []
    outcome = run_job(["stream", "--count", "5", "--interval", "0.02"],
                      on_event=lambda e: received.append(e["fraction"]),
                      between_polls=lambda: ticks.append(1), poll_interval=0.01, **stand_in)
    assert outcome.ok and outcome.error_message is None
    assert received == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert outcome.stdout == "result: done\n"
    assert ticks  # a GUI would have processed its events


def test_run_job_timeout_cancels_and_says_so(stand_in: dict) -> None:
    outcome = run_job(["stream"], timeout=0.5, **stand_in)
    assert outcome.timed_out and not outcome.ok
    assert "did not finish within 0.5 s" in outcome.error_message


def test_a_job_starts_only_once(stand_in: dict) -> None:
    job = BackgroundJob(["stream", "--count", "1", "--interval", "0"], **stand_in).start()
    with pytest.raises(RuntimeError, match="already started"):
        job.start()
    assert job.wait() == 0
    unstarted = BackgroundJob(["stream"], **stand_in)
    assert not unstarted.started and not unstarted.running and unstarted.returncode is None
    assert unstarted.cancel() is None
    with pytest.raises(RuntimeError, match="not started"):
        unstarted.wait()


def test_command_line_runs_the_module_with_json_progress() -> None:
    job = BackgroundJob(["adapt", "--method", "heal"], python="/opt/py")
    assert job.command == ["/opt/py", "-m", "SFUDASegmentLib.cli", "--progress", "json",
                           "adapt", "--method", "heal"]


# ----------------------------------------------------------------------------- helpers


def test_child_environment_puts_the_package_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/existing")
    env = jobs.child_environment({"PYTHONPATH": "/given", "EXTRA": "1"})
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts == [jobs.PACKAGE_PARENT, "/given"]
    assert (Path(parts[0]) / "SFUDASegmentLib" / "slicer_bridge" / "jobs.py").is_file()
    assert env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert jobs.child_environment()["PYTHONPATH"].split(os.pathsep) == [jobs.PACKAGE_PARENT,
                                                                        "/existing"]


def test_parse_event_line_accepts_only_typed_json_objects() -> None:
    assert parse_event_line('{"type": "progress", "fraction": 0.5}\n') == {"type": "progress",
                                                                          "fraction": 0.5}
    assert parse_event_line("  0%|          | 0/10 [00:00<?, ?it/s]") is None
    assert parse_event_line("{not json") is None
    assert parse_event_line('{"stage": "x"}') is None
    assert parse_event_line('{"type": 3}') is None
    assert parse_event_line("[1, 2]") is None


def test_python_executable_outside_slicer(monkeypatch: pytest.MonkeyPatch) -> None:
    # The slicer-core wheel has a ``slicer`` module but no ``slicer.app``.
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace())
    assert jobs.python_executable() == sys.executable


def test_python_executable_inside_slicer_is_python_slicer(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    launcher = tmp_path / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    launcher.parent.mkdir()
    launcher.write_text("")
    app = types.SimpleNamespace(slicerHome=str(tmp_path))
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=app))
    monkeypatch.setenv("PATH", "")
    assert jobs.python_executable() == str(launcher)
    launcher.unlink()
    assert jobs.python_executable() == sys.executable
