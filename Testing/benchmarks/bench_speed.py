"""Seconds and peak memory of segmentation inference and of HEAL, per stage.

Each configuration runs in its own process so that its peak memory is its own (process peak
RSS on CPU, peak allocated GPU memory on CUDA). Network weights are freshly initialised: speed
does not depend on them. Examples:

    python Testing/benchmarks/bench_speed.py inference            # 240x240x155, 2D and 3D models
    python Testing/benchmarks/bench_speed.py heal                 # 2D 256^2, 3D 128^3, 240x240x155 slice mode
    python Testing/benchmarks/bench_speed.py heal --device cuda --only heal-3d-128 --samplers ddim-50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CASES = {
    "inference-2d-240x240x155": dict(kind="inference", dims="2d", shape=(155, 240, 240)),
    "inference-3d-240x240x155": dict(kind="inference", dims="3d", shape=(155, 240, 240)),
    "heal-2d-256": dict(kind="heal", dims="2d", shape=(256, 256)),
    "heal-3d-128": dict(kind="heal", dims="3d", shape=(128, 128, 128)),
    "heal-slices-240x240x155": dict(kind="heal", dims="2d", shape=(155, 240, 240)),
}


def build_checkpoint(dims: str, base: int):
    """A checkpoint with freshly initialised segmentation and diffusion networks."""
    import torch

    from SFUDASegmentLib.checkpoint import DiffusionPart, SourceCheckpoint
    from SFUDASegmentLib.config import DiffusionNetConfig, InputSpec, ScheduleConfig
    from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES
    from SFUDASegmentLib.nets.diffusion_unet import ConditionalDiffusionUNet
    from SFUDASegmentLib.nets.unet import ResidualUNet
    from SFUDASegmentLib.training.segmentation import default_seg_config

    torch.manual_seed(0)
    spec = InputSpec(dims=dims, modality="MR", patch_size=(96, 96, 96) if dims == "3d" else (128, 128))
    seg = default_seg_config(spec, 1 + len(PHANTOM_CLASSES))
    net = DiffusionNetConfig(spatial_dims=spec.spatial_dims, image_channels=1, cond_channels=5, base_channels=base,
                             channel_mults=(1, 2, 2, 4), num_res_blocks=1, groups=8)
    diffusion = ConditionalDiffusionUNet.from_config(net)
    return SourceCheckpoint(list(PHANTOM_CLASSES), spec, seg, ResidualUNet.from_config(seg).state_dict(),
                            DiffusionPart(net, ScheduleConfig(timesteps=250), diffusion.state_dict()))


def run_one(name: str, sampler: str, device: str, base: int, candidates: int) -> dict:
    """Run one configuration in this process and return its figures."""
    import torch

    from SFUDASegmentLib.config import HEALConfig, InferenceConfig
    from SFUDASegmentLib.data.synthetic import make_phantom
    from SFUDASegmentLib.heal import heal_adapt
    from SFUDASegmentLib.inference.segment import segment

    case = CASES[name]
    shape = case["shape"]
    checkpoint = build_checkpoint(case["dims"], base)
    phantom_shape = shape if len(shape) == 2 else (min(shape[0], 160), *shape[1:])
    volume = make_phantom(phantom_shape, seed=1, gap=0.35).target
    inference = InferenceConfig(device=device, batch_size=8 if case["dims"] == "2d" else 2)
    if case["kind"] == "inference":
        out = {}
        for output in ("labels", "probabilities"):
            result = segment(checkpoint, volume, inference, output)
            out[output] = result.timings
        return out
    kind, _, steps = sampler.partition("-")
    # Freshly initialised weights give an arbitrary Y*, so every slice with body is rendered (the
    # worst case); on real scans slices whose Y* is empty are skipped (HEALConfig.skip_empty_slices).
    config = HEALConfig(candidates=candidates, sampler=kind, steps=int(steps or 250), candidate_batch=6 if
                        case["dims"] == "3d" else 48, skip_empty_slices=False)
    result = heal_adapt(volume, checkpoint, config, inference)
    return {"timings": result.timings, "torch_threads": torch.get_num_threads(),
            "rendered_slices": result.extra.get("rendered_slices", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=("inference", "heal"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="case names (default: the suite's cases)")
    parser.add_argument("--samplers", nargs="*", default=None,
                        help="heal: e.g. ddpm ddim-25 ddim-50 (default: ddim-25 ddim-50, and ddpm on GPU)")
    parser.add_argument("--base", type=int, default=16, help="diffusion U-Net base width")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker[0], args.worker[1], args.device, args.base, args.candidates)))
        return
    names = args.only or [n for n, c in CASES.items() if c["kind"] == args.suite]
    samplers = args.samplers or (["ddim-25", "ddim-50"] + (["ddpm"] if args.device != "cpu" else []))
    figures = {}
    for name in names:
        for sampler in (samplers if CASES[name]["kind"] == "heal" else ["-"]):
            if name == "heal-slices-240x240x155" and sampler not in ("ddim-20", "ddim-10") and args.samplers is None:
                sampler = "ddim-20"
            key = f"{name} {sampler}".strip(" -")
            if key in figures:
                continue
            cmd = [sys.executable, __file__, args.suite, "--device", args.device, "--base", str(args.base),
                   "--candidates", str(args.candidates), "--worker", name, sampler]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                figures[key] = {"error": done.stderr.strip().splitlines()[-1]}
                print(f"{key}: FAILED {figures[key]['error']}", flush=True)
                continue
            figures[key] = json.loads(done.stdout.strip().splitlines()[-1])
            timings = figures[key].get("timings") or figures[key]["labels"]
            if "timings" in figures[key]:
                stages = ", ".join(f"{s} {v:.1f}" for s, v in timings["seconds"].items())
                print(f"{key}: total {timings['total_seconds']:.1f} s, peak {max(timings['peak_memory_mb'].values()):.0f} MiB"
                      f" ({timings['peak_memory_kind']}), {figures[key]['rendered_slices']} slices rendered [{stages}]",
                      flush=True)
            else:
                for output in ("labels", "probabilities"):
                    t = figures[key][output]
                    print(f"{key} output={output}: {t['total_seconds']:.1f} s, peak {max(t['peak_memory_mb'].values()):.0f} MiB"
                          f" ({t['peak_memory_kind']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
