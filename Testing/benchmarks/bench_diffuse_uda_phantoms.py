"""Benchmark: Diffuse-UDA versus a source-only model on 2D two-modality phantoms.

For every seed: labelled *source* phantoms train the models, unlabelled *target* phantoms (other
anatomies, target modality at domain gap ``--gap``) are the adaptation data, and held-out
labelled target phantoms are the test set. Rows:

* ``source-only``: the segmentation network trained on the source alone (same budget as the
  retraining);
* ``ascplus``: the Diffuse-UDA stage-1 student (ASCPlus) of the full run;
* ``diffuse-uda``: the full pipeline (Fourier transfer, deformation, synthetic scale-up);
* ``no-fourier``, ``no-deform``, ``no-synthesis``: one ablation switch each.

Variants of one seed share a stage workdir, so stages they have in common run once. Prints a
table of the mean foreground Dice on the test targets (mean +- std over seeds, per class) and
writes everything as JSON.

Example (defaults sized for about 10-15 minutes on two CPU cores)::

    python Testing/benchmarks/bench_diffuse_uda_phantoms.py --out diffuse_uda_phantoms.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SFUDASegmentLib.config import InferenceConfig, InputSpec, TrainingConfig  # noqa: E402
from SFUDASegmentLib.data.labels import values_to_indices  # noqa: E402
from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, make_phantom_set  # noqa: E402
from SFUDASegmentLib.diffuse_uda.pipeline import DiffuseUDAConfig, run_diffuse_uda  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import dice  # noqa: E402
from SFUDASegmentLib.inference.preparation import predict_indices, prepare_input, prepare_training_case  # noqa: E402
from SFUDASegmentLib.nets.unet import ResidualUNet  # noqa: E402
from SFUDASegmentLib.training.segmentation import default_seg_config, train_segmentation  # noqa: E402
from SFUDASegmentLib.utils.device import resolve_device  # noqa: E402

VARIANTS = ("source-only", "ascplus", "diffuse-uda", "no-fourier", "no-deform", "no-synthesis")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(48, 48), help="phantom size (y x)")
    parser.add_argument("--gap", type=float, default=0.4, help="target domain gap in [0, 1]")
    parser.add_argument("--n-source", type=int, default=8, help="labelled source phantoms")
    parser.add_argument("--n-target", type=int, default=8, help="unlabelled target phantoms")
    parser.add_argument("--n-test", type=int, default=8, help="labelled held-out target phantoms")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--ascplus-iterations", type=int, default=300)
    parser.add_argument("--diffusion-iterations", type=int, default=300)
    parser.add_argument("--retrain-iterations", type=int, default=300)
    parser.add_argument("--synthetic-scale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--timesteps", type=int, default=100, help="diffusion schedule length T")
    parser.add_argument("--seg-channels", type=int, nargs="+", default=(16, 32, 64),
                        help="segmentation U-Net widths")
    parser.add_argument("--consistency-weight", type=float, default=DiffuseUDAConfig.consistency_weight)
    parser.add_argument("--confidence", type=float, default=DiffuseUDAConfig.confidence)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--workdir", type=Path, default=None, help="stage folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("diffuse_uda_phantoms.json"))
    return parser.parse_args(argv)


def evaluate(state: dict, seg_config, spec: InputSpec, tests, device: torch.device) -> dict:
    """Mean Dice per class over the test phantoms (target modality)."""
    model = ResidualUNet.from_config(seg_config).to(device).eval()
    model.load_state_dict(state)
    per_class = {c.name: [] for c in PHANTOM_CLASSES}
    for phantom in tests:
        prepared = prepare_input(phantom.target, spec)
        pred, _ = predict_indices(model, prepared.image, spec, seg_config.out_channels,
                                  InferenceConfig(device=str(device)), device)
        pred = prepared.to_input_grid(pred, is_label=True)
        ref = values_to_indices(np.asarray(phantom.labels.array), PHANTOM_CLASSES)
        for k, c in enumerate(PHANTOM_CLASSES, start=1):
            per_class[c.name].append(dice(pred == k, ref == k))
    means = {name: float(np.mean(v)) for name, v in per_class.items()}
    return {"mean": float(np.mean(list(means.values()))), "per_class": means}


def run_seed(seed: int, args: argparse.Namespace, workdir: Path, device: torch.device) -> dict:
    shape = tuple(args.shape)
    spec = InputSpec(dims="2d", modality="phantom", patch_size=shape)
    sources = make_phantom_set(args.n_source, shape, seed=1000 + seed, gap=args.gap)
    targets = make_phantom_set(args.n_target, shape, seed=2000 + seed, gap=args.gap)
    tests = make_phantom_set(args.n_test, shape, seed=3000 + seed, gap=args.gap)
    seg_config = default_seg_config(spec, 1 + len(PHANTOM_CLASSES), tuple(args.seg_channels))
    base = DiffuseUDAConfig(ascplus_iterations=args.ascplus_iterations,
                            diffusion_iterations=args.diffusion_iterations,
                            retrain_iterations=args.retrain_iterations, synthetic_scale=args.synthetic_scale,
                            diffusion_base_channels=16, diffusion_channel_mults=(1, 2, 2),
                            diffusion_batch_size=4, timesteps=args.timesteps, steps=args.steps,
                            consistency_weight=args.consistency_weight, confidence=args.confidence,
                            seg_channels=tuple(args.seg_channels),
                            seed=seed, device=str(device))
    configs = {"diffuse-uda": base, "no-fourier": replace(base, fourier=False),
               "no-deform": replace(base, deform=False), "no-synthesis": replace(base, synthetic_scale=0.0)}
    results: dict = {}
    if "source-only" in args.variants:
        start = time.perf_counter()
        cases = [prepare_training_case(p.source, p.labels, PHANTOM_CLASSES, spec, f"source_{i}")
                 for i, p in enumerate(sources)]
        epochs = base.retrain_epochs
        config = TrainingConfig(epochs=epochs, iterations_per_epoch=-(-base.retrain_iterations // epochs),
                                batch_size=base.batch_size, lr=base.lr, val_fraction=base.val_fraction,
                                seed=seed, device=str(device))
        state = train_segmentation(cases, spec, seg_config, config).state
        results["source-only"] = {**evaluate(state, seg_config, spec, tests, device),
                                  "seconds": time.perf_counter() - start}
    for name, config in configs.items():
        wanted = name in args.variants or (name == "diffuse-uda" and "ascplus" in args.variants)
        if not wanted:
            continue
        start = time.perf_counter()
        outcome = run_diffuse_uda([p.source for p in sources], [p.labels for p in sources],
                                  [p.target for p in targets], PHANTOM_CLASSES, spec, config, workdir)
        seconds = time.perf_counter() - start
        if name in args.variants:
            results[name] = {**evaluate(outcome.checkpoint.seg_state, seg_config, spec, tests, device),
                             "seconds": seconds, "stages": outcome.stages,
                             "stage_seconds": outcome.timings["seconds"]}
        if name == "diffuse-uda" and "ascplus" in args.variants:
            results["ascplus"] = {**evaluate(outcome.ascplus_checkpoint.seg_state, seg_config, spec, tests,
                                             device), "seconds": outcome.timings["seconds"].get("ascplus", 0.0)}
    return results


def summarise(per_seed: list[dict], variants: list[str]) -> dict:
    summary = {}
    for name in variants:
        rows = [r[name] for r in per_seed if name in r]
        if not rows:
            continue
        means = [r["mean"] for r in rows]
        summary[name] = {"mean_dice": float(np.mean(means)), "std_dice": float(np.std(means)),
                         "per_class": {c: float(np.mean([r["per_class"][c] for r in rows]))
                                       for c in rows[0]["per_class"]},
                         "seconds": float(np.mean([r["seconds"] for r in rows]))}
    return summary


def print_table(summary: dict) -> None:
    classes = list(next(iter(summary.values()))["per_class"])
    header = f"{'variant':<14} {'mean Dice':>16} " + " ".join(f"{c:>8}" for c in classes) + f" {'s/seed':>8}"
    print(header)
    print("-" * len(header))
    for name, row in summary.items():
        cells = " ".join(f"{100 * row['per_class'][c]:8.1f}" for c in classes)
        print(f"{name:<14} {100 * row['mean_dice']:8.1f} +- {100 * row['std_dice']:4.1f} {cells} "
              f"{row['seconds']:8.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffuse_uda_bench_") as tmp:
        root = args.workdir or Path(tmp)
        per_seed = []
        for seed in range(args.seeds):
            per_seed.append(run_seed(seed, args, root / f"seed_{seed}", device))
            print(f"seed {seed}: " + ", ".join(f"{k} {100 * v['mean']:.1f}" for k, v in per_seed[-1].items()),
                  flush=True)
    variants = [v for v in VARIANTS if v in args.variants]
    summary = summarise(per_seed, variants)
    print_table(summary)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "device": str(device), "torch_threads": torch.get_num_threads(),
              "total_seconds": time.perf_counter() - start, "summary": summary, "per_seed": per_seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
