"""The ``*.sfuda`` checkpoint: round trip, model card, and every kind of bad file refused with a
message that names the problem (hostile pickle, corrupt, truncated, empty, foreign, future
version, inconsistent metadata, wrong-shape weights, missing)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import FORMAT_VERSION, SourceCheckpoint
from SFUDASegmentLib.config import InputSpec, LabelClass, SegNetConfig
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES
from SFUDASegmentLib.errors import CheckpointError
from SFUDASegmentLib.nets.unet import ResidualUNet
from tiny_models import file_digest, single_thread, untrained_checkpoint  # noqa: F401

SPEC = InputSpec(dims="3d", modality="T1c", patch_size=(16, 16, 16), target_spacing=(2.0, 1.0, 1.0))


class _Hostile:
    """Pickles to a call of ``os.system('touch <marker>')``: loading it with plain pickle runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[SourceCheckpoint, Path]:
    """A seeded random 3D checkpoint and the file it was saved to."""
    ckpt = untrained_checkpoint(SPEC, channels=(4, 8))
    ckpt.provenance = {"data": "phantoms", "validation_mean_dice": 0.5}
    return ckpt, ckpt.save(tmp_path / "model.sfuda")


def _payload(path: Path) -> dict:
    """The raw payload of a checkpoint file (read safely)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _refused(path: Path, *words: str) -> str:
    """Load ``path``, expect CheckpointError naming the file and ``words``; return the message."""
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint.load(path)
    message = str(info.value)
    assert path.name in message
    for word in words:
        assert word.lower() in message.lower(), f"'{word}' not in: {message}"
    return message


# --------------------------------------------------------------------------- round trip


def test_save_load_round_trip_keeps_weights_and_metadata(saved):
    ckpt, path = saved
    loaded = SourceCheckpoint.load(path)
    assert loaded.classes == ckpt.classes
    assert loaded.input_spec == ckpt.input_spec
    assert loaded.seg_config == ckpt.seg_config
    assert loaded.provenance == ckpt.provenance
    assert loaded.diffusion is None and loaded.prototypes is None
    assert set(loaded.seg_state) == set(ckpt.seg_state)
    for name, tensor in ckpt.seg_state.items():
        assert torch.equal(loaded.seg_state[name], tensor), name
    # the rebuilt network computes exactly what the original one does
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    original = ResidualUNet.from_config(ckpt.seg_config)
    original.load_state_dict(ckpt.seg_state)
    with torch.no_grad():
        assert torch.equal(loaded.build_segmentation_net("cpu")(x), original.eval()(x))
    # written atomically: no temporary file left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.sfuda"]


def test_describe_is_the_model_card(saved):
    ckpt, path = saved
    card = SourceCheckpoint.load(path).describe()
    assert card["format_version"] == FORMAT_VERSION
    assert card["dims"] == "3d" and card["modality"] == "T1c"
    assert [(c["value"], c["name"]) for c in card["classes"]] == [(c.value, c.name) for c in PHANTOM_CLASSES]
    assert card["classes"][0]["color"] == list(PHANTOM_CLASSES[0].color)
    assert card["input_spec"]["patch_size"] == (16, 16, 16)
    assert card["input_spec"]["target_spacing"] == (2.0, 1.0, 1.0)
    seg = card["segmentation_network"]
    assert seg["channels"] == (4, 8) and seg["out_channels"] == 4 and seg["spatial_dims"] == 3
    assert seg["parameters"] == sum(p.numel() for p in ResidualUNet.from_config(ckpt.seg_config).state_dict().values())
    assert card["diffusion_model"] is None and card["prototypes"] is None
    assert card["methods"] == ["none", "heal"] and card["heal_stages"] == ["hd"]  # denoising needs no diffusion
    assert card["provenance"]["data"] == "phantoms"
    json.dumps(card)  # JSON-friendly


def test_save_creates_missing_parent_folders_and_replaces_existing_file(saved, tmp_path):
    ckpt, path = saved
    nested = ckpt.save(tmp_path / "a" / "b" / "m.sfuda")
    assert nested.is_file()
    other = untrained_checkpoint(SPEC, channels=(4, 8), seed=1)
    other.save(path)
    reloaded = SourceCheckpoint.load(path)
    assert all(torch.equal(reloaded.seg_state[k], other.seg_state[k]) for k in other.seg_state)


# --------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw-pickle"])
def test_hostile_pickle_is_refused_without_running_code(tmp_path, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.sfuda"
    payload = {"format": "sfuda-checkpoint", "format_version": 1, "metadata": "{}",
               "provenance": _Hostile(marker)}
    if layout == "zip":
        torch.save(payload, path)
    elif layout == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    # the file really is hostile: plain unpickling would run the command
    assert not marker.exists()
    before = file_digest(path)
    message = _refused(path, "would run code", "posix.system", "trusted source")
    assert "weights_only=False" not in message  # never advise the unsafe workaround
    assert not marker.exists()
    assert file_digest(path) == before


def test_hostile_pickle_marker_is_created_by_plain_pickle(tmp_path):
    """Control: the crafted object does run its command under an unrestricted unpickler."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Hostile(marker)))
    assert marker.exists()


# --------------------------------------------------------------------------- damaged files


def test_random_bytes_are_corrupt_not_hostile(tmp_path):
    path = tmp_path / "noise.sfuda"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    message = _refused(path, "corrupt")
    assert "would run code" not in message


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_reported_as_truncated(saved, tmp_path, legacy):
    ckpt, path = saved
    if legacy:
        torch.save(_payload(path), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.sfuda"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "truncated or corrupt", "copy the file again")


def test_empty_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "empty.sfuda"
    path.write_bytes(b"")
    _refused(path, "empty", "0 bytes")


def test_missing_file_is_reported_as_not_found(tmp_path):
    _refused(tmp_path / "nowhere.sfuda", "not found", "train-source")


def test_plain_state_dict_is_not_our_format(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(ResidualUNet(2, 1, 2, (4, 8)).state_dict(), path)
    _refused(path, "not an SFUDASegment checkpoint", "state dict")


def test_future_format_version_is_refused(saved, tmp_path):
    _, path = saved
    payload = _payload(path)
    payload["format_version"] = FORMAT_VERSION + 1
    future = tmp_path / "future.sfuda"
    torch.save(payload, future)
    _refused(future, f"format version {FORMAT_VERSION + 1}", "update")


def test_metadata_class_count_must_match_the_weights(saved, tmp_path):
    _, path = saved
    payload = _payload(path)
    meta = json.loads(payload["metadata"])
    meta["classes"] = meta["classes"][:2]  # network predicts background + 3, list names 2
    payload["metadata"] = json.dumps(meta)
    edited = tmp_path / "fewer_classes.sfuda"
    torch.save(payload, edited)
    _refused(edited, "predicts 4 classes", "class list has 3")


def test_wrong_shape_weights_are_refused(saved, tmp_path):
    _, path = saved
    payload = _payload(path)
    name = next(k for k, v in payload["segmentation_state"].items() if v.ndim == 5)
    shape = list(payload["segmentation_state"][name].shape)
    shape[0] += 1
    payload["segmentation_state"][name] = torch.zeros(shape)
    edited = tmp_path / "wrong_shape.sfuda"
    torch.save(payload, edited)
    message = _refused(edited, "weights do not match")
    assert name in message


def test_missing_weights_are_refused(saved, tmp_path):
    _, path = saved
    payload = _payload(path)
    payload["segmentation_state"].pop(next(iter(payload["segmentation_state"])))
    edited = tmp_path / "missing_weight.sfuda"
    torch.save(payload, edited)
    _refused(edited, "weights do not match", "missing")


def test_damaged_metadata_is_refused(saved, tmp_path):
    _, path = saved
    payload = _payload(path)
    payload["metadata"] = payload["metadata"][:-10]  # cut JSON
    edited = tmp_path / "bad_meta.sfuda"
    torch.save(payload, edited)
    _refused(edited, "damaged metadata")


def test_input_channels_must_match_the_spec(tmp_path):
    spec = InputSpec(dims="2.5d", patch_size=(16, 16), context_slices=1)
    ckpt = untrained_checkpoint(InputSpec(dims="2d", patch_size=(16, 16)))  # 1 input channel
    ckpt.input_spec = spec  # 2.5D with one slice on each side needs 3
    path = tmp_path / "channels.sfuda"
    ckpt.save(path)
    _refused(path, "1 input channels", "needs 3")


def test_non_tensor_weights_are_refused(saved, tmp_path):
    _, path = saved
    payload = _payload(path)
    payload["segmentation_state"] = {"encoder.0.weight": [1.0, 2.0]}
    edited = tmp_path / "lists.sfuda"
    torch.save(payload, edited)
    _refused(edited, "not a dictionary of tensors")


def test_checkpoint_of_other_classes_loads_with_their_names(tmp_path):
    classes = [LabelClass(1, "necrosis"), LabelClass(2, "edema"), LabelClass(4, "enhancing")]
    ckpt = untrained_checkpoint(InputSpec(dims="2d", patch_size=(16, 16)), classes)
    loaded = SourceCheckpoint.load(ckpt.save(tmp_path / "brats.sfuda"))
    assert [(c.value, c.name) for c in loaded.classes] == [(1, "necrosis"), (2, "edema"), (4, "enhancing")]
    assert loaded.num_classes == 4
    assert isinstance(loaded.seg_config, SegNetConfig)


def test_saved_checkpoint_follows_the_umask_not_mkstemp_private_mode(tmp_path):
    checkpoint = untrained_checkpoint(InputSpec(dims="2d", patch_size=(32, 32)))
    previous = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path / "shared.sfuda")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
