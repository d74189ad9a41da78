"""Every tunable parameter of the library, as dataclasses with the papers' defaults.

Where a paper and its public code disagree (see the project's RESEARCH notes) the field's
docstring says which one the default follows and the other is one setting away.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from .errors import InputError

DIMS = ("2d", "2.5d", "3d")


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass ``cls`` from ``data``, ignoring unknown keys, lists to tuples."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)


@dataclass(frozen=True)
class LabelClass:
    """One foreground class: its label value in label files, its name and RGB colour (0-1)."""

    value: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)


DEFAULT_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.30, 0.25), (0.30, 0.70, 0.35), (0.95, 0.80, 0.20), (0.25, 0.50, 0.90),
    (0.80, 0.40, 0.85), (0.20, 0.80, 0.80), (0.95, 0.55, 0.15), (0.60, 0.60, 0.60))


def parse_labels(spec: str) -> list[LabelClass]:
    """Parse ``"1:necrosis,2:edema,4:enhancing"`` into :class:`LabelClass` objects.

    Raises:
        InputError: malformed entries, value 0 (reserved for background) or duplicates.
    """
    classes: list[LabelClass] = []
    for i, item in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        value, sep, name = item.partition(":")
        try:
            v = int(value)
        except ValueError:
            v = -1
        if not sep or not name.strip() or v <= 0:
            raise InputError(
                f"Bad label entry '{item}' in '{spec}'. Write 'value:name' pairs with positive "
                "integer values separated by commas, e.g. '1:necrosis,2:edema,4:enhancing' "
                "(0 is the background and is implicit).")
        classes.append(LabelClass(v, name.strip(), DEFAULT_COLORS[i % len(DEFAULT_COLORS)]))
    if not classes:
        raise InputError("No labels given. Example: --labels '1:necrosis,2:edema,4:enhancing'.")
    values = [c.value for c in classes]
    if len(set(values)) != len(values):
        raise InputError(f"Duplicate label values in '{spec}'.")
    return classes


@dataclass(frozen=True)
class InputSpec:
    """What the network expects as input.

    Attributes:
        dims: ``"2d"`` (slice-wise, or a true 2D image), ``"2.5d"`` (2D net, neighbouring slices
            as channels) or ``"3d"`` (3D net, sliding window).
        modality: free-text modality name, e.g. ``"T1c"``, ``"CT"``, ``"endoscopy"``.
        image_channels: 1 for grey scans, 3 for RGB endoscopy frames.
        context_slices: 2.5D only: slices taken on each side of the centre slice.
        target_spacing: spacing (per array axis, mm) the network was trained at; None keeps
            the input's spacing.
        patch_size: training patch / inference window, per spatial axis of the network.
        clip_percentiles: intensity clipping inside the foreground before z-scoring.
    """

    dims: str = "3d"
    modality: str = "MR"
    image_channels: int = 1
    context_slices: int = 1
    target_spacing: Optional[tuple[float, ...]] = None
    patch_size: tuple[int, ...] = (64, 64, 64)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.dims not in DIMS:
            raise InputError(f"dims must be one of {DIMS}, got '{self.dims}'.")

    @property
    def spatial_dims(self) -> int:
        """2 for the 2D/2.5D networks, 3 for the 3D network."""
        return 3 if self.dims == "3d" else 2

    @property
    def network_channels(self) -> int:
        """Input channels of the segmentation network."""
        if self.dims == "2.5d":
            return self.image_channels * (2 * self.context_slices + 1)
        return self.image_channels

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class SegNetConfig:
    """Residual U-Net (MONAI-style). ``channels[i]`` is the width of level i."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegNetConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class DiffusionNetConfig:
    """Conditional noise-prediction U-Net (Med-DDPM / guided-diffusion style).

    Med-DDPM: base 64, multipliers (1, 1, 2, 3, 4), 2 residual blocks a level, GroupNorm 32,
    attention only in the middle. ``cond_channels`` = one-hot classes (background included)
    + 1 foreground (body) channel.
    """

    spatial_dims: int = 3
    image_channels: int = 1
    cond_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    groups: int = 32
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionNetConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule: cosine (Nichol & Dhariwal, s = 0.008) over T = 250 steps (Med-DDPM)."""

    kind: str = "cosine"
    timesteps: int = 250
    cosine_s: float = 0.008

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScheduleConfig":
        return _from_dict(cls, data)


@dataclass
class TrainingConfig:
    """Source segmentation training.

    Attributes:
        epochs / iterations_per_epoch / batch_size: the budget; batch_size is the global batch
            (under ``torchrun`` it is split evenly over the processes).
        lr, weight_decay, optimizer (``adamw`` | ``adam``), schedule (``poly`` | ``cosine``).
        foreground_oversample: share of patches centred on a foreground voxel.
        val_fraction: share of the cases held out for validation (none with a single case: then
            the validation runs on the training case and the outcome says so).
        validation_interval: validate every this many epochs (and always after the last one).
        validation_samples: slices (2D, 2.5D) or windows (3D) of the validation cases in the
            fixed validation sample drawn once per run; 0 validates on whole cases.
        augment: flips, intensity scale/shift and small affine (rotation, scale), drawn per
            sample.
        amp: mixed precision on GPU.
        device: ``auto`` | ``cpu`` | ``cuda``.
    """

    epochs: int = 20
    iterations_per_epoch: int = 50
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "poly"
    foreground_oversample: float = 0.5
    val_fraction: float = 0.2
    validation_interval: int = 1
    validation_samples: int = 32
    augment: bool = True
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0


@dataclass
class DiffusionTrainingConfig:
    """Conditional diffusion training (Med-DDPM: Adam 1e-5, batch 1, EMA 0.995, L1 loss).

    The defaults here are for small CPU runs; the paper's values are in the docstring.
    """

    iterations: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    ema_decay: float = 0.995
    loss: str = "l1"
    amp: bool = True
    seed: int = 0
    device: str = "auto"


@dataclass
class InferenceConfig:
    """Sliding-window / slice-wise inference.

    Attributes:
        overlap: window overlap fraction (3D).
        batch_size: windows or slices per forward pass.
        gaussian_sigma_scale: sigma of the Gaussian window weight as a fraction of the patch.
        probabilities_dtype: ``float16`` (default; halves memory) or ``float32``.
        amp: mixed precision on GPU.
    """

    overlap: float = 0.5
    batch_size: int = 4
    gaussian_sigma_scale: float = 0.125
    probabilities_dtype: str = "float16"
    amp: bool = True
    device: str = "auto"


@dataclass
class HEALConfig:
    """HEAL (learning-free SFUDA). Defaults: paper (tau1 = tau2 = 0.2, n = 6) and its code's
    NIG constants.

    Attributes:
        tau1: entropy threshold; voxels with H > tau1 become background.
        entropy_base: 2 (paper) or e (public code).
        tau2: threshold on the min-max normalised NIG variance.
        kappa, eps, zeta1, zeta2, eta1, eta2: NIG parameter constants (public code).
        alpha_floor: alpha is held at or above this value (> 1 keeps the variance finite).
        regional_entropy: ``"mean"`` (paper: mean of H over the 3x3(x3) neighbourhood) or
            ``"histogram"`` (code: entropy of the 10-bin histogram of Y_ent in each window).
        normalize_regional: divide E by its largest possible value (``log K``) so that it lies
            in [0, 1], as the NIG formulas assume (``beta = zeta1 (1 - E) + zeta2`` must stay
            positive). Binary tasks (the paper's and the code's) are unchanged; with more
            classes E reaches ``log2 K`` > 1 and, unnormalised, turns beta and the variance
            negative, which shifts the min-max normalisation so that even confident voxels fail
            ``tau2``.
        candidates: n, the number of diffusion samples.
        sampler: ``"ddpm"`` (ancestral over all T steps, the paper) or ``"ddim"``.
        steps: DDIM steps (ignored by DDPM).
        ddim_eta: DDIM stochasticity (0 = deterministic).
        candidate_batch: candidates per forward pass (halved on out-of-memory).
        skip_empty_slices: 2D model on a volume: do not render slices whose Y* has no
            foreground (they add nothing to S_i; M_S(I_B) is background there). False renders
            every slice with body, as a literal reading of the paper would.
        canny_low, canny_high: hysteresis thresholds as fractions of the [0, 1] range.
        canny_sigma: Gaussian smoothing before Canny (pixels); 0 disables it.
        edge_tolerance: r, dilation (voxels) of the condition's edges; 0 is the paper.
        stages: ``"hd"`` (denoising only; the default), ``"hd+egs"`` (+ edge-guided selection,
            the selected sample segmented by the source model) or ``"heal"`` (the paper's full
            pipeline, with size-aware fusion). On the real-BraTS benchmark (README) the diffusion
            stages lost to ``"hd"`` in every direction.
        denoise: ``"components"`` (the default; boundary-preserving: the connected components of
            ``Y_T`` that hold a marker voxel are kept whole; see
            ``heal/component_reconstruction.py``) or ``"paper"`` (the denoised labels are ``Y*``,
            the voxels the NIG stage keeps, as the paper and its code; on real BraTS scans it
            erased nearly all of the tumour, see the README).
        component_markers: ``"entropy"`` (``Y_ent``, the conservative marker) or ``"nig"``
            (``Y*``) as the markers of ``"components"``.
        component_grouping: ``"class"`` (components per class) or ``"foreground"`` (components
            of the whole foreground, e.g. the whole tumour).
        orphan_classes: ``"keep"`` or ``"drop"``: what ``"components"`` does with a class that
            has no marker voxel anywhere (see ``heal/component_reconstruction.py``).
        seed: sampling seed.
        amp: mixed precision on GPU.
        candidate_spread: also segment all n candidates with the source model (n more
            source inferences) and return the spread of those segmentations as the map
            ``candidate_spread`` (``uncertainty/candidate_spread.py``); needs the diffusion
            stages.
    """

    tau1: float = 0.2
    entropy_base: float = 2.0
    tau2: float = 0.2
    kappa: float = 0.1
    eps: float = 1e-3
    zeta1: float = 0.8
    zeta2: float = 0.01
    eta1: float = 0.5
    eta2: float = 0.01
    alpha_floor: float = 1.01
    regional_entropy: str = "mean"
    normalize_regional: bool = True
    candidates: int = 6
    sampler: str = "ddim"
    steps: int = 50
    ddim_eta: float = 0.0
    candidate_batch: int = 6
    skip_empty_slices: bool = True
    canny_low: float = 0.1
    canny_high: float = 0.2
    canny_sigma: float = 1.0
    edge_tolerance: int = 0
    stages: str = "hd"
    denoise: str = "components"
    component_markers: str = "entropy"
    component_grouping: str = "class"
    orphan_classes: str = "keep"
    seed: int = 0
    amp: bool = True
    candidate_spread: bool = False


@dataclass
class GMMConfig:
    """SFS prototype-distribution adaptation (Stan & Rostami; code defaults).

    Attributes:
        rho: confidence threshold for voxels used to fit the prototypes.
        max_samples_per_class: reservoir size per class when fitting.
        shrinkage: covariance shrinkage towards its diagonal mean (keeps it positive definite).
        iterations: adaptation steps.
        lam: weight of the sliced Wasserstein term.
        projections: L random directions, redrawn every iteration.
        lr: Adam learning rate.
        batch_voxels: target embeddings per iteration.
        prototype_samples: samples drawn from the prototypes per iteration.
        class_proportions: samples per class: ``"source"`` (default; the source class priors,
            i.e. the shares of all labelled source voxels recorded with the prototypes, or the
            mixture weights for prototypes fitted before those were recorded) or ``"pseudo"``
            (shares of the target's confident pseudo-labels). The pseudo-label shares
            under-count exactly the classes the shifted source model misses, and the SWD then
            pushes those voxels to the wrong Gaussians: on the 64x64 phantoms (gap 0.35, 3
            seeds) GMM gained +10.7 Dice with ``"source"`` and -1.1 with ``"pseudo"``.
        pseudo_confidence: confidence for the pseudo-label proportions.
        min_class_share: every class gets at least this share of the prototype samples (then
            renormalised), so that rare classes keep anchoring the classifier.
        freeze_classifier: keep the 1x1 classifier fixed.
        guard_agreement: keep the source model's segmentation (and warn) when the adapted
            foreground agrees with the source foreground below this Dice; 0 disables the guard
            (see ``gmm/harm_guard.py``).
        flip_uncertainty: also compute the ``ensemble_entropy`` map, GMM's default overlay (the
            source and the adapted network over the 4 in-plane flips of the scan: 6 more
            inferences per scan); False keeps only the maps that cost nothing extra.
        seed, amp: reproducibility and mixed precision on GPU.
    """

    rho: float = 0.97
    max_samples_per_class: int = 20000
    shrinkage: float = 1e-3
    iterations: int = 100
    lam: float = 0.5
    projections: int = 100
    lr: float = 5e-5
    batch_voxels: int = 4096
    prototype_samples: int = 4096
    class_proportions: str = "source"
    pseudo_confidence: float = 0.9
    min_class_share: float = 0.001
    freeze_classifier: bool = False
    guard_agreement: float = 0.0
    flip_uncertainty: bool = True
    seed: int = 0
    amp: bool = True


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for JSON reports and checkpoints)."""
    return asdict(config)
