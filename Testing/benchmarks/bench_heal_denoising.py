"""What HEAL's hierarchical denoising does to the source model's labels on phantoms.

Trains a 2D source segmentation model on source-modality phantoms of one size (the anatomy keeps
its size in mm, so 128x128 at 0.5 mm is the 64x64 anatomy at twice the resolution), or loads
--checkpoint, then scores, per target gap, the source pseudo-labels Y_T, the entropy-refined
labels Y_ent and Y* (the HD stage) with the default settings, with tau2 = 0.5 and with the
public code's histogram entropy. Gap 0 is the source modality itself. No diffusion is needed:
HD + EGS and HEAL render from Y*, so they cannot recover what Y* has lost.

    python Testing/benchmarks/bench_heal_denoising.py --size 128 --gaps 0 0.1 0.2 0.35
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from SFUDASegmentLib.checkpoint import SourceCheckpoint  # noqa: E402
from SFUDASegmentLib.config import HEALConfig, InferenceConfig, InputSpec, TrainingConfig  # noqa: E402
from SFUDASegmentLib.data.synthetic import make_phantom_set  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import dice  # noqa: E402
from SFUDASegmentLib.heal.denoising import hierarchical_denoise  # noqa: E402
from SFUDASegmentLib.inference.preparation import predict_indices, prepare_input  # noqa: E402
from SFUDASegmentLib.training.segmentation import train_source  # noqa: E402

VARIANTS = {"Y* tau2 0.5": HEALConfig(tau2=0.5), "Y* histogram E": HEALConfig(regional_entropy="histogram")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="phantom side (voxels); spacing 64/size mm")
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.35])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--checkpoint", help="reuse a 2D phantom checkpoint of this size")
    parser.add_argument("--save", help="write the trained checkpoint here")
    args = parser.parse_args()
    torch.manual_seed(0)
    spacing = (64.0 / args.size,) * 2
    shape = (args.size, args.size)
    if args.checkpoint:
        checkpoint = SourceCheckpoint.load(args.checkpoint)
    else:
        t0 = time.perf_counter()
        phantoms = make_phantom_set(6, shape, seed=0, gap=0.35, spacing=spacing)
        spec = InputSpec(dims="2d", modality="phantom-source", patch_size=shape)
        checkpoint = train_source([p.source for p in phantoms], [p.labels for p in phantoms],
                                  phantoms[0].classes, spec,
                                  TrainingConfig(epochs=5, iterations_per_epoch=40, batch_size=8,
                                                 device="cpu")).checkpoint
        print(f"source model trained in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.save:
        checkpoint.save(args.save)
    device = torch.device("cpu")
    model = checkpoint.build_segmentation_net(device)
    inference = InferenceConfig(device="cpu")
    print(f"\n{args.size}x{args.size} phantoms ({spacing[0]:g} mm), {args.seeds} seeds x {args.cases} cases; "
          "mean Dice x100 (organ / vessel / lesion)")
    for gap in args.gaps:
        scores: dict[str, list[list[float]]] = {}
        for seed in range(args.seeds):
            for case in make_phantom_set(args.cases, shape, seed=1000 + seed, gap=gap, spacing=spacing):
                image = case.source if gap == 0 else case.target
                prepared = prepare_input(image, checkpoint.input_spec)
                _, probs = predict_indices(model, prepared.image, checkpoint.input_spec, checkpoint.num_classes,
                                           inference, device, True, None)
                default = hierarchical_denoise(probs[:, 0], HEALConfig())
                maps = {"Y_T (no adaptation)": default.pseudo, "Y_ent": default.y_ent, "Y* (HD)": default.refined}
                maps.update({name: hierarchical_denoise(probs[:, 0], config).refined
                             for name, config in VARIANTS.items()})
                truth = case.labels.array
                for name, labels in maps.items():
                    scores.setdefault(name, []).append([dice(labels == v, truth == v) for v in (1, 2, 3)])
        print(f"gap {gap:g}" + (" (source modality)" if gap == 0 else ""))
        for name, values in scores.items():
            by_label = np.mean(values, axis=0) * 100
            print(f"  {name:20s} {np.mean(values) * 100:5.1f}   " + " / ".join(f"{v:.1f}" for v in by_label),
                  flush=True)


if __name__ == "__main__":
    main()
