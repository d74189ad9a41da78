"""The one rule for every path a command writes, checked before any work starts.

1. No output may be, contain or lie inside an input (paths resolved with symlinks followed;
   hard links and case-insensitive file systems are caught by comparing the files themselves).
2. No output may be, contain or lie inside another output of the same run, and none may be or
   contain a working path the run writes itself (a resume state, a work folder).
3. An output folder that exists and holds anything, or an output file that exists, is refused
   unless ``overwrite`` is given; ``overwrite`` replaces it whole (see ``staging.py``).
4. A folder output must not be an existing file, a file output not an existing folder.

:class:`~SFUDASegmentLib.results.staging.OutputTransaction` applies these checks to every path
it is given, so a command cannot write around them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..errors import OutputError

PathLike = Union[str, Path]

#: hidden folders of runs that are writing (or were killed while writing) start with these
STAGING_MARKERS = (".sfuda-staging-",)


def real_path(path: PathLike) -> Path:
    """``path`` made absolute with every symlink resolved (also when it does not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _key(path: Path) -> str:
    return os.path.normcase(str(path))


def _is_within(inner: Path, outer: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (both resolved)."""
    outer_key = _key(outer).rstrip(os.sep) + os.sep
    return _key(inner) == _key(outer) or _key(inner).startswith(outer_key)


def _same_file(a: Path, b: Path) -> bool:
    """Both exist and are the same file (hard link, other spelling on a case-insensitive disk)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def overlap(a: Path, b: Path) -> Optional[str]:
    """How two resolved paths overlap: ``"is"``, ``"contains"``, ``"is inside"`` or None."""
    if _key(a) == _key(b) or _same_file(a, b):
        return "is"
    if _is_within(b, a):
        return "contains"
    if _is_within(a, b):
        return "is inside"
    return None


def is_staging_entry(name: str) -> bool:
    """True for the hidden staging folders of this library (they are not user content)."""
    return any(marker in name for marker in STAGING_MARKERS)


def user_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that are not staging folders of this library, sorted."""
    return sorted(name for name in os.listdir(folder) if not is_staging_entry(name))


def check_output(path: PathLike, kind: str, label: str, inputs: Sequence[PathLike] = (),
                 outputs: Iterable[tuple[Path, str]] = (), working: Sequence[PathLike] = (),
                 overwrite: bool = False) -> Path:
    """Apply the rule to one output and return its resolved path.

    Args:
        path: the output as the user gave it.
        kind: ``"folder"`` or ``"file"``.
        label: how the user named it, e.g. ``"--out"`` (used in messages).
        inputs: every input path of the run.
        outputs: the run's other outputs as ``(resolved path, label)``.
        working: paths the run writes itself (resume state, work folder).
        overwrite: an existing output may be replaced.

    Raises:
        OutputError: the first broken rule, naming both paths and the fix.
    """
    target = real_path(path)
    for given in inputs:
        source = real_path(given)
        how = overlap(target, source)
        if how == "is":
            raise OutputError(f"{label} '{path}' is the input '{given}'. Inputs are never overwritten: "
                              f"choose another path for {label}.")
        if how == "contains":
            raise OutputError(f"{label} '{path}' contains the input '{given}', which writing it would "
                              f"replace. Inputs are never overwritten: choose a {kind} outside the input's folder.")
        if how == "is inside":
            raise OutputError(f"{label} '{path}' lies inside the input '{given}'. Inputs are never "
                              f"modified: choose a {kind} outside it.")
    for other, other_label in outputs:
        if overlap(target, other):
            raise OutputError(f"{label} '{path}' and {other_label} '{other}' overlap; give them "
                              "separate paths.")
    for given in working:
        if overlap(target, real_path(given)) in ("is", "contains"):
            raise OutputError(f"{label} '{path}' would replace '{given}', which this run writes "
                              f"itself; choose another path for {label}.")
    _check_existing(target, path, kind, label, overwrite)
    return target


def check_working(path: PathLike, label: str, inputs: Sequence[PathLike]) -> None:
    """A path the run writes itself (resume state, work folder) must not be an input file.

    Raises:
        OutputError: naming both paths.
    """
    target = real_path(path)
    for given in inputs:
        if overlap(target, real_path(given)) == "is":
            raise OutputError(f"{label} '{path}' is the input '{given}'. Inputs are never "
                              f"overwritten: choose another path for {label}.")


def check_input(path: PathLike, outputs: Iterable[tuple[Path, str]]) -> None:
    """An input declared after some outputs must not overlap them either.

    Raises:
        OutputError: naming both paths.
    """
    source = real_path(path)
    for target, label in outputs:
        if overlap(target, source):
            raise OutputError(f"{label} '{target}' overlaps the input '{path}'. Inputs are never "
                              f"overwritten: choose another path for {label}.")


def _check_existing(target: Path, given: PathLike, kind: str, label: str, overwrite: bool) -> None:
    """Rules 3 and 4 for one resolved output path."""
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"{label} '{given}' cannot be created: '{ancestor}' is a file, "
                                  "not a folder.")
            break
    if not target.exists():
        return
    if kind == "folder":
        if not target.is_dir():
            raise OutputError(f"{label} '{given}' is an existing file, but {label} names a folder. "
                              "Give a folder path (it is created when missing).")
        content = user_entries(target)
        if content and not overwrite:
            raise OutputError(
                f"{label} '{given}' already holds {len(content)} item(s) (e.g. '{content[0]}'). Choose "
                "a new or empty folder, or pass --overwrite to replace its whole content.")
    else:
        if target.is_dir():
            raise OutputError(f"{label} '{given}' is a folder, but {label} names a file, e.g. "
                              f"'{Path(given) / 'model.sfuda'}'.")
        if not overwrite:
            raise OutputError(f"{label} '{given}' already exists. Choose a new file name, or pass "
                              "--overwrite to replace it.")
