"""What the panel does in Slicer's process, run where importing PyTorch fails.

Run by ``test_slicer_logic.py`` as a child process::

    python Testing/panel_without_torch.py WORKDIR CHECKPOINT

Before anything else it makes every ``import torch`` (and ``torch.*``) raise, then does what
the panel does when it opens and the user applies: reads the installed PyTorch's version from
package metadata, asks for the model card and the device list (child processes, polled as the
panel's timer polls them), formats them, builds the progress plan, and runs a method to the end
(a stand-in of ``sfuda adapt``) and loads its result into a real MRML scene (slicer-core). It
prints one JSON line with what it saw.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import time
from pathlib import Path
from typing import Callable


class _NoTorch(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` fail in this process (Slicer's process must never import it)."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"PyTorch may not be imported in Slicer's process (tried {name}).")
        return None


def _wait(done: Callable[[], bool], seconds: float = 300.0) -> None:
    """Poll ``done`` every 50 ms, as the panel's timer does, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("no answer from the child process")
        time.sleep(0.05)


def main(work: Path, checkpoint: str) -> dict:
    sys.meta_path.insert(0, _NoTorch())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mrml_scene import scene_with_logics
    from slicer_module_loader import STAND_IN, load_module_file, stand_in_modules, write_stand_in

    sys.modules.update(stand_in_modules())
    with scene_with_logics(work / "home"):
        module = load_module_file()
        support, dependencies = module.support, module.dependencies
        logic = module.SFUDASegmentLogic()

        # The panel opens: PyTorch's version from metadata, the model card and the devices.
        torch = dependencies.torch_status(dependencies.installed_versions())
        first = logic.modelCards.request(checkpoint)
        logic.devices.request()
        def settled() -> bool:
            logic.modelCards.poll()
            logic.devices.poll()
            return not logic.modelCards.pending and not logic.devices.pending

        _wait(settled)
        card = logic.modelCards.request(checkpoint).value
        plan = logic.stagePlan("heal", {"candidates": 2, "sampler": "ddim", "steps": 5}, card)

        # Apply: a run to the end, its result loaded into the scene.
        from SFUDASegmentLib.data.io import read_image
        from SFUDASegmentLib.slicer_bridge import mrml
        from SFUDASegmentLib.slicer_bridge.run_folder import run_folder_of

        scan = Path(module.sampleScanPath())
        volume = mrml.add_volume_node(read_image(scan), "target")
        logic.jobModule = STAND_IN
        logic.jobEnvironment = write_stand_in(work / "standin")
        nodes = logic.process(volume, checkpoint, method="heal", waitForCompletion=True)
        hierarchy = module.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume.GetScene())
        return {
            "torch_imported": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
            "torch_version": torch.version, "torch_ok": torch.ok,
            "card_was_cached": first is not None,
            "card_classes": [c["name"] for c in card["classes"]],
            "card_text": support.format_model_card(card),
            "warnings": support.checkpoint_warnings(card, (24, 64, 64), "target"),
            "devices_text": support.devices_text(logic.devices.answer),
            "plan_stages": list(plan.stages),
            "nodes": sorted(nodes),
            "folder": hierarchy.GetItemName(run_folder_of(nodes["segmentation"])),
        }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
