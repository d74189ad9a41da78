"""Source T1c -> target FLAIR on the two glioma cases of ../shared/data: no adaptation, HEAL
(with its HD and HD+EGS ablation stages) and GMM-adapted inference.

A 2D source model, its conditional diffusion model and its class prototypes are trained on the
T1c scans of both cases (in-plane 2 mm to fit a CPU budget), then each FLAIR scan is segmented.
One HEAL run gives all three stages: Y* (HD), M_S(I_B) (HD+EGS) and the fused labels (HEAL).
The labels are BraTS silver-standard fusions; two cases show the pipeline on real scans and the
size of the domain gap, they do not establish accuracy.

    python Testing/benchmarks/bench_glioma.py --save /tmp/glioma_t1c.sfuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from SFUDASegmentLib.checkpoint import SourceCheckpoint  # noqa: E402
from SFUDASegmentLib.config import (DiffusionNetConfig, DiffusionTrainingConfig, GMMConfig,  # noqa: E402
                                    HEALConfig, InferenceConfig, InputSpec, TrainingConfig)
from SFUDASegmentLib.gmm import fit_prototypes, gmm_adapt  # noqa: E402
from SFUDASegmentLib.heal import heal_adapt  # noqa: E402
from SFUDASegmentLib.inference.segment import segment  # noqa: E402
from SFUDASegmentLib.training.segmentation import train_source  # noqa: E402
from glioma_cases import CASES, CLASSES, DEFAULT_DATA, print_case, read_labels, read_scans, scores  # noqa: E402



def train(args: argparse.Namespace, data: Path) -> SourceCheckpoint:
    """T1c source model + diffusion + prototypes."""
    images, labels = read_scans(data, "t1c"), read_labels(data)
    spec = InputSpec(dims="2d", modality="T1c", target_spacing=(args.spacing, args.spacing),
                     patch_size=(args.patch, args.patch))
    diffusion = DiffusionNetConfig(spatial_dims=2, image_channels=1, cond_channels=5, base_channels=16,
                                   channel_mults=(1, 2, 2), num_res_blocks=1, groups=8)
    outcome = train_source(images, labels, CLASSES, spec,
                           TrainingConfig(epochs=args.epochs, iterations_per_epoch=50, batch_size=8,
                                          val_fraction=0.0, device=args.device),
                           diffusion=DiffusionTrainingConfig(iterations=args.diffusion_iterations, batch_size=8,
                                                             lr=1e-3, device=args.device),
                           diffusion_config=diffusion, case_names=[f"{c}/t1c" for c in CASES],
                           data_description="TCGA glioma T1c (BraTS-Toolkit sample data), 2 cases")
    return fit_prototypes(outcome.checkpoint, images, labels, GMMConfig(rho=0.9), device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--checkpoint", help="reuse a checkpoint written by --save")
    parser.add_argument("--save", help="write the trained checkpoint here")
    parser.add_argument("--spacing", type=float, default=2.0, help="in-plane network spacing (mm)")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--diffusion-iterations", type=int, default=600)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gmm-iterations", type=int, default=100)
    parser.add_argument("--gmm-lr", type=float, default=5e-5)
    parser.add_argument("--skip-heal", action="store_true", help="only no adaptation and GMM")
    parser.add_argument("--class-proportions", choices=("source", "pseudo"), default="source",
                        help="GMM prototype samples per class")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    data = Path(args.data)
    t0 = time.perf_counter()
    checkpoint = SourceCheckpoint.load(args.checkpoint) if args.checkpoint else train(args, data)
    if args.save:
        checkpoint.save(args.save)
    figures: dict = {"train_seconds": time.perf_counter() - t0, "cases": {}}
    inference = InferenceConfig(device=args.device, batch_size=16)
    for case, flair, truth_volume in zip(CASES, read_scans(data, "fla"), read_labels(data)):
        truth = truth_volume.array
        row: dict = {}
        t = time.perf_counter()
        row["none"] = scores(segment(checkpoint, flair, inference, "labels").labels, truth, flair.spacing)
        row["none"]["seconds"] = time.perf_counter() - t
        if not args.skip_heal:
            t = time.perf_counter()
            heal = heal_adapt(flair, checkpoint, HEALConfig(stages="heal", candidates=args.candidates, steps=args.steps,
                                                                           candidate_batch=24), inference)
            row["hd"] = scores(heal.label_maps["refined_labels"], truth, flair.spacing)
            row["hd+egs"] = scores(heal.label_maps["selected_segmentation"], truth, flair.spacing)
            row["heal"] = scores(heal.labels, truth, flair.spacing)
            row["heal"]["seconds"] = time.perf_counter() - t
            row["heal"]["stage_seconds"] = heal.timings["seconds"]
            row["heal"]["rendered_slices"] = heal.extra.get("rendered_slices", 0)
        t = time.perf_counter()
        results, adaptation = gmm_adapt(flair, checkpoint,
                                        GMMConfig(iterations=args.gmm_iterations, lr=args.gmm_lr,
                                                  class_proportions=args.class_proportions),
                                        inference)
        row["gmm"] = scores(results[0].labels, truth, flair.spacing)
        row["gmm"].update(seconds=time.perf_counter() - t, swd_before=adaptation.swd_before,
                          swd_after=adaptation.swd_after,
                          seconds_per_iteration=results[0].timings["seconds_per_iteration"])
        figures["cases"][case] = row
        print_case(f"{case}, source model trained on T1c,", row)
        heal_seconds = (f"HEAL {row['heal']['seconds']:.0f} ({row['heal']['rendered_slices']} slices rendered), "
                        if "heal" in row else "")
        print(f"seconds: none {row['none']['seconds']:.0f}, {heal_seconds}"
              f"GMM {row['gmm']['seconds']:.0f} ({row['gmm']['seconds_per_iteration']:.2f} s/iteration, "
              f"SWD {adaptation.swd_before:.3f} -> {adaptation.swd_after:.3f})", flush=True)
    print(f"\ntraining {figures['train_seconds']:.0f} s on {args.device}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
