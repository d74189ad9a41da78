"""Progress reporting and cancellation shared by the library, the CLI and the Slicer panel.

Long operations take an optional :class:`ProgressReporter`. They call
``reporter.report(stage, fraction, message, done=..., total=..., unit=...)``; the reporter
stamps the seconds since the stage started (its first event, or its latest event with
``done=0``: a stage that runs again, such as the validation after every epoch, starts its clock
anew), forwards the event to a callback (a progress bar, a JSON line for the Slicer job
runner, a test recorder) and raises
:class:`~SFUDASegmentLib.errors.OperationCancelled` when ``should_cancel()`` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import OperationCancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update.

    Attributes:
        stage: short machine name of the stage, e.g. ``"inference"``, ``"diffusion"``.
        fraction: progress of that stage in ``[0, 1]``.
        message: human-readable status line.
        done, total: work done and to do in the stage, counted in ``unit`` (None when the
            stage does not count units).
        unit: what ``done`` counts, in words a person reads: ``"iterations"``, ``"slices"``,
            ``"cases"``...
        elapsed: seconds since the stage started: its first event, its latest event with
            ``done == 0``, or the event whose fraction went back (the stage runs again); set by
            :class:`ProgressReporter`.
    """

    stage: str
    fraction: float
    message: str = ""
    done: Optional[float] = None
    total: Optional[float] = None
    unit: str = ""
    elapsed: float = 0.0

    @property
    def rate(self) -> Optional[float]:
        """Units per second so far (None without counts or elapsed time)."""
        if self.done is None or self.elapsed <= 0:
            return None
        return self.done / self.elapsed


class ProgressReporter:
    """Forwards progress events and checks for cancellation.

    Args:
        callback: called with every :class:`ProgressEvent`.
        should_cancel: polled at every report; when it returns True the operation stops by
            raising :class:`OperationCancelled`.
    """

    def __init__(self, callback: Optional[Callable[[ProgressEvent], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.callback = callback
        self.should_cancel = should_cancel
        self.clock = clock
        self._stage_start: dict[str, float] = {}
        self._stage_fraction: dict[str, float] = {}

    def report(self, stage: str, fraction: float, message: str = "", *, done: Optional[float] = None,
               total: Optional[float] = None, unit: str = "") -> None:
        """Send one event, then raise :class:`OperationCancelled` if cancellation was asked.

        Args:
            stage, fraction, message: see :class:`ProgressEvent`.
            done, total, unit: optional counts of the stage's work (e.g. 120 of 400 iterations);
                ``done=0`` (re)starts the stage's clock.
        """
        if self.callback is not None:
            now = self.clock()
            fraction = min(max(float(fraction), 0.0), 1.0)
            if done == 0 or fraction < self._stage_fraction.get(stage, 0.0):  # the stage (re)starts
                self._stage_start.pop(stage, None)
            self._stage_fraction[stage] = fraction
            start = self._stage_start.setdefault(stage, now)
            self.callback(ProgressEvent(stage, fraction, message, done, total, unit, now - start))
        if self.should_cancel is not None and self.should_cancel():
            raise OperationCancelled(f"Cancelled by the user during '{stage}'; nothing was written.")


def report(progress: Optional[ProgressReporter], stage: str, fraction: float, message: str = "", *,
           done: Optional[float] = None, total: Optional[float] = None, unit: str = "") -> None:
    """Report through ``progress`` when one is given (helper for optional reporters)."""
    if progress is not None:
        progress.report(stage, fraction, message, done=done, total=total, unit=unit)
