"""The two TCGA glioma cases of ../shared/data as the glioma benchmarks use them: case names,
BraTS label classes, loading of the T1c / FLAIR scans and labels, and Dice per label and region."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SFUDASegmentLib.config import parse_labels  # noqa: E402
from SFUDASegmentLib.data.geometry import Volume  # noqa: E402
from SFUDASegmentLib.data.io import read_image, read_label  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import BRATS_REGIONS, evaluate  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tcga_glioma"
CASES = ("TCGA-DU-7294", "OtherEXampleFromTCIA")
CLASSES = parse_labels("1:necrosis,2:edema,4:enhancing")
COLUMNS = ("necrosis", "edema", "enhancing", "WT", "TC", "ET")


def read_scans(data: Path, modality: str) -> list[Volume]:
    """The ``modality`` scan (``"t1c"`` or ``"fla"``) of every case, in :data:`CASES` order."""
    return [read_image(data / case / f"{modality}.nii.gz") for case in CASES]


def read_labels(data: Path) -> list[Volume]:
    """The BraTS silver-standard label map of every case (values 0, 1, 2, 4)."""
    return [read_label(data / case / "seg_fusion_mav.nii.gz", {0, *(c.value for c in CLASSES)})
            for case in CASES]


def scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice per label and per BraTS region, and the mean Dice over the labels.

    Args:
        pred, truth: ``(Z, Y, X)`` label maps with BraTS values.
        spacing: mm per axis.
    """
    result = evaluate(pred, truth, spacing, {c.name: c.value for c in CLASSES}, BRATS_REGIONS)
    out = {name: v["dice"] for name, v in result["labels"].items()}
    out.update({name: v["dice"] for name, v in result["regions"].items()})
    out["mean_label_dice"] = result["mean_dice"]
    return out


def print_case(title: str, row: dict[str, dict[str, float]]) -> None:
    """One table: a line per method with its Dice x100 in :data:`COLUMNS`."""
    print(f"\n{title} FLAIR (Dice %, labels and BraTS regions)")
    print(f"{'method':12s} " + " ".join(f"{k:>10s}" for k in COLUMNS))
    for name, values in row.items():
        print(f"{name:12s} " + " ".join(f"{values[k] * 100:10.1f}" for k in COLUMNS))
