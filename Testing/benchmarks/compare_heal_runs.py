"""Run HEAL in two checkouts of the project and compare what it returns, for a fixed seed.

For changes meant to leave HEAL's results as they are (speed work): the demo checkpoint
(``Resources/SampleData/phantom_demo.sfuda``, a trained 2D diffusion model) on the demo target
(24 slices of 64x64), n = 6, DDIM-10 with eta 0 and 1 and ``candidate_batch`` 6 and 48, every
slice with body rendered. Each checkout runs in its own process with its own library and
PyTorch thread count; the comparison prints the largest candidate difference (z-score units)
and whether the edge scores, the selected candidate and every label map are identical.

    git archive fe8e8ac | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python Testing/benchmarks/compare_heal_runs.py --before /tmp/before            # old vs this checkout
    python Testing/benchmarks/compare_heal_runs.py --before /tmp/before --after /tmp/before \\
        --threads-after 1                                                            # old code vs itself
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RUNS = (("eta 0, candidate_batch 6", 0.0, 6), ("eta 1, candidate_batch 6", 1.0, 6),
        ("eta 0, candidate_batch 48", 0.0, 48))


def run_checkout(root: Path, out: Path) -> None:
    """In this process (whose library is ``root``'s): every run, saved to ``out``."""
    from SFUDASegmentLib.checkpoint import SourceCheckpoint
    from SFUDASegmentLib.config import HEALConfig, InferenceConfig
    from SFUDASegmentLib.data.io import read_image
    from SFUDASegmentLib.heal import heal_adapt

    checkpoint = SourceCheckpoint.load(root / "Resources" / "SampleData" / "phantom_demo.sfuda")
    volume = read_image(root / "Resources" / "SampleData" / "phantom_target.nrrd")
    arrays = {}
    for name, eta, batch in RUNS:
        config = HEALConfig(stages="heal", candidates=6, sampler="ddim", steps=10, ddim_eta=eta, candidate_batch=batch,
                                           skip_empty_slices=False, seed=3)
        result = heal_adapt(volume, checkpoint, config, InferenceConfig(device="cpu"))
        arrays[f"{name}/candidates"] = result.candidates
        arrays[f"{name}/scores"] = np.asarray(result.candidate_scores)
        arrays[f"{name}/selected"] = np.asarray(result.selected_index)
        arrays[f"{name}/labels"] = result.labels
        arrays.update({f"{name}/{k}": v for k, v in result.label_maps.items()})
    np.savez(out, **arrays)


def run_in_child(root: Path, threads: int, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, __file__, "--worker", str(root), str(out)], env=env, check=True)


def compare(before: Path, after: Path) -> None:
    with np.load(before) as a, np.load(after) as b:
        for name, _, _ in RUNS:
            keys = sorted(k for k in a.files if k.startswith(name + "/"))
            candidates = np.abs(a[f"{name}/candidates"] - b[f"{name}/candidates"]).max()
            scores = np.abs(a[f"{name}/scores"] - b[f"{name}/scores"]).max()
            maps = [k.split("/", 1)[1] for k in keys if k.split("/", 1)[1] not in ("candidates", "scores")]
            differing = [m for m in maps if not np.array_equal(a[f"{name}/{m}"], b[f"{name}/{m}"])]
            print(f"{name}: candidates max |difference| {candidates:.2e}, scores {scores:.2e}, "
                  f"{'identical' if not differing else 'DIFFERENT: ' + ', '.join(differing)} "
                  f"({', '.join(maps)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="the other checkout (its root folder)")
    parser.add_argument("--after", type=Path, default=REPO, help="default: this checkout")
    parser.add_argument("--threads-before", type=int, default=2)
    parser.add_argument("--threads-after", type=int, default=2)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_checkout(Path(args.worker[0]), Path(args.worker[1]))
        return
    if args.before is None:
        parser.error("--before is required")
    with tempfile.TemporaryDirectory() as folder:
        outputs = (Path(folder) / "before.npz", Path(folder) / "after.npz")
        run_in_child(args.before.resolve(), args.threads_before, outputs[0])
        run_in_child(args.after.resolve(), args.threads_after, outputs[1])
        compare(*outputs)


if __name__ == "__main__":
    main()
