"""Questions that need PyTorch, answered by a child process so that Slicer never imports it.

The panel shows the checkpoint's model card (``sfuda info CHECKPOINT --json``) and the compute
devices with their free memory (``sfuda devices --json``). Both need PyTorch; importing it in
Slicer's GUI process would load CUDA there and pin its version until Slicer restarts. So each
question runs as a :class:`~SFUDASegmentLib.slicer_bridge.jobs.BackgroundJob` whose standard
output is one JSON document, polled by the panel's timer without blocking it. Model cards are
cached per checkpoint file (path, modification time and size), so a card is read once.

Nothing here imports Slicer, Qt or PyTorch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .jobs import DEFAULT_MODULE, BackgroundJob

#: A checkpoint file as the cache knows it: absolute path, modification time (ns), size.
CheckpointKey = tuple[str, int, int]


def checkpoint_key(path: Any) -> Optional[CheckpointKey]:
    """``(absolute path, mtime_ns, size)`` of an existing file; None for no file (an empty
    path, ``"."``, a folder or a missing file). A rewritten checkpoint gets a new key."""
    text = os.fspath(path) if path is not None else ""
    if text in ("", ".") or not os.path.isfile(text):
        return None
    stat = os.stat(text)
    return os.path.abspath(text), stat.st_mtime_ns, stat.st_size


@dataclass
class Answer:
    """What a query produced: the JSON ``value``, or the ``error`` that says why not."""

    value: Any = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class JsonQuery:
    """One ``sfuda`` command in a child process whose standard output is a JSON document.

    Args:
        args: the command after the program, e.g. ``["info", path, "--json"]``.
        module, env, python: as for :class:`BackgroundJob`.

    ``start()``, then ``poll()`` until it returns the :class:`Answer` (None while running).
    """

    def __init__(self, args: Sequence[str], module: str = DEFAULT_MODULE,
                 env: Optional[dict[str, str]] = None, python: Optional[str] = None) -> None:
        self.job = BackgroundJob(args, python=python, env=env, module=module)
        self.answer: Optional[Answer] = None

    def start(self) -> "JsonQuery":
        self.job.start()
        return self

    def poll(self) -> Optional[Answer]:
        """The answer once the child ended (None while it runs); never blocks."""
        if self.answer is None and not self.job.running:
            self.job.wait()
            self.job.poll()
            self.answer = self._answer()
        return self.answer

    def wait(self, timeout: Optional[float] = None) -> Answer:
        """Block until the answer is there.

        Raises:
            TimeoutError: the child still ran after ``timeout`` seconds (it is then stopped).
        """
        if self.job.wait(timeout) is None:
            self.job.cancel()
            raise TimeoutError(f"'sfuda {' '.join(self.job.args)}' did not answer within "
                               f"{timeout:g} s.")
        return self.poll()

    def cancel(self) -> None:
        """Stop the child (its answer is then an error)."""
        self.job.cancel()

    def _answer(self) -> Answer:
        if self.job.returncode != 0:
            return Answer(error=self.job.error_message() or "The query failed.")
        try:
            return Answer(value=json.loads(self.job.stdout_text()))
        except ValueError:
            return Answer(error="The child process printed no JSON answer: "
                                + (self.job.stdout_text().strip()[-300:] or "(nothing)"))


class ModelCards:
    """Model cards read by ``sfuda info --json`` in child processes, cached per checkpoint key.

    Args:
        module, env: as for :class:`BackgroundJob` (tests may run a stand-in module).
    """

    def __init__(self, module: str = DEFAULT_MODULE, env: Optional[dict[str, str]] = None) -> None:
        self.module = module
        self.env = dict(env or {})
        self._answers: dict[CheckpointKey, Answer] = {}
        self._queries: dict[CheckpointKey, JsonQuery] = {}

    def request(self, path: Any) -> Optional[Answer]:
        """The cached answer for ``path``'s checkpoint, or None after starting (once) the child
        that reads it; call :meth:`poll` until it arrives.

        Raises:
            FileNotFoundError: ``path`` is not a file.
        """
        key = checkpoint_key(path)
        if key is None:
            raise FileNotFoundError(f"Checkpoint file not found: '{path}'.")
        if key in self._answers:
            return self._answers[key]
        if key not in self._queries:
            self._queries[key] = JsonQuery(["info", key[0], "--json"], self.module, self.env).start()
        return None

    def poll(self) -> list[CheckpointKey]:
        """Collect the queries that ended; returns their keys (never blocks)."""
        finished = []
        for key, query in list(self._queries.items()):
            answer = query.poll()
            if answer is not None:
                self._answers[key] = answer
                del self._queries[key]
                finished.append(key)
        return finished

    @property
    def pending(self) -> bool:
        """True while a card is being read."""
        return bool(self._queries)

    def get(self, path: Any, timeout: float = 300.0) -> Answer:
        """The answer for ``path``, waiting for the child when it is not cached (scripting)."""
        answer = self.request(path)
        if answer is not None:
            return answer
        key = checkpoint_key(path)
        query = self._queries.pop(key)
        answer = self._answers[key] = query.wait(timeout)
        return answer

    def clear(self) -> None:
        """Forget every answer (after installing packages, a card that failed may now load)."""
        self._answers.clear()

    def cancel(self) -> None:
        """Stop every running query (the panel closes)."""
        for query in self._queries.values():
            query.cancel()
        self._queries.clear()


class DeviceInventory:
    """``sfuda devices --json`` in a child process, asked again after ``max_age`` seconds (free
    GPU memory changes while the user works) or on :meth:`refresh`.

    Args:
        module, env: as for :class:`BackgroundJob`.
        max_age: seconds an answer stays current.
    """

    def __init__(self, module: str = DEFAULT_MODULE, env: Optional[dict[str, str]] = None,
                 max_age: float = 300.0) -> None:
        self.module = module
        self.env = dict(env or {})
        self.max_age = max_age
        self.answer: Optional[Answer] = None
        self._answered_at = -float("inf")
        self._query: Optional[JsonQuery] = None

    def request(self) -> Optional[Answer]:
        """The current answer (None before the first one); starts a query when the answer is
        older than ``max_age`` and none runs."""
        if self._query is None and time.monotonic() - self._answered_at > self.max_age:
            self._query = JsonQuery(["devices", "--json"], self.module, self.env).start()
        return self.answer

    def refresh(self) -> None:
        """Ask again at the next :meth:`request` (after a run used the GPU)."""
        self._answered_at = -float("inf")

    def poll(self) -> bool:
        """True when a new answer arrived (never blocks)."""
        if self._query is None:
            return False
        answer = self._query.poll()
        if answer is None:
            return False
        self.answer, self._answered_at, self._query = answer, time.monotonic(), None
        return True

    @property
    def pending(self) -> bool:
        return self._query is not None

    def cancel(self) -> None:
        if self._query is not None:
            self._query.cancel()
            self._query = None
