"""The module file ``SFUDASegment/SFUDASegment.py`` loaded outside Slicer, and a stand-in of
``sfuda adapt`` for its logic (shared by the tests and by a child process of one of them).

The module file needs Slicer's ``ScriptedLoadableModule`` and ``parameterNodeWrapper``, which
the ``slicer-core`` wheel lacks; :func:`stand_in_modules` gives small stand-ins (the logic uses
nothing of them but the base class). The stand-in ``sfuda adapt`` writes a genuine result folder
with ``write_result`` from a simple, known computation: labels = voxels above the image mean,
entropy = normalised intensity, HEAL candidates = the image times (i + 1).
"""

from __future__ import annotations

import importlib.util
import textwrap
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "SFUDASegment" / "SFUDASegment.py"

#: Module name of the stand-in (``logic.jobModule``).
STAND_IN = "fake_adapt"

STAND_IN_SOURCE = textwrap.dedent('''
    """Stand-in for `sfuda adapt`: labels = voxels above the image mean, entropy = normalised
    intensity, HEAL candidates = the image times (i + 1)."""
    import argparse
    import json
    import os
    import sys
    import time

    import numpy as np

    from SFUDASegmentLib.config import LabelClass
    from SFUDASegmentLib.data.io import read_image
    from SFUDASegmentLib.results.files import write_result
    from SFUDASegmentLib.results.result import Result, structure_statistics

    parser = argparse.ArgumentParser()
    parser.add_argument("--progress")
    parser.add_argument("command")
    parser.add_argument("--method")
    parser.add_argument("--checkpoint")
    parser.add_argument("--image")
    parser.add_argument("--out")
    args, _ = parser.parse_known_args()

    def event(**data):
        sys.stderr.write(json.dumps(data) + "\\n")
        sys.stderr.flush()

    event(type="progress", stage="arguments", fraction=0.0, message=json.dumps(sys.argv[1:]))
    if os.environ.get("FAKE_ADAPT_MODE") == "fail":
        event(type="error", error="CheckpointError", message="The demo checkpoint is damaged.")
        sys.exit(2)
    if os.environ.get("FAKE_ADAPT_MODE") == "hang":
        while True:
            event(type="progress", stage="waiting", fraction=0.5, message="")
            time.sleep(0.05)

    volume = read_image(args.image)
    image = volume.array.astype(np.float32)
    labels = (image > image.mean()).astype(np.uint8)
    entropy = (image - image.min()) / (image.max() - image.min())
    classes = [LabelClass(1, "bright", (1.0, 0.2, 0.1))]
    maps = {"entropy": entropy}
    candidates = None
    if args.method == "heal":
        candidates = np.stack([image * (i + 1) for i in range(2)])
    result = Result(method=args.method, labels=labels, classes=classes, geometry=volume.geometry,
                    maps=maps, candidates=candidates,
                    candidate_scores=[0.25, 0.75] if candidates is not None else [],
                    selected_index=1 if candidates is not None else None,
                    structure_stats=structure_statistics(labels, classes, volume.geometry, maps))
    write_result(result, args.out, input_path=args.image, checkpoint_path=args.checkpoint)
    event(type="progress", stage="done", fraction=1.0, message="written")
''')




class _Base:
    """Stand-in of the ScriptedLoadableModule base classes (not in the slicer-core wheel)."""

    def __init__(self, *args, **kwargs) -> None:
        pass


def stand_in_modules() -> dict[str, types.ModuleType]:
    """Module name -> stand-in, for ``sys.modules``: ``slicer.ScriptedLoadableModule``,
    ``slicer.parameterNodeWrapper`` and an empty ``qt``."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (_Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    return {"slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper,
            "qt": types.ModuleType("qt")}


def load_module_file() -> types.ModuleType:
    """Execute the module file (the stand-ins must be in ``sys.modules`` already)."""
    spec = importlib.util.spec_from_file_location("SFUDASegment_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_stand_in(folder: Path) -> dict[str, str]:
    """Write the stand-in into ``folder``; returns the ``jobEnvironment`` that finds it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{STAND_IN}.py").write_text(STAND_IN_SOURCE)
    return {"PYTHONPATH": str(folder)}
