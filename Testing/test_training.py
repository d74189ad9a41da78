"""Source training: a tiny model learns the source phantoms and loses on the target domain; the
best validation weights are kept; runs are seeded, resumable and work for 2D, 2.5D and 3D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import InferenceConfig, InputSpec, TrainingConfig
from SFUDASegmentLib.data.io import read_image, write_image
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, Phantom, make_phantom_set
from SFUDASegmentLib.errors import CheckpointError, InputError, OperationCancelled
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.training.patch_sampler import TrainingCase
from SFUDASegmentLib.training.segmentation import TrainingOutcome, _split_cases, default_seg_config, train_source
from SFUDASegmentLib.utils.progress import ProgressEvent, ProgressReporter
from tiny_models import TINY_GAP, dice, single_thread, tiny_model  # noqa: F401

CLASSES = list(PHANTOM_CLASSES)
CPU = InferenceConfig(device="cpu")


def _dice_per_class(labels: np.ndarray, reference: np.ndarray) -> list[float]:
    """Dice of each phantom class (values 1, 2, 3)."""
    return [dice(labels == c.value, reference == c.value) for c in CLASSES]


def _train(phantoms: list[Phantom], spec: InputSpec, config: TrainingConfig,
           channels: tuple[int, ...] = (8, 16), **kwargs) -> TrainingOutcome:
    return train_source([p.source for p in phantoms], [p.labels for p in phantoms], CLASSES, spec,
                        config, default_seg_config(spec, 1 + len(CLASSES), channels), **kwargs)


TIMING_KEYS = ("seconds", "iterations_per_second", "validation_seconds")


def _scores(history: list[dict]) -> list[dict]:
    """The history without its wall-clock fields (which differ between identical runs)."""
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def _config(epochs: int, iterations: int = 4, seed: int = 0) -> TrainingConfig:
    return TrainingConfig(epochs=epochs, iterations_per_epoch=iterations, batch_size=2, lr=3e-3,
                          seed=seed, device="cpu")


@pytest.fixture(scope="module")
def small_cases() -> list[Phantom]:
    """Three 32x32 phantoms for the cheap runs (resume, determinism)."""
    return make_phantom_set(3, (32, 32), seed=21)


SPEC_32 = InputSpec(dims="2d", patch_size=(32, 32))


# --------------------------------------------------------------------------- quality


def test_tiny_model_segments_source_well_and_loses_on_target(tiny_model):
    source, target = [], []
    for phantom in tiny_model.held_out:
        ref = phantom.labels.array
        source.append(_dice_per_class(segment(tiny_model.checkpoint, phantom.source, CPU, "labels").labels, ref))
        target.append(_dice_per_class(segment(tiny_model.checkpoint, phantom.target, CPU, "labels").labels, ref))
    source, target = np.array(source), np.array(target)  # (cases, classes)
    assert source[:, 0].mean() > 0.8, f"organ Dice on held-out source phantoms {source[:, 0]}"
    drop = source.mean() - target.mean()
    assert drop > 0.15, (f"mean Dice source {source.mean(0)} vs target {target.mean(0)} at gap "
                         f"{TINY_GAP}: only {100 * drop:.1f} points lost")


def test_history_and_kept_weights_are_the_best_validation_epoch(tiny_model):
    outcome = tiny_model.outcome
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) for h in outcome.history)
    assert outcome.history[-1]["loss"] < outcome.history[0]["loss"]
    scores = [h["val_mean_dice"] for h in outcome.history]
    assert outcome.best_epoch == int(np.argmax(scores)) + 1
    assert outcome.best_val_dice == pytest.approx(max(scores))
    assert len(outcome.validation_cases) == 1  # 20 % of 6 cases
    provenance = tiny_model.checkpoint.provenance
    assert provenance["best_epoch"] == outcome.best_epoch
    assert provenance["validation_cases"] == outcome.validation_cases
    assert provenance["training"]["epochs"] == 4 and provenance["versions"]["torch"] == torch.__version__
    # the kept weights reproduce the reported validation Dice on the held-out validation case
    index = int(outcome.validation_cases[0].split("_")[-1])
    case = tiny_model.train[index]
    labels = segment(tiny_model.checkpoint, case.source, CPU, "labels").labels
    per_class = [d for d, c in zip(_dice_per_class(labels, case.labels.array), CLASSES)
                 if (labels == c.value).any() or (case.labels.array == c.value).any()]
    assert float(np.mean(per_class)) == pytest.approx(outcome.best_val_dice, abs=1e-6)


def test_checkpoint_file_of_the_tiny_model_reloads_and_segments_identically(tiny_model):
    reloaded = SourceCheckpoint.load(tiny_model.path)
    phantom = tiny_model.held_out[0]
    a = segment(tiny_model.checkpoint, phantom.source, CPU, "labels").labels
    b = segment(reloaded, phantom.source, CPU, "labels").labels
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_weights_other_seed_differs(small_cases):
    a = _train(small_cases, SPEC_32, _config(2, 3, seed=5))
    b = _train(small_cases, SPEC_32, _config(2, 3, seed=5))
    c = _train(small_cases, SPEC_32, _config(2, 3, seed=6))
    state_a, state_b, state_c = (o.checkpoint.seg_state for o in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert _scores(a.history) == _scores(b.history)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_training_does_not_modify_the_inputs(small_cases):
    images = [p.source.array.copy() for p in small_cases]
    labels = [p.labels.array.copy() for p in small_cases]
    _train(small_cases, SPEC_32, _config(1, 2))
    for phantom, image, label in zip(small_cases, images, labels):
        np.testing.assert_array_equal(phantom.source.array, image)
        np.testing.assert_array_equal(phantom.labels.array, label)


# --------------------------------------------------------------------------- resuming


class _Recorder:
    """Progress callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)


def test_resume_continues_the_history_without_repeating_epochs(small_cases, tmp_path):
    state = tmp_path / "run.train-state"
    first = _train(small_cases, SPEC_32, _config(2), resume_path=state)
    assert state.is_file()
    assert [h["epoch"] for h in first.history] == [1, 2]
    recorder = _Recorder()
    second = _train(small_cases, SPEC_32, _config(3), resume_path=state,
                    progress=ProgressReporter(recorder))
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[:2] == first.history  # loaded from the state file, timings included
    training = [e for e in recorder.events if e.stage == "training"]
    messages = [e.message for e in training]
    assert messages[0] == "training from epoch 3/3", messages
    assert all(m.startswith("epoch 3") for m in messages[1:]), messages
    assert len([m for m in messages if m.startswith("epoch 3/3 loss")]) == 4  # 4 iterations, once
    fractions = [e.fraction for e in training]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    # the counts are this run's: 4 iterations of epoch 3, not the 12 of the whole schedule
    assert [e.done for e in training] == [0, 1, 2, 3, 4, 4] and {e.total for e in training} == {4}
    assert {e.unit for e in training} == {"iterations"}
    # resuming a finished run trains nothing more
    third = _train(small_cases, SPEC_32, _config(3), resume_path=state)
    assert third.history == second.history


def test_interrupted_then_resumed_equals_uninterrupted(small_cases, tmp_path):
    state = tmp_path / "run.train-state"
    seen: list[str] = []
    reporter = ProgressReporter(lambda event: seen.append(event.message),
                                should_cancel=lambda: seen[-1].startswith("epoch 3/3"))
    with pytest.raises(OperationCancelled):
        _train(small_cases, SPEC_32, _config(3), resume_path=state, progress=reporter)
    resumed = _train(small_cases, SPEC_32, _config(3), resume_path=state)
    straight = _train(small_cases, SPEC_32, _config(3))
    assert _scores(resumed.history) == _scores(straight.history)
    assert resumed.best_epoch == straight.best_epoch
    a, b = resumed.checkpoint.seg_state, straight.checkpoint.seg_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_network_settings_is_refused(small_cases, tmp_path):
    state = tmp_path / "run.train-state"
    _train(small_cases, SPEC_32, _config(1, 2), resume_path=state)
    with pytest.raises(CheckpointError, match="Cannot resume"):
        _train(small_cases, SPEC_32, _config(2, 2), channels=(8, 16, 32), resume_path=state)


# --------------------------------------------------------------------------- 2.5D and 3D


@pytest.mark.parametrize("dims, shape, patch, channels", [
    ("2.5d", (16, 32, 32), (32, 32), 3),
    ("3d", (24, 32, 32), (16, 16, 16), 1),
])
def test_volume_training_runs_and_segments(tmp_path, dims, shape, patch, channels):
    phantoms = make_phantom_set(4, shape, seed=5)
    spec = InputSpec(dims=dims, patch_size=patch, context_slices=1)
    outcome = _train(phantoms[:3], spec, _config(3, 10), channels=(8, 16, 32))
    ckpt = outcome.checkpoint
    assert ckpt.input_spec.dims == dims
    assert ckpt.seg_config.spatial_dims == (3 if dims == "3d" else 2)
    assert ckpt.seg_config.in_channels == channels
    assert outcome.history[-1]["loss"] < outcome.history[0]["loss"]
    # the checkpoint goes through a file and segments an unseen volume in its geometry
    reloaded = SourceCheckpoint.load(ckpt.save(tmp_path / f"{dims}.sfuda"))
    image_path = write_image(phantoms[3].source, tmp_path / "case.nii.gz")
    volume = read_image(image_path)
    result = segment(reloaded, volume, CPU, "probabilities")
    assert result.labels.shape == shape
    assert result.geometry.matches(phantoms[3].source.geometry)
    assert result.probabilities.shape == (4, *shape) and result.probabilities.dtype == np.float16
    organ = dice(result.labels == 1, phantoms[3].labels.array == 1)
    assert organ > 0.5, f"{dims} organ Dice {organ:.2f} after a tiny run"


def test_mismatched_image_and_label_lists_are_refused(small_cases):
    with pytest.raises(InputError, match="one label map per image"):
        train_source([p.source for p in small_cases], [p.labels for p in small_cases[:2]], CLASSES,
                     SPEC_32, _config(1, 1))


def test_saved_checkpoint_path_is_a_real_file(tiny_model):
    assert Path(tiny_model.path).stat().st_size > 10_000


def test_validation_is_held_out_only_from_eligible_cases():
    """Diffuse-UDA's retraining must not validate on synthetic pairs (whose labels are what is
    being tested): only eligible cases are held out, and with fewer than two eligible cases
    they are validated on while they stay in training."""
    cases = [TrainingCase(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 4, 4), np.int64),
                          np.ones((1, 4, 4), bool), f"c{i}")
             for i in range(10)]
    real = [i < 4 for i in range(10)]
    train, val = _split_cases(cases, 0.5, np.random.default_rng(0), real)
    assert len(val) == 2 and all(c.name in {"c0", "c1", "c2", "c3"} for c in val)
    assert sorted(c.name for c in train + val) == sorted(c.name for c in cases)
    one_real = [i == 7 for i in range(10)]
    train, val = _split_cases(cases, 0.5, np.random.default_rng(0), one_real)
    assert train == cases and [c.name for c in val] == ["c7"]
    train, val = _split_cases(cases, 0.2, np.random.default_rng(0))
    assert len(val) == 2 and len(train) == 8
    with pytest.raises(InputError, match="validation flags"):
        _split_cases(cases, 0.2, np.random.default_rng(0), [True])
