"""The development benchmark's models: one 2D source model per modality and fold, trained on the
cases *outside* that fold, with its conditional diffusion model (source modalities) and its GMM
class prototypes, cached as ``<workdir>/models/fold<F>_<modality>.sfuda``.

A recipe is a set of training settings; the CPU recipe fits the 2-core budget (2 mm grid, a
small diffusion network, a few hundred iterations), the GPU recipe is the one to use when a GPU
is at hand (1 mm grid, the budgets of a real training run).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from brats_cases import CLASSES, Case

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import (DiffusionNetConfig, DiffusionTrainingConfig, GMMConfig, InputSpec,
                                    TrainingConfig)
from SFUDASegmentLib.gmm import fit_prototypes
from SFUDASegmentLib.training.segmentation import train_source

MODALITY_NAMES = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}


@dataclass(frozen=True)
class Recipe:
    """Training settings of every model of the benchmark.

    Attributes:
        spacing: isotropic grid (mm) the cases are loaded on.
        patch: 2D training patch (pixels).
        seg_epochs, seg_iterations, batch_size, lr: segmentation budget.
        diffusion_iterations, diffusion_batch, diffusion_lr: diffusion budget.
        diffusion_channels: diffusion U-Net width per level.
        diffusion_blocks: residual blocks per level.
        rho: confidence of the voxels the prototypes are fitted on.
    """

    spacing: Optional[float] = 2.0
    patch: int = 96
    seg_epochs: int = 8
    seg_iterations: int = 50
    batch_size: int = 8
    lr: float = 2e-3
    diffusion_iterations: int = 300
    diffusion_batch: int = 8
    diffusion_lr: float = 1e-3
    diffusion_channels: tuple[int, ...] = (16, 32, 32)
    diffusion_blocks: int = 1
    rho: float = 0.9


CPU_RECIPE = Recipe()
GPU_RECIPE = Recipe(spacing=None, patch=192, seg_epochs=40, seg_iterations=100, batch_size=16,
                    diffusion_iterations=20000, diffusion_batch=16, diffusion_lr=2e-4,
                    diffusion_channels=(64, 64, 128, 192, 256), diffusion_blocks=2, rho=0.97)


def model_path(workdir: Path, fold: int, modality: str) -> Path:
    """Where the fold's model of ``modality`` is cached."""
    return Path(workdir) / "models" / f"fold{fold}_{modality}.sfuda"


def train_model(cases: Sequence[Case], modality: str, recipe: Recipe, with_diffusion: bool,
                device: str, seed: int = 0) -> SourceCheckpoint:
    """Train the 2D segmentation model of ``modality`` on ``cases`` (and its diffusion model when
    ``with_diffusion``), then fit its class prototypes on the same cases.

    The training record (seconds per part) is stored in the checkpoint's provenance under
    ``benchmark``.
    """
    images = [c.scans[modality] for c in cases]
    labels = [c.labels for c in cases]
    spec = InputSpec(dims="2d", modality=MODALITY_NAMES[modality], patch_size=(recipe.patch, recipe.patch))
    widths = recipe.diffusion_channels
    diffusion_net = DiffusionNetConfig(
        spatial_dims=2, image_channels=1, cond_channels=len(CLASSES) + 2, base_channels=widths[0],
        channel_mults=tuple(w // widths[0] for w in widths), num_res_blocks=recipe.diffusion_blocks,
        groups=min(32, widths[0] // 2))
    start = time.perf_counter()
    outcome = train_source(
        images, labels, CLASSES, spec,
        TrainingConfig(epochs=recipe.seg_epochs, iterations_per_epoch=recipe.seg_iterations,
                       batch_size=recipe.batch_size, lr=recipe.lr, seed=seed, device=device),
        diffusion=DiffusionTrainingConfig(iterations=recipe.diffusion_iterations, batch_size=recipe.diffusion_batch,
                                          lr=recipe.diffusion_lr, seed=seed, device=device)
        if with_diffusion else None,
        diffusion_config=diffusion_net, case_names=[f"{c.name}/{modality}" for c in cases],
        data_description=f"BraTS 2018 {MODALITY_NAMES[modality]}, {len(cases)} cases (development benchmark)")
    trained = time.perf_counter()
    checkpoint = fit_prototypes(outcome.checkpoint, images, labels, GMMConfig(rho=recipe.rho, seed=seed),
                                device=device)
    checkpoint.provenance["benchmark"] = {"recipe": asdict(recipe), "train_seconds": trained - start,
                                          "prototype_seconds": time.perf_counter() - trained}
    return checkpoint


def load_or_train(workdir: Path, fold: int, modality: str, cases: Sequence[Case], recipe: Recipe,
                  with_diffusion: bool, device: str) -> SourceCheckpoint:
    """The cached model, or a newly trained one (then cached)."""
    path = model_path(workdir, fold, modality)
    if path.is_file():
        checkpoint = SourceCheckpoint.load(path)
        if not with_diffusion or checkpoint.diffusion is not None:
            return checkpoint
    checkpoint = train_model(cases, modality, recipe, with_diffusion, device, seed=fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path)
    return checkpoint
