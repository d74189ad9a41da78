"""All-or-nothing output folders: files are staged in a temporary folder beside the target and
moved into place only when every file was written, so a failure never leaves half a result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

from ..evaluation.metrics import to_jsonable


class StagedOutputDir:
    """Context manager: ``with StagedOutputDir(out) as stage: write to stage.path(name)``.

    On normal exit every staged file is moved into ``out`` (created if needed, existing files of
    the same name replaced); on an exception nothing in ``out`` changes.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._tmp: Optional[Path] = None

    def __enter__(self) -> "StagedOutputDir":
        parent = self.out_dir.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=parent))
        return self

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` while staging."""
        assert self._tmp is not None, "use inside a with-block"
        return self._tmp / name

    def write_json(self, name: str, data: Any) -> Path:
        """Stage a JSON file (numpy values, inf and NaN made JSON-safe)."""
        path = self.path(name)
        path.write_text(json.dumps(to_jsonable(data), indent=2))
        return path

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        assert self._tmp is not None
        try:
            if exc_type is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                for item in sorted(self._tmp.iterdir()):
                    os.replace(item, self.out_dir / item.name)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
