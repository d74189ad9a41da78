"""The GPU benchmark script runs end to end at its smoke sizes on CPU and refuses its full sizes
without a GPU (its figures come from a GPU machine; this keeps the script working meanwhile)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_gpu.py"
REPO = SCRIPT.parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    """The script in a child process on one PyTorch thread (the test machine's cores are shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_smoke_sizes_run_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_script("--smoke", "--device", "cpu", "--json", str(out))
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["device"] == "CPU"
    heal_3d = [k for k in figures if k.startswith("heal-3d-16x16x16 n=2")]
    assert sorted(heal_3d) == sorted(f"heal-3d-16x16x16 n=2 {s} {p}" for s in ("ddim-2", "ddpm-6")
                                     for p in ("bf16", "fp32"))
    slices = [k for k in figures if k.startswith("heal-slices-32x32x16")]
    assert len(slices) == 1
    for key in heal_3d + slices:
        run = figures[key]
        assert 0 < run["diffusion_seconds"] <= run["total_seconds"] and run["peak_memory_mb"] > 0
    assert all(figures[k]["rendered_slices"] == 16 for k in heal_3d)  # the volume renders every slice
    assert 0 < figures[slices[0]]["rendered_slices"] < 16  # slices without body are skipped
    rates = [v for k, v in figures.items() if k.startswith(("training-2d", "training-3d"))]
    gmm = [v for k, v in figures.items() if k.startswith(("gmm-2d", "gmm-3d"))]
    assert len(rates) == 2 and len(gmm) == 2
    assert all(math.isfinite(r["iterations_per_second"]) for r in rates)
    assert all(math.isfinite(g["seconds_per_iteration"]) for g in gmm)
    for line in ("heal-3d-16x16x16 n=2 ddpm-6 fp32: total", "heal-slices-32x32x16 n=2 ddim-2 bf16: total",
                 "training-3d patch 16x16x16 batch 4:", "gmm-2d 16x32x32:", "all parts:"):
        assert line in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_full_sizes_refuse_without_a_gpu():
    for args in ((), ("--device", "cpu")):
        done = run_script(*args)
        assert done.returncode == 2
        assert "needs a CUDA GPU" in done.stderr and "--smoke" in done.stderr
        assert "Traceback" not in done.stderr
