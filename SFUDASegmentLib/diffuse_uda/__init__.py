"""Diffuse-UDA (source side): Fourier appearance transfer, deformable augmentation, ASCPlus
consistency training, ensemble pseudo-labels, diffusion synthesis of image-label pairs and the
resumable end-to-end pipeline."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "fourier_amplitude_transfer": ".fourier", "adaptive_beta": ".fourier",
    "random_deformation_field": ".deformation", "apply_deformation": ".deformation",
    "DeformationSettings": ".deformation",
    "ASCPlusConfig": ".ascplus", "train_ascplus": ".ascplus",
    "target_pseudo_labels": ".pseudo_labels",
    "LabelTemplate": ".synthesis", "synthesize_pairs": ".synthesis",
    "write_synthetic_dataset": ".synthesis", "read_synthetic_dataset": ".synthesis",
    "synthesize_from_label_maps": ".synthesis",
    "DiffuseUDAConfig": ".pipeline", "DiffuseUDAOutcome": ".pipeline", "run_diffuse_uda": ".pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodules lazily (the pipeline pulls in training and diffusion code)."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
