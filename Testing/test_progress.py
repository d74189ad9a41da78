"""Progress events: counts, per-stage elapsed time and rate, cancellation."""

from __future__ import annotations

import pytest

from SFUDASegmentLib.errors import OperationCancelled
from SFUDASegmentLib.utils.progress import ProgressEvent, ProgressReporter, report


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_events_carry_counts_and_seconds_since_their_stage_started() -> None:
    events: list[ProgressEvent] = []
    clock = FakeClock()
    reporter = ProgressReporter(events.append, clock=clock)
    report(reporter, "training", 0.0, "start", done=0, total=400, unit="iterations")
    clock.now = 110.0
    report(reporter, "training", 0.25, done=100, total=400, unit="iterations")
    clock.now = 112.0
    report(reporter, "validation", 0.5, done=3, total=6, unit="slices")
    clock.now = 116.0
    report(reporter, "validation", 1.0, done=6, total=6, unit="slices")
    assert [e.elapsed for e in events] == [0.0, 10.0, 0.0, 4.0]
    assert events[1].rate == pytest.approx(10.0)  # 100 iterations in 10 s
    assert events[3].rate == pytest.approx(1.5)   # 6 slices in 4 s
    assert events[0].rate is None                 # no time has passed yet
    assert (events[1].done, events[1].total, events[1].unit) == (100, 400, "iterations")


def test_a_stage_that_runs_again_restarts_its_clock_at_done_zero() -> None:
    """The validation after every epoch: its rate must not count the training in between."""
    events: list[ProgressEvent] = []
    clock = FakeClock()
    reporter = ProgressReporter(events.append, clock=clock)
    report(reporter, "validation", 0.0, done=0, total=4, unit="slices")
    clock.now = 102.0
    report(reporter, "validation", 1.0, done=4, total=4, unit="slices")
    clock.now = 160.0  # an epoch of training later
    report(reporter, "validation", 0.0, done=0, total=4, unit="slices")
    clock.now = 164.0
    report(reporter, "validation", 1.0, done=4, total=4, unit="slices")
    assert [e.elapsed for e in events] == [0.0, 2.0, 0.0, 4.0]
    assert events[-1].rate == pytest.approx(1.0)


def test_fraction_is_clamped_and_counts_are_optional() -> None:
    events: list[ProgressEvent] = []
    ProgressReporter(events.append).report("diffusion", 1.7, "over")
    assert events[0].fraction == 1.0
    assert events[0].done is None and events[0].rate is None and events[0].unit == ""


def test_cancel_raises_after_the_event_is_sent() -> None:
    events: list[ProgressEvent] = []
    reporter = ProgressReporter(events.append, should_cancel=lambda: True)
    with pytest.raises(OperationCancelled, match="inference"):
        reporter.report("inference", 0.5)
    assert len(events) == 1


def test_report_without_a_reporter_does_nothing() -> None:
    report(None, "inference", 0.5, done=1, total=2, unit="slices")
