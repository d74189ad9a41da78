"""Diffuse-UDA: Fourier transfer, deformation, pseudo-labels, ASCPlus, synthesis, pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from SFUDASegmentLib.checkpoint import DiffusionPart, SourceCheckpoint
from SFUDASegmentLib.config import (DiffusionNetConfig, InferenceConfig, InputSpec, LabelClass,
                                    ScheduleConfig, SegNetConfig)
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.data.io import read_image
from SFUDASegmentLib.data.labels import indices_to_values
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, make_phantom_set
from SFUDASegmentLib.diffuse_uda.ascplus import (ASCPlusConfig, cutmix, cutmix_masks, sigmoid_rampup,
                                                 train_ascplus, update_teacher)
from SFUDASegmentLib.diffuse_uda.deformation import (DeformationSettings, apply_deformation,
                                                     random_deformation_field, warp_labels)
from SFUDASegmentLib.diffuse_uda.fourier import (adaptive_beta, block_half_size, fourier_amplitude_transfer,
                                                 fourier_restyle_batch, histogram_distance,
                                                 low_frequency_mask)
from SFUDASegmentLib.diffuse_uda.pipeline import DiffuseUDAConfig, run_diffuse_uda
from SFUDASegmentLib.diffuse_uda.pseudo_labels import (ensemble_probabilities, largest_component_per_class,
                                                       refine_pseudo_labels)
from SFUDASegmentLib.diffuse_uda.synthesis import (LabelTemplate, read_synthetic_dataset,
                                                   synthesize_from_label_maps, synthesize_pairs,
                                                   write_synthetic_dataset)
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.nets.diffusion_unet import ConditionalDiffusionUNet
from SFUDASegmentLib.nets.unet import ResidualUNet
from SFUDASegmentLib.training.patch_sampler import TrainingCase
from SFUDASegmentLib.utils.progress import ProgressReporter
from tiny_models import single_thread  # noqa: F401

CLASSES = [LabelClass(1, "a"), LabelClass(2, "b")]
TINY_DIFFUSION = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4,
                      mid_attention=False)


# --------------------------------------------------------------------------- Fourier transfer


def _spectra(x: np.ndarray, dims: int) -> np.ndarray:
    return np.fft.rfftn(x, axes=tuple(range(-dims, 0)))


@pytest.mark.parametrize("shape", [(24, 30), (10, 12, 9)])
def test_fourier_transfer_swaps_exactly_the_block_and_keeps_the_phase(shape):
    rng = np.random.default_rng(0)
    source = rng.normal(size=(2, *shape))
    target = rng.normal(size=(2, *shape)) * 3 + 1
    source_copy, target_copy = source.copy(), target.copy()
    dims = len(shape)
    beta = 0.6
    out = fourier_amplitude_transfer(source, target, beta, spatial_dims=dims)
    assert isinstance(out, np.ndarray) and out.shape == source.shape and out.dtype == source.dtype
    np.testing.assert_array_equal(source, source_copy)
    np.testing.assert_array_equal(target, target_copy)

    b = int(math.floor(0.5 * beta * min(shape)))
    mask = low_frequency_mask(shape, b).numpy()
    assert mask.sum() > 1 and not mask.all()
    f_out, f_src, f_trg = _spectra(out, dims), _spectra(source, dims), _spectra(target, dims)
    np.testing.assert_allclose(np.abs(f_out)[:, mask], np.abs(f_trg)[:, mask], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.abs(f_out)[:, ~mask], np.abs(f_src)[:, ~mask], rtol=1e-9, atol=1e-9)
    # phase: the unit phasors agree wherever both amplitudes are clearly non-zero
    strong = (np.abs(f_out) > 1e-6) & (np.abs(f_src) > 1e-6)
    phasor_out = f_out[strong] / np.abs(f_out[strong])
    phasor_src = f_src[strong] / np.abs(f_src[strong])
    np.testing.assert_allclose(phasor_out, phasor_src, atol=1e-9)


def test_block_indices_are_the_symmetric_corners_of_the_unshifted_spectrum():
    # (8, 8) with beta 0.5: b = floor(0.5 * 0.5 * 8) = 2 -> frequencies -1, 0, 1 on the full axis
    # (indices 0, 1, 7) and 0, 1 on the halved last axis.
    assert block_half_size((8, 8), 0.5) == 2
    mask = low_frequency_mask((8, 8), 2).numpy()
    assert mask.shape == (8, 5)
    expected = np.zeros((8, 5), bool)
    expected[np.ix_([0, 1, 7], [0, 1])] = True
    np.testing.assert_array_equal(mask, expected)
    assert block_half_size((8, 8), 1.0) == 4
    with pytest.raises(InputError):
        block_half_size((8, 8), 1.5)


@pytest.mark.parametrize("shape", [(16, 16), (8, 10, 12)])
def test_fourier_beta_zero_is_the_identity_and_torch_input_works(shape):
    rng = np.random.default_rng(1)
    source = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    target = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    out = fourier_amplitude_transfer(source, target, 0.0)
    assert isinstance(out, torch.Tensor) and out is not source
    assert torch.equal(out, source)
    # a beta whose block is empty is the identity too (b = floor(0.5 * 0.1 * min(shape)) = 0)
    assert torch.equal(fourier_amplitude_transfer(source, target, 0.1), source)
    # the whole spectrum swapped (beta 1) on a target equal to the source changes nothing
    same = fourier_amplitude_transfer(source, source.clone(), 1.0)
    torch.testing.assert_close(same, source, atol=1e-5, rtol=1e-5)


def test_fourier_transfer_moves_the_mean_and_rejects_bad_input():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(32, 32))
    target = rng.normal(size=(32, 32)) + 5.0
    out = fourier_amplitude_transfer(source, target, 0.2)
    # the DC amplitude is the target's: |sum(out)| = |sum(target)|
    assert abs(out.sum()) == pytest.approx(abs(target.sum()), rel=1e-9)
    with pytest.raises(InputError):
        fourier_amplitude_transfer(source, target[:30], 0.2)
    with pytest.raises(InputError):
        fourier_amplitude_transfer(np.full((8, 8), np.nan), target[:8, :8], 0.2)


def test_histogram_distance_and_adaptive_beta_by_hand():
    source = np.array([0.0, 0.0, 1.0, 1.0])
    target = np.array([0.0, 1.0, 1.0, 1.0])
    # 2 bins over [0, 1]: h_s = (0.5, 0.5), h_t = (0.25, 0.75) -> d = 2 * 0.0625 = 0.125
    assert histogram_distance(source, target, bins=2) == pytest.approx(0.125)
    L = 0.125 / 1.125
    rng = np.random.default_rng(0)
    assert adaptive_beta(source, target, rng, factor_range=(1.0, 1.0), bins=2) == pytest.approx(L)
    # L * 0.5 = 0.056 is below the floor 0.1
    assert adaptive_beta(source, target, rng, factor_range=(0.5, 0.5), bins=2) == pytest.approx(0.1)
    a = np.random.default_rng(7).uniform(0.5, 1.5)
    assert adaptive_beta(source, target, np.random.default_rng(7), floor=0.0, bins=2) == pytest.approx(L * a)
    assert histogram_distance(source, source) == 0.0


def test_restyle_batch_uses_one_beta_per_pair():
    rng = np.random.default_rng(3)
    source = torch.from_numpy(rng.normal(size=(3, 2, 16, 16)))
    target = torch.from_numpy(rng.normal(size=(3, 2, 16, 16)))
    out = fourier_restyle_batch(source, target, rng, fixed_beta=0.5)
    for i in range(3):
        torch.testing.assert_close(out[i], fourier_amplitude_transfer(source[i], target[i], 0.5, spatial_dims=2))
    # a target of another intensity distribution: d > 0, beta >= 0.1, b = floor(0.5 * beta * 32) >= 1
    shifted = torch.from_numpy(rng.normal(size=(3, 2, 32, 32))) * 3 + 2
    small = torch.from_numpy(rng.normal(size=(3, 2, 32, 32)))
    adaptive = fourier_restyle_batch(small, shifted, np.random.default_rng(0))
    assert adaptive.shape == small.shape and not torch.equal(adaptive, small)


# --------------------------------------------------------------------------- deformation


IDENTITY = dict(rotation_deg=0.0, scale=(1.0, 1.0), shift=0.0, elastic_magnitude=0.0)


@pytest.mark.parametrize("shape", [(12, 15), (6, 8, 10)])
def test_identity_deformation_is_the_identity(shape):
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.normal(size=(2, 3, *shape)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, size=(2, *shape)))
    grid = random_deformation_field(shape, torch.Generator().manual_seed(0), batch=2, **IDENTITY)
    assert grid.shape == (2, *shape, len(shape))
    warped_image, warped_labels = apply_deformation(image, labels, grid)
    torch.testing.assert_close(warped_image, image, atol=1e-5, rtol=0)
    assert torch.equal(warped_labels, labels) and warped_labels.dtype == labels.dtype


def test_pure_shift_moves_every_point_by_one_constant_offset():
    grid = random_deformation_field((10, 12), torch.Generator().manual_seed(1), batch=3,
                                    rotation_deg=0.0, scale=(1.0, 1.0), shift=0.05, elastic_magnitude=0.0)
    identity = random_deformation_field((10, 12), torch.Generator(), batch=3, **IDENTITY)
    offset = grid - identity
    for b in range(3):
        per_item = offset[b].reshape(-1, 2)
        torch.testing.assert_close(per_item, per_item[:1].expand_as(per_item), atol=1e-6, rtol=0)
        assert per_item.abs().max() <= 0.05 + 1e-6


def test_deformation_is_seeded_and_labels_keep_their_values_and_alignment():
    shape = (16, 16, 16)
    z, y, x = np.meshgrid(*[np.arange(16)] * 3, indexing="ij")
    labels = np.zeros(shape, np.int64)
    labels[(z - 8) ** 2 + (y - 7) ** 2 + (x - 8) ** 2 < 30] = 5
    labels[(z - 8) ** 2 + (y - 7) ** 2 + (x - 8) ** 2 < 8] = 2
    labels_t = torch.from_numpy(labels)[None]
    grid = random_deformation_field(shape, torch.Generator().manual_seed(3))
    again = random_deformation_field(shape, torch.Generator().manual_seed(3))
    other = random_deformation_field(shape, torch.Generator().manual_seed(4))
    assert torch.equal(grid, again) and not torch.equal(grid, other)
    # an image that equals the label map, deformed with the same field, thresholds back onto the
    # deformed labels except at a thin rim of boundary voxels
    image = torch.from_numpy(labels == 5).float()[None, None]
    mask = torch.from_numpy(labels == 5)[None].long()
    warped_image, warped_mask = apply_deformation(image, mask, grid)
    agreement = ((warped_image[:, 0] > 0.5).long() == warped_mask).float().mean()
    assert agreement > 0.97
    assert not torch.equal(warped_mask, mask)  # the field does move things
    warped = warp_labels(labels_t, grid)
    assert set(np.unique(warped.numpy())) <= {0, 2, 5}
    body = warp_labels(torch.from_numpy(labels > 0)[None], grid)
    assert body.dtype == torch.bool


def test_deformation_settings_and_bad_arguments():
    assert DeformationSettings.for_dims(3).elastic_magnitude == 3.0
    assert DeformationSettings.for_dims(2).elastic_magnitude < 3.0
    with pytest.raises(InputError):
        random_deformation_field((4,), torch.Generator())
    with pytest.raises(InputError):
        random_deformation_field((8, 8), torch.Generator(), box=4)
    grid = random_deformation_field((8, 8), torch.Generator())
    with pytest.raises(InputError):
        apply_deformation(torch.zeros(1, 1, 8, 9), torch.zeros(1, 8, 9, dtype=torch.long), grid)


# --------------------------------------------------------------------------- pseudo-labels


def test_refine_pseudo_labels_by_hand():
    # 3 classes on a 1 x 8 strip
    probs = np.array([
        [[0.1, 0.1, 0.6, 0.9, 0.1, 0.2, 0.1, 0.1]],
        [[0.8, 0.9, 0.3, 0.05, 0.2, 0.75, 0.85, 0.1]],
        [[0.1, 0.0, 0.1, 0.05, 0.7, 0.05, 0.05, 0.8]],
    ])
    # arg-max: 1 1 0 0 2 1 1 2 ; confidence 0.72 rejects voxels 2 (0.6) and 4 (0.7);
    # class 1 has components {0, 1} and {5, 6}: equal size, the first (lowest label) is kept;
    # class 2 keeps only voxel 7.
    out = refine_pseudo_labels(probs, 0.72)
    np.testing.assert_array_equal(out, [[1, 1, 0, 0, 0, 0, 0, 2]])
    ignore = refine_pseudo_labels(probs, 0.72, fill_value=-1)
    np.testing.assert_array_equal(ignore, [[1, 1, -1, 0, -1, -1, -1, 2]])
    np.testing.assert_array_equal(refine_pseudo_labels(probs, 0.0), [[1, 1, 0, 0, 2, 0, 0, 0]])


def test_largest_component_per_class_face_connectivity():
    labels = np.zeros((5, 5), np.int64)
    labels[0:2, 0:2] = 1      # 4 voxels
    labels[3, 3] = 1          # 1 voxel (diagonal neighbours only: separate)
    labels[4, 4] = 1
    labels[0, 4] = 2
    out = largest_component_per_class(labels)
    expected = np.zeros((5, 5), np.int64)
    expected[0:2, 0:2] = 1
    expected[0, 4] = 2
    np.testing.assert_array_equal(out, expected)
    assert labels[3, 3] == 1  # input untouched


def test_ensemble_probabilities_is_the_mean_softmax():
    spec = InputSpec(dims="2d", patch_size=(16, 16))
    cfg = SegNetConfig(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8))
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(ResidualUNet.from_config(cfg).state_dict())
    image = np.random.default_rng(0).normal(size=(1, 1, 16, 16)).astype(np.float32)
    mean = ensemble_probabilities(states, cfg, image, spec, torch.device("cpu"), InferenceConfig(amp=False))
    manual = []
    for state in states:
        net = ResidualUNet.from_config(cfg).eval()
        net.load_state_dict(state)
        with torch.no_grad():
            manual.append(torch.softmax(net(torch.from_numpy(image[:, 0])[None]), 1)[0].numpy())
    expected = np.mean(manual, axis=0)[:, None]
    assert mean.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(mean, expected, atol=1e-5)


# --------------------------------------------------------------------------- ASCPlus


def test_ramp_update_and_cutmix_by_hand():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(150, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0

    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher.weight.copy_(torch.tensor([[3.0, -1.0]]))
    assert update_teacher(teacher, student, 0.99, 5) == pytest.approx(5 / 6)
    torch.testing.assert_close(teacher.weight, torch.tensor([[3 * 5 / 6 + 1 / 6, -5 / 6 + 2 / 6]]))
    assert update_teacher(teacher, student, 0.99, 0) == 0.0
    torch.testing.assert_close(teacher.weight, student.weight)
    assert update_teacher(teacher, student, 0.99, 10_000) == 0.99

    masks = cutmix_masks(3, (20, 20), np.random.default_rng(0), (0.25, 0.5))
    for m in masks:
        side = m[0].sum(0).max()  # box side (rows holding the box)
        assert 10 <= side <= 15  # round(sqrt(p) * 20) with p in [0.25, 0.5]
        assert m.sum() == m[0].sum(0).max() * m[0].sum(1).max()  # one rectangle
    values = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 20, 20)
    mixed = cutmix(values, masks)
    for i in range(3):
        expected = torch.where(masks[i, 0] > 0, float((i + 1) % 3), float(i))
        assert torch.equal(mixed[i, 0], expected)


def _phantom_cases(n: int, seed: int, shape=(32, 32)):
    phantoms = make_phantom_set(n, shape, seed, gap=0.8)
    source = [TrainingCase(p.source.array[None, None].astype(np.float32) * 4 - 2,
                           np.asarray(p.labels.array[None]).astype(np.int64), p.body[None], f"s{i}")
              for i, p in enumerate(phantoms)]
    target = [TrainingCase(p.target.array[None, None].astype(np.float32) * 4 - 2,
                           p.body[None].astype(np.int64), p.body[None], f"t{i}") for i, p in enumerate(phantoms)]
    return source, target


@pytest.mark.parametrize("fourier", [True, False])
def test_ascplus_changes_weights_and_the_teacher_is_the_ema(fourier):
    source, target = _phantom_cases(2, 0)
    spec = InputSpec(dims="2d", patch_size=(32, 32))
    cfg = SegNetConfig(spatial_dims=2, in_channels=1, out_channels=4, channels=(4, 8))
    config = ASCPlusConfig(iterations=2, batch_size=2, snapshots=2, snapshot_spacing=0.5, fourier=fourier,
                           device="cpu", seed=3)
    out = train_ascplus(source, target, spec, cfg, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        initial = ResidualUNet.from_config(cfg).state_dict()
    assert out.snapshot_iterations == [1, 2] and len(out.history) == 2
    s1, s2 = out.snapshots
    for name, value in out.student_state.items():
        assert torch.equal(value, s2[name])
    changed = [name for name in initial if not torch.equal(initial[name], out.student_state[name])]
    assert changed
    # update 0 copies the student (s1); update 1 uses a = min(1 - 1/2, 0.99) = 0.5
    for name in changed:
        torch.testing.assert_close(out.teacher_state[name], 0.5 * s1[name] + 0.5 * s2[name])
    first = out.history[0]
    assert first["weight"] == pytest.approx(config.consistency_weight * math.exp(-5))
    assert first["loss"] == pytest.approx(first["supervised"] + first["weight"] * first["consistency"], rel=1e-5)


# --------------------------------------------------------------------------- synthesis


def _tiny_part(dims: int, num_classes: int = 3) -> DiffusionPart:
    cfg = DiffusionNetConfig(spatial_dims=dims, image_channels=1, cond_channels=num_classes + 1, **TINY_DIFFUSION)
    torch.manual_seed(0)
    net = ConditionalDiffusionUNet.from_config(cfg)
    return DiffusionPart(cfg, ScheduleConfig(timesteps=10), net.state_dict(), 3.0)


def _template(shape, seed: int) -> LabelTemplate:
    """Two nested balls (classes 1 and 2) inside a larger body."""
    labels = np.zeros(shape, np.int64)
    centre = tuple(s // 2 for s in shape)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    labels[r2 < (min(shape) // 3) ** 2] = 1
    labels[r2 < (min(shape) // 6) ** 2] = 2
    body = r2 < (min(shape) // 2 - 1) ** 2
    return LabelTemplate(labels, body, f"t{seed}")


def test_synthesize_pairs_2d_and_3d():
    part = _tiny_part(2)
    templates = [_template((16, 16), 0), _template((16, 20), 1)]
    pairs = synthesize_pairs(part, templates, 5, deform=True, steps=2, seed=1, device="cpu", batch_size=2)
    assert len(pairs) == 5
    for i, pair in enumerate(pairs):
        assert pair.template == i % 2
        shape = templates[pair.template].labels.shape
        assert pair.image.shape == (1, *shape) and pair.image.dtype == np.float32
        assert pair.labels.shape == shape and pair.foreground.shape == shape
        assert set(np.unique(pair.labels)) <= {0, 1, 2}
        assert np.isfinite(pair.image).all() and np.abs(pair.image).max() <= 3.0 + 1e-5
    assert not np.array_equal(pairs[0].labels, pairs[2].labels)  # two deformations of one template
    again = synthesize_pairs(part, templates, 5, deform=True, steps=2, seed=1, device="cpu", batch_size=2)
    for a, b in zip(pairs, again):
        np.testing.assert_array_equal(a.image, b.image)
    plain = synthesize_pairs(part, templates[:1], 1, deform=False, steps=2, device="cpu")
    np.testing.assert_array_equal(plain[0].labels, templates[0].labels)

    pairs3 = synthesize_pairs(_tiny_part(3), [_template((8, 12, 12), 2)], 2, deform=True, steps=2,
                              device="cpu")
    assert pairs3[1].image.shape == (1, 8, 12, 12) and set(np.unique(pairs3[1].labels)) <= {0, 1, 2}
    with pytest.raises(InputError):
        synthesize_pairs(part, [_template((8, 12, 12), 2)], 1, device="cpu")
    with pytest.raises(InputError):
        synthesize_pairs(part, templates, 1, sampler="euler", device="cpu")


def test_write_synthetic_dataset_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    pairs = synthesize_pairs(_tiny_part(2), [_template((12, 14), 0)], 2, deform=False, steps=1, device="cpu")
    geometry = Geometry(spacing=(0.5, 0.7), origin=(3.0, -2.0))
    manifest = write_synthetic_dataset(pairs, geometry, tmp_path / "ds", CLASSES, {"note": "test"})
    data = json.loads(manifest.read_text())
    assert data["format"] == "sfuda-synthetic-dataset" and len(data["cases"]) == 2
    assert data["provenance"] == {"note": "test"}
    classes, cases = read_synthetic_dataset(manifest)
    assert [c.value for c in classes] == [1, 2]
    for pair, (image, labels, body) in zip(pairs, cases):
        assert image.geometry.matches(geometry) and labels.geometry.matches(geometry)
        np.testing.assert_allclose(image.array, pair.image[0], atol=1e-6)
        np.testing.assert_array_equal(labels.array, indices_to_values(pair.labels, CLASSES))
        np.testing.assert_array_equal(body.array.astype(bool), pair.foreground)
    # plain (image, labels) tuples on a 3D geometry become one-slice volumes
    geometry3 = Geometry(spacing=(2.0, 0.5, 0.5), origin=(1.0, 2.0, 3.0))
    tuples = [(rng.normal(size=(1, 6, 7)).astype(np.float32), np.ones((6, 7), np.int64) * 2)]
    manifest3 = write_synthetic_dataset(tuples, [geometry3], tmp_path / "ds3", CLASSES)
    _, cases3 = read_synthetic_dataset(manifest3)
    image3, labels3, body3 = cases3[0]
    assert image3.array.shape == (1, 6, 7) and image3.geometry.matches(geometry3) and body3 is None
    assert np.all(labels3.array == 2)
    with pytest.raises(InputError):
        write_synthetic_dataset(tuples, [geometry3, geometry3], tmp_path / "bad", CLASSES)


def test_synthesize_from_label_maps_writes_on_the_label_grid(tmp_path):
    part = _tiny_part(2)
    spec = InputSpec(dims="2d", patch_size=(16, 16))
    seg_cfg = SegNetConfig(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8))
    checkpoint = SourceCheckpoint(CLASSES, spec, seg_cfg, ResidualUNet.from_config(seg_cfg).state_dict(), part)
    geometry = Geometry(spacing=(3.0, 0.8, 0.8), origin=(5.0, 6.0, 7.0))
    values = indices_to_values(_template((16, 16), 0).labels, CLASSES)
    volume = np.zeros((3, 16, 16), np.uint8)
    volume[1] = values
    manifest = synthesize_from_label_maps(checkpoint, [Volume(volume, geometry)], 3, tmp_path / "syn",
                                          deform=False, steps=1, device="cpu")
    _, cases = read_synthetic_dataset(manifest)
    assert len(cases) == 3
    for image, labels, _ in cases:
        # the only slice with labels is slice 1: origin moved by one slice (3 mm along z)
        assert image.array.shape == (1, 16, 16)
        assert image.geometry.origin == pytest.approx((5.0, 6.0, 10.0))
        np.testing.assert_array_equal(labels.array[0], values)


# --------------------------------------------------------------------------- pipeline


def test_run_diffuse_uda_tiny_is_resumable_and_saves_a_checkpoint(tmp_path):
    phantoms = make_phantom_set(3, (32, 32), 11, gap=0.8)
    targets = make_phantom_set(2, (32, 32), 12, gap=0.8)
    spec = InputSpec(dims="2d", modality="phantom", patch_size=(32, 32))
    config = DiffuseUDAConfig(ascplus_iterations=2, diffusion_iterations=2, retrain_iterations=2,
                              retrain_epochs=1, batch_size=2, synthetic_scale=1.0, steps=2, timesteps=10,
                              diffusion_base_channels=8, diffusion_channel_mults=(1, 2),
                              diffusion_batch_size=2, seg_channels=(4, 8), checkpoints=2, device="cpu")
    events = []
    reporter = ProgressReporter(lambda e: events.append(e))
    args = ([p.source for p in phantoms], [p.labels for p in phantoms], [p.target for p in targets],
            PHANTOM_CLASSES, spec)
    first = run_diffuse_uda(*args, config, tmp_path / "work", reporter)
    assert first.stages == {s: "ran" for s in ("ascplus", "pseudo_labels", "diffusion", "synthesis", "retrain")}
    assert {e.stage for e in events} >= {"diffuse-uda", "ascplus", "diffusion-training", "synthesis", "training"}
    assert len(first.pseudo_labels) == 2 and first.pseudo_labels[0].shape == (1, 32, 32)
    manifest = json.loads(first.manifest_path.read_text())
    assert len(manifest["cases"]) == 3  # round(1.0 * 3 source slices)
    label = read_image(first.manifest_path.parent / manifest["cases"][0]["label"])
    assert label.geometry.matches(phantoms[0].labels.geometry)
    assert set(np.unique(label.array)) <= {0, 1, 2, 3}
    assert first.checkpoint.diffusion is not None and first.checkpoint.provenance["synthetic_pairs"] == 3
    saved = first.checkpoint.save(tmp_path / "model.sfuda")
    loaded = SourceCheckpoint.load(saved)
    for name, value in first.checkpoint.seg_state.items():
        assert torch.equal(loaded.seg_state[name], value)
    assert loaded.diffusion is not None and loaded.provenance["method"] == "diffuse-uda"

    events.clear()
    second = run_diffuse_uda(*args, config, tmp_path / "work", reporter)
    assert set(second.stages.values()) == {"loaded"}
    assert any(e.message == "stage ascplus: loaded" for e in events)
    assert not any(e.stage in ("ascplus", "training", "diffusion-training") for e in events)
    for name, value in first.checkpoint.seg_state.items():
        assert torch.equal(second.checkpoint.seg_state[name], value)

    # an ablation reuses the stages it shares: no synthesis -> stages 1-2 loaded, retraining runs
    ablation = run_diffuse_uda(*args, DiffuseUDAConfig(**{**config.__dict__, "synthetic_scale": 0.0}),
                               tmp_path / "work")
    assert ablation.stages == {"ascplus": "loaded", "pseudo_labels": "loaded", "diffusion": "disabled",
                               "synthesis": "disabled", "retrain": "ran"}
    assert ablation.checkpoint.diffusion is None and ablation.manifest_path is None
    with pytest.raises(InputError):
        run_diffuse_uda(args[0], args[1][:2], *args[2:], config)


@pytest.mark.parametrize("dims", ["3d", "2.5d"])
def test_run_diffuse_uda_on_volumes(dims):
    phantoms = make_phantom_set(2, (16, 16, 16), 21, gap=0.8)
    targets = make_phantom_set(1, (16, 16, 16), 22, gap=0.8)
    patch = (16, 16, 16) if dims == "3d" else (16, 16)
    spec = InputSpec(dims=dims, modality="phantom", patch_size=patch)
    config = DiffuseUDAConfig(ascplus_iterations=1, diffusion_iterations=1, retrain_iterations=1,
                              retrain_epochs=1, batch_size=2, synthetic_scale=0.5, steps=1, timesteps=5,
                              diffusion_base_channels=8, diffusion_channel_mults=(1, 2), restyled_copies=1,
                              diffusion_batch_size=2, seg_channels=(4, 8), checkpoints=1, device="cpu")
    outcome = run_diffuse_uda([p.source for p in phantoms], [p.labels for p in phantoms],
                              [p.target for p in targets], PHANTOM_CLASSES, spec, config)
    assert set(outcome.stages.values()) == {"ran"} and outcome.manifest_path is None
    assert outcome.pseudo_labels[0].shape == (16, 16, 16)
    # 3D: round(0.5 * 2 cases) = 1 synthetic volume; 2.5D: half the source slices holding body
    body_slices = sum(int(p.body.any(axis=(1, 2)).sum()) for p in phantoms)
    assert outcome.checkpoint.provenance["synthetic_pairs"] == (1 if dims == "3d" else round(0.5 * body_slices))
    assert outcome.checkpoint.provenance["restyled_cases"] == 2
    assert outcome.checkpoint.diffusion.net_config.spatial_dims == (3 if dims == "3d" else 2)
    outcome.checkpoint.validate()
