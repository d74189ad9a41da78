"""Progress reporting and cancellation shared by the library, the CLI and the Slicer panel.

Long operations take an optional :class:`ProgressReporter`. They call
``reporter.report(stage, fraction, message)``; the reporter forwards the event to a callback
(a tqdm bar, a JSON line for the Slicer job runner, a test recorder) and raises
:class:`~SFUDASegmentLib.errors.OperationCancelled` when ``should_cancel()`` says so.
"""

from __future__ import annotations

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
    """

    stage: str
    fraction: float
    message: str = ""


class ProgressReporter:
    """Forwards progress events and checks for cancellation.

    Args:
        callback: called with every :class:`ProgressEvent`.
        should_cancel: polled at every report; when it returns True the operation stops by
            raising :class:`OperationCancelled`.
    """

    def __init__(self, callback: Optional[Callable[[ProgressEvent], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None) -> None:
        self.callback = callback
        self.should_cancel = should_cancel

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        """Send one event, then raise :class:`OperationCancelled` if cancellation was asked."""
        if self.callback is not None:
            self.callback(ProgressEvent(stage, min(max(float(fraction), 0.0), 1.0), message))
        if self.should_cancel is not None and self.should_cancel():
            raise OperationCancelled(f"Cancelled by the user during '{stage}'; nothing was written.")


def report(progress: Optional[ProgressReporter], stage: str, fraction: float, message: str = "") -> None:
    """Report through ``progress`` when one is given (helper for optional reporters)."""
    if progress is not None:
        progress.report(stage, fraction, message)
