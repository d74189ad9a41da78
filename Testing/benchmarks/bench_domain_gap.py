"""The synthetic phantoms' domain gap: Dice of a source-trained 2D model on source phantoms and
on target phantoms as the gap grows (0 = target contrasts equal the source's, 1 = full target).

    python Testing/benchmarks/bench_domain_gap.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from SFUDASegmentLib.config import InferenceConfig, InputSpec, TrainingConfig  # noqa: E402
from SFUDASegmentLib.data.synthetic import make_phantom_set  # noqa: E402
from SFUDASegmentLib.evaluation.metrics import dice  # noqa: E402
from SFUDASegmentLib.inference.segment import segment  # noqa: E402
from SFUDASegmentLib.training.segmentation import train_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cases", type=int, default=6, help="test phantoms per gap")
    parser.add_argument("--gaps", type=float, nargs="*", default=[0.0, 0.2, 0.3, 0.35, 0.5, 0.7, 1.0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    train = make_phantom_set(6, (args.size, args.size), seed=0)
    spec = InputSpec(dims="2d", modality="phantom-source", patch_size=(args.size, args.size))
    start = time.perf_counter()
    outcome = train_source([p.source for p in train], [p.labels for p in train], train[0].classes, spec,
                           TrainingConfig(epochs=5, iterations_per_epoch=40, batch_size=8, device=args.device))
    print(f"trained in {time.perf_counter() - start:.0f} s; Dice x100 (organ, vessel, lesion | mean)")

    def score(domain: str, gap: float) -> np.ndarray:
        cases = make_phantom_set(args.cases, (args.size, args.size), seed=100, gap=gap)
        return np.mean([[dice(segment(outcome.checkpoint, getattr(c, domain), InferenceConfig(device=args.device)).labels == v,
                              c.labels.array == v) for v in (1, 2, 3)] for c in cases], axis=0)

    source = score("source", 0.0)
    print(f"source phantoms      {' '.join(f'{v * 100:5.1f}' for v in source)} | {source.mean() * 100:5.1f}")
    for gap in args.gaps:
        target = score("target", gap)
        print(f"target, gap {gap:4.2f}    {' '.join(f'{v * 100:5.1f}' for v in target)} | {target.mean() * 100:5.1f}"
              f"   (loss {100 * (source.mean() - target.mean()):5.1f} points)")


if __name__ == "__main__":
    main()
