"""Tiny models, checkpoints and hand-made networks shared by the training, inference, checkpoint,
CLI and bad-input tests.

Import the fixtures into a test module with::

    from tiny_models import single_thread, tiny_model  # noqa: F401

``tiny_model`` trains one small 2D source model on 48x48 source phantoms once per test session
(a few seconds on one CPU thread) and saves it as a ``*.sfuda`` file. ``tiny_full_model`` is a
two-class model with a tiny diffusion model and GMM prototypes (HEAL, GMM, CLI and demo tests).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import DiffusionPart, SourceCheckpoint
from SFUDASegmentLib.config import (DiffusionNetConfig, DiffusionTrainingConfig, GMMConfig, InputSpec,
                                    LabelClass, ScheduleConfig, SegNetConfig, TrainingConfig)
from SFUDASegmentLib.data.geometry import Volume
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, Phantom, make_phantom_set
from SFUDASegmentLib.diffusion.training import image_to_unit_range, train_diffusion
from SFUDASegmentLib.gmm.fitting import fit_prototypes
from SFUDASegmentLib.inference.preparation import prepare_training_case
from SFUDASegmentLib.nets.unet import ResidualUNet
from SFUDASegmentLib.training.segmentation import TrainingOutcome, default_seg_config, train_source

TINY_SHAPE = (48, 48)
TINY_CHANNELS = (8, 16, 32)
TINY_GAP = 0.5
"""Domain gap of the held-out target phantoms (the lead measured ~25 Dice points lost at 0.3)."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed block with one PyTorch CPU thread, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Module-wide: one PyTorch CPU thread (the test machine's two cores are shared)."""
    with one_thread():
        yield


@dataclass
class TinyModel:
    """A tiny trained 2D source model and the data around it.

    Attributes:
        outcome: what ``train_source`` returned.
        path: the checkpoint saved as a ``*.sfuda`` file (do not modify it in tests).
        held_out: phantoms never seen in training, ``(48, 48)``, target rendered at ``TINY_GAP``.
        train: the training phantoms.
    """

    outcome: TrainingOutcome
    path: Path
    held_out: list[Phantom]
    train: list[Phantom]

    @property
    def checkpoint(self) -> SourceCheckpoint:
        """The trained source checkpoint (best validation weights)."""
        return self.outcome.checkpoint


def tiny_spec_2d(patch: tuple[int, int] = TINY_SHAPE) -> InputSpec:
    """The 2D input spec of the tiny models."""
    return InputSpec(dims="2d", modality="source-T1c", patch_size=patch)


def tiny_training_config(epochs: int = 4, iterations: int = 20, seed: int = 0) -> TrainingConfig:
    """A few dozen CPU iterations with a batch of four."""
    return TrainingConfig(epochs=epochs, iterations_per_epoch=iterations, batch_size=4, lr=3e-3,
                          seed=seed, device="cpu")


_TINY_MODEL: list[TinyModel] = []
"""The trained tiny model of this session: each test module that imports the fixture gets its
own fixture definition, so the model itself is cached here, in the shared module."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Train the tiny 2D model once per session (one CPU thread) and save its checkpoint."""
    if not _TINY_MODEL:
        train = make_phantom_set(6, TINY_SHAPE, seed=11)
        held_out = make_phantom_set(4, TINY_SHAPE, seed=12, gap=TINY_GAP)
        spec = tiny_spec_2d()
        with one_thread():
            outcome = train_source([p.source for p in train], [p.labels for p in train],
                                   list(PHANTOM_CLASSES), spec, tiny_training_config(),
                                   default_seg_config(spec, 1 + len(PHANTOM_CLASSES), TINY_CHANNELS))
        path = outcome.checkpoint.save(tmp_path_factory.mktemp("tiny_model") / "tiny.sfuda")
        _TINY_MODEL.append(TinyModel(outcome, path, held_out, train))
    return _TINY_MODEL[0]


def untrained_checkpoint(spec: InputSpec, classes: list[LabelClass] | None = None,
                         channels: tuple[int, ...] = (4, 8), seed: int = 0) -> SourceCheckpoint:
    """A valid checkpoint with seeded random weights (for geometry, format and dims tests)."""
    classes = list(classes or PHANTOM_CLASSES)
    config = SegNetConfig(spatial_dims=spec.spatial_dims, in_channels=spec.network_channels,
                          out_channels=1 + len(classes), channels=channels)
    torch.manual_seed(seed)
    net = ResidualUNet.from_config(config)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return SourceCheckpoint(classes, spec, config, state, provenance={"data": "untrained test model"})


class SignNet(torch.nn.Module):
    """A hand-made "network" whose logits are a fixed voxel-wise function of its input.

    ``(B, C, *S) -> (B, K, *S)`` with logits ``k * x0`` for class k (x0 = first channel): class
    K-1 wins where ``x0 > 0``, class 0 where ``x0 < 0``. With two classes this is
    ``stack([-x, x])`` up to a shift, so the softmax is ``sigmoid(2 x)`` for class 1.
    """

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x[:, :1]
        if self.classes == 2:
            return torch.cat([-x0, x0], dim=1)
        scale = torch.arange(self.classes, dtype=x.dtype, device=x.device) - (self.classes - 1) / 2
        return x0 * scale.view(1, -1, *([1] * (x.ndim - 2)))


def run_sfuda(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``sfuda --progress none ARGV`` in this process: exit code, stdout, stderr."""
    from SFUDASegmentLib import cli

    code = cli.main(["--progress", "none", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (to check that inputs are never modified)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> digest of every file under ``folder`` ({} when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (independent of ``metrics``)."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, ref).sum()) / total


# --------------------------------------------------------------------------- HEAL + GMM model

TWO_CLASSES = list(PHANTOM_CLASSES[:2])
"""organ and vessel: the phantoms' lesions (3-6 pixels at 48x48) are too small for a tiny model
to predict, and GMM prototypes need confident, correct voxels of every class."""

TINY_TIMESTEPS = 20
"""T of the tiny diffusion model (every DDIM step count must be <= T)."""


def merge_lesion(labels: Volume) -> Volume:
    """A phantom label map with the lesion (3) counted as organ (1): values 0, 1, 2."""
    array = np.asarray(labels.array).copy()
    array[array == PHANTOM_CLASSES[2].value] = PHANTOM_CLASSES[0].value
    return labels.like(array)


def tiny_diffusion_config(num_classes: int) -> DiffusionNetConfig:
    """Base 8, multipliers (1, 2), one residual block a level, GroupNorm 4, 2D."""
    return DiffusionNetConfig(spatial_dims=2, image_channels=1, cond_channels=num_classes + 1,
                              base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4)


@dataclass
class TinyFullModel:
    """A tiny 2D source model (organ, vessel) with a diffusion model (T = 20) and GMM
    prototypes (rho = 0.5), and the data around it.

    Attributes:
        checkpoint: the full checkpoint (do not modify it in tests).
        path: it, saved as a ``*.sfuda`` file (do not modify the file in tests).
        train_images, train_labels: the source cases (48x48, labels 0/1/2).
        held_out: ``(image, labels)`` target-modality cases at ``TINY_GAP``, never trained on.
    """

    checkpoint: SourceCheckpoint
    path: Path
    train_images: list[Volume]
    train_labels: list[Volume]
    held_out: list[tuple[Volume, Volume]]


_TINY_FULL: list[TinyFullModel] = []


def build_tiny_full_model(folder: Path) -> TinyFullModel:
    """Train the segmentation net (80 iterations), the diffusion net (40 iterations on whole
    48x48 images) and fit the prototypes; one CPU thread, about 10 s."""
    phantoms = make_phantom_set(6, TINY_SHAPE, seed=11)
    images = [p.source for p in phantoms]
    labels = [merge_lesion(p.labels) for p in phantoms]
    held_out = [(p.target, merge_lesion(p.labels)) for p in make_phantom_set(3, TINY_SHAPE, seed=12, gap=TINY_GAP)]
    spec = tiny_spec_2d()
    with one_thread():
        outcome = train_source(images, labels, TWO_CLASSES, spec, tiny_training_config(),
                               default_seg_config(spec, 1 + len(TWO_CLASSES), TINY_CHANNELS))
        checkpoint = outcome.checkpoint
        cases = [prepare_training_case(i, l, TWO_CLASSES, spec, f"case {n}")
                 for n, (i, l) in enumerate(zip(images, labels))]
        samples = [(image_to_unit_range(c.image[:, 0], 3.0), c.labels[0], c.foreground[0]) for c in cases]
        trained = train_diffusion(samples, tiny_diffusion_config(checkpoint.num_classes),
                                  ScheduleConfig(timesteps=TINY_TIMESTEPS),
                                  DiffusionTrainingConfig(iterations=40, batch_size=4, lr=1e-3, device="cpu"))
        checkpoint = replace(checkpoint, diffusion=DiffusionPart(trained.net_config, trained.schedule_config,
                                                                 trained.ema_state_dict, 3.0))
        checkpoint = fit_prototypes(checkpoint, images, labels, GMMConfig(rho=0.5), device="cpu")
    path = checkpoint.save(folder / "tiny_full.sfuda")
    return TinyFullModel(checkpoint, path, images, labels, held_out)


@pytest.fixture(scope="session")
def tiny_full_model(tmp_path_factory: pytest.TempPathFactory) -> TinyFullModel:
    """The tiny full model, built once per test session."""
    if not _TINY_FULL:
        _TINY_FULL.append(build_tiny_full_model(tmp_path_factory.mktemp("tiny_full_model")))
    return _TINY_FULL[0]
