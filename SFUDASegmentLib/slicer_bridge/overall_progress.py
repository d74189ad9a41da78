"""One progress figure for a whole run: stages weighted by their measured times.

A method reports progress per stage (``inference`` 0..1, then ``denoising`` 0..1, then
``diffusion`` 0..1...), and some stages report nothing (pre- and post-processing). A bar that
follows the stage fraction restarts at 0 at every stage. :class:`OverallProgress` turns the
per-stage events into one fraction of the whole run that only moves forward, weighting each
stage by the seconds it took in a run's ``report.json`` (``timings.seconds``, in stage order),
and estimates the time left from the elapsed time.

The events are those of :class:`~SFUDASegmentLib.utils.progress.ProgressEvent` or their JSON
lines (``{"stage": ..., "fraction": ..., "done": ..., "total": ..., "unit": ...}``); nothing
here imports Qt, Slicer or PyTorch, so the Slicer panel and a command-line bar can share it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

#: Seconds per timed stage, in order, of one run of each method on the bundled sample (the demo
#: checkpoint on the 24x64x64 phantom target in ``Resources/SampleData``, default parameters,
#: CPU), from the ``report.json`` of ``sfuda adapt --method <m> --checkpoint
#: Resources/SampleData/phantom_demo.sfuda --image Resources/SampleData/phantom_target.nrrd
#: --out <dir>``, run while other jobs shared the 2 CPU cores: only the ratios matter.
REFERENCE_STAGE_SECONDS: dict[str, dict[str, float]] = {
    "none": {"preprocess": 0.03, "inference": 6.59, "postprocess": 0.015},
    "heal": {"preprocess": 0.019, "source_prediction": 14.0, "denoising": 0.014, "diffusion": 716.5,
             "selection": 0.028, "source_on_selected": 11.0, "fusion": 0.001, "postprocess": 0.019},
    "gmm": {"preprocess": 0.025, "adaptation": 333.4, "inference": 11.1, "postprocess": 0.029},
}

#: The parameters of the reference runs that the stage times scale with.
REFERENCE_PARAMETERS: dict[str, dict[str, Any]] = {
    "heal": {"candidates": 6, "sampler": "ddim", "steps": 50},
    "gmm": {"iterations": 100},
}

#: Timed stages whose progress events carry another stage name.
EVENT_STAGE_OF_TIMED_STAGE: dict[str, str] = {"source_prediction": "inference"}


def _value(event: Any, key: str, default: Any = None) -> Any:
    """``event[key]`` of a JSON event dict, or ``event.key`` of a ProgressEvent."""
    if isinstance(event, Mapping):
        return event.get(key, default)
    return getattr(event, key, default)


def sampling_steps(parameters: Mapping[str, Any], timesteps: int = 1000) -> int:
    """Denoising steps of one HEAL candidate: the DDIM steps, or every step ``T`` with DDPM."""
    return int(timesteps) if parameters.get("sampler") == "ddpm" else int(parameters.get("steps", 50))


def expected_stage_seconds(method: str, parameters: Mapping[str, Any],
                           reference_seconds: Optional[Mapping[str, float]] = None,
                           reference_parameters: Optional[Mapping[str, Any]] = None,
                           timesteps: int = 1000) -> dict[str, float]:
    """Stage seconds expected for a run, scaled from a reference run of the same method.

    The diffusion stage of HEAL scales with candidates x denoising steps; GMM's adaptation
    with its iterations; the other stages are taken as they are.

    Args:
        method: ``none``, ``heal`` or ``gmm``.
        parameters: this run's parameters (``candidates``, ``sampler``, ``steps``,
            ``iterations``); missing ones are the reference's.
        reference_seconds: timed stage -> seconds of the reference run (default
            :data:`REFERENCE_STAGE_SECONDS`).
        reference_parameters: the reference run's parameters (default
            :data:`REFERENCE_PARAMETERS`).
        timesteps: the diffusion model's ``T`` (DDPM runs all of them).

    Returns:
        Timed stage -> expected seconds, in the reference's order.
    """
    seconds = dict(REFERENCE_STAGE_SECONDS.get(method, {}) if reference_seconds is None
                   else reference_seconds)
    reference = dict(REFERENCE_PARAMETERS.get(method, {}) if reference_parameters is None
                     else reference_parameters)
    wanted = {**reference, **{k: v for k, v in parameters.items() if v is not None}}
    if method == "heal" and "diffusion" in seconds and reference:
        ratio = (int(wanted["candidates"]) * sampling_steps(wanted, timesteps)) / max(
            1, int(reference["candidates"]) * sampling_steps(reference, timesteps))
        seconds["diffusion"] *= ratio
    if method == "gmm" and "adaptation" in seconds and reference:
        seconds["adaptation"] *= int(wanted["iterations"]) / max(1, int(reference["iterations"]))
    return seconds


@dataclass(frozen=True)
class StagePlan:
    """The stages of a run in order, with their weights.

    Attributes:
        stages: progress-event stage names in run order (a timed stage that reports under
            another name appears under that name, see :data:`EVENT_STAGE_OF_TIMED_STAGE`).
        weights: expected seconds (any positive scale) of each stage.
    """

    stages: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_stage_seconds(cls, seconds: Mapping[str, float]) -> "StagePlan":
        """A plan from a report's ``timings.seconds`` (timed stage -> seconds, in run order).
        A stage that took no measurable time still gets a small weight, so that its events
        move the figure."""
        values = [float(v) if math.isfinite(float(v)) else 0.0 for v in seconds.values()]
        floor = max(1e-3, 0.005 * sum(values))
        names = [EVENT_STAGE_OF_TIMED_STAGE.get(name, name) for name in seconds]
        weights = [max(floor, v) for v in values]
        return cls(tuple(names), tuple(weights))

    def fraction(self, stage: str, stage_fraction: float) -> Optional[float]:
        """Overall fraction when ``stage`` is ``stage_fraction`` done (the stages before it are
        complete); None for a stage the plan does not know."""
        if stage not in self.stages:
            return None
        index = self.stages.index(stage)
        done = sum(self.weights[:index]) + self.weights[index] * min(1.0, max(0.0, stage_fraction))
        return done / sum(self.weights)


class OverallProgress:
    """Overall fraction, elapsed time and time left of one run, fed with its progress events.

    Args:
        plan: the run's stages and weights.
        clock: seconds (monotonic); the run starts at construction.

    ``update(event)`` returns the overall fraction, which never decreases; events of stages the
    plan does not know only change :attr:`stage`. :meth:`finish` sets it to 1.
    """

    def __init__(self, plan: StagePlan, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self.clock = clock
        self.start = clock()
        self.fraction = 0.0
        self.stage = ""
        self.detail = ""

    def update(self, event: Any) -> float:
        """Take one progress event (a JSON dict or a ProgressEvent); returns the overall fraction."""
        stage = str(_value(event, "stage", "") or "")
        fraction = _value(event, "fraction", 0.0)
        self.stage = stage
        self.detail = counts_text(event)
        overall = self.plan.fraction(stage, float(fraction) if fraction is not None else 0.0)
        if overall is not None:
            self.fraction = max(self.fraction, min(overall, 1.0))
        return self.fraction

    def finish(self) -> None:
        """The run ended successfully."""
        self.fraction = 1.0

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return max(0.0, self.clock() - self.start)

    def seconds_left(self) -> Optional[float]:
        """Estimated seconds to the end: elapsed x (1 - f) / f, once at least 1 % is done and a
        second has passed; None before (too early to say)."""
        elapsed = self.elapsed
        if self.fraction >= 1.0:
            return 0.0
        if self.fraction < 0.01 or elapsed < 1.0:
            return None
        return elapsed * (1.0 - self.fraction) / self.fraction

    def stage_text(self) -> str:
        """``"Diffusion (120 of 300 steps, 4.1 steps/s)"`` for the panel."""
        name = self.stage.replace("_", " ").replace("-", " ")
        name = name[:1].upper() + name[1:]
        return f"{name} ({self.detail})" if name and self.detail else name

    def time_text(self) -> str:
        """``"1 min 05 s elapsed, about 40 s left"``."""
        text = f"{format_duration(self.elapsed)} elapsed"
        left = self.seconds_left()
        if left is not None and self.fraction < 1.0:
            text += f", about {format_duration(left)} left"
        return text


def counts_text(event: Any) -> str:
    """``"120 of 300 steps, 4.1 steps/s"`` from an event's ``done``/``total``/``unit`` and its
    ``rate`` (or ``done / elapsed``); ``""`` when the event carries no counts."""
    done, total, unit = _value(event, "done"), _value(event, "total"), _value(event, "unit") or ""
    if done is None:
        return ""
    text = f"{_number(done)} of {_number(total)}" if total is not None else _number(done)
    text += f" {unit}" if unit else ""
    rate = _value(event, "rate")
    elapsed = _value(event, "elapsed")
    if rate is None and elapsed:
        rate = float(done) / float(elapsed) if float(elapsed) > 0 else None
    if rate is not None and math.isfinite(float(rate)) and float(rate) > 0:
        per = f" {unit}/s" if unit else "/s"
        text += f", {float(rate):.3g}{per}" if float(rate) >= 1 else f", {1 / float(rate):.3g} s each"
    return text


def _number(value: Any) -> str:
    """A count as text: whole numbers without decimals."""
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:.3g}"


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
