"""The log of a run as the panel shows it: the child's messages, one readable line each.

A method sends dozens of progress events a second; the log keeps the ones a person wants to
read after the fact: the first and last event of every stage, one line per stage at most every
``interval`` seconds in between, every error, and every plain line the child wrote (warnings,
tracebacks). Lines start with the time since the run started. Nothing here imports Qt.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from .overall_progress import counts_text, format_duration


class RunLog:
    """Collects the log lines of one run.

    Args:
        interval: seconds between two logged progress lines of the same stage.
        max_lines: the oldest lines are dropped beyond this many.
        clock: seconds (monotonic); the run starts at construction.
    """

    def __init__(self, interval: float = 5.0, max_lines: int = 2000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_lines = max_lines
        self.clock = clock
        self.start = clock()
        self.lines: list[str] = []
        self._last_logged: dict[str, float] = {}

    def _add(self, text: str) -> str:
        line = f"[{format_duration(self.clock() - self.start)}] {text}"
        self.lines.append(line)
        del self.lines[:-self.max_lines]
        return line

    def add_event(self, event: Mapping[str, Any]) -> list[str]:
        """Log one JSON event of the child if it is worth a line; returns the new lines."""
        kind = event.get("type")
        if kind == "error":
            return [self._add(f"Error ({event.get('error', 'error')}): {event.get('message', '')}")]
        if kind != "progress":
            return []
        stage = str(event.get("stage", ""))
        fraction = float(event.get("fraction") or 0.0)
        now = self.clock()
        last = self._last_logged.get(stage)
        if last is not None and fraction < 1.0 and now - last < self.interval:
            return []
        self._last_logged[stage] = now
        details = [str(event.get("message") or ""), counts_text(event)]
        text = f"{stage}: {round(100 * fraction)} %"
        text += "".join(f" - {d}" for d in details if d)
        return [self._add(text)]

    def add_text(self, line: str) -> str:
        """Log one plain line the child wrote (not a JSON event)."""
        return self._add(line.rstrip())

    def text(self) -> str:
        """Every line, newline-separated."""
        return "\n".join(self.lines)
