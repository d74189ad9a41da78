"""Run an ``sfuda`` command in a child process, stream its progress, cancel it.

The Slicer panel must stay responsive while a method runs for minutes, and a cancel must stop
the work at once, including any process the work started. So the method runs in a child
process (``PythonSlicer`` inside Slicer, the current interpreter elsewhere):

    python -m SFUDASegmentLib.cli --progress json <command> <arguments...>

The child writes one JSON object per line on stderr (see ``cli.py``)::

    {"type": "progress", "stage": "diffusion", "fraction": 0.4, "message": "step 20/50"}
    {"type": "error", "error": "CheckpointError", "message": "Checkpoint file not found: ..."}

Two daemon threads read stdout and stderr into a queue; :meth:`BackgroundJob.poll` hands out
what arrived since the last call without blocking (a Qt timer in the panel calls it). The child
runs in its own process group (POSIX session; a new process group on Windows) so that
:meth:`BackgroundJob.cancel` can end the whole tree: SIGTERM to the group, SIGKILL after a
grace period (``taskkill /T /F`` on Windows).

Nothing here imports Slicer, Qt or PyTorch.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

#: The module the child runs with ``python -m``.
DEFAULT_MODULE = "SFUDASegmentLib.cli"

#: The folder that holds the ``SFUDASegmentLib`` package (put on the child's PYTHONPATH).
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

#: Non-JSON stderr lines kept for :meth:`BackgroundJob.error_message`.
STDERR_TAIL_LINES = 40

#: Seconds between SIGTERM and SIGKILL in :meth:`BackgroundJob.cancel`.
DEFAULT_GRACE_SECONDS = 3.0


def python_executable() -> str:
    """The interpreter for child jobs.

    Inside 3D Slicer this is the ``PythonSlicer`` launcher (it sets up Slicer's Python
    environment), looked up next to ``sys.executable``, in ``<slicerHome>/bin`` and on PATH.
    Elsewhere (plain Python, or the ``slicer-core`` wheel, which has no ``slicer.app``) it is
    ``sys.executable``.
    """
    try:
        import slicer

        app = slicer.app
    except (ImportError, AttributeError):
        return sys.executable
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    folders = [os.path.dirname(sys.executable)]
    home = getattr(app, "slicerHome", None)
    if home:
        folders.append(os.path.join(str(home), "bin"))
    for folder in folders:
        for name in names:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
    import shutil

    found = shutil.which("PythonSlicer")
    return found if found else sys.executable


def child_environment(env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The child's environment: ``os.environ`` updated with ``env``, the package folder first on
    PYTHONPATH, unbuffered UTF-8 output.

    Args:
        env: variables to add or override (a PYTHONPATH given here is kept after the package
            folder).
    """
    merged = dict(os.environ)
    merged.update(env or {})
    rest = merged.get("PYTHONPATH", "")
    merged["PYTHONPATH"] = PACKAGE_PARENT + (os.pathsep + rest if rest else "")
    merged["PYTHONUNBUFFERED"] = "1"
    merged["PYTHONIOENCODING"] = "utf-8"
    return merged


def parse_event_line(line: str) -> Optional[dict[str, Any]]:
    """The event of one stderr line, or None when the line is not a JSON event.

    An event is a JSON object with a string ``"type"`` (``"progress"``, ``"error"``, ...).
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value
    return None


class BackgroundJob:
    """One ``sfuda`` command running in a child process.

    Args:
        args: the command line after the program, e.g. ``["adapt", "--method", "heal", ...]``.
        python: interpreter to run (default :func:`python_executable`).
        env: environment variables added to the current environment (see
            :func:`child_environment`).
        module: module run with ``python -m`` (default :data:`DEFAULT_MODULE`; tests use a
            small stand-in). ``--progress json`` is passed before ``args``.
        cwd: working directory of the child (default: the current one).

    Use: ``job.start()``; call ``job.poll()`` regularly; ``job.running`` turns False when the
    child exits; ``job.wait()`` then ``job.poll()`` once more for the last events;
    ``job.returncode``, ``job.error_message()``. ``job.cancel()`` ends the whole process tree.
    """

    def __init__(self, args: Sequence[str], python: Optional[str] = None,
                 env: Optional[dict[str, str]] = None, module: str = DEFAULT_MODULE,
                 cwd: Optional[str] = None) -> None:
        self.args = [str(a) for a in args]
        self.python = python or python_executable()
        self.env = dict(env or {})
        self.module = module
        self.cwd = cwd
        self.cancelled = False
        self.events: list[dict[str, Any]] = []
        self._process: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self._log_queue: "queue.Queue[str]" = queue.Queue()
        self._stdout: list[str] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._error_event: Optional[dict[str, Any]] = None
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle
    @property
    def command(self) -> list[str]:
        """The full command line of the child."""
        return [self.python, "-m", self.module, "--progress", "json", *self.args]

    def start(self) -> "BackgroundJob":
        """Launch the child (once) and the two reader threads; returns ``self``.

        Raises:
            RuntimeError: the job was already started.
            OSError: the interpreter could not be started.
        """
        if self._process is not None:
            raise RuntimeError("This job was already started; create a new BackgroundJob to run again.")
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP
                                        | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            options["start_new_session"] = True
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_environment(self.env), cwd=self.cwd, text=True, encoding="utf-8",
            errors="replace", bufsize=1, **options)
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self._process.stdout,),
                             name="sfuda-job-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._process.stderr,),
                             name="sfuda-job-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        return self

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran."""
        return self._process is not None

    @property
    def pid(self) -> Optional[int]:
        """Process id of the child (None before :meth:`start`)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """Exit code of the child; None before start and while it runs (negative: killed by
        that signal on POSIX)."""
        return None if self._process is None else self._process.poll()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the child to exit and for its output to be read.

        Args:
            timeout: seconds; None waits as long as it takes.

        Returns:
            The exit code, or None when the child still runs after ``timeout`` seconds.
        """
        if self._process is None:
            raise RuntimeError("The job was not started; call start() first.")
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._join_readers(timeout=2.0)
        return code

    def cancel(self, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> Optional[int]:
        """End the child and every process it started, then wait for it.

        POSIX: SIGTERM to the child's process group, SIGKILL to the group after
        ``grace_seconds`` (or at once when the child is gone, for grandchildren that outlived it).
        Windows: ``taskkill /T /F`` on the child's tree.

        Returns:
            The child's exit code (None when the job was never started).
        """
        if self._process is None:
            return None
        self.cancelled = True
        process = self._process
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if process.poll() is None:
                process.kill()
        else:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
        self._join_readers(timeout=2.0)
        return code

    # ------------------------------------------------------------------ output
    def poll(self) -> list[dict[str, Any]]:
        """The events that arrived since the last call (never blocks).

        Each event is the child's JSON object, e.g. ``{"type": "progress", "stage": ...,
        "fraction": ..., "message": ...}`` or ``{"type": "error", "error": ..., "message":
        ...}``. All events are also kept in :attr:`events`.
        """
        arrived: list[dict[str, Any]] = []
        while True:
            try:
                arrived.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.events.extend(arrived)
        return arrived

    def read_log_lines(self) -> list[str]:
        """The stderr lines that were not JSON events (warnings, tracebacks) and arrived since
        the last call (never blocks); the panel's log shows them beside the events."""
        lines: list[str] = []
        while True:
            try:
                lines.append(self._log_queue.get_nowait())
            except queue.Empty:
                return lines

    def last_progress(self) -> Optional[dict[str, Any]]:
        """The most recent progress event polled so far, or None."""
        for event in reversed(self.events):
            if event.get("type") == "progress":
                return event
        return None

    def stdout_text(self) -> str:
        """Everything the child wrote on stdout so far."""
        with self._lock:
            return "".join(self._stdout)

    def stderr_tail(self) -> str:
        """The last :data:`STDERR_TAIL_LINES` stderr lines that were not JSON events."""
        with self._lock:
            return "\n".join(self._stderr_tail)

    def error_message(self) -> Optional[str]:
        """Why the job failed, readable as is; None while it runs or when it succeeded.

        The message of the child's JSON error event when there is one (the library's own
        message, which names the problem and the fix); for a cancelled job a sentence saying
        so; else the tail of its other stderr output; else the exit code.
        """
        code = self.returncode
        if code is None or code == 0:
            return None
        if self.cancelled or code == 130:
            return "Cancelled by the user; nothing was added to the scene."
        self._join_readers(timeout=1.0)
        if self._error_event is not None:
            return str(self._error_event.get("message", "")) or str(self._error_event.get("error"))
        tail = self.stderr_tail().strip()
        if tail:
            return tail
        return f"The job ended with exit code {code} and printed no message."

    # ------------------------------------------------------------------ readers
    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self._stdout.append(line)
        stream.close()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            event = parse_event_line(line)
            if event is None:
                text = line.rstrip("\r\n")
                with self._lock:
                    self._stderr_tail.append(text)
                self._log_queue.put(text)
                continue
            if event["type"] == "error":
                self._error_event = event
            self._queue.put(event)
        stream.close()

    def _join_readers(self, timeout: float) -> None:
        """Let the readers reach the end of the pipes (a grandchild that inherited them and
        still runs would keep them open, hence the timeout)."""
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group; a group that no longer exists is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class JobOutcome:
    """What a finished job produced.

    Attributes:
        returncode: the child's exit code (0 success, 2 library error, 130 cancelled, 143
            stopped by SIGTERM, negative: killed by a signal).
        events: every JSON event, in order.
        error_message: readable reason of a failure (see :meth:`BackgroundJob.error_message`),
            None on success.
        stdout: the child's standard output.
        timed_out: True when ``run_job`` cancelled the job because of its timeout.
    """

    returncode: int
    events: list[dict[str, Any]] = field(default_factory=list)
    error_message: Optional[str] = None
    stdout: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the job succeeded."""
        return self.returncode == 0


def run_job(args: Sequence[str], on_event: Optional[Callable[[dict[str, Any]], None]] = None,
            python: Optional[str] = None, timeout: Optional[float] = None, *,
            module: str = DEFAULT_MODULE, env: Optional[dict[str, str]] = None,
            cwd: Optional[str] = None, poll_interval: float = 0.1,
            between_polls: Optional[Callable[[], None]] = None) -> JobOutcome:
    """Run a job to the end (blocking) and return its outcome; never raises for a failed job.

    Args:
        args, python, module, env, cwd: as for :class:`BackgroundJob`.
        on_event: called with each event as it arrives.
        timeout: seconds after which the job is cancelled (``timed_out`` is then True).
        poll_interval: seconds between polls.
        between_polls: called at every poll (e.g. ``slicer.app.processEvents`` to keep a GUI
            alive while blocking).

    A KeyboardInterrupt cancels the job (the whole process tree) and is raised again.
    """
    job = BackgroundJob(args, python=python, env=env, module=module, cwd=cwd).start()
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False

    def deliver() -> None:
        for event in job.poll():
            if on_event is not None:
                on_event(event)

    try:
        while job.running:
            deliver()
            if between_polls is not None:
                between_polls()
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                job.cancel()
                break
            time.sleep(poll_interval)
        code = job.wait()
    except BaseException:
        job.cancel()
        raise
    deliver()
    message = job.error_message()
    if timed_out:
        message = f"The job did not finish within {timeout:g} s and was cancelled."
    return JobOutcome(returncode=int(code if code is not None else -1), events=list(job.events),
                      error_message=message, stdout=job.stdout_text(), timed_out=timed_out)
