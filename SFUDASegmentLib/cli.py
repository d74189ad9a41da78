"""The ``sfuda`` command: source training, segmentation, adaptation, evaluation, model cards, demo.

Every subcommand has ``--help``; long work shows a progress bar (``--progress bar``, default),
JSON lines on stderr (``--progress json``, used by the Slicer job runner) or nothing. Errors that
the library raises on purpose are printed as one readable line (exit code 2); a cancelled run
exits with 130 and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import InputError, OperationCancelled, SFUDAError
from .utils.progress import ProgressEvent, ProgressReporter


# ----------------------------------------------------------------------------- progress
class _BarProgress:
    """tqdm bars, one per stage, driven by :class:`ProgressEvent` callbacks."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm import tqdm

        bar = self.bars.get(event.stage)
        if bar is None:
            bar = self.bars[event.stage] = tqdm(total=1000, desc=event.stage, unit="‰", leave=True,
                                                dynamic_ncols=True, file=sys.stderr)
        bar.n = int(round(event.fraction * 1000))
        bar.set_postfix_str(event.message, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _json_progress(event: ProgressEvent) -> None:
    """One JSON line per event on stderr (read by ``jobs.py``)."""
    sys.stderr.write(json.dumps({"type": "progress", "stage": event.stage,
                                 "fraction": event.fraction, "message": event.message}) + "\n")
    sys.stderr.flush()


def make_reporter(mode: str) -> tuple[Optional[ProgressReporter], Callable[[], None]]:
    """A reporter for ``--progress bar|json|none`` and a function that closes it."""
    if mode == "none":
        return None, lambda: None
    if mode == "json":
        return ProgressReporter(_json_progress), lambda: None
    bars = _BarProgress()
    return ProgressReporter(bars), bars.close


# ----------------------------------------------------------------------------- helpers
def _read_pairs_csv(path: str) -> tuple[list[str], list[str]]:
    """``image,label`` rows (a header row naming them is allowed)."""
    images, labels = [], []
    try:
        with open(path, newline="") as handle:
            for row in csv.reader(handle):
                if not row or row[0].strip().lower() in ("image", "#image") or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise InputError(f"Row {row} in '{path}' has no label column. Write 'image,label' per line.")
                images.append(row[0].strip())
                labels.append(row[1].strip())
    except FileNotFoundError as error:
        raise InputError(f"Pairs file not found: '{path}'. Check the path.") from error
    return images, labels


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as error:
        raise InputError(f"--{name} takes integers like '64,64' or '64x64x64', got '{text}'.") from error


def _print_json(data: Any) -> None:
    from .evaluation.metrics import to_jsonable

    print(json.dumps(to_jsonable(data), indent=2))


# ----------------------------------------------------------------------------- commands
def cmd_train_source(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .config import DiffusionTrainingConfig, InputSpec, TrainingConfig, parse_labels
    from .data.io import read_image, read_label
    from .training.segmentation import default_seg_config, train_source

    images, labels = list(args.image or []), list(args.label or [])
    if args.pairs:
        more_images, more_labels = _read_pairs_csv(args.pairs)
        images += more_images
        labels += more_labels
    if not images or len(images) != len(labels):
        raise InputError(f"Got {len(images)} --image and {len(labels)} --label; give one label per "
                         "image (repeat --image/--label, or --pairs pairs.csv).")
    classes = parse_labels(args.labels)
    allowed = {0} | {c.value for c in classes}
    volumes = [read_image(p) for p in images]
    label_maps = [read_label(p, allowed_values=allowed) for p in labels]
    channels = 3 if volumes[0].is_rgb else 1
    default_patch = (64, 64, 64) if args.dims == "3d" else (128, 128)
    patch = _ints(args.patch_size, "patch-size") if args.patch_size else default_patch
    spec = InputSpec(dims=args.dims, modality=args.modality, image_channels=channels,
                     context_slices=args.context, patch_size=patch)
    config = TrainingConfig(epochs=args.epochs, iterations_per_epoch=args.iterations,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    seg_config = default_seg_config(spec, 1 + len(classes), _ints(args.channels, "channels"))
    diffusion = None
    if args.diffusion:
        diffusion = DiffusionTrainingConfig(iterations=args.diffusion_iterations, seed=args.seed,
                                            device=args.device, batch_size=args.batch_size)
    out = Path(args.out)
    outcome = train_source(volumes, label_maps, classes, spec, config, seg_config, diffusion,
                           progress=progress, case_names=[Path(p).name for p in images],
                           resume_path=out.with_suffix(out.suffix + ".train-state") if args.resume else None)
    checkpoint = outcome.checkpoint
    if args.prototypes:
        from .config import GMMConfig
        from .gmm import fit_prototypes

        checkpoint = fit_prototypes(checkpoint, volumes, label_maps, GMMConfig(rho=args.rho, seed=args.seed),
                                    device=args.device, progress=progress)
    checkpoint.save(out)
    _print_json({"checkpoint": str(out), "best_epoch": outcome.best_epoch,
                 "validation_mean_dice": outcome.best_val_dice, "history": outcome.history})
    return 0


def cmd_segment(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint
    from .config import InferenceConfig
    from .data.io import read_image
    from .inference.segment import segment
    from .results.files import write_result

    checkpoint = SourceCheckpoint.load(args.checkpoint)
    volume = read_image(args.image)
    config = InferenceConfig(device=args.device, batch_size=args.batch_size, overlap=args.overlap)
    result = segment(checkpoint, volume, config, "probabilities" if args.uncertainty else "labels", progress)
    report = write_result(result, args.out, input_path=args.image, checkpoint_path=args.checkpoint)
    _print_json({"out": args.out, "seconds": report["timings"]["total_seconds"],
                 "structures": report["structure_stats"]})
    return 0


def cmd_adapt(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint
    from .config import GMMConfig, HEALConfig, InferenceConfig
    from .data.io import read_image
    from .results.files import write_result

    checkpoint = SourceCheckpoint.load(args.checkpoint)
    if args.save_adapted and (args.method != "gmm" or Path(args.save_adapted).resolve() == Path(args.checkpoint).resolve()):
        raise InputError(f"--save-adapted '{args.save_adapted}' must name a new file (the source checkpoint is never "
                         "overwritten) and needs --method gmm (the other methods change no weights).")
    volumes = [read_image(p) for p in args.image]
    inference = InferenceConfig(device=args.device, batch_size=args.batch_size)
    if args.method != "gmm" and len(volumes) > 1:
        raise InputError(f"--method {args.method} adapts one image at a time; give one --image "
                         "(several --image are for --method gmm).")
    if args.method == "none":
        from .inference.segment import segment

        results = [segment(checkpoint, volumes[0], inference, "probabilities", progress)]
    elif args.method == "heal":
        from .heal import heal_adapt

        config = HEALConfig(tau1=args.tau1, tau2=args.tau2, candidates=args.candidates,
                            sampler=args.sampler, steps=args.steps, stages=args.stages, seed=args.seed,
                            candidate_batch=args.candidate_batch,
                            skip_empty_slices=not args.render_all_slices)
        results = [heal_adapt(volumes[0], checkpoint, config, inference, progress)]
    else:
        from .gmm import gmm_adapt
        from .gmm.adaptation import adapted_checkpoint

        config = GMMConfig(iterations=args.iterations, lam=args.lam, lr=args.lr, seed=args.seed,
                           freeze_classifier=args.freeze_classifier, class_proportions=args.class_proportions)
        results, adaptation = gmm_adapt(volumes, checkpoint, config, inference, progress)
        if args.save_adapted:
            adapted_checkpoint(checkpoint, adaptation, config, list(args.image)).save(args.save_adapted)
    outputs = []
    for i, (result, path) in enumerate(zip(results, args.image)):
        out = Path(args.out) if len(results) == 1 else Path(args.out) / f"case_{i:03d}_{Path(path).name.split('.')[0]}"
        report = write_result(result, out, input_path=path, checkpoint_path=args.checkpoint)
        if args.method == "gmm":
            from .gmm.plots import write_embedding_plot

            write_embedding_plot(result, out / "embeddings_pca.png")
        outputs.append({"out": str(out), "seconds": report["timings"]["total_seconds"],
                        "selected_index": report["selected_index"],
                        "structures": report["structure_stats"]})
    _print_json(outputs[0] if len(outputs) == 1 else outputs)
    return 0


def cmd_fit_prototypes(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint
    from .config import GMMConfig
    from .data.io import read_image, read_label
    from .gmm import fit_prototypes

    if not args.image or len(args.image) != len(args.label or []):
        raise InputError("Give one --label per --image (labelled source cases).")
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    allowed = {0} | {c.value for c in checkpoint.classes}
    images = [read_image(p) for p in args.image]
    labels = [read_label(p, allowed_values=allowed) for p in args.label]
    fitted = fit_prototypes(checkpoint, images, labels, GMMConfig(rho=args.rho, seed=args.seed),
                            device=args.device, progress=progress)
    fitted.save(args.out)
    _print_json({"checkpoint": args.out, "prototypes": fitted.describe()["prototypes"]})
    return 0


def cmd_fit_temperature(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint
    from .config import InferenceConfig
    from .data.io import read_image, read_label
    from .uncertainty.temperature import fit_temperature

    if not args.image or len(args.image) != len(args.label or []):
        raise InputError("Give one --label per --image (labelled source cases the model was not trained on).")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise InputError(f"--out '{args.out}' must name a new file; the input checkpoint is never overwritten.")
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    allowed = {0} | {c.value for c in checkpoint.classes}
    images = [read_image(p) for p in args.image]
    labels = [read_label(p, allowed_values=allowed) for p in args.label]
    fitted, fit = fit_temperature(checkpoint, images, labels, InferenceConfig(device=args.device),
                                  max_voxels=args.max_voxels, seed=args.seed, progress=progress)
    fitted.save(args.out)
    _print_json({"checkpoint": args.out, **fit.report()})
    return 0


def cmd_uncertainty(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint
    from .config import InferenceConfig
    from .data.io import read_image
    from .results.files import read_result, write_result
    from .uncertainty.maps import add_uncertainty_maps
    from .uncertainty.reliability import DEFAULT_TABLE, load_reliability_table

    if Path(args.out).resolve() == Path(args.result).resolve():
        raise InputError(f"--out '{args.out}' must be a new folder; the result folder --result is not modified.")
    if not (Path(args.result) / "report.json").is_file():
        raise InputError(f"'{args.result}' is not a result folder (no report.json); give the --out folder of "
                         "`sfuda segment` or `sfuda adapt`.")
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    adapted = SourceCheckpoint.load(args.adapted) if args.adapted else None
    table = load_reliability_table(args.reliability) if args.reliability else DEFAULT_TABLE
    result = read_result(args.result)
    names = [n.strip() for n in args.maps.split(",") if n.strip()]
    add_uncertainty_maps(result, read_image(args.image), checkpoint, names, adapted,
                         InferenceConfig(device=args.device, batch_size=args.batch_size), table=table,
                         target_modality=args.target_modality, progress=progress)
    write_result(result, args.out, input_path=args.image, checkpoint_path=args.checkpoint)
    _print_json({"out": args.out, "maps": sorted(result.maps), "reliability": result.reliability,
                 "review_queue": result.review_queue})
    return 0


def cmd_diffuse_uda(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .config import InputSpec, parse_labels
    from .data.io import read_image, read_label
    from .diffuse_uda import DiffuseUDAConfig, run_diffuse_uda

    if not args.source_image or len(args.source_image) != len(args.source_label or []):
        raise InputError(f"Got {len(args.source_image or [])} --source-image and {len(args.source_label or [])} "
                         "--source-label; give one --source-label per --source-image (labelled source scans).")
    classes = parse_labels(args.labels)
    allowed = {0} | {c.value for c in classes}
    sources = [read_image(p) for p in args.source_image]
    labels = [read_label(p, allowed_values=allowed) for p in args.source_label]
    targets = [read_image(p) for p in args.target_image]
    default_patch = (64, 64, 64) if args.dims == "3d" else (128, 128)
    spec = InputSpec(dims=args.dims, modality=args.modality, image_channels=3 if sources[0].is_rgb else 1,
                     patch_size=_ints(args.patch_size, "patch-size") if args.patch_size else default_patch)
    diffusion_widths = _ints(args.diffusion_channels, "diffusion-channels")
    if not diffusion_widths or any(w < 1 or w % diffusion_widths[0] for w in diffusion_widths):
        raise InputError(f"--diffusion-channels takes positive widths per level that are multiples of the "
                         f"first, e.g. '32,64,64,128'; got '{args.diffusion_channels}'.")
    config = DiffuseUDAConfig(fourier=not args.no_fourier, deform=not args.no_deform,
                              synthetic_scale=args.synthetic_scale, ascplus_iterations=args.iterations,
                              diffusion_iterations=args.diffusion_iterations, retrain_iterations=args.iterations,
                              batch_size=args.batch_size, seg_channels=_ints(args.channels, "channels"),
                              diffusion_base_channels=diffusion_widths[0],
                              diffusion_channel_mults=tuple(w // diffusion_widths[0] for w in diffusion_widths),
                              steps=args.steps, seed=args.seed, device=args.device)
    outcome = run_diffuse_uda(sources, labels, targets, classes, spec, config,
                              Path(args.workdir) if args.workdir else None, progress,
                              [Path(p).name for p in args.source_image], [Path(p).name for p in args.target_image])
    outcome.checkpoint.save(args.out)
    _print_json({"checkpoint": args.out, "stages": outcome.stages, "timings": outcome.timings,
                 "synthetic_dataset": str(outcome.manifest_path) if outcome.manifest_path else None})
    return 0


def cmd_synthesize(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint
    from .data.io import read_image, read_label
    from .diffuse_uda import synthesize_from_label_maps

    checkpoint = SourceCheckpoint.load(args.checkpoint)
    allowed = {0} | {c.value for c in checkpoint.classes}
    label_maps = [read_label(p, allowed_values=allowed) for p in args.label]
    images = [read_image(p) for p in args.image] if args.image else None
    if images is not None and len(images) != len(label_maps):
        raise InputError("Give one --image per --label (or none).")
    manifest = synthesize_from_label_maps(checkpoint, label_maps, args.n, args.out, deform=args.deform,
                                          images=images, sampler=args.sampler, steps=args.steps, seed=args.seed,
                                          device=args.device, progress=progress)
    _print_json({"manifest": str(manifest)})
    return 0


def cmd_evaluate(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    import numpy as np

    from .data.io import check_same_geometry, read_image
    from .evaluation.metrics import evaluate, parse_regions

    pred, ref = read_image(args.pred), read_image(args.gt)
    check_same_geometry(ref, pred)
    values = sorted(int(v) for v in np.union1d(np.unique(pred.array), np.unique(ref.array)) if v != 0)
    if args.labels:
        from .config import parse_labels

        labels: Any = {c.name: c.value for c in parse_labels(args.labels)}
    else:
        labels = values
    regions = parse_regions(args.regions) if args.regions else None
    scores = evaluate(pred.array.astype(np.int64), ref.array.astype(np.int64), pred.spacing, labels,
                      regions, nsd_tolerance_mm=args.nsd_tolerance)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from .evaluation.metrics import to_jsonable

        Path(args.json).write_text(json.dumps(to_jsonable(scores), indent=2))
    _print_json(scores)
    return 0


def cmd_info(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .checkpoint import SourceCheckpoint

    card = SourceCheckpoint.load(args.checkpoint).describe()
    if args.json:
        _print_json(card)
        return 0
    print(f"SFUDASegment checkpoint: {args.checkpoint}")
    print(f"  modality: {card['modality']}   dims: {card['dims']}   "
          f"image channels: {card['input_spec']['image_channels']}")
    print("  classes: " + ", ".join(f"{c['value']}:{c['name']}" for c in card["classes"]))
    seg = card["segmentation_network"]
    print(f"  segmentation net: residual U-Net {seg['spatial_dims']}D, channels {seg['channels']}, "
          f"{seg['parameters']:,} parameters")
    diff = card["diffusion_model"]
    print("  diffusion model: " + ("none (HEAL unavailable)" if diff is None else
                                    f"{diff['spatial_dims']}D, base {diff['base_channels']}, "
                                    f"T = {diff['schedule']['timesteps']}, {diff['parameters']:,} parameters"))
    protos = card["prototypes"]
    print("  class prototypes: " + ("none (GMM unavailable)" if protos is None else json.dumps(protos)))
    print(f"  methods: {', '.join(card['methods'])}")
    prov = card["provenance"]
    if prov:
        print(f"  trained on: {prov.get('data', '?')}; validation mean Dice "
              f"{prov.get('validation_mean_dice', float('nan')):.3f}")
    return 0


def cmd_demo(args: argparse.Namespace, progress: Optional[ProgressReporter]) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), quick=args.quick, device=args.device, train=args.train,
                       progress=progress, sample_data_dir=args.write_sample_data)
    _print_json(summary)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sfuda", description="Source-free domain adaptation for medical image segmentation "
        "(HEAL, GMM-adapted inference, Diffuse-UDA).")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="progress display: tqdm bars (default), JSON lines on stderr, or none")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def device_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")

    p = sub.add_parser("train-source", help="train a source model (and its diffusion model) into a .sfuda checkpoint")
    p.add_argument("--image", action="append", help="source image (repeat with --label)")
    p.add_argument("--label", action="append", help="its label map (same geometry)")
    p.add_argument("--pairs", help="CSV with 'image,label' per line instead of/as well as --image/--label")
    p.add_argument("--labels", required=True, help="classes as 'value:name,...', e.g. '1:necrosis,2:edema,4:enhancing'")
    p.add_argument("--dims", choices=("2d", "2.5d", "3d"), default="2d", help="network type")
    p.add_argument("--modality", default="MR", help="modality name stored in the model card, e.g. T1c")
    p.add_argument("--context", type=int, default=1, help="2.5D: neighbouring slices on each side")
    p.add_argument("--out", required=True, help="output checkpoint, e.g. model.sfuda")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patch-size", help="e.g. 128,128 (2D) or 64,64,64 (3D)")
    p.add_argument("--channels", default="16,32,64,128", help="U-Net width per level")
    p.add_argument("--diffusion", action="store_true", help="also train the conditional diffusion model (HEAL)")
    p.add_argument("--diffusion-iterations", type=int, default=2000)
    p.add_argument("--prototypes", action="store_true", help="also fit the GMM class prototypes (GMM adaptation)")
    p.add_argument("--rho", type=float, default=0.97, help="with --prototypes: confidence threshold of the voxels they are fitted on")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run (state file beside --out)")
    p.add_argument("--seed", type=int, default=0)
    device_arg(p)
    p.set_defaults(func=cmd_train_source)

    p = sub.add_parser("segment", help="segment an image with a checkpoint, no adaptation")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--uncertainty", action="store_true", help="also write probabilities' entropy map")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--overlap", type=float, default=0.5)
    device_arg(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("adapt", help="adapt the source model to target image(s): none, heal or gmm")
    p.add_argument("--method", choices=("none", "heal", "gmm"), default="heal")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", action="append", required=True,
                   help="target image (repeat for several with --method gmm)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per image when several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="slices/windows per forward pass")
    h = p.add_argument_group("HEAL")
    h.add_argument("--tau1", type=float, default=0.2, help="entropy threshold")
    h.add_argument("--tau2", type=float, default=0.2, help="normalised NIG variance threshold")
    h.add_argument("--candidates", type=int, default=6, help="n diffusion candidates")
    h.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    h.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM always uses all T)")
    h.add_argument("--stages", choices=("hd", "hd+egs", "heal"), default="heal",
                   help="ablation: denoising only, + edge-guided selection, full HEAL")
    h.add_argument("--candidate-batch", type=int, default=6, help="candidates (or slices) per diffusion batch")
    h.add_argument("--render-all-slices", action="store_true",
                   help="2D model on a volume: also render slices whose denoised labels are empty")
    g = p.add_argument_group("GMM")
    g.add_argument("--iterations", type=int, default=100)
    g.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the SWD term")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--freeze-classifier", action="store_true")
    g.add_argument("--class-proportions", choices=("source", "pseudo"), default="source",
                   help="prototype samples per class: source priors (default) or the target's confident "
                        "pseudo-label shares")
    g.add_argument("--save-adapted", help="also write the adapted model as a new checkpoint")
    device_arg(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("fit-prototypes", help="add GMM class prototypes to a checkpoint (labelled source cases)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--label", action="append", required=True)
    p.add_argument("--out", required=True, help="new checkpoint (the input file is not modified)")
    p.add_argument("--rho", type=float, default=0.97, help="confidence threshold")
    p.add_argument("--seed", type=int, default=0)
    device_arg(p)
    p.set_defaults(func=cmd_fit_prototypes)

    p = sub.add_parser("fit-temperature", help="fit the temperature of the model's probabilities on labelled "
                       "source cases (calibrates the uncertainty maps)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", action="append", required=True,
                   help="labelled source-modality case, ideally one the model was not trained on (repeat)")
    p.add_argument("--label", action="append", required=True, help="its label map (repeat)")
    p.add_argument("--out", required=True, help="new checkpoint (the input file is not modified)")
    p.add_argument("--max-voxels", type=int, default=200_000, help="body voxels used for the fit, in all")
    p.add_argument("--seed", type=int, default=0)
    device_arg(p)
    p.set_defaults(func=cmd_fit_temperature)

    p = sub.add_parser("uncertainty", help="add uncertainty maps to a result folder, with its review queue and "
                       "reliability statement")
    p.add_argument("--checkpoint", required=True, help="the source checkpoint")
    p.add_argument("--image", required=True, help="the scan the result was computed from")
    p.add_argument("--result", required=True, help="the --out folder of `sfuda segment` or `sfuda adapt`")
    p.add_argument("--out", required=True, help="new output folder (the result folder is not modified)")
    p.add_argument("--maps", default="flip_entropy,flip_variance",
                   help="comma-separated: calibrated_entropy, nig_variance, flip_entropy, flip_variance, "
                        "mahalanobis, disagreement (GMM, needs --adapted), label_disagreement")
    p.add_argument("--adapted", help="the adapted checkpoint of a GMM result (`adapt --save-adapted`)")
    p.add_argument("--reliability", help="reliability table (JSON) to choose the map to show from")
    p.add_argument("--target-modality", help="the scan's modality, e.g. FLAIR (for the reliability lookup)")
    p.add_argument("--batch-size", type=int, default=4)
    device_arg(p)
    p.set_defaults(func=cmd_uncertainty)

    p = sub.add_parser("diffuse-uda", help="source side: ASCPlus + diffusion synthesis + retraining -> checkpoint")
    p.add_argument("--source-image", action="append", required=True)
    p.add_argument("--source-label", action="append", required=True)
    p.add_argument("--target-image", action="append", required=True, help="unlabelled target scans")
    p.add_argument("--labels", required=True, help="classes as 'value:name,...'")
    p.add_argument("--dims", choices=("2d", "2.5d", "3d"), default="2d")
    p.add_argument("--modality", default="MR")
    p.add_argument("--patch-size", help="e.g. 128,128 (2D) or 64,64,64 (3D)")
    p.add_argument("--out", required=True, help="output checkpoint")
    p.add_argument("--workdir", help="stage outputs (resumable) and the synthetic dataset")
    p.add_argument("--synthetic-scale", type=float, default=2.0, help="synthetic pairs per source sample (0: none)")
    p.add_argument("--iterations", type=int, default=1000, help="ASCPlus and retraining iterations")
    p.add_argument("--diffusion-iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4, help="segmentation batch (ASCPlus and retraining)")
    p.add_argument("--channels", default="16,32,64,128", help="segmentation U-Net width per level")
    p.add_argument("--diffusion-channels", default="32,64,64,128",
                   help="diffusion U-Net width per level (multiples of the first), e.g. 16,32,32")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps when synthesizing")
    p.add_argument("--no-fourier", action="store_true", help="ablation: no Fourier appearance transfer")
    p.add_argument("--no-deform", action="store_true", help="ablation: no deformable augmentation")
    p.add_argument("--seed", type=int, default=0)
    device_arg(p)
    p.set_defaults(func=cmd_diffuse_uda)

    p = sub.add_parser("synthesize", help="generate image-label pairs from label maps with the diffusion model")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--label", action="append", required=True, help="label map (repeat for several)")
    p.add_argument("--image", action="append", help="its image (optional: gives the body outline)")
    p.add_argument("--n", type=int, default=8, help="number of pairs")
    p.add_argument("--deform", action="store_true", help="deform the label maps first")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", required=True, help="dataset folder (NIfTI pairs + manifest.json)")
    p.add_argument("--seed", type=int, default=0)
    device_arg(p)
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("evaluate", help="Dice, IoU, ASD, ASSD, HD95, NSD of a segmentation against a reference")
    p.add_argument("--pred", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--labels", help="classes as 'value:name,...' (default: every value present)")
    p.add_argument("--regions", help="unions of labels, e.g. 'WT=1,2,4;TC=1,4;ET=4'")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    p.add_argument("--json", help="also write the scores to this file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="show a checkpoint's model card")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="end-to-end demo on synthetic two-modality phantoms")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny models and data (for tests)")
    p.add_argument("--train", action="store_true", help="train the demo checkpoint even when one is bundled")
    p.add_argument("--write-sample-data", metavar="DIR",
                   help="also write the checkpoint and target scan as Slicer sample data (Resources/SampleData)")
    device_arg(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sfuda`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    progress, close = make_reporter(args.progress)
    try:
        return int(args.func(args, progress))
    except OperationCancelled as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return 130
    except SFUDAError as error:
        if args.progress == "json":
            sys.stderr.write(json.dumps({"type": "error", "error": type(error).__name__,
                                         "message": str(error)}) + "\n")
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        close()


if __name__ == "__main__":
    sys.exit(main())
