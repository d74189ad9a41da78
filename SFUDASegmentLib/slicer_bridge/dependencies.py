"""What the Slicer module installs into Slicer's Python, and how, without replacing anything.

Slicer ships its own numpy, scipy, SimpleITK, Pillow, packaging, requests... (Slicer 5.8:
Python 3.9, numpy 1.26.4, scipy 1.13.1). An unconstrained ``pip install opencv-python-headless``
there resolves to a release that requires numpy >= 2 and replaces Slicer's numpy. So the module
installs only what is missing and pins every distribution already installed in the running
interpreter to its installed version (a pip constraints file built with
``importlib.metadata``): pip then either finds releases that work with what is there, or stops
with a resolution error, and never upgrades, downgrades or reinstalls anything of Slicer's
(newer Slicer releases protect their environment the same way).

PyTorch is not installed here: it comes from the PyTorch extension's *PyTorch Utils*, which
picks the CUDA or CPU build for the machine; this module only checks its version (read from
the package metadata, without importing it) against the library's minimum.

Nothing here imports Slicer, Qt or PyTorch; the module file calls :func:`install_plan` and
hands :func:`pip_arguments` to ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

#: The lowest PyTorch the library runs with (``torch>=2.1`` in pyproject.toml).
TORCH_MINIMUM = "2.1"


@dataclass(frozen=True)
class Requirement:
    """A package the library imports that Slicer may lack.

    Attributes:
        module: the import name (``cv2``).
        distribution: the PyPI name (``opencv-python-headless``).
        minimum: the lowest version the library works with (pyproject.toml).
    """

    module: str
    distribution: str
    minimum: str


#: What the library needs besides PyTorch and what Slicer always has (numpy, SimpleITK).
LIBRARY_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("skimage", "scikit-image", "0.21"),
    Requirement("cv2", "opencv-python-headless", "4.8"),
    Requirement("scipy", "scipy", "1.10"),
    Requirement("tqdm", "tqdm", "4.60"),
)

#: Distributions Slicer itself ships that a requirement above is, or depends on: when one of
#: them is installed but too old, it is reported and never upgraded.
SHIPPED_WITH_SLICER = frozenset({"numpy", "scipy", "simpleitk", "pillow", "packaging"})

#: Upper bounds while the interpreter's numpy is 1.x, read from the packages' own metadata on
#: PyPI (``pip install --dry-run --report``): opencv-python-headless 4.12.0.88 and later
#: require numpy >= 2 on Python >= 3.9, 4.11.0.86 requires numpy >= 1.19.3. The numpy pin
#: alone would make pip walk back through those releases; the bound saves the downloads.
NUMPY_1_UPPER_BOUNDS: dict[str, str] = {"opencv-python-headless": "4.12"}

_PEP440 = re.compile(
    r"^v?(\d+!)?\d+(\.\d+)*((a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?"
    r"((-\d+)|([-_.]?(post|rev|r)[-_.]?\d*))?([-_.]?dev[-_.]?\d*)?(\+[a-z0-9]+([-_.][a-z0-9]+)*)?$",
    re.IGNORECASE)


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` -> ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.1.0+cu118"`` -> ``(2, 1, 0)``,
    ``"1.26.4"`` -> ``(1, 26, 4)``, ``"2.2.0rc1"`` -> ``(2, 2, 0)``; ``()`` when it starts with
    no number."""
    match = re.match(r"\s*v?(?:\d+!)?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def at_least(version: str, minimum: str) -> bool:
    """True when ``version``'s release is ``minimum``'s or later (``"2.1.0" >= "2.1"``); a
    version without numbers is never enough."""
    have, need = release(version), release(minimum)
    if not have:
        return False
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_versions(distributions: Optional[Iterable[importlib.metadata.Distribution]] = None
                       ) -> dict[str, str]:
    """Every distribution installed in the running interpreter: canonical name -> version.

    When a name is installed twice on ``sys.path``, the first one (the one Python imports) wins;
    distributions with broken metadata (no name or version) are skipped.
    """
    found: dict[str, str] = {}
    for distribution in (importlib.metadata.distributions() if distributions is None else distributions):
        name, version = distribution.metadata["Name"], distribution.version
        if name and version:
            found.setdefault(canonical_name(name), version)
    return found


@dataclass
class InstallPlan:
    """What to install and what must not move.

    Attributes:
        requirements: pip requirement strings of the packages to install (missing or, when
            Slicer does not ship them, too old), e.g. ``opencv-python-headless>=4.8,<4.12``.
        constraints: ``name==version`` of every other installed distribution (a pip
            constraints file: pip may not change any of them).
        problems: installed Slicer packages older than the library needs, one readable line
            each; nothing is installed while there are any.
    """

    requirements: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        """True when something has to be installed."""
        return bool(self.requirements)


def install_plan(installed: Mapping[str, str],
                 requirements: Iterable[Requirement] = LIBRARY_REQUIREMENTS) -> InstallPlan:
    """The install of the library's requirements into an interpreter with ``installed``.

    Args:
        installed: canonical distribution name -> installed version (:func:`installed_versions`).
        requirements: what the library needs (default :data:`LIBRARY_REQUIREMENTS`).

    Returns:
        The plan: missing requirements, and outdated ones Slicer does not ship, are installed
        (with :data:`NUMPY_1_UPPER_BOUNDS` while the installed numpy is 1.x); everything else
        installed is pinned; outdated Slicer packages are reported in ``problems``.
    """
    plan = InstallPlan()
    upgraded = set()
    numpy_major = release(installed.get("numpy", ""))[:1]
    for requirement in requirements:
        name = canonical_name(requirement.distribution)
        version = installed.get(name)
        if version is not None and at_least(version, requirement.minimum):
            continue
        if version is not None and name in SHIPPED_WITH_SLICER:
            plan.problems.append(
                f"{requirement.distribution} {version} ships with this Slicer but the library "
                f"needs {requirement.minimum} or later, and Slicer's own packages are never "
                "replaced: use a newer Slicer release.")
            continue
        specifier = f">={requirement.minimum}"
        bound = NUMPY_1_UPPER_BOUNDS.get(name)
        if bound and numpy_major == (1,):
            specifier += f",<{bound}"
        plan.requirements.append(requirement.distribution + specifier)
        upgraded.add(name)
    plan.constraints = [f"{name}=={version}" for name, version in sorted(installed.items())
                        if name not in upgraded and _PEP440.match(version)]
    if plan.problems:
        plan.requirements = []
    return plan


def write_constraints(plan: InstallPlan, folder: str) -> str:
    """Write ``plan.constraints`` to ``<folder>/SFUDASegment-constraints.txt``; returns the path."""
    path = os.path.join(folder, "SFUDASegment-constraints.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("# Installed when SFUDA Segment installed its dependencies: pip may not change them.\n")
        handle.writelines(line + "\n" for line in plan.constraints)
    return path


def pip_arguments(plan: InstallPlan, constraints_path: str) -> list[str]:
    """The arguments after ``pip install`` (the list form of ``slicer.util.pip_install``, which
    needs no quoting of paths with spaces): ``["--constraint", path, *requirements]``."""
    return ["--constraint", constraints_path, *plan.requirements]


@dataclass(frozen=True)
class TorchStatus:
    """The installed PyTorch against the library's minimum.

    Attributes:
        version: the installed version, None when PyTorch is not installed.
        minimum: the library's minimum (:data:`TORCH_MINIMUM`).
    """

    version: Optional[str]
    minimum: str = TORCH_MINIMUM

    @property
    def installed(self) -> bool:
        return self.version is not None

    @property
    def ok(self) -> bool:
        """True when PyTorch is installed and recent enough."""
        return self.version is not None and at_least(self.version, self.minimum)

    @property
    def requirement(self) -> str:
        """The version requirement to hand to PyTorch Utils (``">=2.1"``)."""
        return f">={self.minimum}"

    def message(self) -> str:
        """One readable line: what is installed and what to do."""
        if self.version is None:
            return (f"PyTorch is not installed. It is installed through the PyTorch extension's "
                    f"PyTorch Utils (version {self.requirement}, the build that fits this "
                    "computer) when you click Apply.")
        if not self.ok:
            return (f"PyTorch {self.version} is installed but SFUDA Segment needs {self.minimum} "
                    f"or later. Upgrade it through PyTorch Utils (version requirement "
                    f"'{self.requirement}'), then restart Slicer if PyTorch was already in use.")
        return f"PyTorch {self.version} (needs {self.minimum} or later)."


def torch_status(installed: Mapping[str, str]) -> TorchStatus:
    """The PyTorch status of an interpreter with ``installed`` distributions."""
    return TorchStatus(installed.get("torch"))


def describe_install(plan: InstallPlan, python_version: Optional[str] = None) -> str:
    """What the confirmation dialog says before installing ``plan``."""
    python_version = python_version or ".".join(str(v) for v in sys.version_info[:3])
    pinned = [line.split("==")[0] for line in plan.constraints]
    core = [name for name in ("numpy", "scipy", "simpleitk", "pillow") if name in pinned]
    return ("SFUDA Segment needs these Python packages, which will now be downloaded and "
            f"installed into Slicer's Python {python_version}:\n\n" + "\n".join(plan.requirements)
            + f"\n\nNothing already installed is changed: pip is given the {len(pinned)} installed "
            "packages" + (f" ({', '.join(core)}, ...)" if core else "")
            + " as constraints at their installed versions.")
