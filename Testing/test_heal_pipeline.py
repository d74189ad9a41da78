"""HEAL end to end (``heal.pipeline``) on the tiny full model: the learning-free property, the
ablation stages against independent recomputations, reproducibility, the DDPM path, 2D images
and volumes with a 2D model, bad settings and out-of-memory retries.

The unit parts (denoising, edge selection, fusion) have their own tests; here every check is
about how the pipeline wires them together.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import HEALConfig, InferenceConfig
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.synthetic import make_phantom_set, render
from SFUDASegmentLib.diffusion.sampling import DDIMSampler
from SFUDASegmentLib.errors import CheckpointError, DeviceError, InputError
from SFUDASegmentLib.heal.denoising import hierarchical_denoise
from SFUDASegmentLib.heal.edge_selection import select_candidate
from SFUDASegmentLib.heal.pipeline import heal_adapt
from SFUDASegmentLib.results.result import Result
from SFUDASegmentLib.utils.progress import ProgressEvent, ProgressReporter
from tiny_models import TINY_SHAPE, TINY_TIMESTEPS, single_thread, tiny_full_model  # noqa: F401

CPU = InferenceConfig(device="cpu")


@pytest.fixture(scope="module")
def image() -> Volume:
    """A 48x48 target-modality phantom at gap 0.2: the tiny model's Y* keeps part of the organ
    but none of the vessel there, so Y*, M_S(I_B) and their fusion all differ."""
    return make_phantom_set(3, TINY_SHAPE, seed=12, gap=0.2)[1].target


@pytest.fixture(scope="module")
def runs(tiny_full_model, image) -> dict[str, Result]:
    """One run per stage, same seed and settings (4 candidates, DDIM 5 steps)."""
    base = HEALConfig(candidates=4, steps=5, seed=3, stages="heal", denoise="paper")
    return {stage: heal_adapt(image, tiny_full_model.checkpoint, replace(base, stages=stage), CPU)
            for stage in ("hd", "hd+egs", "heal")}


def reference_fusion(refined: np.ndarray, selected: np.ndarray, values: list[int]) -> np.ndarray:
    """Size-aware fusion written from the paper: the foreground class with the fewest voxels in
    Y* (absent classes ignored, ties to the lower value) comes from Y*, the others from M_S(I_B)."""
    sizes = {v: int((refined == v).sum()) for v in values if (refined == v).any()}
    if len(values) < 2 or not sizes:
        return selected.copy()
    smallest = min(sizes, key=lambda v: (sizes[v], v))
    fused = np.where(selected == smallest, 0, selected)
    return np.where(refined == smallest, smallest, fused).astype(selected.dtype)


def source_labels(checkpoint: SourceCheckpoint, normalised: np.ndarray) -> np.ndarray:
    """The frozen source model applied directly to a ``(Y, X)`` normalised image: label values."""
    net = checkpoint.build_segmentation_net("cpu")
    with torch.no_grad():
        logits = net(torch.from_numpy(normalised.astype(np.float32))[None, None])
    indices = logits[0].argmax(0).numpy()
    return np.array([0] + [c.value for c in checkpoint.classes])[indices]


# --------------------------------------------------------------------------- learning-free


def test_no_weight_changes_and_no_optimizer_or_backward(tiny_full_model, image, monkeypatch):
    checkpoint = tiny_full_model.checkpoint
    before = {name: {k: v.clone() for k, v in state.items()}
              for name, state in (("seg", checkpoint.seg_state), ("diffusion", checkpoint.diffusion.state_dict))}
    built: list[tuple[str, torch.nn.Module]] = []
    for method, name in (("build_segmentation_net", "seg"), ("build_diffusion_net", "diffusion")):
        original = getattr(SourceCheckpoint, method)

        def recording(self, device="cpu", _original=original, _name=name):
            net = _original(self, device)
            built.append((_name, net))
            return net
        monkeypatch.setattr(SourceCheckpoint, method, recording)

    def no_optimizer(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("HEAL constructed an optimizer")

    def no_backward(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("HEAL called backward()")
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", no_optimizer)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    with pytest.raises(AssertionError, match="optimizer"):  # the trap is armed
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    result = heal_adapt(image, checkpoint, HEALConfig(candidates=3, steps=4, stages="heal"), CPU)

    assert result.candidates is not None and len(result.candidate_scores) == 3
    assert sorted({name for name, _ in built}) == ["diffusion", "seg"]
    for name, net in built:
        stored = before[name]
        state = net.state_dict()  # parameters and buffers
        assert sorted(state) == sorted(stored)
        for key, value in state.items():
            assert torch.equal(value.cpu(), stored[key]), f"{name}.{key} changed"
        assert all(p.grad is None for p in net.parameters())
    for name, state in (("seg", checkpoint.seg_state), ("diffusion", checkpoint.diffusion.state_dict)):
        for key, value in state.items():
            assert torch.equal(value, before[name][key]), f"checkpoint {name}.{key} changed"


# --------------------------------------------------------------------------- stages


def test_hd_returns_y_star_recomputed_from_the_source_probabilities(runs, image):
    hd = runs["hd"]
    refined = hd.label_maps["refined_labels"]
    np.testing.assert_array_equal(hd.labels, refined)
    assert hd.candidates is None and hd.candidate_scores == [] and hd.selected_index is None
    assert "selected_segmentation" not in hd.label_maps
    assert set(hd.timings["seconds"]) == {"preprocess", "source_prediction", "denoising", "postprocess"}
    # Y* = hierarchical denoising of the frozen model's probabilities (values = indices here)
    expected = hierarchical_denoise(hd.probabilities, HEALConfig(), spacing=image.spacing)
    np.testing.assert_array_equal(refined, expected.refined)
    np.testing.assert_array_equal(hd.label_maps["pseudo_labels"], expected.pseudo)
    np.testing.assert_array_equal(hd.label_maps["entropy_labels"], expected.y_ent)
    np.testing.assert_allclose(hd.maps["nig_variance"], expected.variance_normalized, atol=1e-6)
    assert 0 < (refined > 0).sum() < (hd.label_maps["pseudo_labels"] > 0).sum()  # denoising removed voxels


def test_hd_egs_returns_the_source_segmentation_of_the_selected_candidate(runs, tiny_full_model):
    egs = runs["hd+egs"]
    np.testing.assert_array_equal(egs.labels, egs.label_maps["selected_segmentation"])
    np.testing.assert_array_equal(egs.label_maps["refined_labels"], runs["hd"].label_maps["refined_labels"])
    chosen = egs.candidates[egs.selected_index]
    np.testing.assert_array_equal(egs.labels, source_labels(tiny_full_model.checkpoint, chosen))
    assert not np.array_equal(egs.labels, egs.label_maps["refined_labels"])


def test_heal_fuses_y_star_and_the_selected_segmentation(runs, tiny_full_model):
    heal, egs = runs["heal"], runs["hd+egs"]
    np.testing.assert_array_equal(heal.candidates, egs.candidates)  # same seed, same candidates
    refined, selected = heal.label_maps["refined_labels"], heal.label_maps["selected_segmentation"]
    np.testing.assert_array_equal(selected, egs.labels)
    expected = reference_fusion(refined, selected, [c.value for c in tiny_full_model.checkpoint.classes])
    np.testing.assert_array_equal(heal.labels, expected)
    # on this image the fusion is neither of its inputs, so the three stages are told apart
    assert not np.array_equal(heal.labels, selected) and not np.array_equal(heal.labels, refined)
    assert set(heal.timings["seconds"]) == {"preprocess", "source_prediction", "denoising", "diffusion",
                                            "selection", "source_on_selected", "fusion", "postprocess"}
    assert heal.extra["heal"]["stages"] == "heal" and heal.method == "heal"


def test_result_maps_candidates_scores_and_selection(runs, image):
    result = runs["heal"]
    assert result.geometry.matches(image.geometry)
    for name in ("entropy", "nig_variance"):
        assert result.maps[name].shape == image.array.shape and result.maps[name].dtype == np.float32
        assert np.isfinite(result.maps[name]).all()
    assert result.maps["nig_variance"].min() == 0.0 and result.maps["nig_variance"].max() == 1.0
    for name in ("pseudo_labels", "entropy_labels", "refined_labels", "selected_segmentation"):
        assert result.label_maps[name].shape == image.array.shape
    assert result.candidates.shape == (4, *image.array.shape)
    assert len(result.candidate_scores) == 4
    scores = result.candidate_scores
    assert result.selected_index == min(i for i, s in enumerate(scores) if s == max(scores))
    # the scores are the edge scores of exactly these candidates against exactly this Y*
    rescored = select_candidate(result.candidates, result.label_maps["refined_labels"], HEALConfig())
    assert rescored.scores == pytest.approx(scores, abs=1e-12)
    stats = {s["name"]: s for s in result.structure_stats}
    assert stats["organ"]["voxels"] == int((result.labels == 1).sum())
    assert "mean_nig_variance" in stats["organ"]


def test_same_seed_same_candidates_other_seed_differs(tiny_full_model, image):
    config = HEALConfig(candidates=2, steps=3, stages="hd+egs", seed=7)
    first = heal_adapt(image, tiny_full_model.checkpoint, config, CPU)
    again = heal_adapt(image, tiny_full_model.checkpoint, config, CPU)
    other = heal_adapt(image, tiny_full_model.checkpoint, replace(config, seed=8), CPU)
    np.testing.assert_array_equal(first.candidates, again.candidates)
    assert first.candidate_scores == again.candidate_scores
    assert not np.allclose(first.candidates, other.candidates)
    assert not np.allclose(first.candidates[0], first.candidates[1])  # the n draws differ


def _count_diffusion_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the input shape of every forward call of the diffusion networks HEAL builds."""
    shapes: list[tuple[int, ...]] = []
    original = SourceCheckpoint.build_diffusion_net

    def recording(self, device="cpu"):
        net = original(self, device)
        net.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
        return net
    monkeypatch.setattr(SourceCheckpoint, "build_diffusion_net", recording)
    return shapes


@pytest.mark.parametrize("sampler, steps, calls", [("ddpm", 999, TINY_TIMESTEPS), ("ddim", 5, 5)])
def test_sampler_runs_its_number_of_network_steps(tiny_full_model, image, monkeypatch, sampler, steps, calls):
    shapes = _count_diffusion_calls(monkeypatch)
    config = HEALConfig(candidates=2, sampler=sampler, steps=steps, candidate_batch=2, stages="heal")
    result = heal_adapt(image, tiny_full_model.checkpoint, config, CPU)
    assert len(shapes) == calls and all(s[0] == 2 for s in shapes)
    assert result.extra["heal"]["steps"] == calls and result.extra["heal"]["sampler"] == sampler
    assert result.candidates.shape == (2, *image.array.shape)
    assert np.isfinite(result.candidates).all()


def test_volume_with_a_2d_model_renders_slice_by_slice(tiny_full_model, monkeypatch):
    phantoms = make_phantom_set(2, TINY_SHAPE, seed=12, gap=0.2)
    empty = np.full(TINY_SHAPE, float(phantoms[0].target.array.min()), np.float32)
    array = np.stack([phantoms[0].target.array, empty, phantoms[1].target.array])
    volume = Volume(array, Geometry((3.0, 0.8, 0.8), (10.0, -4.0, 2.5)))
    kept = array.copy()
    shapes = _count_diffusion_calls(monkeypatch)
    events: list[ProgressEvent] = []
    result = heal_adapt(volume, tiny_full_model.checkpoint,
                        HEALConfig(candidates=2, steps=3, skip_empty_slices=False, stages="heal"),
                        CPU, ProgressReporter(events.append))
    # 2 candidates x 2 slices with a body, one batch of 2D slices per step
    assert len(shapes) == 3 and all(s[0] == 4 and len(s) == 4 for s in shapes)
    assert result.candidates.shape == (2, 3, *TINY_SHAPE)
    assert result.labels.shape == array.shape and result.geometry.matches(volume.geometry)
    for name in ("entropy", "nig_variance"):
        assert result.maps[name].shape == array.shape
    for name in ("refined_labels", "selected_segmentation"):
        assert result.label_maps[name].shape == array.shape
    assert np.ptp(result.candidates[:, 1]) == 0  # the slice without a body is background
    assert all(np.ptp(result.candidates[i, z]) > 0 for i in range(2) for z in (0, 2))
    assert not np.array_equal(result.candidates[:, 0], result.candidates[:, 2])
    diffusion = [e.fraction for e in events if e.stage == "diffusion"]
    assert diffusion and diffusion[-1] == pytest.approx(1.0) and diffusion == sorted(diffusion)
    np.testing.assert_array_equal(volume.array, kept)
    assert volume.array is array


@pytest.mark.parametrize("skip", [True, False])
def test_slices_with_empty_y_star_are_not_rendered_unless_asked(tiny_full_model, monkeypatch, skip):
    phantom = make_phantom_set(1, TINY_SHAPE, seed=12, gap=0.2)[0]
    body_only = render(np.zeros_like(phantom.labels.array), phantom.body, "target",
                       np.random.default_rng(5), gap=0.2)
    array = np.stack([phantom.target.array, body_only])
    volume = Volume(array, Geometry((3.0, 0.8, 0.8), (10.0, -4.0, 2.5)))
    shapes = _count_diffusion_calls(monkeypatch)
    result = heal_adapt(volume, tiny_full_model.checkpoint,
                        HEALConfig(candidates=2, steps=3, stages="hd+egs", denoise="paper", skip_empty_slices=skip), CPU)
    refined = result.label_maps["refined_labels"]
    assert refined[0].any() and not refined[1].any()  # the case this test is about
    rendered = 1 if skip else 2
    assert result.extra["rendered_slices"] == rendered
    assert all(s[0] == 2 * rendered for s in shapes)
    if skip:
        assert np.ptp(result.candidates[:, 1]) == 0
        assert not result.label_maps["selected_segmentation"][1].any()
    else:
        assert all(np.ptp(result.candidates[i, 1]) > 0 for i in range(2))


# --------------------------------------------------------------------------- bad input


def test_checkpoint_without_diffusion(tiny_full_model, image, runs):
    bare = replace(tiny_full_model.checkpoint, diffusion=None)
    for stages in ("hd+egs", "heal"):
        with pytest.raises(CheckpointError, match="--diffusion") as error:
            heal_adapt(image, bare, HEALConfig(stages=stages), CPU)
        assert "--stages hd" in str(error.value)
    denoised = heal_adapt(image, bare, HEALConfig(stages="hd", denoise="paper", seed=3), CPU)
    np.testing.assert_array_equal(denoised.labels, runs["hd"].labels)
    assert denoised.candidates is None


@pytest.mark.parametrize("change, words", [
    ({"candidates": 0}, ["candidates", "at least 1", "got 0"]),
    ({"candidates": -2}, ["candidates", "got -2"]),
    ({"steps": TINY_TIMESTEPS + 1}, ["T = 20", f"got {TINY_TIMESTEPS + 1}", "--steps"]),
    ({"steps": 0}, ["between 1", "got 0"]),
    ({"sampler": "euler"}, ["sampler", "euler", "ddpm"]),
    ({"stages": "full"}, ["stages", "full", "hd+egs"]),
])
def test_bad_settings_are_input_errors(tiny_full_model, image, change, words):
    with pytest.raises(InputError) as error:
        heal_adapt(image, tiny_full_model.checkpoint, replace(HEALConfig(stages="heal"), **change), CPU)
    for word in words:
        assert word in str(error.value)


def _oom_sampler(monkeypatch: pytest.MonkeyPatch, largest_ok: int) -> list[int]:
    """Make DDIM sampling raise a CUDA out-of-memory error for batches above ``largest_ok``;
    returns the batch sizes tried."""
    tried: list[int] = []
    original = DDIMSampler.sample

    def sample(self, model, cond, *args: Any, **kwargs: Any) -> torch.Tensor:
        tried.append(int(cond.shape[0]))
        if cond.shape[0] > largest_ok:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, model, cond, *args, **kwargs)
    monkeypatch.setattr(DDIMSampler, "sample", sample)
    return tried


def test_out_of_memory_retries_with_smaller_chunks(tiny_full_model, image, monkeypatch):
    tried = _oom_sampler(monkeypatch, largest_ok=1)
    config = HEALConfig(candidates=4, steps=3, candidate_batch=4, stages="heal")
    result = heal_adapt(image, tiny_full_model.checkpoint, config, CPU)
    assert tried == [4, 2, 1, 1, 1, 1]
    assert result.candidates.shape == (4, *image.array.shape) and np.isfinite(result.candidates).all()
    assert len(result.candidate_scores) == 4
    assert len({result.candidates[i].tobytes() for i in range(4)}) == 4  # four distinct draws


def test_out_of_memory_even_one_at_a_time_is_a_device_error(tiny_full_model, image, monkeypatch):
    tried = _oom_sampler(monkeypatch, largest_ok=0)
    with pytest.raises(DeviceError) as error:
        heal_adapt(image, tiny_full_model.checkpoint, HEALConfig(candidates=2, steps=3, candidate_batch=2, stages="heal"), CPU)
    message = str(error.value)
    assert tried == [2, 1]
    assert "Out of memory" in message and "candidate batch of one" in message and "'cpu'" in message
    assert isinstance(error.value.__cause__, torch.cuda.OutOfMemoryError)


def test_input_volume_is_not_modified(tiny_full_model, image):
    kept = image.array.copy()
    flags = image.array.flags.writeable
    heal_adapt(image, tiny_full_model.checkpoint, HEALConfig(candidates=2, steps=2, stages="heal"), CPU)
    np.testing.assert_array_equal(image.array, kept)
    assert image.array.dtype == kept.dtype and image.array.flags.writeable == flags
