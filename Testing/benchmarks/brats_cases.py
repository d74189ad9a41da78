"""The ten expert-labelled BraTS 2018 cases of ../shared/data/brats2018 as the development
benchmark uses them: case list, modalities, BraTS classes and regions, loading at a chosen
isotropic spacing, cross-validation folds, and the scores (Dice and ASD per BraTS region).

Loading at a coarser spacing (the CPU recipe uses 2 mm) resamples the image linearly and the
label map by nearest neighbour onto the same grid, once, so that every method and the reference
meet on one grid.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SFUDASegmentLib.config import parse_labels  # noqa: E402
from SFUDASegmentLib.data.geometry import Volume  # noqa: E402
from SFUDASegmentLib.data.io import from_sitk, read_image, read_label, to_sitk  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import BRATS_REGIONS, asd, dice  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats2018"
MODALITIES = ("t1", "t1ce", "t2", "flair")
CLASSES = parse_labels("1:necrosis,2:edema,4:enhancing")
LABEL_VALUES = {0, *(c.value for c in CLASSES)}
REGIONS = tuple(BRATS_REGIONS)  # WT, TC, ET


def case_names(data: Path) -> list[str]:
    """Sorted case folder names (each holds ``<case>_<modality>.nii.gz`` and ``<case>_seg.nii.gz``)."""
    names = sorted(p.name for p in Path(data).iterdir() if (p / f"{p.name}_seg.nii.gz").is_file())
    if not names:
        raise SystemExit(f"No BraTS cases under '{data}' (expected <case>/<case>_seg.nii.gz). "
                         "Pass --data with the brats2018 folder of ../shared/data.")
    return names


def _resample(volume: Volume, spacing: float, is_label: bool) -> Volume:
    """``volume`` on an isotropic ``spacing`` grid with the same origin and direction."""
    if all(math.isclose(s, spacing) for s in volume.spacing):
        return volume
    image = to_sitk(volume)
    size_xyz = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    out = sitk.Resample(image, size_xyz, sitk.Transform(),
                        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
                        image.GetOrigin(), (spacing,) * 3, image.GetDirection(), 0.0, image.GetPixelID())
    return from_sitk(out)


@dataclass
class Case:
    """One patient: every modality and the label map on one grid."""

    name: str
    scans: dict[str, Volume]
    labels: Volume


def load_case(data: Path, name: str, spacing: Optional[float],
              modalities: Sequence[str] = MODALITIES) -> Case:
    """Read one case (``spacing`` None keeps the native 1 mm grid)."""
    folder = Path(data) / name
    scans = {m: read_image(folder / f"{name}_{m}.nii.gz") for m in modalities}
    labels = read_label(folder / f"{name}_seg.nii.gz", LABEL_VALUES)
    if spacing is not None:
        scans = {m: _resample(v, spacing, False) for m, v in scans.items()}
        labels = _resample(labels, spacing, True)
    return Case(name, scans, labels)


def folds(names: Sequence[str], count: int) -> list[list[str]]:
    """``count`` disjoint target folds covering every case once (case ``i`` in fold ``i % count``)."""
    if not 2 <= count <= len(names):
        raise SystemExit(f"--folds must be between 2 and the number of cases ({len(names)}).")
    return [[n for i, n in enumerate(names) if i % count == f] for f in range(count)]


def region_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice and ASD (mm, prediction surface to reference surface) of WT, TC and ET, and the mean
    Dice of the three regions.

    ASD is ``inf`` when exactly one of the two masks is empty and 0 when both are (see
    :func:`SFUDASegmentLib.evaluation.metrics.asd`).

    Args:
        pred, truth: ``(Z, Y, X)`` label maps with BraTS values 0, 1, 2, 4.
        spacing: mm per axis.
    """
    out: dict[str, float] = {}
    for region, values in BRATS_REGIONS.items():
        p, r = np.isin(pred, values), np.isin(truth, values)
        out[f"{region}_dice"] = dice(p, r)
        out[f"{region}_asd"] = asd(p, r, spacing)
    out["mean_dice"] = float(np.mean([out[f"{r}_dice"] for r in REGIONS]))
    return out
