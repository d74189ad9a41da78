"""Inference: the Gaussian-weighted sliding window and the slice-wise path against direct and
independent reference computations, labels-only memory, probability dtype, and results in the
input's exact geometry (anisotropic, oblique, shifted, resampled, 2D, RGB)."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import torch

from SFUDASegmentLib.config import InferenceConfig, InputSpec, LabelClass
from SFUDASegmentLib.data.geometry import Geometry, Volume
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.inference.preparation import prepare_input
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.inference.sliding_window import sliding_window_3d, slicewise_2d
from tiny_models import SignNet, dice, single_thread, tiny_model, untrained_checkpoint  # noqa: F401

CPU = torch.device("cpu")
PATCH = (8, 16, 16)


def _config(overlap: float = 0.5, batch: int = 3, dtype: str = "float32") -> InferenceConfig:
    return InferenceConfig(overlap=overlap, batch_size=batch, probabilities_dtype=dtype, device="cpu")


def _signed_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``(1, *shape)`` float32 values with ``|x| >= 0.05`` (no ties at the decision boundary)."""
    x = np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32)
    x[np.abs(x) < 0.05] = 0.1 * np.sign(x[np.abs(x) < 0.05] + 1e-9)
    return x


def _direct_labels(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Argmax of the model applied once to the whole image ``(C, *S)``."""
    with torch.no_grad():
        return model(torch.from_numpy(image)[None])[0].argmax(0).numpy()


class WindowMeanNet(torch.nn.Module):
    """Logits ``[-(x - m), x - m]`` with ``m`` the mean of the window: depends on the window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x[:, :1] - x[:, :1].mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        return torch.cat([-d, d], dim=1)


class ChannelSign(torch.nn.Module):
    """Two-class logits ``[-x_c, x_c]`` of input channel ``c`` (tests channel order)."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x[:, self.channel:self.channel + 1]
        return torch.cat([-xc, xc], dim=1)


def _reference_sliding_window(model: torch.nn.Module, image: np.ndarray, patch: tuple[int, ...],
                              overlap: float, sigma_scale: float = 0.125) -> np.ndarray:
    """Plain, unstreamed Gaussian-weighted sliding window: ``(K, *S)`` float64 probabilities.

    Edge-pads the image to at least the patch, slides windows with step
    ``round(p * (1 - overlap))`` plus one flush with the end, and averages the softmax weighted
    by a separable Gaussian (sigma = ``sigma_scale * p``, max 1, floored at 1e-3).
    """
    spatial = image.shape[1:]
    padded = np.pad(image, [(0, 0)] + [(0, max(0, p - s)) for s, p in zip(spatial, patch)], mode="edge")
    shape = padded.shape[1:]
    starts = []
    for n, p in zip(shape, patch):
        step = max(1, int(round(p * (1 - overlap))))
        axis = list(range(0, n - p + 1, step))
        if axis[-1] != n - p:
            axis.append(n - p)
        starts.append(axis)
    profiles = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (sigma_scale * p)) ** 2) for p in patch]
    weight = np.einsum("i,j,k->ijk", *profiles)
    weight = np.maximum(weight / weight.max(), 1e-3)
    acc, wsum = None, np.zeros(shape)
    for corner in itertools.product(*starts):
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(padded[(slice(None),) + window]))[None])
        probs = torch.softmax(logits.double(), 1)[0].numpy()
        if acc is None:
            acc = np.zeros((probs.shape[0], *shape))
        acc[(slice(None),) + window] += probs * weight
        wsum[window] += weight
    result = acc / wsum
    return result[(slice(None),) + tuple(slice(0, s) for s in spatial)]


# --------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("shape", [(20, 37, 29), (5, 7, 6), (8, 16, 16), (5, 40, 9), (9, 17, 33)])
@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_sliding_window_labels_equal_the_direct_result(shape, overlap):
    image = _signed_image(shape)
    model = SignNet(2)
    labels, probs = sliding_window_3d(model, image, PATCH, 2, _config(overlap), CPU, True)
    assert labels.shape == shape and probs.shape == (2, *shape) and probs.dtype == np.float32
    np.testing.assert_array_equal(labels, _direct_labels(model, image))
    expected = 1.0 / (1.0 + np.exp(-2.0 * image[0].astype(np.float64)))  # softmax([-x, x])[1]
    np.testing.assert_allclose(probs[1], expected, atol=2e-6)
    only_labels, none = sliding_window_3d(model, image, PATCH, 2, _config(overlap), CPU, False)
    assert none is None
    np.testing.assert_array_equal(only_labels, labels)


@pytest.mark.parametrize("shape, overlap", [((20, 37, 29), 0.5), ((13, 21, 40), 0.25), ((6, 20, 12), 0.5)])
def test_sliding_window_blends_windows_like_an_unstreamed_reference(shape, overlap):
    image = _signed_image(shape, seed=3)
    model = WindowMeanNet()
    labels, probs = sliding_window_3d(model, image, PATCH, 2, _config(overlap, batch=4), CPU, True)
    reference = _reference_sliding_window(model, image, PATCH, overlap)
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    decided = np.abs(reference[1] - 0.5) > 1e-4
    np.testing.assert_array_equal(labels[decided], reference.argmax(0)[decided])


@pytest.mark.parametrize("shape", [(7, 19, 23), (1, 16, 16), (3, 5, 6)])
def test_slicewise_2d_labels_equal_the_direct_result(shape):
    image = _signed_image(shape, seed=1)
    spec = InputSpec(dims="2d", patch_size=(16, 16))
    labels, probs = slicewise_2d(SignNet(3), image, spec, 3, _config(batch=3), CPU, True)
    assert labels.shape == shape and probs.shape == (3, *shape)
    np.testing.assert_array_equal(labels, _direct_labels(SignNet(3), image))
    single, single_probs = slicewise_2d(SignNet(3), image[:, 0], spec, 3, _config(), CPU, True)
    np.testing.assert_array_equal(single, labels[0])
    np.testing.assert_array_equal(single_probs, probs[:, 0])


@pytest.mark.parametrize("channel, offset", [(0, -1), (1, 0), (2, 1)])
def test_slicewise_2_5d_stacks_neighbouring_slices_in_order(channel, offset):
    """Channel c of a 2.5D input (context 1) is slice z + c - 1, replicated at the ends."""
    shape = (6, 11, 9)
    image = _signed_image(shape, seed=2)
    spec = InputSpec(dims="2.5d", patch_size=(16, 16), context_slices=1)
    labels, _ = slicewise_2d(ChannelSign(channel), image, spec, 2, _config(batch=4), CPU, False)
    source = np.clip(np.arange(shape[0]) + offset, 0, shape[0] - 1)
    np.testing.assert_array_equal(labels, (image[0, source] > 0).astype(np.uint8))


# --------------------------------------------------------------------------- memory


def _peak_numpy_bytes(fn) -> int:
    """Peak bytes traced by tracemalloc (numpy buffers included) while running ``fn``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_labels_only_never_holds_float32_probabilities_of_every_class(dims):
    k = 16
    shape = (40, 96, 96)
    full_map = k * int(np.prod(shape)) * 4  # bytes of a float32 (K, Z, Y, X) array
    spec = InputSpec(dims=dims, patch_size=(16, 32, 32) if dims == "3d" else (96, 96))
    classes = [LabelClass(v, f"class {v}") for v in range(1, k)]
    ckpt = untrained_checkpoint(spec, classes)
    body = np.zeros(shape, dtype=np.float32)
    body[4:-4, 10:-10, 10:-10] = 1.0
    volume = Volume(body * 100 + _signed_image(shape)[0] * 10, Geometry((2.0, 1.0, 1.0)))
    model = SignNet(k)
    config = InferenceConfig(device="cpu", batch_size=2)
    labels_peak = _peak_numpy_bytes(lambda: segment(ckpt, volume, config, "labels", model=model))
    probs_peak = _peak_numpy_bytes(lambda: segment(ckpt, volume, config, "probabilities", model=model))
    # control: the measurement sees the float16 probabilities when they are asked for
    assert probs_peak >= full_map // 2
    # any float32 (K, Z, Y, X) array alone would reach full_map (preprocessing uses ~0.45 of it)
    assert labels_peak < full_map, f"labels-only peak {labels_peak / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- results


def _oblique_geometry(spacing: tuple[float, ...]) -> Geometry:
    """Anisotropic spacing, a rotated direction and a non-zero origin."""
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    if len(spacing) == 2:
        return Geometry(spacing, (-7.25, 12.5), tuple(rz[:2, :2].ravel()))
    return Geometry(spacing, (-10.5, 33.25, 7.75), tuple((rz @ rx).ravel()))


def _two_level_volume(shape: tuple[int, ...], geometry: Geometry) -> tuple[Volume, np.ndarray]:
    """An ellipsoidal body on an exact zero background, 140 on one side of an oblique plane and
    60 on the other; returns the volume and its bright part (what a sign model finds)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g ** 2 for g in grids) < 0.8
    plane = sum(w * g for w, g in zip((0.3, 0.5, -0.4)[-len(shape):], grids)) > 0.05
    bright = body & plane
    image = np.where(bright, 140.0, np.where(body, 60.0, 0.0)).astype(np.float32)
    return Volume(image, geometry), bright


def test_probabilities_are_float16_by_default_and_float32_on_request():
    spec = InputSpec(dims="3d", patch_size=PATCH)
    ckpt = untrained_checkpoint(spec)
    volume, _ = _two_level_volume((10, 20, 18), Geometry((2.0, 1.0, 1.0)))
    default = segment(ckpt, volume, InferenceConfig(device="cpu"), "probabilities")
    assert default.probabilities.dtype == np.float16
    assert default.probabilities.shape == (4, 10, 20, 18)
    np.testing.assert_allclose(default.probabilities.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert default.maps["entropy"].shape == (10, 20, 18)
    wide = segment(ckpt, volume, InferenceConfig(device="cpu", probabilities_dtype="float32"), "probabilities")
    assert wide.probabilities.dtype == np.float32
    np.testing.assert_allclose(wide.probabilities, default.probabilities, atol=1e-3)
    np.testing.assert_array_equal(wide.labels, default.labels)
    labels_only = segment(ckpt, volume, InferenceConfig(device="cpu"), "labels")
    assert labels_only.probabilities is None and labels_only.maps == {}
    np.testing.assert_array_equal(labels_only.labels, default.labels)


def test_result_is_in_the_exact_input_geometry_and_label_values():
    geometry = _oblique_geometry((2.5, 0.7, 0.9))
    volume, bright = _two_level_volume((12, 21, 19), geometry)
    original = volume.array.copy()
    ckpt = untrained_checkpoint(InputSpec(dims="3d", patch_size=PATCH), [LabelClass(7, "blob")])
    result = segment(ckpt, volume, InferenceConfig(device="cpu"), "labels", model=SignNet(2))
    assert result.geometry == geometry
    assert result.labels.shape == volume.array.shape and result.labels.dtype == np.uint8
    expected = np.where(bright, 7, 0)
    np.testing.assert_array_equal(result.labels, expected)
    stats = result.structure_stats[0]
    assert stats["value"] == 7 and stats["voxels"] == int(bright.sum())
    assert stats["volume_ml"] == pytest.approx(stats["voxels"] * 2.5 * 0.7 * 0.9 / 1000)
    np.testing.assert_array_equal(volume.array, original)  # the input is never modified


@pytest.mark.parametrize("shape, spacing, target", [
    ((14, 30, 26), (3.0, 0.8, 1.1), (2.0, 1.6, 1.6)),
    ((40, 36), (0.5, 0.7), (1.0, 1.0)),
])
def test_target_spacing_resamples_and_maps_back_onto_the_input_grid(shape, spacing, target):
    geometry = _oblique_geometry(spacing)
    volume, bright = _two_level_volume(shape, geometry)
    dims = "3d" if len(shape) == 3 else "2d"
    spec = InputSpec(dims=dims, patch_size=PATCH if dims == "3d" else (16, 16), target_spacing=target)
    ckpt = untrained_checkpoint(spec, [LabelClass(3, "blob")])
    network_grid = prepare_input(volume, spec).image.shape[1:]
    assert network_grid[-2:] != shape[-2:]  # the resampling path really runs
    result = segment(ckpt, volume, InferenceConfig(device="cpu"), "probabilities", model=SignNet(2))
    assert result.geometry == geometry
    assert result.labels.shape == shape and result.probabilities.shape == (2, *shape)
    assert set(np.unique(result.labels)) == {0, 3}
    # only voxels at the resampled boundary may differ (a flip or shift would fail badly)
    assert dice(result.labels == 3, bright) > 0.9
    assert np.mean((result.labels == 3) == bright) > 0.95
    assert np.mean((result.labels == 3) == (result.probabilities[1] > 0.5)) > 0.95


def test_2d_image_with_the_tiny_model(tiny_model):
    phantom = tiny_model.held_out[1]
    result = segment(tiny_model.checkpoint, phantom.source, InferenceConfig(device="cpu"), "probabilities")
    assert result.labels.shape == phantom.source.array.shape
    assert result.geometry == phantom.source.geometry and result.geometry.ndim == 2
    assert result.probabilities.shape == (4, *phantom.source.array.shape)
    assert result.maps["entropy"].shape == phantom.source.array.shape
    assert "area_mm2" in result.structure_stats[0]
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}
    assert dice(result.labels == 1, phantom.labels.array == 1) > 0.8


def _rgb_frame() -> tuple[Volume, np.ndarray]:
    """An RGB endoscopy-like frame: R is 100 left / 200 right inside a disc, G and B textured."""
    y, x = np.mgrid[:40, :50]
    disc = (y - 20) ** 2 / 18 ** 2 + (x - 25) ** 2 / 22 ** 2 < 1
    right = disc & (x >= 25)
    rng = np.random.default_rng(5)
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    rgb[..., 0] = np.where(right, 200, 100) * disc
    rgb[..., 1] = (60 + rng.integers(0, 120, (40, 50))) * disc
    rgb[..., 2] = (60 + rng.integers(0, 120, (40, 50))) * disc
    return Volume(rgb, _oblique_geometry((0.3, 0.3))), right


def test_rgb_checkpoint_reads_channels_in_rgb_order():
    frame, right = _rgb_frame()
    original = frame.array.copy()
    ckpt = untrained_checkpoint(InputSpec(dims="2d", modality="endoscopy", image_channels=3,
                                          patch_size=(32, 32)), [LabelClass(1, "polyp")])
    result = segment(ckpt, frame, InferenceConfig(device="cpu"), "labels", model=ChannelSign(0))
    assert result.labels.shape == (40, 50) and result.geometry == frame.geometry
    np.testing.assert_array_equal(result.labels, right.astype(np.uint8))
    np.testing.assert_array_equal(frame.array, original)
    real_net = segment(ckpt, frame, InferenceConfig(device="cpu"), "probabilities")
    assert real_net.labels.shape == (40, 50) and real_net.probabilities.shape == (2, 40, 50)


def test_rgb_and_grey_mismatch_with_the_checkpoint_is_refused(tiny_model):
    frame, _ = _rgb_frame()
    with pytest.raises(InputError, match=r"3 channel\(s\).*expects 1"):
        segment(tiny_model.checkpoint, frame, InferenceConfig(device="cpu"), "labels")
    rgb_ckpt = untrained_checkpoint(InputSpec(dims="2d", image_channels=3, patch_size=(32, 32)))
    grey = tiny_model.held_out[0].source
    with pytest.raises(InputError, match=r"1 channel\(s\).*expects 3"):
        segment(rgb_ckpt, grey, InferenceConfig(device="cpu"), "labels")


def test_unknown_output_kind_is_refused(tiny_model):
    with pytest.raises(InputError, match="output must be one of"):
        segment(tiny_model.checkpoint, tiny_model.held_out[0].source, InferenceConfig(device="cpu"), "logits")
