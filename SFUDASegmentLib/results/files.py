"""Write a :class:`Result` as files: NIfTI maps in the input's exact geometry + ``report.json``.

File names: ``segmentation.nii.gz``; one ``<map>.nii.gz`` per uncertainty map (``entropy``,
``nig_variance``); one per intermediate label map (``refined_labels`` = Y*, ``entropy_labels``
= Y_ent, ``pseudo_labels`` = Y_T, ``selected_segmentation`` = M_S(I_B)); ``candidate_00.nii.gz``
... for HEAL's candidates; ``probabilities.nii.gz`` (4D, float16 -> float32) when asked.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import LabelClass
from ..data.geometry import Volume
from ..data.io import read_image, write_image
from .result import Result
from .staging import OutputTransaction


def write_result_files(result: Result, folder: Path, input_path: Optional[str] = None,
                       checkpoint_path: Optional[str] = None,
                       write_probabilities: bool = False) -> dict[str, Any]:
    """Write every array of ``result`` into ``folder`` (a staged output folder) and return the
    report that belongs in its ``report.json`` (which the caller writes, with what it adds).

    Args:
        result: what a method returned.
        folder: where the files go (created); see :class:`OutputTransaction` for staging.
        input_path, checkpoint_path: recorded in the report.
        write_probabilities: also write ``probability_<k>.nii.gz`` per class.
    """
    geometry = result.geometry
    files: dict[str, str] = {}
    folder.mkdir(parents=True, exist_ok=True)

    def put(name: str, array: np.ndarray) -> None:
        write_image(Volume(array, geometry), folder / name)
        files[name.split(".")[0]] = name

    put("segmentation.nii.gz", result.labels)
    for name, array in result.maps.items():
        put(f"{name}.nii.gz", array.astype(np.float32))
    for name, array in result.label_maps.items():
        put(f"{name}.nii.gz", array)
    if result.candidates is not None:
        for i, candidate in enumerate(result.candidates):
            put(f"candidate_{i:02d}.nii.gz", candidate.astype(np.float32))
    if write_probabilities and result.probabilities is not None:
        for k, probs in enumerate(result.probabilities):
            put(f"probability_{k}.nii.gz", probs.astype(np.float32))
    report = result.report()
    report.update({"input": input_path, "checkpoint": checkpoint_path, "files": files,
                   "device": result.timings.get("device"), "versions": versions()})
    return report


#: DEFLATE (gzip) never compresses data below 1/1032 of its size
DEFLATE_MAX_RATIO = 1032


def result_bytes(result_shape: tuple[int, ...], float_maps: int, label_maps: int) -> int:
    """A floor of the bytes a result folder takes on disk (``.nii.gz`` maps).

    What gzip leaves of the maps at its best ratio, so a disk with less room cannot hold the
    result while a run that fits is never refused (a HEAL result of the demo phantom compresses
    its label maps 30-200x and its float maps 1.2-5x).

    Args:
        result_shape: the input's spatial shape (voxels per map).
        float_maps: float32 maps (entropy, variance, candidates...).
        label_maps: uint8 label maps (segmentation, refined labels...).
    """
    voxels = int(np.prod(result_shape))
    return (4 * voxels * float_maps + voxels * label_maps) // DEFLATE_MAX_RATIO


def versions() -> dict[str, Any]:
    """The software versions a report records."""
    import torch  # here, not at module level: the Slicer panel reads results without PyTorch

    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}


def write_result(result: Result, out_dir: str | Path, input_path: Optional[str] = None,
                 checkpoint_path: Optional[str] = None, write_probabilities: bool = False,
                 extra_report: Optional[dict[str, Any]] = None, overwrite: bool = False) -> dict[str, Any]:
    """Write every array of ``result`` and ``report.json`` into ``out_dir``, all or nothing.

    ``out_dir`` must be new or empty unless ``overwrite`` (which replaces its whole content), and
    must not be or contain ``input_path`` or ``checkpoint_path`` (see ``output_guard.py``).

    Returns:
        The report dict written to ``report.json``.
    """
    with OutputTransaction(overwrite) as outputs:
        outputs.add_inputs([input_path, checkpoint_path])
        folder = outputs.folder(out_dir, "out_dir")
        report = write_result_files(result, folder, input_path, checkpoint_path, write_probabilities)
        report.update(extra_report or {})
        outputs.write_json(folder / "report.json", report)
    return report


def read_result(out_dir: str | Path) -> Result:
    """Read a folder written by :func:`write_result` back into a :class:`Result`.

    Used by the Slicer module, whose background job writes files that the panel then loads.
    """
    out_dir = Path(out_dir)
    report = json.loads((out_dir / "report.json").read_text())
    segmentation = read_image(out_dir / "segmentation.nii.gz")
    classes = [LabelClass(int(c["value"]), c["name"], tuple(c["color"])) for c in report["classes"]]

    def load(name: str) -> np.ndarray:
        return read_image(out_dir / f"{name}.nii.gz").array

    candidates = None
    if report.get("candidates"):
        candidates = np.stack([load(f"candidate_{i:02d}") for i in range(int(report["candidates"]))])
    known = {"method", "classes", "geometry", "shape", "maps", "label_maps", "candidates",
             "candidate_scores", "selected_index", "structure_stats", "timings", "review_queue",
             "reliability"}
    return Result(method=report["method"], labels=segmentation.array, classes=classes,
                  geometry=segmentation.geometry,
                  maps={name: load(name) for name in report["maps"]},
                  label_maps={name: load(name) for name in report["label_maps"]},
                  candidates=candidates, candidate_scores=list(report["candidate_scores"]),
                  selected_index=report["selected_index"],
                  structure_stats=report["structure_stats"], timings=report["timings"],
                  extra={k: v for k, v in report.items() if k not in known},
                  review_queue=list(report.get("review_queue", [])),
                  reliability=dict(report.get("reliability", {})))
