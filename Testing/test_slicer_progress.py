"""One progress figure for a whole run (slicer_bridge.overall_progress) and the run's log
(slicer_bridge.run_log), on hand-computed examples and on the events of a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from SFUDASegmentLib.slicer_bridge.overall_progress import (REFERENCE_STAGE_SECONDS,
                                                            OverallProgress, StagePlan,
                                                            counts_text, expected_stage_seconds,
                                                            format_duration)
from SFUDASegmentLib.slicer_bridge.run_log import RunLog
from SFUDASegmentLib.utils.progress import ProgressEvent, ProgressReporter

HEAL_SECONDS = {"preprocess": 1.0, "source_prediction": 4.0, "denoising": 1.0, "diffusion": 12.0,
                "selection": 1.0, "postprocess": 1.0}  # 20 s in all


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress(stage: str, fraction: float, **extra) -> dict:
    return {"type": "progress", "stage": stage, "fraction": fraction, "message": "", **extra}


def test_plan_from_report_seconds_maps_timed_stages_to_event_stages() -> None:
    plan = StagePlan.from_stage_seconds(HEAL_SECONDS)
    assert plan.stages == ("preprocess", "inference", "denoising", "diffusion", "selection",
                           "postprocess")
    assert plan.fraction("inference", 0.5) == pytest.approx((1 + 2) / 20)
    assert plan.fraction("diffusion", 0.25) == pytest.approx((1 + 4 + 1 + 3) / 20)
    assert plan.fraction("selection", 1.0) == pytest.approx(19 / 20)
    assert plan.fraction("unknown", 0.5) is None
    # A stage of no measurable time still gets a small weight, never zero.
    tiny = StagePlan.from_stage_seconds({"a": 0.0, "b": 10.0, "c": float("nan")})
    assert tiny.weights == (0.05, 10.0, 0.05)


def test_overall_fraction_is_weighted_and_never_goes_back() -> None:
    clock = Clock()
    run = OverallProgress(StagePlan.from_stage_seconds(HEAL_SECONDS), clock)
    seen = []
    for event in (progress("inference", 0.5), progress("inference", 1.0), progress("denoising", 0.0),
                  progress("diffusion", 0.5), progress("inference", 0.2),  # late, earlier stage
                  progress("waiting", 0.9),  # a stage the plan does not know
                  progress("diffusion", 1.0), progress("selection", 1.0)):
        seen.append(run.update(event))
    assert seen == pytest.approx([3 / 20, 5 / 20, 5 / 20, 12 / 20, 12 / 20, 12 / 20, 18 / 20, 19 / 20])
    assert run.stage == "selection"
    run.finish()
    assert run.fraction == 1.0 and run.seconds_left() == 0.0


def test_time_left_from_elapsed_time_and_fraction() -> None:
    clock = Clock()
    run = OverallProgress(StagePlan.from_stage_seconds(HEAL_SECONDS), clock)
    assert run.seconds_left() is None and run.time_text() == "0 s elapsed"
    clock.now += 30.0
    run.update(progress("diffusion", 0.5))  # 12/20 done after 30 s -> 20 s left
    assert run.seconds_left() == pytest.approx(20.0)
    assert run.time_text() == "30 s elapsed, about 20 s left"
    clock.now += 100.0
    run.update(progress("selection", 1.0))  # 19/20 after 130 s -> 130/19 s left
    assert run.seconds_left() == pytest.approx(130 / 19)
    assert run.time_text() == "2 min 10 s elapsed, about 7 s left"


def test_stage_seconds_scale_with_the_work_asked_for() -> None:
    heal = expected_stage_seconds("heal", {"candidates": 3, "sampler": "ddim", "steps": 100})
    reference = REFERENCE_STAGE_SECONDS["heal"]
    assert heal["diffusion"] == pytest.approx(reference["diffusion"] * (3 * 100) / (6 * 50))
    assert heal["denoising"] == reference["denoising"]
    ddpm = expected_stage_seconds("heal", {"candidates": 6, "sampler": "ddpm"}, timesteps=250)
    assert ddpm["diffusion"] == pytest.approx(reference["diffusion"] * 250 / 50)
    gmm = expected_stage_seconds("gmm", {"iterations": 300, "candidates": None})
    assert gmm["adaptation"] == pytest.approx(REFERENCE_STAGE_SECONDS["gmm"]["adaptation"] * 3)
    # A run measured here replaces the reference, with the parameters it ran with.
    mine = expected_stage_seconds("heal", {"candidates": 4, "steps": 10}, {"diffusion": 8.0},
                                  {"candidates": 2, "sampler": "ddim", "steps": 10})
    assert mine == {"diffusion": pytest.approx(16.0)}
    assert list(expected_stage_seconds("none", {})) == ["preprocess", "inference", "postprocess"]


def test_counts_and_durations_read_as_text() -> None:
    assert counts_text({"done": 120, "total": 300, "unit": "steps", "elapsed": 30.0}) == \
        "120 of 300 steps, 4 steps/s"
    assert counts_text({"done": 3, "total": 10, "unit": "slices", "rate": 0.25}) == \
        "3 of 10 slices, 4 s each"
    assert counts_text({"fraction": 0.5}) == ""
    event = ProgressEvent("diffusion", 0.4, "step", done=20.0, total=50.0, unit="steps", elapsed=8.0)
    assert counts_text(event) == "20 of 50 steps, 2.5 steps/s"
    assert [format_duration(s) for s in (0.4, 59.6, 185, 3725)] == ["0 s", "1 min 00 s",
                                                                     "3 min 05 s", "1 h 02 min"]


def test_stage_text_carries_the_counts() -> None:
    run = OverallProgress(StagePlan.from_stage_seconds(HEAL_SECONDS), Clock())
    run.update(progress("source_prediction", 0.5, done=4, total=8, unit="slices", elapsed=2.0))
    assert run.stage_text() == "Source prediction (4 of 8 slices, 2 slices/s)"


def test_the_cli_reporter_events_drive_it_too() -> None:
    # The library's own reporter, as the CLI uses it, feeds ProgressEvents directly.
    clock = Clock()
    run = OverallProgress(StagePlan.from_stage_seconds({"adaptation": 3.0, "inference": 1.0}), clock)
    reporter = ProgressReporter(run.update, clock=clock)
    for step in range(1, 4):
        clock.now += 1.0
        reporter.report("adaptation", step / 3, f"iteration {step}", done=step, total=3,
                        unit="iterations")
    assert run.fraction == pytest.approx(0.75)
    assert run.stage_text() == "Adaptation (3 of 3 iterations, 1.5 iterations/s)"


def test_overall_progress_of_a_real_run_is_monotonic(tmp_path: Path) -> None:
    from SFUDASegmentLib.slicer_bridge.jobs import run_job

    repo = Path(__file__).resolve().parents[1]
    events: list[dict] = []
    outcome = run_job(["adapt", "--method", "none", "--checkpoint",
                       str(repo / "Resources" / "SampleData" / "phantom_demo.sfuda"), "--image",
                       str(repo / "Resources" / "SampleData" / "phantom_target.nrrd"),
                       "--out", str(tmp_path / "out"), "--device", "cpu"], on_event=events.append)
    assert outcome.ok, outcome.error_message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    run = OverallProgress(StagePlan.from_stage_seconds(report["timings"]["seconds"]))
    fractions = [run.update(e) for e in events if e["type"] == "progress"]
    assert len(fractions) >= 2 and fractions == sorted(fractions)
    assert 0.5 < fractions[-1] < 1.0  # inference done, post-processing not reported
    log = RunLog(interval=3600)
    lines = [line for e in events for line in log.add_event(e)]
    assert lines[0].startswith("[0 s] inference: ") and lines[-1].split("] ")[1].startswith(
        "inference: 100 %")


# ----------------------------------------------------------------------------- the log


def test_log_keeps_first_last_and_spaced_progress_lines_and_every_error() -> None:
    clock = Clock()
    log = RunLog(interval=5.0, clock=clock)
    kept = []
    for second, event in enumerate([progress("diffusion", 0.1, message="step 1"),
                                    progress("diffusion", 0.2), progress("diffusion", 0.3),
                                    progress("selection", 0.5), progress("diffusion", 0.4),
                                    progress("diffusion", 0.5), progress("diffusion", 0.6),
                                    progress("diffusion", 1.0)]):
        clock.now = 100.0 + 2 * second
        kept += log.add_event(event)
    assert kept == ["[0 s] diffusion: 10 % - step 1", "[6 s] selection: 50 %",
                    "[8 s] diffusion: 40 %", "[14 s] diffusion: 100 %"]
    assert log.add_event({"type": "error", "error": "DeviceError", "message": "Out of memory."}) == [
        "[14 s] Error (DeviceError): Out of memory."]
    assert log.add_event({"type": "something else"}) == []
    assert log.add_text("Traceback (most recent call last):\n") == \
        "[14 s] Traceback (most recent call last):"
    assert log.text().count("\n") == 5


def test_log_drops_the_oldest_lines_beyond_its_limit() -> None:
    log = RunLog(max_lines=3, clock=Clock())
    for i in range(5):
        log.add_text(f"line {i}")
    assert log.lines == ["[0 s] line 2", "[0 s] line 3", "[0 s] line 4"]
