"""``sfuda demo``: the embedded-default main job, end to end on synthetic two-modality phantoms.

1. Loads the bundled demo checkpoint (``Resources/SampleData/phantom_demo.sfuda``: a 2D source
   model with its diffusion model and GMM prototypes, trained on *source*-modality phantoms), or
   trains one when it is not bundled (``--train``, or a pip install without the resources).
2. Generates a *target*-modality phantom volume (the bundled ``phantom_target.nrrd`` is the same
   case) with known labels.
3. Segments it without adaptation, with HEAL (its default: the denoising alone), with HEAL's
   diffusion stages (the paper's full pipeline) and with GMM-adapted inference.
4. Writes the images, every segmentation and uncertainty map (NIfTI, input geometry), a PNG
   overview of the middle slice and ``metrics.json`` (Dice and HD95 per structure and method,
   each method's mean Dice minus no adaptation's, and one sentence per method that says plainly
   whether it gained or lost on this scan).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from .checkpoint import SourceCheckpoint
from .config import (DiffusionTrainingConfig, GMMConfig, HEALConfig,
                     InferenceConfig, InputSpec, ScheduleConfig, TrainingConfig)
from .data.geometry import Volume
from .data.io import write_image
from .data.synthetic import Phantom, make_phantom, make_phantom_set
from .errors import OutputError
from .evaluation.metrics import evaluate
from .results.result import Result
from .results.files import result_bytes, versions
from .results.staging import OutputTransaction
from .utils.progress import ProgressReporter, report


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``quick`` shrinks everything for tests.

    Attributes:
        shape: phantom volume shape ``(z, y, x)``; spacing (2, 1, 1) mm.
        gap: target domain gap (see ``synthetic``): the source model loses about a third of its
            Dice at 0.35 on these phantoms, which leaves room for adaptation to show.
        source_cases: source phantoms for training.
        target_seed: seed of the target case (the bundled sample scan uses the default).
        epochs, iterations, diffusion_iterations: training budget when no checkpoint is bundled.
        channels, lr: segmentation U-Net widths and learning rate when training.
        candidates, steps: HEAL's n and DDIM steps.
        gmm_iterations: GMM adaptation steps.
    """

    shape: tuple[int, int, int] = (24, 64, 64)
    gap: float = 0.35
    source_cases: int = 8
    target_seed: int = 2024
    epochs: int = 6
    iterations: int = 50
    diffusion_iterations: int = 600
    candidates: int = 6
    steps: int = 20
    gmm_iterations: int = 60
    channels: tuple[int, ...] = (16, 32, 64, 128)
    lr: float = 2e-3


QUICK = DemoSettings(shape=(16, 48, 48), source_cases=4, epochs=6, iterations=30,
                     diffusion_iterations=60, candidates=2, steps=4, gmm_iterations=5,
                     channels=(16, 32, 64), lr=3e-3)
"""Small enough for tests, yet trained long enough that the model predicts every class
(lesions included) with the confidence the GMM prototypes need (rho = 0.97)."""


def bundled_resources() -> Optional[Path]:
    """``Resources/SampleData`` of a source checkout or an installed Slicer module, if present."""
    here = Path(__file__).resolve().parent
    for base in (here.parent, here.parent.parent):
        folder = base / "Resources" / "SampleData"
        if (folder / "phantom_demo.sfuda").is_file():
            return folder
    return None


def demo_target(settings: DemoSettings = DemoSettings()) -> Phantom:
    """The demo's target case (the bundled ``phantom_target.nrrd`` is its ``target`` image)."""
    return make_phantom(settings.shape, settings.target_seed, gap=settings.gap)


def train_demo_checkpoint(settings: DemoSettings = DemoSettings(), device: str = "auto",
                          progress: Optional[ProgressReporter] = None) -> SourceCheckpoint:
    """Train the demo's source model, diffusion model and prototypes on source phantoms."""
    from .gmm import fit_prototypes
    from .training.segmentation import default_diffusion_config, default_seg_config, train_source

    phantoms = make_phantom_set(settings.source_cases, settings.shape, seed=7, gap=settings.gap)
    patch = settings.shape[1:]
    spec = InputSpec(dims="2d", modality="phantom-source", patch_size=patch)
    classes = phantoms[0].classes
    diffusion_net = replace(default_diffusion_config(spec, 1 + len(classes), base_channels=16,
                                                     channel_mults=(1, 2, 2)), num_res_blocks=1, groups=8)
    outcome = train_source(
        [p.source for p in phantoms], [p.labels for p in phantoms], classes, spec,
        TrainingConfig(epochs=settings.epochs, iterations_per_epoch=settings.iterations, batch_size=8,
                       lr=settings.lr, device=device),
        default_seg_config(spec, 1 + len(classes), settings.channels),
        diffusion=DiffusionTrainingConfig(iterations=settings.diffusion_iterations, batch_size=16,
                                          lr=1e-3, device=device),
        diffusion_config=diffusion_net, schedule=ScheduleConfig(timesteps=250), progress=progress,
        case_names=[f"phantom_source_{i}" for i in range(len(phantoms))],
        data_description=f"{len(phantoms)} synthetic source-modality phantoms {settings.shape}, "
                         "SFUDASegmentLib.data.synthetic (seed 7)")
    return fit_prototypes(outcome.checkpoint, [p.source for p in phantoms], [p.labels for p in phantoms],
                          GMMConfig(), device=device, progress=progress)


_PANEL_SCALE = 3

#: The demo's methods, in the order they run and are shown.
DEMO_METHODS = ("none", "heal", "heal_diffusion", "gmm")
METHOD_TITLES = {"none": "no adaptation", "heal": "HEAL (default: denoising)",
                 "heal_diffusion": "HEAL + diffusion stages", "gmm": "GMM"}


def verdicts(mean_dice: dict[str, float]) -> dict[str, str]:
    """One plain sentence per adapted method: its mean Dice against no adaptation's.

    Args:
        mean_dice: method -> mean Dice (``"none"`` included).
    """
    base = mean_dice["none"]
    out = {}
    for name, value in mean_dice.items():
        if name == "none":
            continue
        change = value - base
        word = "gains" if change > 0.005 else "loses" if change < -0.005 else "changes nothing"
        out[name] = (f"{METHOD_TITLES.get(name, name)} {word} on this demo scan: mean Dice {value:.3f} against "
                     f"{base:.3f} without adaptation ({change:+.3f}).")
    return out


def _grey_panel(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def _label_panel(image: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[float, ...]]) -> np.ndarray:
    panel = _grey_panel(image).astype(np.float32)
    for value, rgb in colours.items():
        mask = labels == value
        panel[mask] = 0.45 * panel[mask] + 0.55 * np.array([rgb[2], rgb[1], rgb[0]]) * 255
    return panel.astype(np.uint8)


def _map_panel(values: np.ndarray) -> np.ndarray:
    scaled = np.clip(values / max(float(values.max()), 1e-9) * 255, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)


def overview_png(case: Phantom, results: dict[str, Result], scores: dict[str, float]) -> np.ndarray:
    """Middle-slice overview: target, truth, each method (titled with its mean Dice and the
    change against ``"none"``), HEAL's uncertainty maps, the selected diffusion candidate.

    Returns:
        ``(H, W, 3)`` uint8 BGR image.
    """
    z = int(np.argmax((case.labels.array > 0).sum(axis=(1, 2))))
    image = case.target.array[z]
    colours = {c.value: c.color for c in case.classes}
    panels = [("target image", _grey_panel(image)), ("reference labels", _label_panel(image, case.labels.array[z], colours))]
    for name, result in results.items():
        change = "" if name == "none" or "none" not in scores else f" {scores[name] - scores['none']:+.2f}"
        panels.append((f"{name} {scores[name]:.2f}{change}", _label_panel(image, result.labels[z], colours)))
    heal = results.get("heal")
    if heal is not None:
        panels.append(("entropy", _map_panel(heal.maps["entropy"][z])))
        panels.append(("NIG variance", _map_panel(heal.maps["nig_variance"][z])))
    rendered = [r for r in results.values() if r.candidates is not None and r.selected_index is not None]
    if rendered:
        panels.append(("selected candidate", _grey_panel(rendered[0].candidates[rendered[0].selected_index][z])))
    tiles = []
    for title, panel in panels:
        big = cv2.resize(panel, None, fx=_PANEL_SCALE, fy=_PANEL_SCALE, interpolation=cv2.INTER_NEAREST)
        tile = np.full((big.shape[0] + 24, big.shape[1] + 8, 3), 255, np.uint8)
        tile[24:, 4:-4] = big
        cv2.putText(tile, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        tiles.append(tile)
    columns = 4
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


#: the Slicer sample data files, in the order :func:`write_sample_data` takes their paths
SAMPLE_FILES = ("phantom_demo.sfuda", "phantom_target.nrrd", "phantom_target_labels.nrrd")


def write_sample_data(paths: Sequence[Path], checkpoint: SourceCheckpoint,
                      settings: DemoSettings = DemoSettings()) -> list[Path]:
    """Write the Slicer sample data: the demo checkpoint, the target scan and its labels (NRRD).

    Args:
        paths: where to write each of :data:`SAMPLE_FILES` (e.g. staged output files).
    """
    case = demo_target(settings)
    checkpoint_path, image_path, labels_path = paths
    return [checkpoint.save(checkpoint_path), write_image(case.target, image_path),
            write_image(case.labels, labels_path)]


def run_demo(out_dir: Path, quick: bool = False, device: str = "auto", train: bool = False,
             progress: Optional[ProgressReporter] = None, sample_data_dir: Optional[Path] = None,
             outputs: Optional[OutputTransaction] = None,
             report_extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run the demo and write its files into ``out_dir`` (all or nothing).

    Args:
        out_dir: output folder (new or empty; see ``output_guard.py``).
        quick: fewer candidates, steps and iterations (tests); tiny models when training.
        device: ``auto`` | ``cpu`` | ``cuda``.
        train: train the demo checkpoint even when one is bundled.
        progress: progress/cancel reporter.
        sample_data_dir: also write the (trained) checkpoint and target scan there, as the
            Slicer sample data (``Resources/SampleData``, files :data:`SAMPLE_FILES`).
        outputs: the run's output transaction (the CLI's, which commits after the demo
            returns); None commits the demo's own before returning.
        report_extra: added to ``report.json``.

    Returns:
        Summary: checkpoint origin, Dice per method, seconds per stage.
    """
    if outputs is None:
        with OutputTransaction() as own:
            return run_demo(out_dir, quick, device, train, progress, sample_data_dir, own, report_extra)
    from .gmm import gmm_adapt
    from .heal import heal_adapt
    from .inference.segment import segment

    settings = DemoSettings()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    bundle = None if train else bundled_resources()
    origin = "trained now" if bundle is None else str(bundle / "phantom_demo.sfuda")
    outputs.add_inputs([None if bundle is None else origin])
    folder = outputs.folder(out_dir)
    sample_paths = None if sample_data_dir is None else [
        outputs.file(Path(sample_data_dir) / name, "--write-sample-data") for name in SAMPLE_FILES]
    shape = demo_target(QUICK if quick and bundle is None else settings).target.array.shape
    outputs.require_free_space(result_bytes(shape, float_maps=4, label_maps=5), "the demo")
    if bundle is not None:
        checkpoint = SourceCheckpoint.load(origin)
    else:
        settings = QUICK if quick else settings
        checkpoint = train_demo_checkpoint(settings, device, progress)
    if quick:
        settings = replace(settings, candidates=QUICK.candidates, steps=QUICK.steps,
                           gmm_iterations=QUICK.gmm_iterations)
    if sample_paths is not None:
        write_sample_data(sample_paths, checkpoint, settings)
    seconds["checkpoint"] = time.perf_counter() - start
    case = demo_target(settings)
    inference = InferenceConfig(device=device)
    results: dict[str, Result] = {}
    total = len(DEMO_METHODS)
    for name in DEMO_METHODS:
        report(progress, "demo", len(results) / total, f"running {name}", done=len(results), total=total,
               unit="methods")
        t0 = time.perf_counter()
        if name == "none":
            results[name] = segment(checkpoint, case.target, inference, "probabilities", progress)
        elif name == "heal":
            results[name] = heal_adapt(case.target, checkpoint, HEALConfig(), inference, progress)
        elif name == "heal_diffusion":
            results[name] = heal_adapt(case.target, checkpoint,
                                       HEALConfig(stages="heal", candidates=settings.candidates, steps=settings.steps),
                                       inference, progress)
        else:
            results[name] = gmm_adapt(case.target, checkpoint, GMMConfig(iterations=settings.gmm_iterations, lr=1e-4),
                                      inference, progress)[0][0]
        seconds[name] = time.perf_counter() - t0
    labels = {c.name: c.value for c in case.classes}
    metrics = {name: evaluate(r.labels, case.labels.array, case.labels.spacing, labels) for name, r in results.items()}
    mean_dice = {name: float(m["mean_dice"]) for name, m in metrics.items()}
    said = verdicts(mean_dice)
    geometry = case.target.geometry
    write_image(case.target, folder / "target_image.nii.gz")
    write_image(case.source, folder / "same_case_in_source_modality.nii.gz")
    write_image(case.labels, folder / "reference_labels.nii.gz")
    for name, result in results.items():
        write_image(Volume(result.labels, geometry), folder / f"segmentation_{name}.nii.gz")
    for map_name, values in results["heal"].maps.items():
        write_image(Volume(values, geometry), folder / f"heal_{map_name}.nii.gz")
    write_image(Volume(results["heal"].label_maps["refined_labels"], geometry),
                folder / "heal_refined_labels.nii.gz")
    if not cv2.imwrite(str(folder / "overview.png"), overview_png(case, results, mean_dice)):
        raise OutputError(f"Could not write '{out_dir}/overview.png'. Check the folder and free space.")
    summary = {"checkpoint": origin, "target": {"shape": list(settings.shape), "gap": settings.gap,
                                                "seed": settings.target_seed},
               "mean_dice": mean_dice, "versus_none": {n: mean_dice[n] - mean_dice["none"] for n in said},
               "verdicts": said, "seconds": seconds, "metrics": metrics,
               "heal": {"settings": results["heal"].extra["heal"]},
               "heal_diffusion": {"scores": results["heal_diffusion"].candidate_scores,
                                  "selected": results["heal_diffusion"].selected_index,
                                  "warnings": results["heal_diffusion"].extra["warnings"]},
               "gmm": {"swd_before": results["gmm"].extra["swd_before"],
                       "swd_after": results["gmm"].extra["swd_after"]}}
    outputs.write_json(folder / "metrics.json", summary)
    files = sorted(p.name for p in folder.iterdir()) + ["report.json"]
    outputs.write_json(folder / "report.json", {
        **(report_extra or {}), "checkpoint": origin, "mean_dice": mean_dice, "verdicts": said, "seconds": seconds,
        "files": files, "sample_data": None if sample_data_dir is None else [
            str(Path(sample_data_dir) / name) for name in SAMPLE_FILES],
        "versions": versions()})
    report(progress, "demo", 1.0, "done", done=total, total=total, unit="methods")
    return {k: summary[k] for k in ("checkpoint", "mean_dice", "verdicts", "seconds")} | {"out": str(out_dir)}
