"""What the Slicer module installs into Slicer's Python (slicer_bridge.dependencies): never a
replacement of what is installed, a PyTorch too old detected, and the constraints doing their
work in a real (offline) pip resolution."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from SFUDASegmentLib.slicer_bridge import dependencies as deps

REPO = Path(__file__).resolve().parents[1]

#: What Slicer 5.8.1 ships that matters here (RESEARCH.md, "Slicer 5.8 facts").
SLICER_58 = {"numpy": "1.26.4", "scipy": "1.13.1", "simpleitk": "2.4.1", "pillow": "10.1.0",
             "packaging": "24.1", "pip": "24.2", "requests": "2.32.3"}


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize("version, expected", [
    ("2.1.0+cu118", (2, 1, 0)), ("1.26.4", (1, 26, 4)), ("2.2.0rc1", (2, 2, 0)),
    ("v0.21", (0, 21)), ("1!2.0", (2, 0)), ("unknown", ()), ("", ()),
])
def test_release_numbers(version: str, expected: tuple) -> None:
    assert deps.release(version) == expected


@pytest.mark.parametrize("version, minimum, enough", [
    ("2.1", "2.1", True), ("2.1.0", "2.1", True), ("2.0.1", "2.1", False),
    ("2.13.0+cpu", "2.1", True), ("10.0", "9.9", True), ("1.13.1", "1.10", True),
    ("1.9.3", "1.10", False), ("", "0.1", False),
])
def test_version_check(version: str, minimum: str, enough: bool) -> None:
    assert deps.at_least(version, minimum) is enough


def test_torch_status_from_installed_versions() -> None:
    missing = deps.torch_status({"numpy": "1.26.4"})
    assert not missing.installed and not missing.ok
    assert "not installed" in missing.message() and "PyTorch Utils" in missing.message()
    old = deps.torch_status({"torch": "2.0.1+cu118"})
    assert old.installed and not old.ok and old.requirement == ">=2.1"
    assert "2.0.1+cu118 is installed" in old.message() and "'>=2.1'" in old.message()
    assert deps.torch_status({"torch": "2.1.2"}).ok


def test_library_minimums_are_the_package_requirements() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', pyproject))
    assert declared["torch"] == deps.TORCH_MINIMUM
    for requirement in deps.LIBRARY_REQUIREMENTS:
        assert declared[requirement.distribution] == requirement.minimum, requirement


# ----------------------------------------------------------------------------- install plans


def test_plan_in_slicer_58_installs_only_what_is_missing_and_pins_everything_else() -> None:
    plan = deps.install_plan(SLICER_58)
    assert plan.requirements == ["scikit-image>=0.21", "opencv-python-headless>=4.8,<4.12",
                                 "tqdm>=4.60"]  # scipy ships with Slicer 5.8
    assert plan.constraints == sorted(f"{n}=={v}" for n, v in SLICER_58.items())
    assert "numpy==1.26.4" in plan.constraints and "simpleitk==2.4.1" in plan.constraints
    assert plan.problems == [] and plan.needed


def test_plan_with_numpy_2_needs_no_opencv_bound_and_nothing_when_all_is_there() -> None:
    numpy2 = {**SLICER_58, "numpy": "2.0.2"}
    assert "opencv-python-headless>=4.8" in deps.install_plan(numpy2).requirements
    complete = {**SLICER_58, "scikit-image": "0.24.0", "opencv-python-headless": "4.11.0.86",
                "tqdm": "4.67.1"}
    plan = deps.install_plan(complete)
    assert not plan.needed and plan.problems == []


def test_outdated_packages_are_upgraded_unless_slicer_ships_them() -> None:
    outdated = {**SLICER_58, "scikit-image": "0.19.3", "tqdm": "4.67.1",
                "opencv-python-headless": "4.11.0.86"}
    plan = deps.install_plan(outdated)
    assert plan.requirements == ["scikit-image>=0.21"]  # another extension's old copy
    assert "scikit-image==0.19.3" not in plan.constraints
    assert "tqdm==4.67.1" in plan.constraints
    old_scipy = deps.install_plan({**outdated, "scipy": "1.9.3"})
    assert old_scipy.requirements == [] and not old_scipy.needed  # nothing half-installed
    assert len(old_scipy.problems) == 1
    assert "scipy 1.9.3 ships with this Slicer" in old_scipy.problems[0]
    assert "never replaced" in old_scipy.problems[0]


def test_distribution_names_are_canonical_and_odd_versions_are_not_pinned() -> None:
    assert deps.canonical_name("SimpleITK") == "simpleitk"
    assert deps.canonical_name("opencv_python.Headless") == "opencv-python-headless"
    plan = deps.install_plan({"numpy": "1.26.4", "weird": "not a version",
                              "torch": "2.3.0+cu121"})
    assert "weird==not a version" not in plan.constraints  # pip would reject the whole file
    assert "torch==2.3.0+cu121" in plan.constraints


def test_installed_versions_reads_the_running_interpreter() -> None:
    import numpy

    found = deps.installed_versions()
    assert found["numpy"] == numpy.__version__
    assert all(name == deps.canonical_name(name) for name in found)


class _Distribution:
    def __init__(self, name, version) -> None:
        self.metadata = {"Name": name}
        self.version = version


def test_installed_versions_keeps_the_first_copy_and_skips_broken_metadata() -> None:
    found = deps.installed_versions([_Distribution("NumPy", "1.26.4"), _Distribution("numpy", "2.0"),
                                     _Distribution(None, "1.0"), _Distribution("x", None)])
    assert found == {"numpy": "1.26.4"}


def test_constraints_file_and_pip_arguments(tmp_path: Path) -> None:
    plan = deps.install_plan(SLICER_58)
    folder = tmp_path / "folder with spaces"
    folder.mkdir()
    path = deps.write_constraints(plan, str(folder))
    lines = [ln for ln in Path(path).read_text().splitlines() if not ln.startswith("#")]
    assert lines == plan.constraints
    assert deps.pip_arguments(plan, path) == ["--constraint", path, *plan.requirements]
    text = deps.describe_install(plan, "3.9.10")
    assert "Python 3.9.10" in text and "opencv-python-headless>=4.8,<4.12" in text
    assert f"the {len(SLICER_58)} installed packages (numpy, scipy, simpleitk, pillow, ...)" in text


# ----------------------------------------------------------------------------- real pip, offline


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A minimal pure-Python wheel (metadata only) that pip can resolve from a folder."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\n"
                       f"Name: {name}\nVersion: {version}\n"
                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                       "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


def _dry_run(tmp_path: Path, wheels: Path, arguments: list[str]) -> dict[str, str]:
    """What ``pip install --dry-run`` would install from ``wheels`` only: name -> version."""
    report = tmp_path / f"report{len(list(tmp_path.glob('report*')))}.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                           "--ignore-installed", "--find-links", str(wheels), "--report",
                           str(report), "--quiet", *arguments], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                               "PIP_CONFIG_FILE": os.devnull})
    assert done.returncode == 0, done.stderr[-2000:]
    return {i["metadata"]["name"]: i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}


def test_constraints_keep_the_installed_base_where_a_plain_install_replaces_it(tmp_path) -> None:
    # A miniature of Slicer 5.8 + opencv: the newest "vision" needs base >= 2, an older one
    # works with base 1.x, and base 1.5 is what the interpreter has.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "sfudatest-base", "1.5", [])
    _wheel(wheels, "sfudatest-base", "2.0", [])
    _wheel(wheels, "sfudatest-vision", "4.11", ["sfudatest-base>=1.2"])
    _wheel(wheels, "sfudatest-vision", "4.12", ["sfudatest-base>=2"])
    assert _dry_run(tmp_path, wheels, ["sfudatest-vision"]) == {
        "sfudatest-vision": "4.12", "sfudatest-base": "2.0"}  # base would be replaced

    installed = {"sfudatest-base": "1.5"}
    plan = deps.install_plan(installed, [deps.Requirement("vision", "sfudatest-vision", "4.0")])
    constraints = deps.write_constraints(plan, str(tmp_path))
    chosen = _dry_run(tmp_path, wheels, deps.pip_arguments(plan, constraints))
    assert chosen == {"sfudatest-vision": "4.11", "sfudatest-base": "1.5"}
