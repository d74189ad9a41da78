"""A real MRML scene outside Slicer, built from the ``slicer-core`` wheel (pytest fixture).

The wheel has MRML and the module logics but no ``slicer.app`` and no ``slicer.modules``. The
fixture wires up the pieces that ``slicer.util`` and the MRML bridge need (see DESIGN.md,
"Testing the MRML bridge on slicer-core"):

- a ``vtkMRMLScene`` with a ``vtkSlicerApplicationLogic``;
- a ``vtkSlicerColorLogic`` given the application logic first, then the scene, registered as
  ``"Colors"`` (it adds the procedural colour tables: Grey, Iron, Rainbow, ...);
- ``vtkSlicerVolumesLogic`` and ``vtkSlicerSegmentationsModuleLogic`` registered as
  ``"Volumes"`` and ``"Segmentations"``;
- ``vtkSlicerSequencesLogic`` on the scene (creates the proxy nodes of sequence browsers);
- ``slicer.mrmlScene`` and a small ``slicer.modules`` namespace whose ``volumes.logic()`` and
  ``segmentations.logic()`` return those logics.

The previous ``slicer.mrmlScene`` / ``slicer.modules`` are restored afterwards. Use it with
``from mrml_scene import mrml_scene  # noqa: F401`` in a test module of this folder.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Iterator

import pytest

_MISSING = object()


@contextlib.contextmanager
def scene_with_logics(home: Path) -> Iterator[object]:
    """A fresh ``vtkMRMLScene`` with the module logics, set as ``slicer.mrmlScene`` while the
    context lasts (also usable outside pytest, e.g. in a child process of a test).

    Args:
        home: an empty folder for the application logic's home directory.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    # The colour logic looks for colour files under <home>/<share>/ColorFiles; an empty folder
    # there keeps it quiet (the procedural tables need no files).
    (home / "share" / "ColorFiles").mkdir(parents=True)
    app_logic.SetHomeDirectory(str(home))
    app_logic.SetShareDirectory("share")

    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)
    color_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", color_logic)

    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLApplicationLogic(app_logic)
    volumes_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Volumes", volumes_logic)

    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    segmentations_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Segmentations", segmentations_logic)

    sequences_logic = slicer.vtkSlicerSequencesLogic()
    sequences_logic.SetMRMLApplicationLogic(app_logic)
    sequences_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Sequences", sequences_logic)

    modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: volumes_logic),
        segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic),
        sequences=types.SimpleNamespace(logic=lambda: sequences_logic),
    )
    saved = {name: getattr(slicer, name, _MISSING) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = modules
    try:
        yield scene
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        scene.Clear(True)


@pytest.fixture
def mrml_scene(tmp_path: Path) -> Iterator[object]:
    """A fresh ``vtkMRMLScene`` with the module logics, set as ``slicer.mrmlScene``.

    Skips the test when the ``slicer-core`` wheel is not installed (``pip install
    slicer-core`` or ``pip install .[test]``).
    """
    pytest.importorskip("slicer_core", reason="the slicer-core wheel is not installed "
                        "(pip install slicer-core)")
    with scene_with_logics(tmp_path) as scene:
        yield scene
