"""How the ``sfuda`` command shows progress events (``--progress``).

- ``bar`` (default): one tqdm bar per stage on a terminal, counting in the event's units
  (iterations, slices, cases, candidates...) or in percent when the stage gives no counts. When
  stderr is not a terminal (a log file, a pipe, a batch job) it prints plain lines instead.
- ``lines``: plain lines, no escape codes, at most one per stage per 10 % of its progress or per
  :data:`LINE_INTERVAL_SECONDS`, plus the stage's last event; finished stages are not repeated.
- ``json``: one JSON object per event (read by ``slicer_bridge/jobs.py``): ``type``, ``stage``,
  ``fraction``, ``message`` and ``done``, ``total``, ``unit``, ``elapsed`` (s), ``rate`` (units/s).
- ``none``: nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

from .progress import ProgressEvent, ProgressReporter

MODES = ("bar", "lines", "json", "none")

#: ``lines``: a stage that moves slowly still prints a line this often (seconds)
LINE_INTERVAL_SECONDS = 30.0

#: ``lines``: one line per this share of a stage's progress
LINE_STEP = 0.1


def _count(value: float) -> str:
    """``12`` for whole counts, ``12.5`` otherwise."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _clock(seconds: float) -> str:
    """``mm:ss`` or ``h:mm:ss``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def describe(event: ProgressEvent) -> str:
    """One plain line for an event, e.g.
    ``inference  40%  12/30 slices  3.1 slices/s  00:04  slices 12/30``."""
    parts = [event.stage, f"{event.fraction * 100:3.0f}%"]
    if event.done is not None and event.total is not None:
        parts.append(f"{_count(event.done)}/{_count(event.total)} {event.unit}".rstrip())
        rate = event.rate
        if rate is not None:
            parts.append(f"{rate:.3g} {event.unit or 'units'}/s")
    parts.append(_clock(event.elapsed))
    if event.message:
        parts.append(event.message)
    return "  ".join(parts)


def json_line(event: ProgressEvent) -> str:
    """The JSON object of one event (no newline)."""
    rate = event.rate
    return json.dumps({"type": "progress", "stage": event.stage, "fraction": event.fraction,
                       "message": event.message, "done": event.done, "total": event.total,
                       "unit": event.unit, "elapsed": round(event.elapsed, 3),
                       "rate": None if rate is None else round(rate, 6)})


class JsonLines:
    """Writes :func:`json_line` of every event to ``stream``."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        self.stream.write(json_line(event) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Nothing to finish."""


@dataclass
class _StageLine:
    """What :class:`LogLines` last printed for one stage."""

    step: int
    fraction: float
    printed_at: float
    finished: bool


class LogLines:
    """Plain, throttled lines for logs (see the module docstring).

    Args:
        stream: where to write.
        interval: seconds after which a moving stage prints again.
        clock: time source (tests).
    """

    def __init__(self, stream: IO[str], interval: float = LINE_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.stages: dict[str, _StageLine] = {}

    def __call__(self, event: ProgressEvent) -> None:
        now = self.clock()
        step = int(math.floor(event.fraction / LINE_STEP + 1e-9))
        last = self.stages.get(event.stage)
        if last is not None and event.fraction < last.fraction:
            last = None  # the stage runs again
        if last is not None:
            moved = event.fraction > last.fraction
            due = step > last.step or (moved and now - last.printed_at >= self.interval)
            if last.finished or not (due or (event.fraction >= 1.0 and moved)):
                last.fraction = max(last.fraction, event.fraction)
                return
        self.stages[event.stage] = _StageLine(step, event.fraction, now, event.fraction >= 1.0)
        self.stream.write(describe(event) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Nothing to repeat: every line is already written."""


class TerminalBars:
    """tqdm bars, one per stage (a new one when a stage runs again), on a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.bars: dict[str, Any] = {}
        self.shape: dict[str, tuple[Optional[float], str]] = {}
        self.fraction: dict[str, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm import tqdm

        counted = event.done is not None and event.total is not None and event.total > 0
        shape = (event.total, event.unit) if counted else (None, "%")
        bar = self.bars.get(event.stage)
        if bar is not None and (shape != self.shape[event.stage]
                                or event.fraction < self.fraction[event.stage]):
            bar.close()
            bar = None
        if bar is None:
            if counted:
                bar = tqdm(total=event.total, desc=event.stage, unit=f" {event.unit}" if event.unit else "it",
                           leave=True, dynamic_ncols=True, file=self.stream)
            else:
                bar = tqdm(total=100, desc=event.stage, leave=True, dynamic_ncols=True, file=self.stream,
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
            self.bars[event.stage], self.shape[event.stage] = bar, shape
        self.fraction[event.stage] = event.fraction
        bar.n = event.done if counted else round(event.fraction * 100, 1)
        bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Close the bars still open (they stay on screen as they are)."""
        for bar in self.bars.values():
            bar.close()


def make_reporter(mode: str, stream: Optional[IO[str]] = None
                  ) -> tuple[Optional[ProgressReporter], Callable[[], None]]:
    """A reporter for ``--progress MODE`` writing to ``stream`` (stderr), and its close function.

    ``bar`` on a stream that is not a terminal gives :class:`LogLines`.
    """
    stream = sys.stderr if stream is None else stream
    if mode == "none":
        return None, lambda: None
    if mode == "json":
        display: Any = JsonLines(stream)
    elif mode == "bar" and _is_terminal(stream):
        display = TerminalBars(stream)
    else:
        display = LogLines(stream)
    return ProgressReporter(display), display.close


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
