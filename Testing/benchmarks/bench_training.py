"""Source training cost on 2, 5 and 10 BraTS 2018 cases (../shared/data/brats2018, T1ce, 2D,
2 mm in-plane): loading seconds and bytes, iterations per second, seconds per validation (the
fixed sample, and once over whole volumes for comparison) and peak memory.

Each case count runs in a fresh process (peak resident memory is a per-process high-water mark),
one default epoch each (50 iterations, global batch 8, 128x128 patches, 32 validation slices),
with ``OMP_WAIT_POLICY=PASSIVE`` as ``sfuda`` runs (unless the environment sets a policy):

    python Testing/benchmarks/bench_training.py
    python Testing/benchmarks/bench_training.py --cases 10 --iterations 50   # one count, in-process

``--wait-policies`` compares how PyTorch's OpenMP threads wait (the runtime's default, spinning a
while, against ``OMP_WAIT_POLICY=PASSIVE``, which ``sfuda`` sets): seconds per source-training
iteration (3 cases, as above) and per iteration of the CPU-default diffusion network (global
batch 8, 128x128), each policy in fresh processes, twice, alternating:

    python Testing/benchmarks/bench_training.py --wait-policies
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from SFUDASegmentLib.config import InputSpec, TrainingConfig, parse_labels  # noqa: E402
from SFUDASegmentLib.data.io import read_image, read_label  # noqa: E402
from SFUDASegmentLib.inference.preparation import prepare_training_case  # noqa: E402
from SFUDASegmentLib.nets.unet import ResidualUNet  # noqa: E402
from SFUDASegmentLib.training.segmentation import _split_cases, default_seg_config, train_segmentation  # noqa: E402
from SFUDASegmentLib.training.validation import ValidationSample, validation_dice  # noqa: E402
from SFUDASegmentLib.utils.device import process_peak_rss_mb  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats2018"
CLASSES = parse_labels("1:necrosis,2:edema,4:enhancing")
MB = 2.0 ** 20


def measure(data: Path, cases: int, iterations: int, spacing: float) -> dict:
    """Load ``cases`` cases, train one epoch, validate on the sample and on whole volumes."""
    folders = sorted(p for p in data.iterdir() if p.is_dir())[:cases]
    if len(folders) < cases:
        raise SystemExit(f"{data} holds {len(folders)} cases, {cases} asked for.")
    spec = InputSpec(dims="2d", modality="T1ce", target_spacing=(spacing, spacing), patch_size=(128, 128))
    started = time.perf_counter()
    prepared = []
    for folder in folders:
        image = read_image(folder / f"{folder.name}_t1ce.nii.gz")
        labels = read_label(folder / f"{folder.name}_seg.nii.gz", {0, *(c.value for c in CLASSES)})
        prepared.append(prepare_training_case(image, labels, CLASSES, spec, folder.name))
    load_seconds = time.perf_counter() - started
    load_rss = process_peak_rss_mb()
    config = TrainingConfig(epochs=1, iterations_per_epoch=iterations, batch_size=8, device="cpu")
    seg_config = default_seg_config(spec, 1 + len(CLASSES))
    run = train_segmentation(prepared, spec, seg_config, config)
    timings = run.timings()
    # the earlier validation: every slice of the validation cases (the same split as the run)
    _, val_cases = _split_cases(prepared, config.val_fraction, np.random.default_rng(config.seed))
    whole = ValidationSample.draw(val_cases, spec, 0, np.random.default_rng(0))
    net = ResidualUNet.from_config(seg_config)
    net.load_state_dict(run.state)
    started = time.perf_counter()
    validation_dice(net, val_cases, whole, spec, seg_config.out_channels, torch.device("cpu"))
    whole_seconds = time.perf_counter() - started
    return {
        "cases": cases, "validation_cases": len(val_cases), "load_seconds": load_seconds,
        "image_mb": sum(c.image.nbytes for c in prepared) / MB,
        "label_mb": sum(c.labels.nbytes for c in prepared) / MB,
        "mask_mb": sum(c.foreground.nbytes for c in prepared) / MB,
        "rss_after_loading_mb": load_rss,
        "iterations": timings["iterations"], "iterations_per_second": timings["iterations_per_second"],
        "epoch_training_seconds": timings["training_seconds"],
        "validation_seconds": timings["validation_seconds"],
        "validation_items": timings["validation_items"], "validation_unit": timings["validation_unit"],
        "whole_volume_validation_seconds": whole_seconds, "whole_volume_slices": len(whole.items),
        "peak_rss_mb": process_peak_rss_mb(), "threads": torch.get_num_threads(),
    }


def seconds_per_iteration(data: Path, spacing: float) -> dict:
    """Seconds per source-training iteration (3 cases, 8 iterations) and per iteration of the CPU
    default diffusion network (4 iterations after one warm-up), in this process."""
    from SFUDASegmentLib.config import DiffusionTrainingConfig, ScheduleConfig
    from SFUDASegmentLib.diffusion.training import CPU_DIFFUSION_DEFAULTS, train_diffusion, widths_to_base_and_multipliers
    from SFUDASegmentLib.training.segmentation import default_diffusion_config

    folders = sorted(p for p in data.iterdir() if p.is_dir())[:3]
    spec = InputSpec(dims="2d", target_spacing=(spacing, spacing), patch_size=(128, 128))
    cases = [prepare_training_case(read_image(f / f"{f.name}_t1ce.nii.gz"),
                                   read_label(f / f"{f.name}_seg.nii.gz", {0, *(c.value for c in CLASSES)}),
                                   CLASSES, spec, f.name) for f in folders]
    run = train_segmentation(cases, spec, default_seg_config(spec, 1 + len(CLASSES)),
                             TrainingConfig(epochs=1, iterations_per_epoch=8, batch_size=8, device="cpu",
                                            validation_samples=4))
    net = default_diffusion_config(spec, 1 + len(CLASSES), *widths_to_base_and_multipliers(CPU_DIFFUSION_DEFAULTS.widths),
                                   CPU_DIFFUSION_DEFAULTS.num_res_blocks)
    samples = [(np.clip(c.image[:, c.labels.shape[0] // 2] / 3, -1, 1), c.labels[c.labels.shape[0] // 2],
                c.foreground[c.labels.shape[0] // 2]) for c in cases]
    config = DiffusionTrainingConfig(iterations=1, batch_size=8, device="cpu")
    train_diffusion(samples, net, ScheduleConfig(), config, (128, 128))
    config.iterations = 4
    diffusion = train_diffusion(samples, net, ScheduleConfig(), config, (128, 128))
    return {"segmentation_seconds": 1 / run.timings()["iterations_per_second"],
            "diffusion_seconds": diffusion.seconds / 4, "load": open("/proc/loadavg").read().split()[0]
            if Path("/proc/loadavg").is_file() else "?"}


def compare_wait_policies(data: Path, spacing: float) -> None:
    """Each policy in fresh processes, alternating, twice."""
    print(f"{'OMP_WAIT_POLICY':>16} {'training s/it':>13} {'diffusion s/it':>14} {'load':>5}")
    for policy in ("(default)", "PASSIVE") * 2:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy == "PASSIVE":
            env["OMP_WAIT_POLICY"] = policy
        child = subprocess.run([sys.executable, __file__, "--data", str(data), "--spacing", str(spacing),
                                "--iteration-seconds"], capture_output=True, text=True, check=True, env=env)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{policy:>16} {row['segmentation_seconds']:13.2f} {row['diffusion_seconds']:14.2f} {row['load']:>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--cases", type=int, help="measure one case count in this process (JSON line)")
    parser.add_argument("--counts", default="2,5,10", help="case counts, each in a fresh process")
    parser.add_argument("--iterations", type=int, default=50, help="iterations of the epoch (default: one default epoch)")
    parser.add_argument("--spacing", type=float, default=2.0, help="in-plane network spacing (mm)")
    parser.add_argument("--wait-policies", action="store_true", help="compare OpenMP wait policies (see above)")
    parser.add_argument("--iteration-seconds", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wait_policies:
        compare_wait_policies(Path(args.data), args.spacing)
        return
    if args.iteration_seconds:
        print(json.dumps(seconds_per_iteration(Path(args.data), args.spacing)))
        return
    if args.cases:
        print(json.dumps(measure(Path(args.data), args.cases, args.iterations, args.spacing)))
        return
    rows = []
    env = {**os.environ}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for count in (int(c) for c in args.counts.split(",")):
        child = subprocess.run([sys.executable, __file__, "--data", args.data, "--cases", str(count),
                                "--iterations", str(args.iterations), "--spacing", str(args.spacing)],
                               capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nBraTS 2018 T1ce, 2D at {args.spacing:g} mm in-plane, one epoch of {args.iterations} iterations "
          f"(global batch 8, 128x128), CPU, {rows[0]['threads']} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    print(f"{'cases':>5} {'load s':>7} {'images MB':>9} {'labels MB':>9} {'it/s':>6} {'epoch s':>8} "
          f"{'val s':>6} {'val/epoch':>9} {'whole-volume val s':>18} {'peak MB':>8}")
    for r in rows:
        print(f"{r['cases']:5d} {r['load_seconds']:7.1f} {r['image_mb']:9.0f} {r['label_mb']:9.0f} "
              f"{r['iterations_per_second']:6.2f} {r['epoch_training_seconds']:8.1f} {r['validation_seconds']:6.1f} "
              f"{r['validation_seconds'] / r['epoch_training_seconds']:9.3f} "
              f"{r['whole_volume_validation_seconds']:9.1f} ({r['whole_volume_slices']} slices) {r['peak_rss_mb']:8.0f}")


if __name__ == "__main__":
    main()
