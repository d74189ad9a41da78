"""What installing the module's dependencies does to a Python like Slicer 5.8's (needs network).

Slicer 5.8.1 runs Python 3.9 with numpy 1.26.4, scipy 1.13.1, Pillow 10.1.0 and its own
SimpleITK build. This script makes a virtual environment with a Python 3.9 and those versions
(SimpleITK from PyPI standing in for Slicer's build), then asks pip what it would do:

1. the plain ``pip install scikit-image opencv-python-headless tqdm`` an extension might run;
2. what the module runs (``slicer_bridge.dependencies``: only the missing packages, every
   installed distribution pinned by a constraints file);

and, with ``--install``, installs (2) and imports the library's image code in that Python.
It prints what each would install or change::

    python Testing/benchmarks/check_slicer_install.py --python python3.9 --install
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Slicer 5.8.1's versions (RESEARCH.md "Slicer 5.8 facts"; Pillow from Slicer's superbuild).
SLICER_58 = ["numpy==1.26.4", "scipy==1.13.1", "Pillow==10.1.0", "SimpleITK==2.4.1"]

PLAN = """
import json, sys, tempfile
from SFUDASegmentLib.slicer_bridge import dependencies as deps
plan = deps.install_plan(deps.installed_versions())
path = deps.write_constraints(plan, tempfile.mkdtemp())
print(json.dumps({"arguments": deps.pip_arguments(plan, path), "constraints": plan.constraints,
                  "problems": plan.problems}))
"""

IMPORTS = """
import cv2, numpy, scipy, skimage, SimpleITK, tqdm
from SFUDASegmentLib.heal import edge_selection
from SFUDASegmentLib.data import preprocess
edges = cv2.Canny(numpy.zeros((8, 8), numpy.uint8), 10, 20)
print(f"numpy {numpy.__version__}, scipy {scipy.__version__}, SimpleITK {SimpleITK.Version_VersionString()}, "
      f"opencv {cv2.__version__}, scikit-image {skimage.__version__}: library image code imports")
"""


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done


def dry_run(python: str, arguments: list[str], folder: Path, name: str) -> list[tuple[str, str]]:
    """What ``pip install --dry-run`` would install: (name, version)."""
    report = folder / f"{name}.json"
    run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *arguments])
    return [(i["metadata"]["name"], i["metadata"]["version"])
            for i in json.loads(report.read_text())["install"]]


def check(interpreter: str, install: bool, folder: Path) -> None:
    """Make the environment in ``folder`` and print what each install would do."""
    run([interpreter, "-m", "venv", str(folder / "venv")])
    python = str(folder / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    run([python, "-m", "pip", "install", "--quiet", "pip==24.2"])
    run([python, "-m", "pip", "install", "--quiet", *SLICER_58])
    version = run([python, "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()
    print(f"Python {version} with {', '.join(SLICER_58)}")

    plain = dry_run(python, ["scikit-image", "opencv-python-headless", "tqdm"], folder, "plain")
    print("plain `pip install scikit-image opencv-python-headless tqdm` would install:")
    print("  " + ", ".join(f"{n} {v}" for n, v in plain))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plan = json.loads(run([python, "-c", PLAN], env=env).stdout)
    print(f"the module's plan: {' '.join(plan['arguments'][2:])} with {len(plan['constraints'])} "
          f"installed distributions as constraints; problems: {plan['problems'] or 'none'}")
    planned = dry_run(python, plan["arguments"], folder, "planned")
    print("  would install: " + ", ".join(f"{n} {v}" for n, v in planned))
    pinned = {line.split("==")[0] for line in plan["constraints"]}
    changed = [f"{n} {v}" for n, v in planned if n.lower().replace("_", "-") in pinned]
    print(f"  changes to installed distributions: {', '.join(changed) or 'none'}")
    if install:
        run([python, "-m", "pip", "install", "--quiet", *plan["arguments"]])
        print("installed; " + run([python, "-c", IMPORTS], env=env).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3.9", help="a Python 3.9 interpreter")
    parser.add_argument("--install", action="store_true", help="also install and import")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="slicer58-"))
    try:
        check(args.python, args.install, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
