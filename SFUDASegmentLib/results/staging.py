"""All-or-nothing output: files are staged on the output's own file system, verified, then
moved into place together; a failure at any step leaves no output (or the earlier one intact).

Where the staging folder lives (always a hidden folder on the file system of the output, so
that the final moves are renames and never cross a device):

- an output **folder that does not exist**: ``<parent>/.<name>.sfuda-staging-XXXX/content``,
  renamed to ``<parent>/<name>`` at the commit (the parent must be writable to create the folder
  anyway);
- an output **folder that exists** (empty, or replaced with ``overwrite``; it may be a mount
  point, or a writable folder in a read-only parent): ``<folder>/.sfuda-staging-XXXX/content``,
  whose entries are renamed into the folder at the commit (with ``overwrite`` the earlier entries
  are first renamed aside into the staging folder and deleted after the commit);
- an output **file**: ``<parent>/.<name>.sfuda-staging-XXXX/<name>``, renamed over ``<parent>/<name>``.

The commit verifies every staged file (``file_integrity.py``: size and header read back, so a
short write that the writer did not report is caught) and flushes it to the disk, then renames;
if a rename fails, the renames already done are undone. Ctrl-C and SIGTERM wait until the
renames are done. Nothing is written after the commit. Each staging folder holds a lock file
for as long as its run lives; a staging folder whose lock is free (its run was killed) is
removed by the next run that writes the same output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import OutputError
from .file_integrity import sync_file, verify_file
from .output_guard import (STAGING_MARKERS, PathLike, check_input, check_output, check_working,
                           real_path, user_entries)

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

STAGING = STAGING_MARKERS[0]
#: the lock file inside every staging folder, held while its run lives
LOCK_NAME = ".lock"
#: a staging folder without a lock file (a run killed while creating it, or an older version's
#: ``.partial`` folder) is stale once it is this many seconds old
UNLOCKED_GRACE_SECONDS = 60.0


class _Lock:
    """An exclusive, non-blocking lock on a file, released when the process ends."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a+b")

    def try_acquire(self) -> bool:
        try:
            if fcntl is not None:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif msvcrt is not None:
                self.handle.seek(0)
                msvcrt.locking(self.handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.handle.close()


def _is_stale(folder: Path) -> bool:
    """True when no live run holds ``folder``'s lock."""
    lock_path = folder / LOCK_NAME
    if not lock_path.exists():
        try:
            return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_SECONDS
        except OSError:
            return False
    try:
        lock = _Lock(lock_path)
    except OSError:
        return False
    try:
        return lock.try_acquire()
    finally:
        lock.close()


def remove_stale_staging(folder: Path, prefixes: Sequence[str]) -> list[Path]:
    """Delete the staging folders in ``folder`` whose names start with one of ``prefixes`` and
    whose runs are gone (killed while writing). Returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = folder / name
        if name.startswith(tuple(prefixes)) and path.is_dir() and _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass
class _Target:
    """One output (folder or file) and its staging folder.

    Attributes:
        final: resolved output path.
        label: how the user named it (``--out``...).
        kind: ``"folder"`` or ``"file"``.
        staging: the hidden staging folder (holds the lock and the content).
        content: where the output is written while staged (a folder, or the file's path).
        into_existing: a folder output that exists: its entries are moved in one by one.
        created: folders created for this output (removed again when nothing is committed).
    """

    final: Path
    label: str
    kind: str
    staging: Path
    content: Path
    into_existing: bool
    lock: _Lock
    created: list[Path] = field(default_factory=list)


class OutputTransaction:
    """The outputs of one run, staged and committed all or nothing.

    Use::

        with OutputTransaction(overwrite=False) as outputs:
            outputs.add_inputs([image_path, checkpoint_path])
            folder = outputs.folder("result/")       # checked, staged, before the work
            ... compute ...
            write_image(volume, folder / "segmentation.nii.gz")
        # normal exit: verified and committed; an exception: nothing is written

    Args:
        overwrite: existing outputs may be replaced (each one whole).
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self.inputs: list[str] = []
        self.working: list[str] = []
        self.targets: list[_Target] = []
        self.committed = False

    # ------------------------------------------------------------------ declaring
    def add_inputs(self, paths: Sequence[Optional[PathLike]]) -> None:
        """Declare input paths (None entries are skipped); they must not overlap any output."""
        for path in paths:
            if path is not None:
                check_input(path, [(t.final, t.label) for t in self.targets])
                self.inputs.append(os.fspath(path))

    def add_working(self, path: PathLike, label: str) -> None:
        """Declare a path the run writes itself (resume state, work folder): never an input, and
        no output may be or contain it."""
        check_working(path, label, self.inputs)
        self.working.append(os.fspath(path))

    def folder(self, path: PathLike, label: str = "--out") -> Path:
        """Check and stage an output folder; returns the folder to write into."""
        return self._add(path, "folder", label).content

    def file(self, path: PathLike, label: str = "--out") -> Path:
        """Check and stage an output file; returns the path to write it to."""
        return self._add(path, "file", label).content

    def final_path(self, staged: Path) -> Path:
        """Where a path inside a staged output will be after the commit."""
        for target in self.targets:
            if staged == target.content or target.content in staged.parents:
                return target.final / staged.relative_to(target.content)
        raise ValueError(f"{staged} is not inside a staged output")

    def _add(self, path: PathLike, kind: str, label: str) -> _Target:
        final = check_output(path, kind, label, self.inputs, [(t.final, t.label) for t in self.targets],
                             self.working, self.overwrite)
        parent = final.parent
        prefix = f".{final.name}{STAGING}"
        into_existing = kind == "folder" and final.is_dir()
        created: list[Path] = []
        try:
            if into_existing:
                remove_stale_staging(final, (STAGING,))
            else:
                created = _make_folders(parent)
            remove_stale_staging(parent, (prefix, f".{final.name}.partial-"))
            staging = Path(tempfile.mkdtemp(prefix=STAGING if into_existing else prefix,
                                            dir=final if into_existing else parent))
        except OSError as error:
            _remove_created(created)
            raise OutputError(f"{label} '{path}' cannot be written: {_reason(error)}. Choose a "
                              "writable location (nothing was written).") from error
        lock = _Lock(staging / LOCK_NAME)
        lock.try_acquire()
        content = staging / ("content" if kind == "folder" else final.name)
        if kind == "folder":
            content.mkdir()
        target = _Target(final, label, kind, staging, content, into_existing, lock, created)
        self.targets.append(target)
        return target

    # ------------------------------------------------------------------ checks before the work
    def require_free_space(self, nbytes: int, what: str = "the output") -> None:
        """Refuse to start when an output's file system has less than ``nbytes`` free.

        Raises:
            OutputError: naming the free and needed space.
        """
        for target in self.targets:
            free = shutil.disk_usage(target.staging).free
            if free < nbytes:
                raise OutputError(
                    f"{target.label} '{target.final}' is on a disk with {free / 1e6:.1f} MB free, but "
                    f"{what} needs about {nbytes / 1e6:.1f} MB. Free space or choose another location "
                    "(nothing was written).")

    # ------------------------------------------------------------------ writing helpers
    @staticmethod
    def write_json(path: Path, data: Any) -> Path:
        """Write a JSON file (numpy values, inf and NaN made JSON-safe)."""
        from ..evaluation.metrics import to_jsonable

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_jsonable(data), indent=2))
        return path

    def staged_files(self) -> list[Path]:
        """Every file written into the staged outputs so far."""
        files: list[Path] = []
        for target in self.targets:
            if target.kind == "file":
                files += [target.content] if target.content.is_file() else []
            else:
                files += sorted(p for p in target.content.rglob("*") if p.is_file())
        return files

    # ------------------------------------------------------------------ commit / abort
    def commit(self) -> None:
        """Verify and flush every staged file, then move every output into place.

        Raises:
            OutputError: a file failed verification, an output file was never written, or a
                rename failed (the renames done are undone first); nothing was committed.
        """
        for target in self.targets:
            if target.kind == "file" and not target.content.is_file():
                raise OutputError(f"{target.label} '{target.final}' was not written; nothing was committed.")
        try:
            for path in self.staged_files():
                verify_file(path)
                sync_file(path)
        except OSError as error:
            raise OutputError(f"Writing the output failed: {_reason(error)}. Nothing was written.") from error
        undo: list[Callable[[], None]] = []
        with _signals_deferred():
            try:
                for target in self.targets:
                    _move_into_place(target, self.overwrite, undo)
            except BaseException as error:
                for step in reversed(undo):
                    with contextlib.suppress(OSError):
                        step()
                if isinstance(error, OSError):
                    raise OutputError(f"Moving the output into place failed: {_reason(error)}. "
                                      "Nothing was written.") from error
                raise
            self.committed = True
            for target in self.targets:
                _sync_folder(target.final if target.kind == "folder" else target.final.parent)
        self._remove_staging(keep_created=True)

    def abort(self) -> None:
        """Drop everything staged (and, unless committed, the folders created for it)."""
        self._remove_staging(keep_created=self.committed)

    def _remove_staging(self, keep_created: bool) -> None:
        for target in reversed(self.targets):
            target.lock.close()
            shutil.rmtree(target.staging, ignore_errors=True)
            if not keep_created:
                _remove_created(target.created)
        self.targets = []

    def __enter__(self) -> "OutputTransaction":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.abort()
        else:
            self.abort()


def _move_into_place(target: _Target, overwrite: bool, undo: list[Callable[[], None]]) -> None:
    """Rename a staged output into place, recording how to undo each rename."""
    def move(source: Path, destination: Path) -> None:
        os.replace(source, destination)
        undo.append(lambda: os.replace(destination, source))

    if target.kind == "file":
        if target.final.exists():
            move(target.final, target.staging / "replaced")
        move(target.content, target.final)
    elif not target.into_existing:
        move(target.content, target.final)
    else:
        if overwrite:
            aside = target.staging / "replaced"
            aside.mkdir()
            for name in user_entries(target.final):
                move(target.final / name, aside / name)
        for name in sorted(os.listdir(target.content)):
            move(target.content / name, target.final / name)


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders this call created, outermost first.

    A folder another process creates meanwhile is used, not reported as created.
    """
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if path.is_dir():
                continue  # another process (a torchrun rank) made it first: not ours to remove
            _remove_created(created)
            raise
        except OSError:
            _remove_created(created)
            raise
        created.append(path)
    return created


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir()


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames) to the disk where the platform allows it."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(error: OSError) -> str:
    """An OS error in words, with the path it concerns."""
    text = error.strerror or str(error)
    where = f" ('{error.filename}')" if error.filename else ""
    return f"{text}{where}"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for name in ("SIGINT", "SIGTERM"):
        number = getattr(signal, name, None)
        if number is None:
            continue
        with contextlib.suppress(OSError, ValueError):
            previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if received:
            signal.raise_signal(received[0])
