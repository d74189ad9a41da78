"""Do the uncertainty maps find each method's errors? Voxel AUROC / AUPRC, ECE and per-structure
rank correlation, for every candidate map and every method.

For each case and method (no adaptation, HEAL's denoising Y*, full HEAL with the candidate
spread, GMM) the method's own errors (labels != truth) inside the body mask are scored against
every map: the method's own maps (entropy; NIG variance and candidate spread for HEAL; NIG
variance, disagreement and the source + adapted ensemble entropy over flips for GMM), the
temperature-scaled entropy, HEAL's NIG variance of the method's probabilities, flip test-time
augmentation (entropy of the mean, variance), the Mahalanobis distance to the source class
Gaussians, the source/adapted disagreement (GMM, in probabilities; HEAL and GMM, in labels),
and, for GMM, the source network's maps (``source_*``). Printed: mean voxel AUROC and AUPRC
over the cases, the expected calibration error of the probabilities (raw and
temperature-scaled; 15 equal-width bins), per structure Spearman's correlation across cases
between the map's mean inside the predicted structure and 1 - Dice, and each adapted map
against the entropy and the flip entropy before adaptation, paired per case.

``--phantoms``: a small 2D source model (and its diffusion model and prototypes) trained on
64x64 source-modality phantoms, the temperature fitted on other source phantoms, then
target-modality phantoms at ``--gap`` (0.2-0.35: the image still carries the structures):

    python Testing/benchmarks/bench_uncertainty.py --phantoms --cases 16 --gap 0.3

``--brats WORKDIR``: the real-BraTS development benchmark's cached source models
(``bench_brats.py --workdir WORKDIR`` trains them; 2 mm CPU recipe), each applied to the target
modality of the cases of its fold (patients it never saw), the temperature fitted on two of the
fold's training cases in the source modality:

    python Testing/benchmarks/bench_uncertainty.py --brats /tmp/brats_bench --direction t2:flair

The measurement itself is :func:`measure_case` (one scan, its truth, the source checkpoint and
each method's output) and :func:`summarise` (the cases' records -> table rows), so that a run
over cached real-data predictions reuses them unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SFUDASegmentLib.checkpoint import SourceCheckpoint  # noqa: E402
from SFUDASegmentLib.config import (DiffusionNetConfig, DiffusionTrainingConfig, GMMConfig,  # noqa: E402
                                    HEALConfig, InferenceConfig, InputSpec, TrainingConfig)
from SFUDASegmentLib.data.geometry import Volume  # noqa: E402
from SFUDASegmentLib.data.labels import values_to_indices  # noqa: E402
from SFUDASegmentLib.data.synthetic import make_phantom_set  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import dice  # noqa: E402
from SFUDASegmentLib.evaluation.paired import paired_difference  # noqa: E402
from SFUDASegmentLib.evaluation.uncertainty_metrics import (expected_calibration_error,  # noqa: E402
                                                            spearman, voxel_auprc, voxel_auroc)
from SFUDASegmentLib.gmm import fit_prototypes, gmm_adapt  # noqa: E402
from SFUDASegmentLib.gmm.adaptation import adapted_checkpoint  # noqa: E402
from SFUDASegmentLib.heal import heal_adapt  # noqa: E402
from SFUDASegmentLib.inference.preparation import prepare_input  # noqa: E402
from SFUDASegmentLib.inference.segment import segment  # noqa: E402
from SFUDASegmentLib.results.result import Result  # noqa: E402
from SFUDASegmentLib.training.segmentation import train_source  # noqa: E402
from SFUDASegmentLib.uncertainty.maps import add_uncertainty_maps  # noqa: E402
from SFUDASegmentLib.uncertainty.temperature import apply_temperature, fit_temperature  # noqa: E402

#: Maps of the network behind a result that :func:`measure_case` adds.
NETWORK_MAPS = ("nig_variance", "flip_entropy", "flip_variance", "mahalanobis")
ECE_BINS = 15


@dataclass
class MethodOutput:
    """One method's output on one case.

    Attributes:
        result: its :class:`Result` (labels, probabilities, maps; not modified).
        model_checkpoint: the adapted checkpoint (GMM); None when the source network produced
            the result's probabilities (no adaptation, HEAL).
    """

    result: Result
    model_checkpoint: Optional[SourceCheckpoint] = None


def _copy(result: Result) -> Result:
    """A copy whose map and label-map dicts can be extended without touching ``result``."""
    return replace(result, maps=dict(result.maps), label_maps=dict(result.label_maps),
                   structure_stats=list(result.structure_stats), extra=dict(result.extra))


def _with_maps(output: MethodOutput, volume: Volume, checkpoint: SourceCheckpoint, names: Sequence[str],
               inference: InferenceConfig) -> tuple[dict[str, np.ndarray], float]:
    """The result's maps plus ``names`` (those it lacks), and the seconds they took."""
    result = _copy(output.result)
    missing = [n for n in names if n not in result.maps]
    start = time.perf_counter()
    if missing:
        add_uncertainty_maps(result, volume, checkpoint, missing, output.model_checkpoint, inference)
    return result.maps, time.perf_counter() - start


def measure_case(volume: Volume, truth: np.ndarray, checkpoint: SourceCheckpoint,
                 outputs: Mapping[str, MethodOutput], inference: InferenceConfig = InferenceConfig()
                 ) -> dict[str, Any]:
    """Score every candidate map against every method's errors on one case.

    Args:
        volume: the target scan.
        truth: its reference label map (label values), on the scan's grid.
        checkpoint: the source checkpoint (prototypes for the Mahalanobis map; its temperature,
            when fitted, for the calibrated entropy and ECE).
        outputs: method name -> its output; a method whose result has ``nig_variance`` or
            ``pseudo_labels`` is taken as HEAL, one with a ``model_checkpoint`` as adapted.
        inference: device and batch settings of the extra maps.

    Returns:
        ``{method: {"auroc": {map: v}, "auprc": {map: v}, "ece": {name: v},
        "structures": {class name: {"dice": d, "mean": {map: v}}}, "error_share": e,
        "map_seconds": s}}``.
    """
    prepared = prepare_input(volume, checkpoint.input_spec)
    body = prepared.to_input_grid(prepared.foreground, True)
    truth = np.asarray(truth)
    truth_indices = values_to_indices(truth, checkpoint.classes, "reference labels")
    source_output = next((o for o in outputs.values() if o.model_checkpoint is None and o.result.method == "none"),
                         None)
    if source_output is None:
        source_output = MethodOutput(segment(checkpoint, volume, inference))
    source_names = list(NETWORK_MAPS) + (["calibrated_entropy"] if checkpoint.temperature is not None else [])
    source_maps, source_seconds = _with_maps(source_output, volume, checkpoint, source_names, inference)
    records: dict[str, Any] = {}
    for method, output in outputs.items():
        result = output.result
        if output.model_checkpoint is not None:
            names = list(NETWORK_MAPS) + ["disagreement", "ensemble_entropy", "label_disagreement"] + (
                ["calibrated_entropy"] if checkpoint.temperature is not None else [])
            maps, seconds = _with_maps(output, volume, checkpoint, names, inference)
            maps.update({f"source_{k}": v for k, v in source_maps.items()})
        elif result.method == "none":
            maps, seconds = source_maps, source_seconds
        else:  # HEAL: the source network's maps, and where its labels left the source labels
            maps, seconds = _with_maps(output, volume, checkpoint, ["label_disagreement"], inference)
            maps.update({k: v for k, v in source_maps.items() if k not in maps})
        errors = (result.labels != truth) & body
        record: dict[str, Any] = {"auroc": {}, "auprc": {}, "ece": {}, "structures": {},
                                  "error_share": float(errors.sum() / max(1, body.sum())), "map_seconds": seconds}
        for name, values in sorted(maps.items()):
            record["auroc"][name] = voxel_auroc(values, errors, body)
            record["auprc"][name] = voxel_auprc(values, errors, body)
        if result.probabilities is not None and result.method != "heal":
            record["ece"]["raw"] = expected_calibration_error(result.probabilities, truth_indices, body, ECE_BINS)
            if checkpoint.temperature is not None:
                scaled = apply_temperature(result.probabilities, checkpoint.temperature)
                record["ece"]["temperature"] = expected_calibration_error(scaled, truth_indices, body, ECE_BINS)
        for c in checkpoint.classes:
            predicted = result.labels == c.value
            record["structures"][c.name] = {
                "dice": dice(predicted, truth == c.value),
                "mean": {name: float(values[predicted].mean()) if predicted.any() else float("nan")
                         for name, values in maps.items()}}
        records[method] = record
    return records


def summarise(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, map): mean AUROC / AUPRC over the cases where they are defined, the
    number of such cases, and per structure Spearman's correlation across cases between the
    map's mean inside the predicted structure and 1 - Dice."""
    rows = []
    for method in cases[0]:
        per_method = [case[method] for case in cases if method in case]
        structures = list(per_method[0]["structures"])
        for name in per_method[0]["auroc"]:
            aurocs = [r["auroc"][name] for r in per_method if np.isfinite(r["auroc"].get(name, np.nan))]
            auprcs = [r["auprc"][name] for r in per_method if np.isfinite(r["auprc"].get(name, np.nan))]
            row = {"method": method, "map": name, "cases": len(aurocs),
                   "auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
                   "auroc_min": float(np.min(aurocs)) if aurocs else float("nan"),
                   "auprc": float(np.mean(auprcs)) if auprcs else float("nan"), "spearman": {}}
            for s in structures:
                row["spearman"][s] = spearman([r["structures"][s]["mean"][name] for r in per_method],
                                              [1.0 - r["structures"][s]["dice"] for r in per_method])
            rows.append(row)
    return rows


def print_table(rows: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]]) -> None:
    """The AUROC / AUPRC / Spearman table, then ECE and mean Dice per method."""
    structures = list(rows[0]["spearman"])
    print(f"\n{'method':8s} {'map':24s} {'AUROC':>6s} {'min':>6s} {'AUPRC':>6s}   Spearman(mean map, 1 - Dice): "
          + " ".join(f"{s:>7s}" for s in structures))
    for row in rows:
        print(f"{row['method']:8s} {row['map']:24s} {row['auroc']:6.3f} {row['auroc_min']:6.3f} {row['auprc']:6.3f}   "
              + " " * 30 + " ".join(f"{row['spearman'][s]:7.2f}" for s in structures))
    print(f"\nper method: mean Dice per structure, error share of the body, ECE ({ECE_BINS} bins) raw / "
          "temperature-scaled, seconds of the extra maps")
    for method in cases[0]:
        records = [case[method] for case in cases]
        dices = " ".join(f"{s} {np.mean([r['structures'][s]['dice'] for r in records]):.3f}" for s in structures)
        ece = {k: np.mean(values) if values else float("nan")
               for k in ("raw", "temperature") for values in [[r["ece"][k] for r in records if k in r["ece"]]]}
        print(f"{method:8s} {dices}; errors {np.mean([r['error_share'] for r in records]):.3f}; "
              f"ECE {ece['raw']:.4f} / {ece['temperature']:.4f}; {np.mean([r['map_seconds'] for r in records]):.2f} s")


def against_before_adaptation(cases: Sequence[Mapping[str, Any]],
                              baselines: Sequence[str] = ("entropy", "calibrated_entropy", "flip_entropy")
                              ) -> list[dict[str, Any]]:
    """Is a method's map as good at finding its errors as a map before adaptation was at finding
    the unadapted errors? Per case, the map's AUROC minus no adaptation's AUROC with each
    baseline map (no adaptation's default overlay is the entropy, or the calibrated entropy when
    the checkpoint has a temperature); one row per (method, map, baseline) with the paired mean,
    its 95 % t interval and the gains / losses (methods other than ``"none"``, cases where both
    are defined)."""
    rows = []
    for method in [m for m in cases[0] if m != "none"]:
        for name in cases[0][method]["auroc"]:
            for baseline in baselines:
                pairs = [(c[method]["auroc"].get(name, np.nan), c["none"]["auroc"].get(baseline, np.nan))
                         for c in cases if method in c]
                pairs = [p for p in pairs if np.isfinite(p[0]) and np.isfinite(p[1])]
                if len(pairs) < 2:
                    continue
                d = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
                rows.append({"method": method, "map": name, "baseline": baseline, "mean": d.mean, "low": d.low,
                             "high": d.high, "gains": d.gains, "losses": d.losses, "cases": d.n})
    return rows


def print_figures(cases: Sequence[Mapping[str, Any]], title: str) -> dict[str, Any]:
    """Summarise the cases and print ``title``, the table and each adapted map against the maps
    before adaptation; returns ``{"rows": summarise(cases), "paired": against_before_adaptation(cases)}``."""
    figures = {"rows": summarise(cases), "paired": against_before_adaptation(cases)}
    print(title)
    print_table(figures["rows"], cases)
    print_against_before_adaptation(figures["paired"])
    return figures


def print_against_before_adaptation(rows: Sequence[Mapping[str, Any]]) -> None:
    """The rows of :func:`against_before_adaptation`."""
    print("\nAUROC of each method's map for its errors minus no adaptation's map for its errors (paired, 95 % t "
          "interval, gains/losses)")
    for r in rows:
        print(f"{r['method']:8s} {r['map']:24s} - none {r['baseline']:18s} {r['mean']:+.4f} "
              f"[{r['low']:+.4f}, {r['high']:+.4f}] {r['gains']}/{r['losses']}")


# ----------------------------------------------------------------------------- phantoms


def train_phantom_checkpoint(args: argparse.Namespace) -> SourceCheckpoint:
    """2D source model (+ diffusion model + prototypes) on 64x64 source phantoms, temperature
    fitted on other source phantoms."""
    phantoms = make_phantom_set(args.train_cases, (args.size, args.size), seed=0)
    images, labels = [p.source for p in phantoms], [p.labels for p in phantoms]
    spec = InputSpec(dims="2d", modality="phantom-source", patch_size=(args.size, args.size))
    diffusion = None if args.no_diffusion else DiffusionTrainingConfig(
        iterations=args.diffusion_iterations, batch_size=8, lr=1e-3, device=args.device)
    net = DiffusionNetConfig(spatial_dims=2, image_channels=1, cond_channels=5, base_channels=16,
                             channel_mults=(1, 2, 2), num_res_blocks=1, groups=8)
    outcome = train_source(images, labels, phantoms[0].classes, spec,
                           TrainingConfig(epochs=5, iterations_per_epoch=40, batch_size=8, device=args.device),
                           diffusion=diffusion, diffusion_config=net)
    checkpoint = fit_prototypes(outcome.checkpoint, images, labels, GMMConfig(), device=args.device)
    calibration = make_phantom_set(args.calibration_cases, (args.size, args.size), seed=1)
    checkpoint, fit = fit_temperature(checkpoint, [p.source for p in calibration], [p.labels for p in calibration],
                                      InferenceConfig(device=args.device))
    print(f"temperature {fit.temperature:.3f} (NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f} on "
          f"{fit.voxels} voxels of {fit.cases} held-out source phantoms)")
    return checkpoint


def run_phantoms(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or load) the phantom checkpoint, run every method on each target phantom, measure."""
    t0 = time.perf_counter()
    checkpoint = SourceCheckpoint.load(args.checkpoint) if args.checkpoint else train_phantom_checkpoint(args)
    if args.save:
        checkpoint.save(args.save)
    train_seconds = time.perf_counter() - t0
    inference = InferenceConfig(device=args.device)
    gmm_config = GMMConfig(iterations=args.gmm_iterations)
    heal_full = checkpoint.diffusion is not None and not args.no_diffusion
    cases, heal_seconds = [], []
    for i, case in enumerate(make_phantom_set(args.cases, (args.size, args.size), seed=1000, gap=args.gap)):
        outputs = {"none": MethodOutput(segment(checkpoint, case.target, inference)),
                   "heal/hd": MethodOutput(heal_adapt(case.target, checkpoint, HEALConfig(stages="hd"), inference))}
        if heal_full:
            heal = heal_adapt(case.target, checkpoint, HEALConfig(stages="heal", candidates=args.candidates, steps=args.steps,
                                                                                 seed=i, candidate_spread=True), inference)
            outputs["heal"] = MethodOutput(heal)
            heal_seconds.append((heal.timings["seconds"]["candidate_spread"], heal.timings["total_seconds"]))
        results, adaptation = gmm_adapt(case.target, checkpoint, replace(gmm_config, seed=i), inference)
        outputs["gmm"] = MethodOutput(results[0], adapted_checkpoint(checkpoint, adaptation, gmm_config, [f"case {i}"]))
        cases.append(measure_case(case.target, case.labels.array, checkpoint, outputs, inference))
        print(f"case {i + 1}/{args.cases} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    figures = print_figures(cases, f"\n{args.size}x{args.size} phantoms, gap {args.gap}, {args.cases} target cases; "
                                   f"GMM {args.gmm_iterations} iterations; HEAL n={args.candidates} DDIM-{args.steps}; "
                                   f"training {train_seconds:.0f} s")
    if heal_seconds:
        spread, total = np.mean(heal_seconds, axis=0)
        print(f"candidate spread: {spread:.3f} s of HEAL's {total:.2f} s per case ({100 * spread / total:.1f} %)")
    return {"args": vars(args), **figures, "cases": cases, "train_seconds": train_seconds,
            "candidate_spread_seconds": heal_seconds}


def run_brats(args: argparse.Namespace) -> dict[str, Any]:
    """Every fold's cached source model on its fold's target scans: no adaptation, HEAL's default
    (denoising only), GMM (guard off, so that the adapted labels are scored), full HEAL unless
    ``--no-diffusion``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from brats_cases import DEFAULT_DATA, case_names, folds, load_case
    from brats_models import CPU_RECIPE, model_path

    t0 = time.perf_counter()
    source, target = args.direction.split(":")
    data = Path(args.data or DEFAULT_DATA)
    names = case_names(data)
    inference = InferenceConfig(device=args.device)
    gmm_config = GMMConfig(iterations=args.gmm_iterations, guard_agreement=0.0)
    cases: list[dict[str, Any]] = []
    for f, fold in enumerate(folds(names, args.folds)):
        path = model_path(Path(args.brats), f, source)
        if not path.is_file():
            raise SystemExit(f"No cached model '{path}': run bench_brats.py --workdir {args.brats} first.")
        calibration = [load_case(data, n, CPU_RECIPE.spacing, (source,)) for n in names if n not in fold][:2]
        checkpoint, fit = fit_temperature(SourceCheckpoint.load(path), [c.scans[source] for c in calibration],
                                          [c.labels for c in calibration], inference)
        print(f"fold {f}: temperature {fit.temperature:.3f} on {fit.cases} {source.upper()} training cases", flush=True)
        for i, name in enumerate(fold):
            case = load_case(data, name, CPU_RECIPE.spacing, (target,))
            scan = case.scans[target]
            outputs = {"none": MethodOutput(segment(checkpoint, scan, inference)),
                       "heal/hd": MethodOutput(heal_adapt(scan, checkpoint, HEALConfig(), inference))}
            if not args.no_diffusion and checkpoint.diffusion is not None:
                outputs["heal"] = MethodOutput(heal_adapt(scan, checkpoint, HEALConfig(
                    stages="heal", candidates=args.candidates, steps=args.steps, seed=i, candidate_spread=True),
                    inference))
            results, adaptation = gmm_adapt(scan, checkpoint, replace(gmm_config, seed=i), inference)
            outputs["gmm"] = MethodOutput(results[0], adapted_checkpoint(checkpoint, adaptation, gmm_config, [name]))
            cases.append(measure_case(scan, case.labels.array, checkpoint, outputs, inference))
            print(f"fold {f} {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    figures = print_figures(cases, f"\nBraTS 2018 {source.upper()} -> {target.upper()}, {len(cases)} target cases (2 mm, "
                                   f"each fold's model on patients it never saw); GMM {args.gmm_iterations} iterations; "
                                   f"{time.perf_counter() - t0:.0f} s")
    return {"args": vars(args), **figures, "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--phantoms", action="store_true", help="synthetic two-modality phantoms")
    mode.add_argument("--brats", metavar="WORKDIR", help="the real-BraTS benchmark's work folder (cached models)")
    parser.add_argument("--direction", default="t2:flair", help="--brats: source:target modalities")
    parser.add_argument("--folds", type=int, default=2, help="--brats: the benchmark's number of folds")
    parser.add_argument("--data", help="--brats: the brats2018 folder (default ../shared/data/brats2018)")
    parser.add_argument("--checkpoint", help="reuse a phantom checkpoint written by --save")
    parser.add_argument("--save", help="write the trained phantom checkpoint here")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gap", type=float, default=0.3)
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--calibration-cases", type=int, default=4, help="held-out source phantoms for T")
    parser.add_argument("--cases", type=int, default=16, help="target phantoms")
    parser.add_argument("--diffusion-iterations", type=int, default=400)
    parser.add_argument("--no-diffusion", action="store_true", help="skip full HEAL and the candidate spread")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gmm-iterations", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: PyTorch's default)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    figures = run_brats(args) if args.brats else run_phantoms(args)
    if args.json:
        from SFUDASegmentLib.evaluation.metrics import to_jsonable

        Path(args.json).write_text(json.dumps(to_jsonable(figures), indent=2))


if __name__ == "__main__":
    main()
