"""The ``sfuda`` command: source training, segmentation, adaptation, evaluation, model cards, demo.

Every subcommand has ``--help`` (with the defaults); long work shows progress (``--progress``,
before or after the subcommand; see ``utils/progress_display.py``). Every command that writes
goes through one :class:`~SFUDASegmentLib.results.staging.OutputTransaction`: its outputs are
checked before the work (never an input, never an existing output unless ``--overwrite``,
writable, enough free space), staged on their own file system, verified and committed all or
nothing, with a report: ``report.json`` inside an output folder, ``<file>.report.json`` beside a
single output file. Errors a user can cause are one line on stderr with exit code 2; Ctrl-C
exits with 130 and SIGTERM with 143, each with one line, and nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import InputError, OperationCancelled, SFUDAError
from .results.staging import OutputTransaction
from .utils.progress import ProgressReporter
from .utils.progress_display import MODES, make_reporter


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


def _report(args: argparse.Namespace, **content: Any) -> dict[str, Any]:
    """A command's report: the command, its arguments, ``content`` and the software versions."""
    from .results.files import versions

    arguments = {k: v for k, v in vars(args).items() if k not in ("func", "command", "progress")}
    return {"command": args.command, "arguments": arguments, **content, "versions": versions()}


def report_path(output_file: str | Path) -> Path:
    """Where a command that writes one file puts its report: ``<file>.report.json`` beside it."""
    path = Path(output_file)
    return path.with_name(path.name + ".report.json")


def _stage_file_with_report(outputs: OutputTransaction, path: str, label: str = "--out") -> tuple[Path, Path]:
    """Stage an output file and its report beside it; returns both staged paths."""
    return outputs.file(path, label), outputs.file(report_path(path), f"{label}'s report")


def _image_channels(volumes: Sequence[Any]) -> int:
    """3 when any training image is real colour; 1 when all are grey (an RGB image whose three
    channels are equal is grey)."""
    from .data.io import with_model_channels

    return 3 if any(with_model_channels(v, 1).is_rgb for v in volumes) else 1


def _parameter_bytes(*builders: Callable[[], Any]) -> int:
    """float32 bytes of the networks' parameters, counted on the ``meta`` device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(4 * p.numel() for build in builders for p in build().parameters())


#: ``adapt`` without ``--method`` runs HEAL's default, which every checkpoint supports
AUTO_METHOD = "heal"
AUTO_REASON = ("HEAL's default (the denoising alone) needs only the source model, and of the three methods it was "
               "the only one within one Dice point of no adaptation on every direction of the real-BraTS "
               "benchmark (README)")


def choose_adapt_method(requested: Optional[str]) -> dict[str, str]:
    """The method ``adapt`` runs and why (recorded in ``report.json``): ``--method`` when given,
    else :data:`AUTO_METHOD`.

    Returns:
        ``method``, ``chosen`` (``"--method"`` or ``"automatically"``) and ``reason``.
    """
    if requested is not None:
        return {"method": requested, "chosen": "--method", "reason": "given on the command line"}
    return {"method": AUTO_METHOD, "chosen": "automatically", "reason": AUTO_REASON}


# ----------------------------------------------------------------------------- commands
def _spacing(text: str, dims: str) -> tuple[float, ...]:
    """``--spacing``: two in-plane values (any dims) or ``z,y,x`` (3D), positive millimetres."""
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if len(values) not in (2, 3) or not all(0 < v < float("inf") for v in values) or (len(values) == 3 and dims != "3d"):
        raise InputError(f"--spacing takes the network spacing in mm: two in-plane values such as '2,2' "
                         f"(2D, 2.5D and 3D; the slice spacing is kept) or 'z,y,x' such as '1,2,2' (3D only); "
                         f"got '{text}' with --dims {dims}.")
    return values


def cmd_train_source(args: argparse.Namespace, progress: Optional[ProgressReporter],
                     outputs: OutputTransaction) -> Optional[dict[str, Any]]:
    from .config import DiffusionTrainingConfig, InputSpec, TrainingConfig, parse_labels
    from .data.io import read_image, read_label
    from .diffusion.training import diffusion_defaults, parse_diffusion_widths, widths_to_base_and_multipliers
    from .heal.diffusion_quality import ROUND_TRIP_KEY, round_trip_warning
    from .nets.unet import ResidualUNet
    from .training.segmentation import default_diffusion_config, default_seg_config, train_source
    from .utils.distributed import environment_rank, process_group

    images, labels = list(args.image or []), list(args.label or [])
    if args.pairs:
        more_images, more_labels = _read_pairs_csv(args.pairs)
        images += more_images
        labels += more_labels
    if not images or len(images) != len(labels):
        raise InputError(f"Got {len(images)} --image and {len(labels)} --label; give one label per "
                         "image (repeat --image/--label, or --pairs pairs.csv).")
    outputs.add_inputs([args.pairs, *images, *labels])
    out = Path(args.out)
    state_path = out.with_suffix(out.suffix + ".train-state")
    main_process = environment_rank() == 0  # under torchrun only rank 0 writes
    if main_process:
        outputs.add_working(state_path, "the training state")
        staged, staged_report = _stage_file_with_report(outputs, args.out)
    classes = parse_labels(args.labels)
    spacing = _spacing(args.spacing, args.dims) if args.spacing else None
    widths = parse_diffusion_widths(args.diffusion_channels) if args.diffusion_channels else None
    allowed = {0} | {c.value for c in classes}
    volumes = [read_image(p) for p in images]
    label_maps = [read_label(p, allowed_values=allowed) for p in labels]
    channels = _image_channels(volumes)
    default_patch = (64, 64, 64) if args.dims == "3d" else (128, 128)
    patch = _ints(args.patch_size, "patch-size") if args.patch_size else default_patch
    spec = InputSpec(dims=args.dims, modality=args.modality, image_channels=channels,
                     context_slices=args.context, patch_size=patch, target_spacing=spacing)
    config = TrainingConfig(epochs=args.epochs, iterations_per_epoch=args.iterations,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                            validation_interval=args.validation_interval,
                            validation_samples=args.validation_samples)
    seg_config = default_seg_config(spec, 1 + len(classes), _ints(args.channels, "channels"))
    if main_process:
        outputs.require_free_space(_parameter_bytes(lambda: ResidualUNet.from_config(seg_config)), "the checkpoint")
    with process_group(args.device) as distributed:
        diffusion = diffusion_net = defaults = None
        if args.diffusion:
            defaults = diffusion_defaults(distributed.device(args.device))
            iterations = defaults.iterations if args.diffusion_iterations is None else args.diffusion_iterations
            diffusion = DiffusionTrainingConfig(iterations=iterations,
                                                lr=defaults.lr, seed=args.seed, device=args.device,
                                                batch_size=args.batch_size)
            diffusion_net = default_diffusion_config(spec, 1 + len(classes),
                                                     *widths_to_base_and_multipliers(widths or defaults.widths),
                                                     defaults.num_res_blocks)
        outcome = train_source(volumes, label_maps, classes, spec, config, seg_config, diffusion, diffusion_net,
                               progress=progress if distributed.is_main else None,
                               case_names=[Path(p).name for p in images], distributed=distributed,
                               resume_path=state_path if args.resume else None,
                               round_trip_slices=args.round_trip_slices)
    if not distributed.is_main:
        return None
    checkpoint = outcome.checkpoint
    if defaults is not None:
        overridden = [name for name, given in (("widths", widths), ("iterations", args.diffusion_iterations))
                      if given is not None]
        checkpoint.provenance["diffusion_training"]["defaults"] = {**defaults.to_dict(), "overridden": overridden}
    if args.prototypes:
        from .config import GMMConfig
        from .gmm import fit_prototypes

        checkpoint = fit_prototypes(checkpoint, volumes, label_maps, GMMConfig(rho=args.rho, seed=args.seed),
                                    device=args.device, progress=progress)
    checkpoint.save(staged)
    trip_warning = round_trip_warning(checkpoint.provenance) if ROUND_TRIP_KEY in checkpoint.provenance else None
    for warning in [*outcome.warnings, *([trip_warning] if trip_warning else [])]:
        print(f"warning: {warning}", file=sys.stderr)
    summary = {"checkpoint": str(out), "best_epoch": outcome.best_epoch,
               ROUND_TRIP_KEY: checkpoint.provenance.get(ROUND_TRIP_KEY), "round_trip_warning": trip_warning,
               "validation_mean_dice": outcome.best_val_dice,
               "validation": checkpoint.provenance["validation"], "warnings": outcome.warnings,
               "timings": outcome.timings, "history": outcome.history}
    outputs.write_json(staged_report, _report(args, **summary, model_card=checkpoint.describe()))
    return summary


def cmd_segment(args: argparse.Namespace, progress: Optional[ProgressReporter],
                outputs: OutputTransaction) -> dict[str, Any]:
    from .checkpoint import SourceCheckpoint
    from .config import InferenceConfig
    from .data.io import read_image
    from .inference.segment import segment
    from .results.files import result_bytes, write_result_files

    outputs.add_inputs([args.checkpoint, args.image])
    folder = outputs.folder(args.out)
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    volume = read_image(args.image)
    outputs.require_free_space(result_bytes(volume.array.shape[:volume.geometry.ndim],
                                            float_maps=int(args.uncertainty), label_maps=1))
    config = InferenceConfig(device=args.device, batch_size=args.batch_size, overlap=args.overlap)
    result = segment(checkpoint, volume, config, "probabilities" if args.uncertainty else "labels", progress)
    report = write_result_files(result, folder, input_path=args.image, checkpoint_path=args.checkpoint)
    outputs.write_json(folder / "report.json", _report(args, **report))
    return {"out": args.out, "seconds": report["timings"]["total_seconds"],
            "structures": report["structure_stats"]}


def cmd_adapt(args: argparse.Namespace, progress: Optional[ProgressReporter],
              outputs: OutputTransaction) -> Any:
    from .checkpoint import SourceCheckpoint
    from .config import GMMConfig, HEALConfig, InferenceConfig
    from .data.io import read_image
    from .results.files import result_bytes, write_result_files

    if args.cohort:
        from .cohort import adapt_cohort

        return adapt_cohort(args, cmd_adapt, progress, outputs)
    outputs.add_inputs([args.checkpoint, *args.image])
    folder = outputs.folder(args.out)
    adapted_path = outputs.file(args.save_adapted, "--save-adapted") if args.save_adapted else None
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    choice = choose_adapt_method(args.method)
    method = choice["method"]
    if args.method is None:
        print(f"adapt: method {method}, chosen because {choice['reason']} (--method chooses another)",
              file=sys.stderr)
    if args.save_adapted and method != "gmm":
        raise InputError(f"--save-adapted needs --method gmm (method {method} changes no weights); "
                         "drop --save-adapted or pass --method gmm.")
    volumes = [read_image(p) for p in args.image]
    inference = InferenceConfig(device=args.device, batch_size=args.batch_size)
    if method != "gmm" and len(volumes) > 1:
        raise InputError(f"--method {method} adapts one image at a time; give one --image "
                         "(several --image are for --method gmm).")
    # float maps (entropy, NIG variance, candidates; GMM's disagreement and ensemble entropy), label maps
    maps = {"none": (1, 1), "heal": (2 + args.candidates, 5), "gmm": (4, 2)}[method]
    outputs.require_free_space(sum(result_bytes(v.array.shape[:v.geometry.ndim], *maps) for v in volumes)
                               + (os.path.getsize(args.checkpoint) if adapted_path else 0))
    if method == "none":
        from .inference.segment import segment

        results = [segment(checkpoint, volumes[0], inference, "probabilities", progress)]
    elif method == "heal":
        from .heal import heal_adapt

        config = HEALConfig(tau1=args.tau1, tau2=args.tau2, candidates=args.candidates,
                            sampler=args.sampler, steps=args.steps, stages=args.stages, seed=args.seed,
                            candidate_batch=args.candidate_batch,
                            skip_empty_slices=not args.render_all_slices, denoise=args.denoise,
                            component_markers=args.component_markers,
                            component_grouping=args.component_grouping)
        results = [heal_adapt(volumes[0], checkpoint, config, inference, progress)]
    else:
        from .gmm import gmm_adapt
        from .gmm.adaptation import adapted_checkpoint

        config = GMMConfig(iterations=args.iterations, lam=args.lam, lr=args.lr, seed=args.seed,
                           freeze_classifier=args.freeze_classifier, class_proportions=args.class_proportions,
                           guard_agreement=args.guard_agreement, flip_uncertainty=not args.no_flip_uncertainty)
        results, adaptation = gmm_adapt(volumes, checkpoint, config, inference, progress)
        if adapted_path is not None:
            adapted_checkpoint(checkpoint, adaptation, config, list(args.image)).save(adapted_path)
    for result, path in zip(results, args.image):
        for warning in result.extra.get("warnings", []):
            print(f"warning: {Path(path).name}: {warning}", file=sys.stderr)
    outputs_list = []
    for i, (result, path) in enumerate(zip(results, args.image)):
        name = "" if len(results) == 1 else f"case_{i:03d}_{Path(path).name.split('.')[0]}"
        report = write_result_files(result, folder / name, input_path=path, checkpoint_path=args.checkpoint)
        if method == "gmm":
            from .gmm.plots import write_embedding_plot

            write_embedding_plot(result, folder / name / "embeddings_pca.png")
            report["files"]["embeddings_pca"] = "embeddings_pca.png"
        outputs.write_json(folder / name / "report.json",
                           _report(args, **report, method_choice=choice, adapted_checkpoint=args.save_adapted))
        outputs_list.append({"out": str(Path(args.out) / name), "seconds": report["timings"]["total_seconds"],
                             "selected_index": report["selected_index"],
                             "structures": report["structure_stats"]})
    if len(results) > 1:
        outputs.write_json(folder / "report.json", _report(args, method_choice=choice, cases=outputs_list,
                                                           adapted_checkpoint=args.save_adapted))
    return outputs_list[0] if len(outputs_list) == 1 else outputs_list


def _checkpoint_with_labelled_cases(args: argparse.Namespace, outputs: OutputTransaction, which_cases: str
                                    ) -> tuple[Path, Path, Any, list[Any], list[Any]]:
    """What the commands that turn a checkpoint and labelled cases into a new checkpoint share:
    one ``--label`` per ``--image`` (else an error that names ``which_cases``), the inputs
    declared, ``--out`` and its report staged, room for the checkpoint, the files read.

    Returns:
        ``(staged checkpoint path, staged report path, checkpoint, images, label maps)``.
    """
    from .checkpoint import SourceCheckpoint
    from .data.io import read_image, read_label

    if not args.image or len(args.image) != len(args.label or []):
        raise InputError(f"Give one --label per --image ({which_cases}).")
    outputs.add_inputs([args.checkpoint, *args.image, *args.label])
    staged, staged_report = _stage_file_with_report(outputs, args.out)
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    outputs.require_free_space(os.path.getsize(args.checkpoint), "the checkpoint")
    allowed = {0} | {c.value for c in checkpoint.classes}
    images = [read_image(p) for p in args.image]
    labels = [read_label(p, allowed_values=allowed) for p in args.label]
    return staged, staged_report, checkpoint, images, labels


def cmd_fit_prototypes(args: argparse.Namespace, progress: Optional[ProgressReporter],
                       outputs: OutputTransaction) -> dict[str, Any]:
    from .config import GMMConfig
    from .gmm import fit_prototypes

    staged, staged_report, checkpoint, images, labels = _checkpoint_with_labelled_cases(
        args, outputs, "labelled source cases")
    fitted = fit_prototypes(checkpoint, images, labels, GMMConfig(rho=args.rho, seed=args.seed),
                            device=args.device, progress=progress)
    fitted.save(staged)
    summary = {"checkpoint": args.out, "prototypes": fitted.describe()["prototypes"]}
    outputs.write_json(staged_report, _report(args, **summary))
    return summary


def cmd_round_trip(args: argparse.Namespace, progress: Optional[ProgressReporter],
                   outputs: OutputTransaction) -> dict[str, Any]:
    from .config import HEALConfig, InferenceConfig
    from .heal.diffusion_quality import ROUND_TRIP_KEY, round_trip_warning
    from .heal.round_trip import with_round_trip

    staged, staged_report, checkpoint, images, labels = _checkpoint_with_labelled_cases(
        args, outputs, "labelled source cases the diffusion model was not trained on")
    config = HEALConfig(candidates=args.candidates, sampler=args.sampler, steps=args.steps, seed=args.seed)
    checked = with_round_trip(checkpoint, images, labels, config,
                              InferenceConfig(device=args.device, batch_size=args.batch_size), args.slices,
                              [Path(p).name for p in args.image], progress)
    checked.save(staged)
    warning = round_trip_warning(checked.provenance)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    summary = {"checkpoint": args.out, ROUND_TRIP_KEY: checked.provenance[ROUND_TRIP_KEY], "warning": warning}
    outputs.write_json(staged_report, _report(args, **summary))
    return summary


def cmd_fit_temperature(args: argparse.Namespace, progress: Optional[ProgressReporter],
                        outputs: OutputTransaction) -> dict[str, Any]:
    from .config import InferenceConfig
    from .uncertainty.temperature import fit_temperature

    staged, staged_report, checkpoint, images, labels = _checkpoint_with_labelled_cases(
        args, outputs, "labelled source cases the model was not trained on")
    fitted, fit = fit_temperature(checkpoint, images, labels, InferenceConfig(device=args.device),
                                  max_voxels=args.max_voxels, seed=args.seed, progress=progress)
    fitted.save(staged)
    summary = {"checkpoint": args.out, **fit.report()}
    outputs.write_json(staged_report, _report(args, **summary))
    return summary


def cmd_uncertainty(args: argparse.Namespace, progress: Optional[ProgressReporter],
                    outputs: OutputTransaction) -> dict[str, Any]:
    from .checkpoint import SourceCheckpoint
    from .config import InferenceConfig
    from .data.io import read_image
    from .results.files import read_result, write_result_files
    from .uncertainty.maps import add_uncertainty_maps
    from .uncertainty.reliability import DEFAULT_TABLE, load_reliability_table

    if not (Path(args.result) / "report.json").is_file():
        raise InputError(f"'{args.result}' is not a result folder (no report.json); give the --out folder of "
                         "`sfuda segment` or `sfuda adapt`.")
    outputs.add_inputs([args.checkpoint, args.image, args.result, args.adapted, args.reliability])
    folder = outputs.folder(args.out)
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    adapted = SourceCheckpoint.load(args.adapted) if args.adapted else None
    table = load_reliability_table(args.reliability) if args.reliability else DEFAULT_TABLE
    result = read_result(args.result)
    names = [n.strip() for n in args.maps.split(",") if n.strip()]
    add_uncertainty_maps(result, read_image(args.image), checkpoint, names, adapted,
                         InferenceConfig(device=args.device, batch_size=args.batch_size), table=table,
                         target_modality=args.target_modality, progress=progress)
    report = write_result_files(result, folder, input_path=args.image, checkpoint_path=args.checkpoint)
    outputs.write_json(folder / "report.json", _report(args, **report))
    return {"out": args.out, "maps": sorted(result.maps), "reliability": result.reliability,
            "review_queue": result.review_queue}


def cmd_diffuse_uda(args: argparse.Namespace, progress: Optional[ProgressReporter],
                    outputs: OutputTransaction) -> dict[str, Any]:
    from .config import InputSpec, parse_labels
    from .data.io import read_image, read_label
    from .diffuse_uda import DiffuseUDAConfig, run_diffuse_uda
    from .diffusion.training import parse_diffusion_widths, widths_to_base_and_multipliers

    if not args.source_image or len(args.source_image) != len(args.source_label or []):
        raise InputError(f"Got {len(args.source_image or [])} --source-image and {len(args.source_label or [])} "
                         "--source-label; give one --source-label per --source-image (labelled source scans).")
    outputs.add_inputs([*args.source_image, *args.source_label, *args.target_image])
    if args.workdir:
        outputs.add_working(args.workdir, "--workdir")
    staged, staged_report = _stage_file_with_report(outputs, args.out)
    classes = parse_labels(args.labels)
    diffusion_base, diffusion_mults = widths_to_base_and_multipliers(parse_diffusion_widths(args.diffusion_channels))
    allowed = {0} | {c.value for c in classes}
    sources = [read_image(p) for p in args.source_image]
    labels = [read_label(p, allowed_values=allowed) for p in args.source_label]
    targets = [read_image(p) for p in args.target_image]
    default_patch = (64, 64, 64) if args.dims == "3d" else (128, 128)
    spec = InputSpec(dims=args.dims, modality=args.modality, image_channels=_image_channels(sources),
                     patch_size=_ints(args.patch_size, "patch-size") if args.patch_size else default_patch)
    config = DiffuseUDAConfig(fourier=not args.no_fourier, deform=not args.no_deform,
                              synthetic_scale=args.synthetic_scale, ascplus_iterations=args.iterations,
                              diffusion_iterations=args.diffusion_iterations, retrain_iterations=args.iterations,
                              batch_size=args.batch_size, seg_channels=_ints(args.channels, "channels"),
                              diffusion_base_channels=diffusion_base, diffusion_channel_mults=diffusion_mults,
                              steps=args.steps, seed=args.seed, device=args.device)
    outcome = run_diffuse_uda(sources, labels, targets, classes, spec, config,
                              Path(args.workdir) if args.workdir else None, progress,
                              [Path(p).name for p in args.source_image], [Path(p).name for p in args.target_image])
    outcome.checkpoint.save(staged)
    summary = {"checkpoint": args.out, "stages": outcome.stages, "timings": outcome.timings,
               "synthetic_dataset": str(outcome.manifest_path) if outcome.manifest_path else None}
    outputs.write_json(staged_report, _report(args, **summary))
    return summary


def cmd_synthesize(args: argparse.Namespace, progress: Optional[ProgressReporter],
                   outputs: OutputTransaction) -> dict[str, Any]:
    from .checkpoint import SourceCheckpoint
    from .data.io import read_image, read_label
    from .diffuse_uda import synthesize_from_label_maps

    outputs.add_inputs([args.checkpoint, *args.label, *(args.image or [])])
    folder = outputs.folder(args.out)
    checkpoint = SourceCheckpoint.load(args.checkpoint)
    allowed = {0} | {c.value for c in checkpoint.classes}
    label_maps = [read_label(p, allowed_values=allowed) for p in args.label]
    images = [read_image(p) for p in args.image] if args.image else None
    if images is not None and len(images) != len(label_maps):
        raise InputError("Give one --image per --label (or none).")
    manifest = synthesize_from_label_maps(checkpoint, label_maps, args.n, folder, deform=args.deform,
                                          images=images, sampler=args.sampler, steps=args.steps, seed=args.seed,
                                          device=args.device, progress=progress)
    summary = {"manifest": str(outputs.final_path(manifest))}
    outputs.write_json(folder / "report.json", _report(args, **summary, pairs=args.n))
    return summary


def cmd_evaluate(args: argparse.Namespace, progress: Optional[ProgressReporter],
                 outputs: OutputTransaction) -> dict[str, Any]:
    import numpy as np

    from .data.io import check_same_geometry, read_image
    from .evaluation.metrics import evaluate, parse_regions

    outputs.add_inputs([args.pred, args.gt])
    staged = _stage_file_with_report(outputs, args.json, "--json") if args.json else None
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
                      regions, nsd_tolerance_mm=args.nsd_tolerance, progress=progress)
    if staged is not None:
        outputs.write_json(staged[0], scores)
        outputs.write_json(staged[1], _report(args, scores=args.json, mean_dice=scores["mean_dice"]))
    return scores


def cmd_info(args: argparse.Namespace, progress: Optional[ProgressReporter],
             outputs: OutputTransaction) -> None:
    from .checkpoint import SourceCheckpoint

    card = SourceCheckpoint.load(args.checkpoint).describe()
    if args.json:
        _print_json(card)
        return None
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
    if diff is not None:
        from .heal.diffusion_quality import ROUND_TRIP_KEY, round_trip_warning

        trip = card["provenance"].get(ROUND_TRIP_KEY)
        if trip:
            print(f"  diffusion round trip: mean Dice {trip['round_trip_dice']:.3f} on images rendered from "
                  f"held-out labels ({trip['slices']} slices), source model {trip['source_dice']:.3f} on the "
                  "real images")
        warning = round_trip_warning(card["provenance"])
        if warning:
            print(f"  warning: {warning}")
    protos = card["prototypes"]
    if protos is None:
        print("  class prototypes: none (GMM unavailable)")
    else:
        print(prototype_table(protos, ["background"] + [c["name"] for c in card["classes"]]))
    print(f"  methods: {', '.join(card['methods'])}")
    prov = card["provenance"]
    if prov:
        on = f" on the {prov['validation']}" if prov.get("validation") else ""
        print(f"  trained on: {prov.get('data', '?')}; validation mean Dice "
              f"{prov.get('validation_mean_dice', float('nan')):.3f}{on}")
    return None


def prototype_table(prototypes: dict[str, Any], class_names: Sequence[str]) -> str:
    """The GMM class prototypes of a model card as an aligned text table.

    Args:
        prototypes: ``card["prototypes"]`` (see ``ClassPrototypes.describe``).
        class_names: name of every class index, background first.
    """
    lines = [f"  class prototypes (one Gaussian per class of the {prototypes['embedding_dim']}-D "
             f"'{prototypes['embedding_layer']}' embedding, fitted on voxels with confidence > "
             f"{prototypes['rho']:g}):",
             f"    {'class':14s} {'weight':>7s} {'label share':>11s} {'voxels':>10s} {'|mean|':>8s} "
             f"{'cov. trace':>10s} {'condition':>10s}"]
    for entry in prototypes["classes"]:
        index = entry["class_index"]
        name = class_names[index] if index < len(class_names) else f"class {index}"
        share = "-" if entry["label_share"] is None else f"{entry['label_share']:.4f}"
        lines.append(f"    {name[:14]:14s} {entry['weight']:7.4f} {share:>11s} {entry['selected_voxels']:10,d} "
                     f"{entry['mean_norm']:8.2f} {entry['covariance_trace']:10.2f} "
                     f"{entry['covariance_condition']:10.0f}")
    return "\n".join(lines)


def cmd_devices(args: argparse.Namespace, progress: Optional[ProgressReporter],
                outputs: OutputTransaction) -> None:
    from .utils.device import device_inventory

    inventory = device_inventory()
    if args.json:
        _print_json(inventory)
        return None
    build = f"CUDA {inventory['cuda_build']}" if inventory["cuda_build"] else "CPU-only"
    print(f"PyTorch {inventory['torch']} ({build} build), {inventory['cpu_threads']} CPU threads")
    for gpu in inventory["gpus"]:
        print(f"  {gpu['device']}: {gpu['name']}, {gpu['free_mib'] / 1024:.1f} GiB free of "
              f"{gpu['total_mib'] / 1024:.1f} GiB")
    if not inventory["gpus"]:
        print("  no CUDA GPU: the methods run on the CPU")
    return None


def cmd_demo(args: argparse.Namespace, progress: Optional[ProgressReporter],
             outputs: OutputTransaction) -> dict[str, Any]:
    from .demo import run_demo

    return run_demo(Path(args.out), quick=args.quick, device=args.device, train=args.train,
                    progress=progress, sample_data_dir=args.write_sample_data, outputs=outputs,
                    report_extra=_report(args))


# ----------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if any(action.default is value for value in (None, False, argparse.SUPPRESS)):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from .config import GMMConfig, HEALConfig
    from .heal.component_reconstruction import GROUPINGS
    from .heal.denoised_labels import DENOISE_MODES, MARKERS

    parser = argparse.ArgumentParser(
        prog="sfuda", formatter_class=_HelpFormatter,
        description="Source-free domain adaptation for medical image segmentation "
        "(HEAL, GMM-adapted inference, Diffuse-UDA).")
    progress_help = ("progress on stderr: bars on a terminal (plain lines in a log), plain lines, "
                     "JSON lines (for scripts) or none")
    parser.add_argument("--progress", choices=MODES, default="bar", help=progress_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func: Callable[..., Any], writes: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.add_argument("--progress", choices=MODES, default=argparse.SUPPRESS,
                       help=progress_help + " (also accepted before the command; default: bar)")
        if writes:
            p.add_argument("--overwrite", action="store_true",
                           help="replace an existing output whole (an output folder loses every earlier "
                                "file); never allowed for an input")
        p.set_defaults(func=func)
        return p

    def device_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")

    p = command("train-source", "train a source model (and its diffusion model) into a .sfuda checkpoint",
                cmd_train_source)
    p.add_argument("--image", action="append", help="source image (repeat with --label)")
    p.add_argument("--label", action="append", help="its label map (same geometry)")
    p.add_argument("--pairs", help="CSV with 'image,label' per line instead of/as well as --image/--label")
    p.add_argument("--labels", required=True, help="classes as 'value:name,...', e.g. '1:necrosis,2:edema,4:enhancing'")
    p.add_argument("--dims", choices=("2d", "2.5d", "3d"), default="2d", help="network type")
    p.add_argument("--modality", default="MR", help="modality name stored in the model card, e.g. T1c")
    p.add_argument("--context", type=int, default=1, help="2.5D: neighbouring slices on each side")
    p.add_argument("--out", required=True,
                   help="output checkpoint, e.g. model.sfuda (its report: model.sfuda.report.json)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    p.add_argument("--batch-size", type=int, default=8,
                   help="patches per iteration: the global batch (under torchrun split evenly over the processes)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    p.add_argument("--patch-size", help="e.g. 128,128 (2D) or 64,64,64 (3D); default 128,128 or 64,64,64")
    p.add_argument("--spacing", help="network spacing in mm: '2,2' in-plane (any --dims; the slice spacing is kept) "
                                     "or 'z,y,x' such as '1,2,2' (3D); default: each image's own")
    p.add_argument("--channels", default="16,32,64,128", help="U-Net width per level")
    p.add_argument("--validation-interval", type=int, default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--validation-samples", type=int, default=32,
                   help="slices (2D, 2.5D) or windows (3D) of the held-out cases in the fixed validation sample; "
                        "0: whole cases")
    p.add_argument("--diffusion", action="store_true", help="also train the conditional diffusion model (HEAL)")
    p.add_argument("--diffusion-iterations", type=int,
                   help="diffusion training iterations; default: 600 on CPU, 100000 on GPU (Med-DDPM's)")
    p.add_argument("--diffusion-channels",
                   help="diffusion U-Net width per level (multiples of the first), as for diffuse-uda; "
                        "default: 16,32,32 with one residual block a level on CPU, 64,64,128,192,256 with two "
                        "on GPU (Med-DDPM's)")
    p.add_argument("--round-trip-slices", type=int, default=8,
                   help="with --diffusion: the diffusion model is trained without the held-out validation cases "
                        "and its round trip (renderings segmented again) is measured on this many of their "
                        "slices and stored in the card; 0: skip it and train the diffusion model on every case")
    p.add_argument("--prototypes", action="store_true", help="also fit the GMM class prototypes (GMM adaptation)")
    p.add_argument("--rho", type=float, default=0.97, help="with --prototypes: confidence threshold of the voxels they are fitted on")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run (state file beside --out)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_arg(p)

    p = command("segment", "segment an image with a checkpoint, no adaptation", cmd_segment)
    p.add_argument("--checkpoint", required=True, help="the .sfuda checkpoint")
    p.add_argument("--image", required=True, help="the image to segment")
    p.add_argument("--out", required=True, help="output folder (new or empty; holds report.json)")
    p.add_argument("--uncertainty", action="store_true", help="also write probabilities' entropy map")
    p.add_argument("--batch-size", type=int, default=4, help="slices/windows per forward pass")
    p.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap")
    device_arg(p)

    p = command("adapt", "adapt the source model to target image(s): none, heal or gmm", cmd_adapt)
    p.add_argument("--method", choices=("none", "heal", "gmm"),
                   help="adaptation method; default: heal, with its default denoising alone, which every "
                        "checkpoint supports (the README's BraTS benchmark says why)")
    p.add_argument("--checkpoint", required=True, help="the .sfuda checkpoint (never modified)")
    p.add_argument("--image", action="append", required=True,
                   help="target image (repeat for several with --method gmm)")
    p.add_argument("--out", required=True,
                   help="output folder, new or empty (one sub-folder per image when several)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=4, help="slices/windows per forward pass")
    h = p.add_argument_group("HEAL")
    h.add_argument("--tau1", type=float, default=0.2, help="entropy threshold")
    h.add_argument("--tau2", type=float, default=0.2, help="normalised NIG variance threshold")
    h.add_argument("--candidates", type=int, default=6, help="n diffusion candidates")
    h.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="diffusion sampler")
    h.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM always uses all T)")
    h.add_argument("--stages", choices=("hd", "hd+egs", "heal"), default=HEALConfig.stages,
                   help="'hd': denoising only (the default: on real BraTS scans the diffusion stages lost "
                        "to it in every direction measured, see the README); 'hd+egs': + the edge-guided "
                        "selection of a diffusion candidate; 'heal': the paper's full pipeline with fusion")
    h.add_argument("--candidate-batch", type=int, default=6, help="candidates (or slices) per diffusion batch")
    h.add_argument("--render-all-slices", action="store_true",
                   help="2D model on a volume: also render slices whose denoised labels are empty")
    h.add_argument("--denoise", choices=DENOISE_MODES, default=HEALConfig.denoise,
                   help="denoised labels: 'paper' (Y*, only the voxels the NIG stage keeps, as the paper) or "
                        "'components' (the source model's connected components that hold a marker voxel, "
                        "kept whole with their boundaries)")
    h.add_argument("--component-markers", choices=MARKERS, default=HEALConfig.component_markers,
                   help="with --denoise components: the markers, Y_ent ('entropy') or Y* ('nig')")
    h.add_argument("--component-grouping", choices=GROUPINGS, default=HEALConfig.component_grouping,
                   help="with --denoise components: components per class or of the whole foreground")
    g = p.add_argument_group("GMM")
    g.add_argument("--iterations", type=int, default=100, help="adaptation iterations")
    g.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the SWD term")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    g.add_argument("--freeze-classifier", action="store_true", help="keep the 1x1 classifier fixed")
    g.add_argument("--class-proportions", choices=("source", "pseudo"), default="source",
                   help="prototype samples per class: source priors or the target's confident "
                        "pseudo-label shares")
    g.add_argument("--guard-agreement", type=float, default=GMMConfig.guard_agreement,
                   help="keep the source model's segmentation (and warn) when the adapted foreground agrees "
                        "with it below this Dice; 0 turns the guard off")
    g.add_argument("--no-flip-uncertainty", action="store_true",
                   help="skip ensemble_entropy, GMM's default overlay (6 more inferences per scan: the source and "
                        "the adapted network over 3 flips each); the maps that cost nothing extra stay")
    g.add_argument("--save-adapted", help="also write the adapted model as a new checkpoint")
    p.add_argument("--cohort", action="store_true",
                   help="adapt every --image on its own into OUT/case_NNN_<name> and write OUT/cohort.json; "
                        "under torchrun the images are split over the processes")
    device_arg(p)

    p = command("fit-prototypes", "add GMM class prototypes to a checkpoint (labelled source cases)",
                cmd_fit_prototypes)
    p.add_argument("--checkpoint", required=True, help="the .sfuda checkpoint (never modified)")
    p.add_argument("--image", action="append", required=True, help="labelled source image (repeat)")
    p.add_argument("--label", action="append", required=True, help="its label map (repeat)")
    p.add_argument("--out", required=True,
                   help="new checkpoint, never the input (its report: <out>.report.json)")
    p.add_argument("--rho", type=float, default=0.97, help="confidence threshold")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_arg(p)

    p = command("round-trip", "measure whether the diffusion model's renderings carry the structure (labelled "
                "held-out source cases) and record it in a new checkpoint", cmd_round_trip)
    p.add_argument("--checkpoint", required=True, help="the .sfuda checkpoint with a diffusion model (never modified)")
    p.add_argument("--image", action="append", required=True,
                   help="labelled source image the diffusion model was not trained on (repeat)")
    p.add_argument("--label", action="append", required=True, help="its label map (repeat)")
    p.add_argument("--out", required=True, help="new checkpoint, never the input (its report: <out>.report.json)")
    p.add_argument("--slices", type=int, default=16, help="2D model: slices rendered in all, spread over the cases")
    p.add_argument("--candidates", type=int, default=HEALConfig.candidates, help="candidates per slice")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=HEALConfig.sampler, help="diffusion sampler")
    p.add_argument("--steps", type=int, default=HEALConfig.steps, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=4, help="slices/windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_arg(p)

    p = command("fit-temperature", "fit the temperature of the model's probabilities on labelled source cases "
                "(calibrates the uncertainty maps) into a new checkpoint", cmd_fit_temperature)
    p.add_argument("--checkpoint", required=True, help="the .sfuda checkpoint (never modified)")
    p.add_argument("--image", action="append", required=True,
                   help="labelled source-modality case, ideally one the model was not trained on (repeat)")
    p.add_argument("--label", action="append", required=True, help="its label map (repeat)")
    p.add_argument("--out", required=True, help="new checkpoint, never the input (its report: <out>.report.json)")
    p.add_argument("--max-voxels", type=int, default=200_000, help="body voxels used for the fit, in all")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_arg(p)

    p = command("uncertainty", "add uncertainty maps to a result folder, with its review queue and reliability "
                "statement, written to a new folder", cmd_uncertainty)
    p.add_argument("--checkpoint", required=True, help="the source checkpoint")
    p.add_argument("--image", required=True, help="the scan the result was computed from")
    p.add_argument("--result", required=True, help="the --out folder of `sfuda segment` or `sfuda adapt` (not modified)")
    p.add_argument("--out", required=True, help="output folder, new or empty (holds report.json)")
    p.add_argument("--maps", default="flip_entropy,flip_variance",
                   help="comma-separated: calibrated_entropy, nig_variance, flip_entropy, flip_variance, "
                        "mahalanobis, disagreement and ensemble_entropy (GMM, need --adapted), label_disagreement")
    p.add_argument("--adapted", help="the adapted checkpoint of a GMM result (`adapt --save-adapted`)")
    p.add_argument("--reliability", help="reliability table (JSON) to choose the map to show from")
    p.add_argument("--target-modality", help="the scan's modality, e.g. FLAIR (for the reliability lookup)")
    p.add_argument("--batch-size", type=int, default=4, help="slices/windows per forward pass")
    device_arg(p)

    p = command("diffuse-uda", "source side: ASCPlus + diffusion synthesis + retraining -> checkpoint",
                cmd_diffuse_uda)
    p.add_argument("--source-image", action="append", required=True, help="labelled source scan (repeat)")
    p.add_argument("--source-label", action="append", required=True, help="its label map (repeat)")
    p.add_argument("--target-image", action="append", required=True, help="unlabelled target scans")
    p.add_argument("--labels", required=True, help="classes as 'value:name,...'")
    p.add_argument("--dims", choices=("2d", "2.5d", "3d"), default="2d", help="network type")
    p.add_argument("--modality", default="MR", help="modality name stored in the model card")
    p.add_argument("--patch-size", help="e.g. 128,128 (2D) or 64,64,64 (3D); default 128,128 or 64,64,64")
    p.add_argument("--out", required=True, help="output checkpoint (its report: <out>.report.json)")
    p.add_argument("--workdir", help="stage outputs (resumable) and the synthetic dataset")
    p.add_argument("--synthetic-scale", type=float, default=2.0, help="synthetic pairs per source sample (0: none)")
    p.add_argument("--iterations", type=int, default=1000, help="ASCPlus and retraining iterations")
    p.add_argument("--diffusion-iterations", type=int, default=2000, help="diffusion training iterations")
    p.add_argument("--batch-size", type=int, default=4, help="segmentation batch (ASCPlus and retraining)")
    p.add_argument("--channels", default="16,32,64,128", help="segmentation U-Net width per level")
    p.add_argument("--diffusion-channels", default="32,64,64,128",
                   help="diffusion U-Net width per level (multiples of the first), e.g. 16,32,32")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps when synthesizing")
    p.add_argument("--no-fourier", action="store_true", help="ablation: no Fourier appearance transfer")
    p.add_argument("--no-deform", action="store_true", help="ablation: no deformable augmentation")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_arg(p)

    p = command("synthesize", "generate image-label pairs from label maps with the diffusion model",
                cmd_synthesize)
    p.add_argument("--checkpoint", required=True, help="a .sfuda checkpoint with a diffusion model")
    p.add_argument("--label", action="append", required=True, help="label map (repeat for several)")
    p.add_argument("--image", action="append", help="its image (optional: gives the body outline)")
    p.add_argument("--n", type=int, default=8, help="number of pairs")
    p.add_argument("--deform", action="store_true", help="deform the label maps first")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="diffusion sampler")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--out", required=True,
                   help="dataset folder, new or empty (NIfTI pairs, manifest.json, report.json)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    device_arg(p)

    p = command("evaluate", "Dice, IoU, ASD, ASSD, HD95, NSD of a segmentation against a reference",
                cmd_evaluate)
    p.add_argument("--pred", required=True, help="the segmentation to score")
    p.add_argument("--gt", required=True, help="the reference segmentation")
    p.add_argument("--labels", help="classes as 'value:name,...' (default: every value present)")
    p.add_argument("--regions", help="unions of labels, e.g. 'WT=1,2,4;TC=1,4;ET=4'")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    p.add_argument("--json", help="also write the scores to this file (its report: <file>.report.json)")

    p = command("info", "show a checkpoint's model card", cmd_info, writes=False)
    p.add_argument("checkpoint", help="the .sfuda checkpoint")
    p.add_argument("--json", action="store_true", help="print the card as JSON")

    p = command("devices", "the PyTorch build and the GPUs it can use, with their free memory", cmd_devices,
                writes=False)
    p.add_argument("--json", action="store_true", help="print the inventory as JSON")

    p = command("demo", "end-to-end demo on synthetic two-modality phantoms", cmd_demo)
    p.add_argument("--out", required=True, help="output folder, new or empty (holds report.json)")
    p.add_argument("--quick", action="store_true", help="tiny models and data (for tests)")
    p.add_argument("--train", action="store_true", help="train the demo checkpoint even when one is bundled")
    p.add_argument("--write-sample-data", metavar="DIR",
                   help="also write the checkpoint and target scan as Slicer sample data (Resources/SampleData)")
    device_arg(p)
    return parser


# ----------------------------------------------------------------------------- running
class Terminated(BaseException):
    """SIGTERM arrived (e.g. the Slicer job runner cancelled the job)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (so that staged output is
    removed) instead of ending the process at once; main thread and platforms with SIGTERM."""
    number = getattr(signal, "SIGTERM", None)
    if number is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(number, handler)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(number, signal.SIG_DFL if previous is None else previous)


def _one_line(text: str) -> str:
    """A message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(text).split())


def _os_error_text(error: OSError) -> str:
    """An operating-system error as one sentence with its fix."""
    where = f" '{error.filename}'" if error.filename else ""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"the disk is full ({error.strerror}{where}); nothing was written. Free space or choose "
                "another output location.")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{error.strerror}{where}; nothing was written. Check the permissions, or choose an "
                "output location you may write to.")
    if error.strerror is None:
        return f"{error}; nothing was written."
    return f"{error.strerror}{where}; nothing was written. Check the path and try again."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sfuda`` console script; returns the exit code.

    Exit codes: 0 success; 2 an error the user can fix (one line on stderr, and a JSON error
    line with ``--progress json``); 130 Ctrl-C or a cancel; 143 SIGTERM. Only success writes.
    """
    from .utils.threads import prefer_sleeping_threads

    prefer_sleeping_threads()  # before anything imports PyTorch
    args = build_parser().parse_args(argv)
    progress, close = make_reporter(args.progress)
    outputs = OutputTransaction(overwrite=getattr(args, "overwrite", False))

    def fail(kind: str, message: str) -> int:
        message = _one_line(message)
        if args.progress == "json":
            sys.stderr.write(json.dumps({"type": "error", "error": kind, "message": message}) + "\n")
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        with _sigterm_raises():
            with outputs:
                summary = args.func(args, progress, outputs)
        if summary is not None:
            _print_json(summary)
        return 0
    except OperationCancelled as error:
        print(f"cancelled: {_one_line(error)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        done = "the output was already complete" if outputs.committed else "nothing was written"
        print(f"cancelled: interrupted (Ctrl-C); {done}.", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: stopped by SIGTERM; " + ("the output was already complete."
                                                    if outputs.committed else "nothing was written."),
              file=sys.stderr)
        return 143
    except SFUDAError as error:
        return fail(type(error).__name__, str(error))
    except OSError as error:
        return fail("OSError", _os_error_text(error))
    except MemoryError:
        return fail("MemoryError", "out of memory. Use a smaller --batch-size, a smaller image or a "
                                   "machine with more memory.")
    finally:
        close()


if __name__ == "__main__":
    sys.exit(main())
