"""GPU figures for the README, in one run: HEAL 3D 128^3 (n = 6, DDIM-50 and DDPM-250, bf16 and
fp32), HEAL 2D slice mode on 240x240x155 (n = 6, DDIM-20, every slice with body rendered),
source training iterations per second (2D and 3D) and GMM seconds per iteration (2D and 3D).

    python Testing/benchmarks/bench_gpu.py --json gpu.json     # needs a CUDA GPU
    python Testing/benchmarks/bench_gpu.py --smoke             # tiny sizes on any device (a test runs it)
    python Testing/benchmarks/bench_gpu.py --parts heal-3d      # some parts only

Networks as in ``bench_speed.py`` (freshly initialised weights, which do not change speed):
diffusion U-Net base 16, multipliers 1,2,2,4, one residual block a level, T = 250; the default
segmentation U-Net (16, 32, 64, 128). "bf16" is HEAL's default mixed precision (autocast);
"fp32" turns it off (cuDNN may still use TF32 for convolutions, as PyTorch does by default; the
line says whether). Peak memory is PyTorch's peak allocated GPU memory (process RSS on CPU).

Each part prints one line as soon as it is done. Training and GMM rates are differences of two
runs (``--iterations`` apart), so that setup and validation cancel out.

The library reads images with SimpleITK, which the GPU machine may lack; carry its wheel (see
the README's speed section).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import REPO, build_checkpoint

sys.path.insert(0, str(REPO))

PARTS = ("heal-3d", "heal-slices", "training", "gmm")
FULL = dict(volume_3d=(128, 128, 128), slices=(155, 240, 240), candidates=6, timesteps=250, ddim_steps=50,
            slice_steps=20, base=16, mults=(1, 2, 2, 4), seg_channels=None, patch_3d=(96, 96, 96),
            patch_2d=(128, 128), train_iterations=(20, 80), gmm_iterations=(20, 60), training_cases=2)
SMOKE = dict(volume_3d=(16, 16, 16), slices=(16, 32, 32), candidates=2, timesteps=6, ddim_steps=2,
             slice_steps=2, base=4, mults=(1, 2), seg_channels=(4, 8), patch_3d=(16, 16, 16),
             patch_2d=(32, 32), train_iterations=(2, 6), gmm_iterations=(2, 4), training_cases=2)


def checkpoint_for(dims: str, sizes: dict):
    """The benchmark checkpoint (``bench_speed.build_checkpoint``) at these sizes."""
    checkpoint = build_checkpoint(dims, sizes["base"], sizes["mults"], sizes["timesteps"], sizes["seg_channels"])
    patch = sizes["patch_3d"] if dims == "3d" else sizes["patch_2d"]
    return replace(checkpoint, input_spec=replace(checkpoint.input_spec, patch_size=patch))


def memory_note(device) -> str:
    import torch

    if device.type != "cuda":
        return "process RSS"
    return f"GPU allocated; cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}"


def heal_run(dims: str, shape: tuple[int, ...], sampler: str, steps: int, amp: bool, sizes: dict,
             device) -> dict:
    """One HEAL run on a phantom; its total and diffusion seconds and peak memory."""
    from SFUDASegmentLib.config import HEALConfig, InferenceConfig
    from SFUDASegmentLib.data.synthetic import make_phantom
    from SFUDASegmentLib.heal import heal_adapt

    checkpoint = checkpoint_for(dims, sizes)
    volume = make_phantom(shape, seed=1, gap=0.35).target
    config = HEALConfig(stages="heal", candidates=sizes["candidates"], sampler=sampler, steps=steps, amp=amp,
                                       candidate_batch=sizes["candidates"] if dims == "3d" else 48, skip_empty_slices=False)
    result = heal_adapt(volume, checkpoint, config, InferenceConfig(device=str(device), amp=amp))
    timings = result.timings
    return {"total_seconds": timings["total_seconds"], "diffusion_seconds": timings["seconds"]["diffusion"],
            "peak_memory_mb": max(timings["peak_memory_mb"].values()),
            "diffusion_peak_memory_mb": timings["peak_memory_mb"]["diffusion"],
            "rendered_slices": result.extra.get("rendered_slices", 0), "stages": timings["seconds"]}


def heal_line(name: str, figures: dict, device) -> str:
    return (f"{name}: total {figures['total_seconds']:.1f} s, diffusion {figures['diffusion_seconds']:.1f} s, "
            f"peak {figures['peak_memory_mb']:.0f} MiB (diffusion {figures['diffusion_peak_memory_mb']:.0f}; "
            f"{memory_note(device)}), {figures['rendered_slices']} slices rendered")


def part_heal_3d(sizes: dict, device) -> dict:
    out = {}
    T, k = sizes["timesteps"], sizes["ddim_steps"]
    for sampler, steps in (("ddim", k), ("ddpm", T)):
        for precision, amp in (("bf16", True), ("fp32", False)):
            shape = "x".join(map(str, sizes["volume_3d"]))
            name = f"heal-3d-{shape} n={sizes['candidates']} {sampler}-{steps} {precision}"
            out[name] = heal_run("3d", sizes["volume_3d"], sampler, steps, amp, sizes, device)
            print(heal_line(name, out[name], device), flush=True)
    return out


def part_heal_slices(sizes: dict, device) -> dict:
    z, y, x = sizes["slices"]
    name = f"heal-slices-{y}x{x}x{z} n={sizes['candidates']} ddim-{sizes['slice_steps']} bf16"
    figures = heal_run("2d", sizes["slices"], "ddim", sizes["slice_steps"], True, sizes, device)
    print(heal_line(name, figures, device), flush=True)
    return {name: figures}


def peak_memory_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    import torch

    from SFUDASegmentLib.utils.device import process_peak_rss_mb

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_peak_rss_mb()


def rate_from_two_runs(run, counts: tuple[int, int], device) -> tuple[float, float]:
    """Seconds per iteration from two runs of ``run(iterations)`` and the peak memory."""
    seconds = []
    peak_memory_reset(device)
    for count in counts:
        start = time.perf_counter()
        run(count)
        seconds.append(time.perf_counter() - start)
    return (seconds[1] - seconds[0]) / (counts[1] - counts[0]), peak_memory_mb(device)


def part_training(sizes: dict, device) -> dict:
    from SFUDASegmentLib.config import TrainingConfig
    from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES, make_phantom_set
    from SFUDASegmentLib.training.segmentation import train_source

    out = {}
    for dims, shape in (("2d", sizes["slices"]), ("3d", sizes["volume_3d"])):
        checkpoint = checkpoint_for(dims, sizes)
        phantoms = make_phantom_set(sizes["training_cases"], shape, seed=3)

        def train(iterations: int, phantoms=phantoms, checkpoint=checkpoint) -> None:
            config = TrainingConfig(epochs=1, iterations_per_epoch=iterations, device=str(device), seed=0)
            train_source([p.source for p in phantoms], [p.labels for p in phantoms], list(PHANTOM_CLASSES),
                         checkpoint.input_spec, config, checkpoint.seg_config)

        per_iteration, peak = rate_from_two_runs(train, sizes["train_iterations"], device)
        patch = "x".join(map(str, checkpoint.input_spec.patch_size))
        name = f"training-{dims} patch {patch} batch {TrainingConfig().batch_size}"
        out[name] = {"iterations_per_second": 1.0 / per_iteration, "peak_memory_mb": peak}
        print(f"{name}: {1.0 / per_iteration:.2f} iterations/s, peak {peak:.0f} MiB ({memory_note(device)})",
              flush=True)
    return out


def part_gmm(sizes: dict, device) -> dict:
    from SFUDASegmentLib.config import GMMConfig, InferenceConfig
    from SFUDASegmentLib.data.synthetic import make_phantom, make_phantom_set
    from SFUDASegmentLib.gmm.adaptation import gmm_adapt
    from SFUDASegmentLib.gmm.fitting import fit_prototypes

    out = {}
    for dims, shape in (("2d", sizes["slices"]), ("3d", sizes["volume_3d"])):
        phantoms = make_phantom_set(sizes["training_cases"], shape, seed=3)
        checkpoint = fit_prototypes(checkpoint_for(dims, sizes), [p.source for p in phantoms],
                                    [p.labels for p in phantoms], GMMConfig(), device=str(device))
        target = make_phantom(shape, seed=1, gap=0.35).target

        def adapt(iterations: int, target=target, checkpoint=checkpoint) -> None:
            gmm_adapt(target, checkpoint, GMMConfig(iterations=iterations), InferenceConfig(device=str(device)))

        per_iteration, peak = rate_from_two_runs(adapt, sizes["gmm_iterations"], device)
        name = f"gmm-{dims} {'x'.join(map(str, shape))}"
        out[name] = {"seconds_per_iteration": per_iteration, "peak_memory_mb": peak}
        print(f"{name}: {per_iteration:.3f} s per iteration, peak {peak:.0f} MiB ({memory_note(device)})",
              flush=True)
    return out


RUNNERS = {"heal-3d": part_heal_3d, "heal-slices": part_heal_slices, "training": part_training, "gmm": part_gmm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke only)")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        print("bench_gpu.py: the library needs SimpleITK, which is not installed here. Carry its wheel "
              "(see the README's speed section) and put it on PYTHONPATH.", file=sys.stderr)
        return 2
    import torch

    has_gpu = torch.cuda.is_available()
    if not args.smoke and not (args.device.startswith("cuda") and has_gpu):
        reason = "this machine has none" if not has_gpu else f"--device is {args.device}"
        print(f"bench_gpu.py needs a CUDA GPU for its full sizes, and {reason} (PyTorch {torch.__version__}). "
              "Run it on a GPU machine, or add --smoke for a tiny check of the script on this device.",
              file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not has_gpu:
        args.device = "cpu"
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_gpu.py on {name}, PyTorch {torch.__version__}, {'smoke sizes' if args.smoke else 'full sizes'}",
          flush=True)
    figures: dict = {"device": name, "torch": torch.__version__, "smoke": args.smoke}
    start = time.perf_counter()
    for part in args.parts:
        figures.update(RUNNERS[part](sizes, device))
    figures["wall_seconds"] = time.perf_counter() - start
    print(f"all parts: {figures['wall_seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
