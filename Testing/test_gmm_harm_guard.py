"""The guard against harmful GMM adaptation: its label-free signals by hand, and in gmm_adapt the
source segmentation kept (with a warning and the adapted labels aside) when the rule fires."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from SFUDASegmentLib.config import GMMConfig, InferenceConfig
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.gmm.adaptation import gmm_adapt
from SFUDASegmentLib.gmm.harm_guard import adaptation_signals, guard_fires, guard_message
from SFUDASegmentLib.inference.segment import segment
from tiny_models import single_thread, tiny_full_model  # noqa: F401

CPU = InferenceConfig(device="cpu")
FAST = GMMConfig(iterations=6, lr=1e-3, batch_voxels=512, prototype_samples=512, projections=50)


def test_signals_by_hand() -> None:
    source = np.zeros((1, 4, 4), np.int64)
    source[0, :2, :2] = 1          # 4 voxels of class 1
    source[0, 3, 3] = 2            # 1 voxel of class 2
    adapted = np.zeros_like(source)
    adapted[0, :2, :3] = 1         # 6 voxels of class 1, 4 of them shared
    body = np.ones(source.shape, bool)
    s = adaptation_signals(source, adapted, body, num_classes=3)
    # foregrounds: 5 and 6 voxels, 4 shared -> 8 / 11
    assert s["foreground_agreement"] == pytest.approx(8 / 11)
    # class 1: 2*4/(4+6) = 0.8; class 2: 0 shared of 1 + 0 -> 0
    assert s["class_agreement"] == pytest.approx(0.4)
    assert s["foreground_volume_log_ratio"] == pytest.approx(math.log(7 / 6))
    assert s["changed_share"] == pytest.approx(3 / 16)  # two new class-1 voxels, one lost class-2 voxel
    assert "entropy_before" not in s


def test_entropy_signals_and_identical_predictions() -> None:
    probs = np.full((2, 1, 2, 2), 0.5, np.float32)
    confident = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))]).astype(np.float32)
    labels = np.ones((1, 2, 2), np.int64)
    s = adaptation_signals(labels, labels, np.ones((1, 2, 2), bool), 2, probs, confident)
    assert s["foreground_agreement"] == 1.0 and s["changed_share"] == 0.0
    assert s["entropy_before"] == pytest.approx(1.0) and s["entropy_after"] == pytest.approx(0.0, abs=1e-5)
    assert s["entropy_drop"] == pytest.approx(1.0, abs=1e-5)


def test_rule_and_message() -> None:
    signals = {"foreground_agreement": 0.42}
    assert guard_fires(signals, 0.5) and not guard_fires(signals, 0.4) and not guard_fires(signals, 0.0)
    assert "0.42" in guard_message(signals, 0.5) and "gmm_adapted_labels" in guard_message(signals, 0.5)


def test_guard_keeps_the_source_segmentation_when_it_fires(tiny_full_model) -> None:
    checkpoint = tiny_full_model.checkpoint
    image = tiny_full_model.held_out[0][0]
    off = gmm_adapt(image, checkpoint, FAST, CPU)[0][0]
    assert off.extra["guard"]["fired"] is False and off.extra["warnings"] == []
    assert 0.0 <= off.extra["guard"]["signals"]["foreground_agreement"] <= 1.0
    # A threshold above any agreement forces the guard: the result is the source segmentation.
    on = gmm_adapt(image, checkpoint, replace(FAST, guard_agreement=1.0), CPU)[0][0]
    source = segment(checkpoint, image, CPU, "probabilities")
    assert off.extra["guard"]["signals"]["foreground_agreement"] < 1.0  # the adaptation changed something
    assert not np.array_equal(off.labels, source.labels)
    assert on.extra["guard"]["fired"] is True and on.extra["guard"]["kept"] == "source"
    np.testing.assert_array_equal(on.labels, source.labels)
    np.testing.assert_array_equal(on.label_maps["gmm_adapted_labels"], off.labels)
    assert on.extra["warnings"] == [guard_message(on.extra["guard"]["signals"], 1.0)]
    assert on.extra["guard"]["signals"] == off.extra["guard"]["signals"]


def test_threshold_outside_zero_one_is_refused(tiny_full_model) -> None:
    with pytest.raises(InputError, match="agreement"):
        gmm_adapt(tiny_full_model.held_out[0][0], tiny_full_model.checkpoint, replace(FAST, guard_agreement=1.5), CPU)
