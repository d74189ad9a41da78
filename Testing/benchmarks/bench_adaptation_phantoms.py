"""No adaptation vs HEAL (HD, HD+EGS, full) vs GMM on synthetic two-modality phantoms.

Trains a small 2D source model, its diffusion model and its class prototypes on source-modality
phantoms (or loads --checkpoint), then adapts to target-modality phantom sets of several seeds
(each seed: a new set of target cases and a new sampling/adaptation seed) and prints the mean
Dice per method. One HEAL run per case gives its three stages (Y*, M_S(I_B), fused labels).

    python Testing/benchmarks/bench_adaptation_phantoms.py --seeds 3 --cases 4 --gap 0.35
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from SFUDASegmentLib.checkpoint import SourceCheckpoint  # noqa: E402
from SFUDASegmentLib.config import (DiffusionNetConfig, DiffusionTrainingConfig, GMMConfig,  # noqa: E402
                                    HEALConfig, InferenceConfig, InputSpec, TrainingConfig)
from SFUDASegmentLib.data.synthetic import make_phantom_set  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import dice  # noqa: E402
from SFUDASegmentLib.gmm import fit_prototypes, gmm_adapt  # noqa: E402
from SFUDASegmentLib.heal import heal_adapt  # noqa: E402
from SFUDASegmentLib.inference.segment import segment  # noqa: E402
from SFUDASegmentLib.training.segmentation import train_source  # noqa: E402

METHODS = ("none", "hd", "hd+egs", "heal", "gmm")


def train(args: argparse.Namespace) -> SourceCheckpoint:
    """Source segmentation + diffusion model + prototypes on source phantoms."""
    phantoms = make_phantom_set(args.train_cases, (args.size, args.size), seed=0, gap=args.gap)
    images, labels = [p.source for p in phantoms], [p.labels for p in phantoms]
    spec = InputSpec(dims="2d", modality="phantom-source", patch_size=(args.size, args.size))
    net = DiffusionNetConfig(spatial_dims=2, image_channels=1, cond_channels=5, base_channels=args.base,
                             channel_mults=(1, 2, 2), num_res_blocks=1, groups=8)
    outcome = train_source(images, labels, phantoms[0].classes, spec,
                           TrainingConfig(epochs=5, iterations_per_epoch=40, batch_size=8, device=args.device),
                           diffusion=DiffusionTrainingConfig(iterations=args.diffusion_iterations, batch_size=8,
                                                             lr=1e-3, device=args.device),
                           diffusion_config=net)
    return fit_prototypes(outcome.checkpoint, images, labels, GMMConfig(), device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="reuse a trained checkpoint (written by --save)")
    parser.add_argument("--save", help="write the trained checkpoint here")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gap", type=float, default=0.35)
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--diffusion-iterations", type=int, default=400)
    parser.add_argument("--base", type=int, default=16, help="diffusion U-Net base width")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=4, help="target phantoms per seed")
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
    torch.manual_seed(0)
    t0 = time.perf_counter()
    checkpoint = SourceCheckpoint.load(args.checkpoint) if args.checkpoint else train(args)
    if args.save:
        checkpoint.save(args.save)
    train_seconds = time.perf_counter() - t0
    methods = ("none", "gmm") if args.skip_heal else METHODS
    per_seed: dict[str, list[float]] = {m: [] for m in methods}
    per_label: dict[str, list[list[float]]] = {m: [] for m in methods}
    swd: list[tuple[float, float]] = []
    inference = InferenceConfig(device=args.device)
    for seed in range(args.seeds):
        cases = make_phantom_set(args.cases, (args.size, args.size), seed=1000 + seed, gap=args.gap)
        labels: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        for case in cases:
            labels["none"].append(segment(checkpoint, case.target, inference).labels)
            if args.skip_heal:
                continue
            heal = heal_adapt(case.target, checkpoint, HEALConfig(stages="heal", candidates=args.candidates, steps=args.steps,
                                                                                 seed=seed), inference)
            labels["hd"].append(heal.label_maps["refined_labels"])
            labels["hd+egs"].append(heal.label_maps["selected_segmentation"])
            labels["heal"].append(heal.labels)
        results, adaptation = gmm_adapt([c.target for c in cases], checkpoint,
                                        GMMConfig(iterations=args.gmm_iterations, lr=args.gmm_lr, seed=seed,
                                                  class_proportions=args.class_proportions),
                                        inference)
        labels["gmm"] = [r.labels for r in results]
        swd.append((adaptation.swd_before, adaptation.swd_after))
        for method in methods:
            scores = [[dice(pred == v, case.labels.array == v) for v in (1, 2, 3)]
                      for pred, case in zip(labels[method], cases)]
            per_seed[method].append(float(np.mean(scores)))
            per_label[method].append(np.mean(scores, axis=0).tolist())
        print(f"seed {seed}: " + "  ".join(f"{m} {per_seed[m][-1]:.3f}" for m in methods)
              + f"  (SWD {swd[-1][0]:.3f} -> {swd[-1][1]:.3f})", flush=True)
    print(f"\n{args.size}x{args.size} phantoms, gap {args.gap}, {args.seeds} seeds x {args.cases} cases; "
          f"HEAL n={args.candidates} DDIM-{args.steps}; GMM {args.gmm_iterations} it, lr {args.gmm_lr} "
          f"({train_seconds:.0f} s training)")
    print(f"{'method':8s} {'mean Dice':>10s} {'sd':>5s}   organ  vessel  lesion")
    for method in methods:
        by_label = np.mean(per_label[method], axis=0)
        print(f"{method:8s} {np.mean(per_seed[method]) * 100:10.1f} {np.std(per_seed[method]) * 100:5.1f}   "
              + "  ".join(f"{v * 100:5.1f}" for v in by_label))
    print(f"SWD to the prototypes, mean over seeds: {np.mean([b for b, _ in swd]):.4f} -> {np.mean([a for _, a in swd]):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "per_seed": per_seed, "per_label": per_label,
                                               "swd": swd, "train_seconds": train_seconds}, indent=2))


if __name__ == "__main__":
    main()
