"""Seconds and peak memory of segmentation inference and of HEAL, per stage; where the
diffusion network's time goes.

Each configuration runs in its own process so that its peak memory is its own (process peak
RSS on CPU, peak allocated GPU memory on CUDA). Network weights are freshly initialised: speed
does not depend on them. Every line ends with the machine's load average (1 minute) before and
after the run: wall-clock figures only mean something on an otherwise idle machine (HEAL lines
also give the process's CPU seconds, which depend less on other processes). Examples:

    python Testing/benchmarks/bench_speed.py inference            # 240x240x155, 2D and 3D models
    python Testing/benchmarks/bench_speed.py heal                 # 2D 256^2, 3D 128^3, 240x240x155 slice mode
    python Testing/benchmarks/bench_speed.py heal --device cuda --only heal-3d-128 --samplers ddim-50
    python Testing/benchmarks/bench_speed.py network              # the 2D U-Net per item and operator

HEAL runs also split the diffusion stage into the network calls, the sampler's update steps and
the rest (conditions, crops, assembling the candidates), as seen from the calling thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CASES = {
    "inference-2d-240x240x155": dict(kind="inference", dims="2d", shape=(155, 240, 240)),
    "inference-3d-240x240x155": dict(kind="inference", dims="3d", shape=(155, 240, 240)),
    "heal-2d-256": dict(kind="heal", dims="2d", shape=(256, 256)),
    "heal-3d-128": dict(kind="heal", dims="3d", shape=(128, 128, 128)),
    "heal-slices-240x240x155": dict(kind="heal", dims="2d", shape=(155, 240, 240)),
    "network-2d-176": dict(kind="network", dims="2d", shape=(176, 176)),
}
NETWORK_ITEMS = 48
"""Items of the ``network`` suite's batch: one chunk of 8 slices x 6 candidates, as HEAL renders
them with ``candidate_batch=48``; 176x176 is the mean body box of the slice-mode benchmark."""


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def build_checkpoint(dims: str, base: int, mults: tuple[int, ...] = (1, 2, 2, 4), timesteps: int = 250,
                     seg_channels: tuple[int, ...] | None = None):
    """A checkpoint with freshly initialised segmentation and diffusion networks.

    Args:
        dims: ``"2d"`` or ``"3d"``.
        base, mults: the diffusion U-Net's base width and multipliers (one residual block a level).
        timesteps: the noise schedule's T.
        seg_channels: the segmentation U-Net's widths (default: ``default_seg_config``'s).
    """
    import torch

    from SFUDASegmentLib.checkpoint import DiffusionPart, SourceCheckpoint
    from SFUDASegmentLib.config import DiffusionNetConfig, InputSpec, ScheduleConfig
    from SFUDASegmentLib.data.synthetic import PHANTOM_CLASSES
    from SFUDASegmentLib.nets.diffusion_unet import ConditionalDiffusionUNet
    from SFUDASegmentLib.nets.unet import ResidualUNet
    from SFUDASegmentLib.training.segmentation import default_seg_config

    torch.manual_seed(0)
    spec = InputSpec(dims=dims, modality="MR", patch_size=(96, 96, 96) if dims == "3d" else (128, 128))
    seg = default_seg_config(spec, 1 + len(PHANTOM_CLASSES), *([seg_channels] if seg_channels else []))
    net = DiffusionNetConfig(spatial_dims=spec.spatial_dims, image_channels=1, cond_channels=5, base_channels=base,
                             channel_mults=mults, num_res_blocks=1, groups=8)
    diffusion = ConditionalDiffusionUNet.from_config(net)
    return SourceCheckpoint(list(PHANTOM_CLASSES), spec, seg, ResidualUNet.from_config(seg).state_dict(),
                            DiffusionPart(net, ScheduleConfig(timesteps=timesteps), diffusion.state_dict()))


def timed_diffusion_parts() -> dict[str, float]:
    """Accumulate the seconds of the sampler's network calls and update steps (calling thread)."""
    from SFUDASegmentLib.diffusion import sampling

    seconds = {"network": 0.0, "sampler_steps": 0.0}

    def timed(function, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start
        return wrapper

    sampling._predict_noise = timed(sampling._predict_noise, "network")
    for sampler in (sampling.DDIMSampler, sampling.DDPMSampler):
        sampler.step = timed(sampler.step, "sampler_steps")
    return seconds


def run_network(base: int, device: str) -> dict:
    """The 2D U-Net on 176x176 items: seconds per item and sampling step as the sampler runs it,
    and as one call on PyTorch's own threads (how it ran before); its operators' share."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from SFUDASegmentLib.diffusion.sampling import DDIMSampler, NoiseSchedule, network_groups

    net = build_checkpoint("2d", base).build_diffusion_net(device)
    cond = torch.rand((NETWORK_ITEMS, 5, 176, 176)).to(device)
    x, t = torch.randn((NETWORK_ITEMS, 1, 176, 176)).to(device), torch.full((NETWORK_ITEMS,), 100, device=device)
    sampler = DDIMSampler(NoiseSchedule(250), steps=2)
    sampler.sample(net, cond[:2], 1, torch.Generator().manual_seed(0))  # warm-up
    threads = torch.get_num_threads()
    groups = network_groups(cond.device, NETWORK_ITEMS, 176 * 176, threads)
    out: dict = {"threads": threads, "calls": f"{len(groups)} calls of up to {groups[0].stop} items"}

    def per_item(run, steps: int) -> dict[str, float]:
        before = os.times()
        run()
        after = os.times()
        scale = 1e3 / (NETWORK_ITEMS * steps)
        return {"ms": (after.elapsed - before.elapsed) * scale,
                "cpu_ms": (after.user + after.system - before.user - before.system) * scale,
                "sys_ms": (after.system - before.system) * scale}

    out["sampler"] = per_item(lambda: sampler.sample(net, cond, 1, torch.Generator().manual_seed(0)),
                              sampler.num_steps)
    with torch.inference_mode():
        out["one_call"] = per_item(lambda: net(x, t, cond), 1)
    # one worker's share: the network on two items, one PyTorch thread, operators by self time
    torch.set_num_threads(1)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as flops:
            net(x[:1], t[:1], cond[:1])
        out["gflop_per_item"] = flops.get_total_flops() / 1e9
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                net(x[:2], t[:2], cond[:2])
    torch.set_num_threads(threads)
    events = prof.key_averages()
    out["one_thread_ms_per_item"] = sum(e.self_cpu_time_total for e in events) / 1e3 / 6
    out["operators_ms_per_item"] = {e.key: e.self_cpu_time_total / 1e3 / 6 for e in
                                    sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]}
    return out


def run_one(name: str, sampler: str, device: str, base: int, candidates: int) -> dict:
    """Run one configuration in this process and return its figures."""
    import torch

    from SFUDASegmentLib.config import HEALConfig, InferenceConfig
    from SFUDASegmentLib.data.synthetic import make_phantom
    from SFUDASegmentLib.heal import heal_adapt
    from SFUDASegmentLib.inference.segment import segment

    case = CASES[name]
    if case["kind"] == "network":
        return run_network(base, device)
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
    config = HEALConfig(stages="heal", candidates=candidates, sampler=kind, steps=int(steps or 250), candidate_batch=6 if
                                       case["dims"] == "3d" else 48, skip_empty_slices=False)
    parts = timed_diffusion_parts()
    before = os.times()
    result = heal_adapt(volume, checkpoint, config, inference)
    after = os.times()
    parts["rest"] = result.timings["seconds"]["diffusion"] - sum(parts.values())
    return {"timings": result.timings, "torch_threads": torch.get_num_threads(),
            "cpu_seconds": after.user + after.system - before.user - before.system,
            "rendered_slices": result.extra.get("rendered_slices", 0), "diffusion_parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=("inference", "heal", "network"))
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
            load_before = load_average()
            done = subprocess.run(cmd, capture_output=True, text=True)
            load = f"load {load_before:.1f} -> {load_average():.1f}"
            if done.returncode:
                figures[key] = {"error": done.stderr.strip().splitlines()[-1]}
                print(f"{key}: FAILED {figures[key]['error']} ({load})", flush=True)
                continue
            figures[key] = json.loads(done.stdout.strip().splitlines()[-1])
            figures[key]["load_average"] = load
            print_figures(key, figures[key], load)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def print_figures(key: str, figures: dict, load: str) -> None:
    """One line (two for inference) per configuration."""
    if "operators_ms_per_item" in figures:
        operators = ", ".join(f"{k} {v:.1f}" for k, v in figures["operators_ms_per_item"].items())
        sampler, one_call = figures["sampler"], figures["one_call"]
        print(f"{key}: {figures['gflop_per_item']:.2f} GFLOP per item; sampler {sampler['ms']:.1f} ms per item "
              f"and step ({sampler['cpu_ms']:.1f} ms CPU, {sampler['sys_ms']:.1f} of it system; {figures['calls']} "
              f"on {figures['threads']} single-threaded workers), one call of {NETWORK_ITEMS} on "
              f"{figures['threads']} PyTorch threads {one_call['ms']:.1f} ms per item ({one_call['cpu_ms']:.1f} ms "
              f"CPU, {one_call['sys_ms']:.1f} system); one thread, 2 items a call: "
              f"{figures['one_thread_ms_per_item']:.1f} ms per item [{operators}] ({load})", flush=True)
    elif "timings" in figures:
        timings = figures["timings"]
        stages = ", ".join(f"{s} {v:.1f}" for s, v in timings["seconds"].items())
        parts = ", ".join(f"{s} {v:.1f}" for s, v in figures["diffusion_parts"].items())
        print(f"{key}: total {timings['total_seconds']:.1f} s ({figures['cpu_seconds']:.0f} CPU seconds), peak "
              f"{max(timings['peak_memory_mb'].values()):.0f} MiB ({timings['peak_memory_kind']}), "
              f"{figures['rendered_slices']} slices rendered [{stages}] diffusion: [{parts}] ({load})", flush=True)
    else:
        for output in ("labels", "probabilities"):
            t = figures[output]
            print(f"{key} output={output}: {t['total_seconds']:.1f} s, peak {max(t['peak_memory_mb'].values()):.0f} MiB"
                  f" ({t['peak_memory_kind']}) ({load})", flush=True)


if __name__ == "__main__":
    main()
