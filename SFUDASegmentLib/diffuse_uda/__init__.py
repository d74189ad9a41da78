"""Diffuse-UDA (source side): Fourier appearance transfer, deformable augmentation, ASCPlus
consistency training, ensemble pseudo-labels, diffusion synthesis of image-label pairs and the
resumable end-to-end pipeline.

Imports are lazy: the pipeline pulls in training and diffusion code."""

from ..utils.lazy import lazy_exports

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
__getattr__ = lazy_exports(__name__, _EXPORTS)
