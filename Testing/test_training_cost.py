"""Training cost made visible and bounded: compact label maps, batches shared out between
processes, the fixed validation sample (slices or windows, at an interval), progress counts and
rates, seconds in the history and the model card, and the warning when nothing is held out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SFUDASegmentLib.config import InferenceConfig, InputSpec, TrainingConfig
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, make_phantom_set
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.inference.preparation import predict_indices, prepare_training_case
from SFUDASegmentLib.nets.unet import ResidualUNet
from SFUDASegmentLib.training.patch_sampler import PatchSampler, compact_label_dtype
from SFUDASegmentLib.training.segmentation import (VALIDATION_HELD_OUT, VALIDATION_ON_TRAINING, default_seg_config,
                                                   train_source)
from SFUDASegmentLib.training.validation import ValidationSample, validation_dice
from SFUDASegmentLib.utils.distributed import DistributedContext
from SFUDASegmentLib.utils.progress import ProgressEvent, ProgressReporter
from tiny_models import single_thread  # noqa: F401

CLASSES = list(PHANTOM_CLASSES)
K = 1 + len(CLASSES)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def volumes() -> list:
    """Three 16-slice 3D phantoms (labels on some slices only)."""
    return make_phantom_set(3, (16, 32, 32), seed=8)


def _cases(phantoms, spec: InputSpec) -> list:
    return [prepare_training_case(p.source, p.labels, CLASSES, spec, f"case {i}") for i, p in enumerate(phantoms)]


def _net(spec: InputSpec, seed: int = 0) -> ResidualUNet:
    torch.manual_seed(seed)
    return ResidualUNet.from_config(default_seg_config(spec, K, (4, 8))).eval()


def _pooled_dice(pred: list[np.ndarray], ref: list[np.ndarray]) -> list[float]:
    """Reference: per case, Dice pooled over its arrays; per class, mean over the cases where
    prediction or reference is non-empty (NaN when none)."""
    out = []
    for k in range(1, K):
        scores = []
        for p_list, r_list in zip(pred, ref):
            p = np.concatenate([a.ravel() for a in p_list]) == k
            r = np.concatenate([a.ravel() for a in r_list]) == k
            if p.sum() + r.sum():
                scores.append(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
        out.append(float(np.mean(scores)) if scores else float("nan"))
    return out


# --------------------------------------------------------------------------- memory


def test_training_labels_are_stored_compactly(volumes):
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    case = prepare_training_case(volumes[0].source, volumes[0].labels, CLASSES, spec, "c")
    assert case.labels.dtype == np.uint8 and case.labels.nbytes * 4 == case.image.nbytes
    np.testing.assert_array_equal(case.labels, volumes[0].labels.array)  # values 1, 2, 3 are indices 1, 2, 3
    assert compact_label_dtype(256) == np.uint8 and compact_label_dtype(257) == np.int16
    # a case smaller than the patch is padded at the far end, labels keep their type
    small = prepare_training_case(volumes[0].source, volumes[0].labels, CLASSES,
                                  InputSpec(dims="2d", patch_size=(40, 36)), "c")
    assert small.labels.shape == (16, 40, 36) and small.labels.dtype == np.uint8
    np.testing.assert_array_equal(small.labels[:, :32, :32], case.labels)
    assert not small.labels[:, 32:].any() and not small.labels[:, :, 32:].any()


def _second_batch(cases, spec: InputSpec, patch) -> tuple[np.ndarray, np.ndarray]:
    """The second whole batch of 6 drawn with the seed of the test below."""
    sampler = PatchSampler(cases, spec, patch, 0.5, np.random.default_rng(4))
    sampler.sample(6)
    return sampler.sample(6)


@pytest.mark.parametrize("dims, patch", [("2d", (16, 16)), ("2.5d", (16, 16)), ("3d", (8, 16, 16))])
def test_a_share_of_a_batch_is_the_same_rows_of_the_whole_batch(volumes, dims, patch):
    spec = InputSpec(dims=dims, patch_size=patch)
    cases = _cases(volumes, spec)
    whole = PatchSampler(cases, spec, patch, 0.5, np.random.default_rng(4))
    images, labels = whole.sample(6)
    assert images.dtype == np.float32 and labels.dtype == np.int64 and labels.shape == (6, *patch)
    assert labels.any()  # foreground oversampling finds the structures
    second = _second_batch(cases, spec, patch)
    for rank in range(3):
        share = DistributedContext(rank, 3).batch_part(6)
        part = PatchSampler(cases, spec, patch, 0.5, np.random.default_rng(4))
        part_images, part_labels = part.sample(6, share)
        np.testing.assert_array_equal(part_images, images[2 * rank:2 * rank + 2])
        np.testing.assert_array_equal(part_labels, labels[2 * rank:2 * rank + 2])
        # the random stream advanced by the whole batch: the next batches agree too
        np.testing.assert_array_equal(part.sample(6, share)[1], second[1][2 * rank:2 * rank + 2])


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(InputError, match="batch size 6 does not split evenly over 4 processes"):
        DistributedContext(1, 4).batch_part(6)
    assert DistributedContext(1, 4).batch_part(8) == slice(2, 4)
    assert list(DistributedContext(1, 3).items(7)) == [1, 4]


# --------------------------------------------------------------------------- validation sample


def test_whole_case_validation_equals_whole_volume_inference(volumes):
    """``validation_samples = 0`` predicts every slice: the score equals per-case Dice of
    ``predict_indices`` on the whole volumes (the earlier validation)."""
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    cases, net = _cases(volumes, spec), _net(spec)
    sample = ValidationSample.draw(cases, spec, 0, np.random.default_rng(0))
    assert sample.unit == "slices" and len(sample.items) == 48
    got = validation_dice(net, cases, sample, spec, K, CPU)
    predictions = [predict_indices(net, c.image, spec, K, InferenceConfig(device="cpu"), CPU)[0] for c in cases]
    expected = _pooled_dice([[p] for p in predictions], [[c.labels] for c in cases])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_slice_sample_is_fixed_half_labelled_and_scored_on_those_slices(volumes):
    spec = InputSpec(dims="2.5d", patch_size=(32, 32), context_slices=1)
    cases, net = _cases(volumes, spec), _net(spec)
    sample = ValidationSample.draw(cases, spec, 8, np.random.default_rng(3))
    again = ValidationSample.draw(cases, spec, 8, np.random.default_rng(3))
    assert sample == again and len(sample.items) == 8 and sample.unit == "slices"
    per_case = {c: [i.z for i in sample.items if i.case == c] for c in range(3)}
    assert [len(z) for z in per_case.values()] == [3, 3, 2]  # 8 over 3 cases
    for c, zs in per_case.items():
        labelled = [z for z in zs if cases[c].labels[z].any()]
        assert len(set(zs)) == len(zs) and all(cases[c].foreground[z].any() for z in zs)
        assert len(labelled) >= (len(zs) + 1) // 2
    got = validation_dice(net, cases, sample, spec, K, CPU)
    whole = [predict_indices(net, c.image, spec, K, InferenceConfig(device="cpu"), CPU)[0] for c in cases]
    expected = _pooled_dice([[whole[c][z] for z in zs] for c, zs in per_case.items()],
                            [[cases[c].labels[z] for z in zs] for c, zs in per_case.items()])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_window_sample_in_3d(volumes):
    spec = InputSpec(dims="3d", patch_size=(8, 16, 16))
    cases, net = _cases(volumes, spec), _net(spec)
    sample = ValidationSample.draw(cases, spec, 6, np.random.default_rng(1))
    assert sample.unit == "windows" and len(sample.items) == 6
    references, predictions = [[] for _ in cases], [[] for _ in cases]
    for item in sample.items:
        window = tuple(slice(s, s + p) for s, p in zip(item.start, spec.patch_size))
        assert all(0 <= s and s + p <= n for s, p, n in zip(item.start, spec.patch_size, cases[item.case].labels.shape))
        references[item.case].append(cases[item.case].labels[window])
        with torch.no_grad():
            logits = net(torch.from_numpy(cases[item.case].image[(slice(None),) + window][None]))
        predictions[item.case].append(logits.argmax(1)[0].numpy())
    # one of each case's two windows is centred on a labelled voxel
    assert all(any(r[tuple(p // 2 for p in spec.patch_size)] > 0 for r in refs) for refs in references)
    got = validation_dice(net, cases, sample, spec, K, CPU)
    np.testing.assert_allclose(got, _pooled_dice(predictions, references), rtol=1e-12)
    whole = ValidationSample.draw(cases, spec, 0, np.random.default_rng(1))
    assert whole.unit == "cases" and len(whole.items) == 3


def test_validation_reports_its_own_counts_and_clock():
    clock = iter(np.arange(0.0, 100.0, 0.5))
    events: list[ProgressEvent] = []
    reporter = ProgressReporter(events.append, clock=lambda: float(next(clock)))
    phantoms = make_phantom_set(3, (32, 32), seed=2)
    config = TrainingConfig(epochs=4, iterations_per_epoch=2, batch_size=2, device="cpu", validation_interval=2)
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    outcome = train_source([p.source for p in phantoms], [p.labels for p in phantoms], CLASSES, spec, config,
                           default_seg_config(spec, K, (4, 8)), progress=reporter)
    validation = [e for e in events if e.stage == "validation"]
    assert [(e.done, e.total, e.unit) for e in validation] == [(0, 1, "slices"), (1, 1, "slices")] * 2
    # every validation starts its clock anew: 0.5 s per event of the fake clock
    assert [e.elapsed for e in validation] == [0.0, 0.5] * 2
    training = [e for e in events if e.stage == "training"]
    assert training[-1].done == training[-1].total == 8 and training[-1].unit == "iterations"
    # validated at epochs 2 and 4 only; the kept weights come from one of them
    assert [h["val_mean_dice"] is not None for h in outcome.history] == [False, True, False, True]
    assert outcome.best_epoch in (2, 4)


# --------------------------------------------------------------------------- timings and the card


def test_seconds_and_rates_reach_history_outcome_and_card():
    phantoms = make_phantom_set(4, (32, 32), seed=5)
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    config = TrainingConfig(epochs=2, iterations_per_epoch=3, batch_size=2, device="cpu", validation_samples=5)
    outcome = train_source([p.source for p in phantoms], [p.labels for p in phantoms], CLASSES, spec, config,
                           default_seg_config(spec, K, (4, 8)))
    for record in outcome.history:
        assert record["seconds"] > 0 and record["iterations_per_second"] == pytest.approx(3 / record["seconds"])
        assert record["validation_seconds"] > 0
    timings = outcome.timings["segmentation"]
    assert timings["iterations"] == 6 and timings["validations"] == 2
    assert timings["training_seconds"] == pytest.approx(sum(h["seconds"] for h in outcome.history))
    assert timings["iterations_per_second"] == pytest.approx(6 / timings["training_seconds"])
    # 2D images: one slice per validation case, whatever the requested sample size
    assert (timings["validation_items"], timings["validation_unit"]) == (1, "slices")
    provenance = outcome.checkpoint.provenance
    assert provenance["timings"] == outcome.timings and provenance["processes"] == 1
    assert provenance["validation"] == VALIDATION_HELD_OUT and outcome.warnings == []
    assert provenance["training"]["validation_samples"] == 5


def test_a_single_case_warns_that_validation_is_on_the_training_case():
    phantom = make_phantom_set(1, (32, 32), seed=5)[0]
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    messages: list[str] = []
    outcome = train_source([phantom.source], [phantom.labels], CLASSES, spec,
                           TrainingConfig(epochs=1, iterations_per_epoch=2, batch_size=2, device="cpu"),
                           default_seg_config(spec, K, (4, 8)), progress=ProgressReporter(lambda e: messages.append(e.message)),
                           case_names=["only.nii.gz"])
    assert not outcome.validation_held_out and outcome.validation_cases == ["only.nii.gz"]
    assert len(outcome.warnings) == 1 and "only.nii.gz" in outcome.warnings[0]
    assert "not how the model does on unseen scans" in outcome.warnings[0]
    assert ("warning: " + outcome.warnings[0]) in messages
    assert outcome.checkpoint.provenance["validation"] == VALIDATION_ON_TRAINING
