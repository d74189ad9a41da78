"""Diffuse-UDA on the two glioma cases of ../shared/data: labelled T1c source, unlabelled FLAIR target.

Source: the T1c scans of both cases with their labels. Target: the FLAIR scans of both cases,
without labels. Rows, each scored on the FLAIR scans against the labels:

* ``source-only``: a 2D segmentation network trained on the T1c scans alone, with the same
  network, batch and iteration budget as Diffuse-UDA's retraining;
* ``ascplus``: the Diffuse-UDA stage-1 student (Fourier transfer + consistency training);
* ``diffuse-uda``: the final model (source + synthetic pairs + restyled source).

The FLAIR scans are both the adaptation data and the test set (transductive, as at a target
site that adapts on its own unlabelled scans). The network works at an in-plane spacing of
``--spacing`` mm (2 mm by default, to fit a CPU budget); predictions are scored on the original
1 mm grid. The labels are BraTS silver-standard fusions and there are two cases: the figures
show the pipeline and the size of the domain gap on real scans, they do not establish accuracy.

Prints Dice per label (necrosis, edema, enhancing) and per BraTS region (WT, TC, ET) for each
case and row, the seconds of every stage and the device. The defaults are sized for about 25-30
minutes on two dedicated CPU cores (an estimate from per-iteration costs: about 1.6 s per
segmentation iteration, 2.8 s per ASCPlus or diffusion iteration at batch 4, 0.25 s per
synthesized slice and DDIM step, 20 s per inference pass over a 155-slice volume); budgets this
small leave the diffusion model far from converged, so read the figures as a pipeline check::

    python Testing/benchmarks/bench_glioma_diffuse_uda.py --threads 2 --json glioma_diffuse_uda.json

On a GPU, budgets closer to the paper's::

    python Testing/benchmarks/bench_glioma_diffuse_uda.py --device cuda --channels 16 32 64 128 \\
        --batch-size 8 --ascplus-iterations 2000 --retrain-iterations 2000 --epochs 10 \\
        --diffusion-iterations 20000 --diffusion-channels 32 64 64 128 --diffusion-batch-size 8 \\
        --synthetic-scale 2 --steps 50 --json glioma_diffuse_uda_gpu.json

A smoke run (tiny networks and budgets, a few minutes at most)::

    python Testing/benchmarks/bench_glioma_diffuse_uda.py --spacing 4 --patch 48 --channels 4 8 \\
        --diffusion-channels 8 16 --ascplus-iterations 4 --diffusion-iterations 4 \\
        --retrain-iterations 4 --epochs 2 --synthetic-scale 0.05 --steps 2 --progress none
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SFUDASegmentLib.checkpoint import SourceCheckpoint  # noqa: E402
from SFUDASegmentLib.utils.progress_display import make_reporter  # noqa: E402
from SFUDASegmentLib.config import InferenceConfig, InputSpec, TrainingConfig  # noqa: E402
from SFUDASegmentLib.data.geometry import Volume  # noqa: E402
from SFUDASegmentLib.diffuse_uda.pipeline import DiffuseUDAConfig, run_diffuse_uda  # noqa: E402
from SFUDASegmentLib.inference.segment import segment  # noqa: E402
from SFUDASegmentLib.training.segmentation import default_seg_config, train_source  # noqa: E402
from SFUDASegmentLib.utils.device import StageTimer, resolve_device  # noqa: E402
from SFUDASegmentLib.utils.progress import ProgressReporter  # noqa: E402
from glioma_cases import CASES, CLASSES, COLUMNS, DEFAULT_DATA, print_case, read_labels, read_scans, scores  # noqa: E402

ROWS = ("source-only", "ascplus", "diffuse-uda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--spacing", type=float, default=2.0, help="in-plane network spacing (mm)")
    parser.add_argument("--patch", type=int, default=96, help="2D training patch (pixels per side)")
    parser.add_argument("--channels", type=int, nargs="+", default=(16, 32, 64),
                        help="segmentation U-Net widths (source-only and Diffuse-UDA)")
    parser.add_argument("--batch-size", type=int, default=4, help="segmentation batch")
    parser.add_argument("--ascplus-iterations", type=int, default=100)
    parser.add_argument("--retrain-iterations", type=int, default=150,
                        help="Diffuse-UDA retraining, and the source-only training")
    parser.add_argument("--epochs", type=int, default=3,
                        help="the retraining's (and source-only) epochs, each ending with a validation")
    parser.add_argument("--diffusion-iterations", type=int, default=120)
    parser.add_argument("--diffusion-channels", type=int, nargs="+", default=(16, 32, 32),
                        help="diffusion U-Net widths (multiples of the first)")
    parser.add_argument("--diffusion-batch-size", type=int, default=4)
    parser.add_argument("--synthetic-scale", type=float, default=0.25,
                        help="synthetic pairs per source slice holding brain (0: no diffusion model)")
    parser.add_argument("--timesteps", type=int, default=250, help="diffusion schedule length T")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of the synthesis")
    parser.add_argument("--no-fourier", action="store_true", help="ablation: no Fourier appearance transfer")
    parser.add_argument("--no-deform", action="store_true", help="ablation: no deformable augmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--workdir", type=Path, help="Diffuse-UDA stage folder, reused by a rerun "
                        "(default: a temporary folder)")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    parser.add_argument("--save", type=Path, help="write the Diffuse-UDA checkpoint here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    widths = args.diffusion_channels
    if any(w % widths[0] for w in widths):
        parser.error(f"--diffusion-channels must be multiples of the first width, got {widths}")
    return args


def train_source_only(images: list[Volume], labels: list[Volume], spec: InputSpec, config: DiffuseUDAConfig,
                      progress: ProgressReporter | None) -> SourceCheckpoint:
    """The baseline: the retraining's network and budget on the T1c scans alone."""
    epochs = max(1, config.retrain_epochs)
    training = TrainingConfig(epochs=epochs, iterations_per_epoch=-(-config.retrain_iterations // epochs),
                              batch_size=config.batch_size, lr=config.lr, val_fraction=config.val_fraction,
                              seed=config.seed, device=config.device)
    seg_config = default_seg_config(spec, 1 + len(CLASSES), config.seg_channels)
    outcome = train_source(images, labels, CLASSES, spec, training, seg_config, progress=progress,
                           case_names=[f"{c}/t1c" for c in CASES],
                           data_description="TCGA glioma T1c (BraTS-Toolkit sample data), 2 cases")
    return outcome.checkpoint


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = Path(args.data)
    t1c, flair, labels = read_scans(data, "t1c"), read_scans(data, "fla"), read_labels(data)
    spec = InputSpec(dims="2d", modality="T1c", target_spacing=(args.spacing, args.spacing),
                     patch_size=(args.patch, args.patch))
    widths = tuple(args.diffusion_channels)
    config = DiffuseUDAConfig(fourier=not args.no_fourier, deform=not args.no_deform,
                              synthetic_scale=args.synthetic_scale, ascplus_iterations=args.ascplus_iterations,
                              diffusion_iterations=args.diffusion_iterations,
                              retrain_iterations=args.retrain_iterations, retrain_epochs=args.epochs,
                              batch_size=args.batch_size, diffusion_batch_size=args.diffusion_batch_size,
                              diffusion_base_channels=widths[0],
                              diffusion_channel_mults=tuple(w // widths[0] for w in widths),
                              timesteps=args.timesteps, steps=args.steps, seg_channels=tuple(args.channels),
                              seed=args.seed, device=str(device))
    progress, close = make_reporter(args.progress)
    timer = StageTimer(device)
    try:
        with timer.stage("source-only"):
            baseline = train_source_only(t1c, labels, spec, config, progress)
        with tempfile.TemporaryDirectory(prefix="glioma_diffuse_uda_") as tmp:
            outcome = run_diffuse_uda(t1c, labels, flair, CLASSES, spec, config, args.workdir or Path(tmp),
                                      progress, [f"{c}/t1c" for c in CASES], [f"{c}/fla" for c in CASES])
            synthetic_pairs = outcome.provenance.get("synthetic_pairs", 0)
    finally:
        close()
    if args.save:
        outcome.checkpoint.save(args.save)
    models = {"source-only": baseline, "ascplus": outcome.ascplus_checkpoint, "diffuse-uda": outcome.checkpoint}
    inference = InferenceConfig(device=str(device), batch_size=16)
    figures: dict = {"device": str(device), "torch_threads": torch.get_num_threads(),
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "synthetic_pairs": synthetic_pairs, "stages": outcome.stages, "cases": {}}
    with timer.stage("segment FLAIR"):
        for case, image, truth in zip(CASES, flair, labels):
            row = {name: scores(segment(model, image, inference, "labels").labels, truth.array, image.spacing)
                   for name, model in models.items()}
            figures["cases"][case] = row
            print_case(case, row)
    figures["mean"] = {name: {k: float(np.mean([figures["cases"][c][name][k] for c in CASES]))
                              for k in (*COLUMNS, "mean_label_dice")} for name in ROWS}
    print_case("mean of both cases,", figures["mean"])
    figures["diffuse_uda_timings"] = outcome.timings
    figures["seconds"] = {**timer.to_dict()["seconds"], **{f"diffuse-uda/{k}": v
                                                           for k, v in outcome.timings["seconds"].items()}}
    print(f"\nseconds on {device} ({torch.get_num_threads()} threads), {synthetic_pairs} synthetic pairs:")
    print(f"  source-only training {figures['seconds']['source-only']:.0f}")
    for stage, seconds in outcome.timings["seconds"].items():
        state = f" ({outcome.stages[stage]})" if stage in outcome.stages else ""
        print(f"  diffuse-uda {stage:14s} {seconds:.0f}{state}")
    print(f"  diffuse-uda total    {outcome.timings['total_seconds']:.0f}")
    print(f"  segment + score FLAIR (3 models, 2 cases) {figures['seconds']['segment FLAIR']:.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
