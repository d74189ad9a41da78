"""SFUDA Segment: source-free domain adaptation of a segmentation model to the scan in front of you.

The module is thin: the panel (``Resources/UI/SFUDASegment.ui``) is bound to a
``parameterNodeWrapper`` parameter node; the logic writes the input volume to a temporary file,
runs ``sfuda adapt`` from ``SFUDASegmentLib`` in a child process (``jobs.BackgroundJob``), and
adds the result to the scene with ``SFUDASegmentLib.slicer_bridge.mrml``. Decisions that need no Qt live in
``SFUDASegmentLib.slicer_bridge.panel_support`` and are tested without Slicer.

Console use::

    logic = slicer.util.getModuleLogic("SFUDASegment")
    nodes = logic.process(volumeNode, "/path/model.sfuda", method="heal",
                          parameters={"candidates": 6, "sampler": "ddim", "steps": 50},
                          waitForCompletion=True)
    nodes["segmentation"], nodes["map_entropy"], nodes["statistics"]
"""

import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Annotated, Any, Callable, Optional

import qt
import vtk

import slicer
from slicer import (vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLSequenceBrowserNode,
                    vtkMRMLTableNode)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

#
# Where the library and the resources are
#

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _besideOrAbove(name: str) -> str:
    """The folder that holds ``name``: the module's own folder (installed tree, where
    ``SFUDASegment.py``, ``SFUDASegmentLib/`` and ``Resources/`` sit side by side) or its parent
    (a source checkout added as an additional module path: ``repo/SFUDASegment/`` beside
    ``repo/SFUDASegmentLib/`` and ``repo/Resources/``)."""
    for folder in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        if os.path.isdir(os.path.join(folder, name)):
            return folder
    return _MODULE_DIR


LIBRARY_ROOT = _besideOrAbove("SFUDASegmentLib")
if LIBRARY_ROOT not in sys.path:
    sys.path.insert(0, LIBRARY_ROOT)
RESOURCES_DIR = os.path.join(_besideOrAbove("Resources"), "Resources")

# Only torch-free parts of the library are imported here: PyTorch may not be installed yet
# (ensureDependencies installs it). The rest is imported inside the functions that need it.
from SFUDASegmentLib.slicer_bridge import panel_support as support  # noqa: E402
from SFUDASegmentLib.slicer_bridge.jobs import DEFAULT_MODULE, BackgroundJob, run_job  # noqa: E402

PROJECT_URL = "https://github.com/sfudasegment/SlicerSFUDASegment"
SAMPLE_NAME = "SFUDAPhantomTarget"
SAMPLE_SCAN_FILE = "phantom_target.nrrd"
DEMO_CHECKPOINT_FILE = "phantom_demo.sfuda"
JOB_POLL_MSEC = 200


def sampleScanPath() -> str:
    """The bundled target scan (a synthetic phantom in the target modality)."""
    return os.path.join(RESOURCES_DIR, "SampleData", SAMPLE_SCAN_FILE)


def demoCheckpointPath() -> str:
    """The bundled demo checkpoint (trained on phantoms of the source modality)."""
    return os.path.join(RESOURCES_DIR, "SampleData", DEMO_CHECKPOINT_FILE)


#
# SFUDASegment
#


class SFUDASegment(ScriptedLoadableModule):
    """Module metadata; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SFUDA Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SFUDASegment developers"]
        self.parent.helpText = f"""
Adapts a segmentation model trained at another site or on another modality (the source) to the
selected scan (the target) without the source data, and shows how far to trust the result:
voxel entropy and NIG variance maps, the HEAL candidates with their edge scores, and the
volume and mean uncertainty of each structure.<br>
Methods: no adaptation, HEAL (learning-free), GMM-adapted inference (SFS).<br>
Try it: Sample Data &gt; SFUDA Segment &gt; {SAMPLE_NAME} loads a phantom and selects the demo
checkpoint. See the <a href="{PROJECT_URL}#readme">README</a> for the walk-through, console
scripting and the <code>sfuda</code> command line.
"""
        self.parent.acknowledgementText = """
Implements published methods; please cite them:
<ul>
<li>HEAL: learning-free source-free unsupervised domain adaptation for cross-modality medical
image segmentation (hierarchical denoising, conditional diffusion, edge-guided selection,
size-aware fusion).</li>
<li>SFS: S. Stan and M. Rostami, unsupervised model adaptation for source-free segmentation via
a prototypical (Gaussian mixture) distribution of the source embedding.</li>
<li>Diffuse-UDA: H. Gong et al., addressing unsupervised domain adaptation in medical image
segmentation with appearance and structure aligned diffusion models.</li>
</ul>
Built on 3D Slicer, PyTorch (via the PyTorch extension), SimpleITK and scikit-image.
"""
        iconPath = os.path.join(RESOURCES_DIR, "Icons", "SFUDASegment.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)
        slicer.app.connect("startupCompleted()", registerSampleData)

    def resourcePath(self, filename: str) -> str:
        """A file in the Resources folder (beside the module, or above it in a checkout)."""
        return os.path.join(RESOURCES_DIR, filename)


#
# Sample data
#


def registerSampleData() -> None:
    """Register the bundled phantom with the Sample Data module (local file, no download).

    Clicking it in Sample Data loads the scan and selects the bundled demo checkpoint in the
    SFUDA Segment panel.
    """
    import SampleData

    scan = sampleScanPath()
    if not os.path.isfile(scan):
        logging.warning(f"SFUDASegment: sample scan {scan} not found; sample data not registered.")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SFUDA Segment",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(RESOURCES_DIR, "Icons", "SFUDASegment.png"),
        uris=pathlib.Path(scan).as_uri(),
        fileNames=SAMPLE_SCAN_FILE,
        nodeNames=SAMPLE_NAME,
        customDownloader=_loadSampleWithDemoCheckpoint,
    )


def _loadSampleWithDemoCheckpoint(source: Any) -> list:
    """Sample Data button: load the scan and select it and the demo checkpoint in the panel."""
    import SampleData

    nodes = SampleData.SampleDataLogic().downloadFromSource(source)
    parameterNode = SFUDASegmentLogic().getParameterNode()
    if os.path.isfile(demoCheckpointPath()):
        parameterNode.checkpointPath = pathlib.Path(demoCheckpointPath())
    volumes = [n for n in nodes if hasattr(n, "IsA") and n.IsA("vtkMRMLScalarVolumeNode")]
    if volumes:
        parameterNode.inputVolume = volumes[0]
    return nodes


#
# SFUDASegmentParameterNode
#


@parameterNodeWrapper
class SFUDASegmentParameterNode:
    """Every choice of the panel (saved with the scene) and the nodes of the last result.

    inputVolume - the scan to segment (never modified).
    checkpointPath - the *.sfuda source checkpoint.
    method - none | heal | gmm; device - auto | cuda | cpu.
    tau1, tau2, candidates, sampler, steps, healStages, seed - HEAL (paper defaults).
    gmmIterations, gmmLambda - GMM-adapted inference (SFS code defaults).
    overlayMap, overlayOpacity - the coloured foreground shown over the input.
    resultInput ... statistics - the nodes of the last result (filled by the panel).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    checkpointPath: pathlib.Path
    method: Annotated[str, Choice(["none", "heal", "gmm"])] = "heal"
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    tau1: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    tau2: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    candidates: Annotated[int, WithinRange(1, 32)] = 6
    sampler: Annotated[str, Choice(["ddim", "ddpm"])] = "ddim"
    steps: Annotated[int, WithinRange(1, 1000)] = 50
    healStages: Annotated[str, Choice(["heal", "hd+egs", "hd"])] = "heal"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    gmmIterations: Annotated[int, WithinRange(1, 100000)] = 100
    gmmLambda: Annotated[float, WithinRange(0.0, 10.0)] = 0.5
    overlayMap: Annotated[str, Choice(["entropy", "nig_variance", "candidate"])] = "entropy"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    resultInput: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    entropyMap: vtkMRMLScalarVolumeNode
    nigVarianceMap: vtkMRMLScalarVolumeNode
    candidateImage: vtkMRMLScalarVolumeNode
    candidateBrowser: vtkMRMLSequenceBrowserNode
    candidateScores: vtkMRMLTableNode
    statistics: vtkMRMLTableNode


def _checkpointFile(path: Any) -> Optional[str]:
    """``path`` as a string when it names an existing file, else None (an empty path line edit
    gives ``Path('.')``)."""
    text = str(path) if path is not None else ""
    return text if text not in ("", ".") and os.path.isfile(text) else None


def _dicomModality(volumeNode: Any) -> Optional[str]:
    """The DICOM modality code of the volume's series (subject hierarchy), when it has one."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if shNode is None or volumeNode is None:
        return None
    item = shNode.GetItemByDataNode(volumeNode)
    name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    value = shNode.GetItemAttribute(item, name) if item else ""
    return value or None


def _volumeShape(volumeNode: Any) -> tuple:
    """``(z, y, x)`` voxel counts of a volume node, () without image data."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None:
        return ()
    nx, ny, nz = imageData.GetDimensions()
    return (nz, ny, nx)


#
# SFUDASegmentWidget
#


class SFUDASegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, parameters, run (Apply / Cancel with progress), review of the result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobInput = None
        self._jobMethod = None
        self._card = None
        self._cardError = None
        self._cardKey = None
        self._reviewKey = None
        self._overlayKey = None
        self._timer = None

    def resourcePath(self, filename: str) -> str:
        """A file in the Resources folder (beside the module, or above it in a checkout)."""
        return os.path.join(RESOURCES_DIR, filename)

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SFUDASegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SFUDASegmentLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(JOB_POLL_MSEC)
        self._timer.connect("timeout()", self._onJobTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.ui.progressBar.setValue(0)
        self.ui.stageLabel.text = ""
        self.ui.statusLabel.text = "Select a volume and a checkpoint, then click Apply."
        self.ui.compatibilityWarningLabel.visible = False
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes: stop a running job, drop observers."""
        self._cancelJob("Slicer is closing")
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self._updateGpuMemory()

    def exit(self) -> None:
        """Called each time the user opens another module (a running job goes on)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """A closing scene ends a running job (its input is about to disappear)."""
        self._cancelJob("the scene was closed")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Recreate the parameter node when the module is shown while the scene closes."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect a volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SFUDASegmentParameterNode]) -> None:
        """Bind the GUI (widgets with a SlicerParameterName property) to the parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._reviewKey = None
        self._overlayKey = None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            if str(self._parameterNode.checkpointPath) == ".":
                self.ui.checkpointPathLineEdit.currentPath = ""  # an unset Path reads as "."
            self._labelChoices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _labelChoices(self) -> None:
        """Readable texts for the combo boxes that connectGui filled with the raw choices."""
        _relabel(self.ui.methodComboBox, support.METHODS, support.METHOD_LABELS)
        _relabel(self.ui.deviceComboBox, support.DEVICES, support.DEVICE_LABELS)
        _relabel(self.ui.samplerComboBox, support.SAMPLERS, support.SAMPLER_LABELS)
        _relabel(self.ui.stagesComboBox, support.HEAL_STAGES, support.STAGE_LABELS)
        _relabel(self.ui.overlayComboBox, tuple(support.OVERLAY_NODE_KEYS), support.OVERLAY_LABELS)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateModelCard()
        self._updateWarnings()
        self._updateApplyButton()
        self._updateReview()

    # ------------------------------------------------------------------ inputs
    def _updateModelCard(self) -> None:
        """Read the model card when the checkpoint file changed (cached by path and time)."""
        path = _checkpointFile(self._parameterNode.checkpointPath)
        key = (path, os.path.getmtime(path) if path else None, support.torch_installed())
        if key == self._cardKey:
            return
        self._cardKey = key
        self._card, self._cardError = None, None
        if path is None:
            self.ui.modelCardLabel.text = "Choose a checkpoint (*.sfuda) to see its model card."
            return
        if not support.torch_installed():
            self.ui.modelCardLabel.text = ("PyTorch is not installed yet; it is installed when you "
                                           "click Apply, and the model card shows then.")
            return
        try:
            self._card = self.logic.modelCard(path)
        except Exception as error:  # the library's message says what is wrong with the file
            self._cardError = str(error)
            self.ui.modelCardLabel.text = f'<span style="color:#c0392b">{_escape(str(error))}</span>'
            return
        self.ui.modelCardLabel.text = support.format_model_card(self._card)

    def _updateWarnings(self) -> None:
        """The compatibility warnings of the card and the input volume, and of the method."""
        warnings = []
        volume = self._parameterNode.inputVolume
        if self._card is not None and volume is not None and _volumeShape(volume):
            warnings += support.checkpoint_warnings(self._card, _volumeShape(volume),
                                                    volume.GetName(), _dicomModality(volume))
        reason = support.method_unavailable_reason(self._card, self._parameterNode.method)
        if reason:
            warnings.append(reason)
        self.ui.compatibilityWarningLabel.text = "<br>".join(
            f'<span style="color:#d35400">&#9888; {_escape(w)}</span>' for w in warnings)
        self.ui.compatibilityWarningLabel.visible = bool(warnings)

    def _updateGpuMemory(self) -> None:
        """Free GPU memory beside the device selector (needs PyTorch)."""
        if not support.torch_installed():
            self.ui.gpuMemoryLabel.text = "PyTorch is not installed yet (installed on Apply)."
            return
        try:
            from SFUDASegmentLib.utils.device import gpu_memory_info

            self.ui.gpuMemoryLabel.text = support.gpu_memory_text(gpu_memory_info())
        except Exception as error:
            self.ui.gpuMemoryLabel.text = f"Could not query the GPU: {error}"

    def _applyBlocker(self) -> Optional[str]:
        """Why Apply cannot run now, or None."""
        p = self._parameterNode
        if p is None or p.inputVolume is None:
            return "Select an input volume."
        if _checkpointFile(p.checkpointPath) is None:
            return "Choose a checkpoint file (*.sfuda)."
        if self._cardError:
            return self._cardError
        return support.method_unavailable_reason(self._card, p.method)

    def _updateApplyButton(self) -> None:
        if self._job is not None:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running job; nothing is added to the scene."
            self.ui.applyButton.enabled = True
            return
        blocker = self._applyBlocker()
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.enabled = blocker is None
        method = self._parameterNode.method if self._parameterNode else "heal"
        self.ui.applyButton.toolTip = blocker or (
            f"Run {support.METHOD_LABELS[method]}; the result is added as new nodes.")

    # ------------------------------------------------------------------ run
    def _parameters(self) -> dict:
        """The method parameters of the parameter node, keyed as ``build_adapt_arguments``
        expects."""
        p = self._parameterNode
        return {"tau1": p.tau1, "tau2": p.tau2, "candidates": p.candidates, "sampler": p.sampler,
                "steps": p.steps, "stages": p.healStages, "seed": p.seed,
                "iterations": p.gmmIterations, "lambda": p.gmmLambda}

    def onApplyButton(self) -> None:
        """Apply starts a job; while it runs the same button cancels it."""
        if self._job is not None:
            self._cancelJob("cancelled by the user")
            return
        with slicer.util.tryWithErrorDisplay("SFUDA Segment could not start.", waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = "Dependencies were not installed; nothing was run."
                return
            self._cardKey = None
            self._onParameterNodeModified()
            blocker = self._applyBlocker()
            if blocker:
                self.ui.statusLabel.text = blocker
                return
            self._updateGpuMemory()
            p = self._parameterNode
            self._job = self.logic.process(p.inputVolume, str(p.checkpointPath), method=p.method,
                                           parameters=self._parameters(), waitForCompletion=False,
                                           device=p.device)
            self._jobInput = p.inputVolume
            self._jobMethod = p.method
            self.ui.progressBar.setValue(0)
            self.ui.stageLabel.text = "Starting"
            self.ui.statusLabel.text = (f"Running {support.METHOD_LABELS[p.method]} on "
                                        f"'{p.inputVolume.GetName()}'...")
            self._timer.start()
        self._updateApplyButton()

    def _showEvent(self, event: dict) -> None:
        """Show one job event in the progress bar, stage and status labels."""
        if event.get("type") == "progress":
            self.ui.progressBar.setValue(int(round(100 * float(event.get("fraction", 0.0)))))
            self.ui.stageLabel.text = support.stage_label(str(event.get("stage", "")))
            self.ui.statusLabel.text = str(event.get("message", ""))
        elif event.get("type") == "error":
            self.ui.statusLabel.text = str(event.get("message", ""))

    def _onJobTimer(self) -> None:
        """Every JOB_POLL_MSEC: show new events; when the job ended, load or report."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            self._showEvent(event)
        if job.running:
            return
        self._timer.stop()
        job.wait()
        for event in job.poll():
            self._showEvent(event)
        self._job = None
        try:
            if job.returncode == 0:
                with slicer.util.tryWithErrorDisplay("The results could not be loaded.",
                                                     waitCursor=True):
                    nodes = self.logic.finishJob(job, self._jobInput)
                    self._storeResult(nodes, self._jobInput)
                    self.ui.progressBar.setValue(100)
                    self.ui.statusLabel.text = (f"Done: {support.METHOD_LABELS[self._jobMethod]}"
                                                f" added {len(nodes)} new nodes.")
            else:
                message = job.error_message() or "The job failed."
                self.ui.statusLabel.text = "Failed; nothing was added to the scene."
                slicer.util.errorDisplay(f"SFUDA Segment failed:\n\n{message}")
        finally:
            self.logic.discardJob(job)
            self._updateApplyButton()
            self._updateGpuMemory()

    def _cancelJob(self, reason: str) -> None:
        """Kill the running job's whole process tree; the scene stays as it was."""
        job = self._job
        if job is None:
            return
        if self._timer is not None:
            self._timer.stop()
        self._job = None
        self.logic.discardJob(job)
        self.ui.progressBar.setValue(0)
        self.ui.stageLabel.text = ""
        self.ui.statusLabel.text = f"Stopped ({reason}); nothing was added to the scene."
        self._updateApplyButton()

    # ------------------------------------------------------------------ review
    def _storeResult(self, nodes: dict, inputVolume: Any) -> None:
        """Remember the result's nodes in the parameter node (saved with the scene)."""
        p = self._parameterNode
        if p is None:
            return
        with slicer.util.NodeModify(p.parameterNode):
            p.resultInput = inputVolume
            p.segmentation = nodes.get("segmentation")
            p.entropyMap = nodes.get("map_entropy")
            p.nigVarianceMap = nodes.get("map_nig_variance")
            p.candidateImage = nodes.get("candidate_proxy")
            p.candidateBrowser = nodes.get("candidate_browser")
            p.candidateScores = nodes.get("candidate_scores")
            p.statistics = nodes.get("statistics")
            if self._overlayNode() is None:
                p.overlayMap = "entropy"
        self._overlayKey = None
        self._updateReview()

    def _overlayNode(self) -> Any:
        """The node chosen as coloured foreground (None when the result has no such layer)."""
        p = self._parameterNode
        return {"entropy": p.entropyMap, "nig_variance": p.nigVarianceMap,
                "candidate": p.candidateImage}.get(p.overlayMap)

    def _updateReview(self) -> None:
        """Tables, candidate browser, overlay and legend of the last result."""
        p = self._parameterNode
        if p is None:
            return
        reviewKey = tuple(n.GetID() if n is not None else None
                          for n in (p.candidateScores, p.statistics, p.candidateBrowser))
        if reviewKey != self._reviewKey:
            self._reviewKey = reviewKey
            self.ui.candidateTableView.setMRMLTableNode(p.candidateScores)
            self.ui.statisticsTableView.setMRMLTableNode(p.statistics)
            self.ui.candidateSeekWidget.setMRMLSequenceBrowserNode(p.candidateBrowser)
        overlay = self._overlayNode()
        overlayKey = (p.resultInput.GetID() if p.resultInput else None,
                      overlay.GetID() if overlay else None, round(p.overlayOpacity, 3),
                      p.segmentation.GetID() if p.segmentation else None)
        if overlayKey == self._overlayKey or p.resultInput is None:
            return
        self._overlayKey = overlayKey
        from SFUDASegmentLib.slicer_bridge import mrml

        mrml.show_in_views(p.resultInput, overlay, p.segmentation, p.overlayOpacity)
        self.ui.colorLegendLabel.text = _legendText(p.overlayMap, overlay)


def _relabel(comboBox: Any, values: tuple, labels: dict) -> None:
    """Set readable item texts on a combo box whose items are ``values`` in this order."""
    for index, value in enumerate(values):
        if index < comboBox.count:
            comboBox.setItemText(index, labels.get(value, value))


def _legendText(choice: str, overlayNode: Any) -> str:
    """The colour legend of the overlay node (colour table and display range)."""
    if overlayNode is None:
        return "This result has no such layer (HEAL writes NIG variance and candidates)."
    display = overlayNode.GetDisplayNode()
    colorNode = display.GetColorNode() if display is not None else None
    low = display.GetWindowLevelMin() if display is not None else 0.0
    high = display.GetWindowLevelMax() if display is not None else 1.0
    return support.overlay_legend_text(choice, low, high,
                                       colorNode.GetName() if colorNode is not None else "grey")


def _escape(text: str) -> str:
    import html

    return html.escape(text)


#
# SFUDASegmentLogic
#


class SFUDASegmentLogic(ScriptedLoadableModuleLogic):
    """Runs the methods of SFUDASegmentLib on volume nodes; usable without the panel.

    ``process(...)`` is the scripting entry point (see the module docstring).

    Attributes:
        jobModule: the module the child process runs (``python -m jobModule --progress json
            adapt ...``); the ``sfuda`` CLI unless a test substitutes a stand-in.
        jobEnvironment: extra environment variables of the child process.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobModule = DEFAULT_MODULE
        self.jobEnvironment = {}
        self._jobFolders = {}

    def getParameterNode(self) -> SFUDASegmentParameterNode:
        return SFUDASegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the library needs, asking the user once; True when all is there.

        PyTorch comes from the PyTorch extension's PyTorchUtils (it picks the CUDA or CPU build
        for this machine). scikit-image, opencv-python-headless, scipy and tqdm come through
        ``slicer.util.pip_install`` after one confirmation. Slicer's SimpleITK is never touched.

        Raises:
            RuntimeError: PyTorch is missing and the PyTorch extension is not installed.
        """
        ask = askConfirmation and not slicer.app.commandOptions().testingEnabled
        if not support.torch_installed():
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(
                    "SFUDA Segment needs PyTorch. Install the 'PyTorch' extension from the "
                    "Extensions Manager (View > Extensions Manager), restart Slicer, and click "
                    "Apply again.") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=ask, torchVersionRequirement=support.TORCH_REQUIREMENT)
            if torch is None:
                return False
        missing = support.missing_requirements()
        if missing:
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "SFUDA Segment needs these Python packages, which will now be downloaded and "
                    "installed into Slicer's Python (Slicer's own SimpleITK is kept):\n\n"
                    + "\n".join(missing), "SFUDA Segment: install dependencies"):
                return False
            slicer.util.pip_install(list(missing))
            import importlib

            importlib.invalidate_caches()
        return True

    def modelCard(self, checkpointPath: str) -> dict:
        """The checkpoint's model card (``SourceCheckpoint.describe()``); needs PyTorch.

        Raises:
            CheckpointError: the file is missing, damaged or not a checkpoint.
        """
        from SFUDASegmentLib.checkpoint import SourceCheckpoint

        return SourceCheckpoint.load(checkpointPath).describe()

    # ------------------------------------------------------------------ processing
    def process(self, inputVolume: vtkMRMLScalarVolumeNode, checkpointPath: str,
                method: str = "heal", parameters: Optional[dict] = None,
                waitForCompletion: bool = True,
                onProgress: Optional[Callable[[dict], None]] = None, device: str = "auto"):
        """Segment ``inputVolume`` with the checkpoint, adapting it with ``method``.

        The volume is written to a temporary NRRD (the node is not modified) and ``sfuda adapt``
        runs on it in a child process; only after it succeeded are new nodes added.

        Args:
            inputVolume: scalar volume node.
            checkpointPath: the *.sfuda file.
            method: ``"none"``, ``"heal"`` or ``"gmm"``.
            parameters: e.g. ``{"tau1": 0.2, "tau2": 0.2, "candidates": 6, "sampler": "ddim",
                "steps": 50, "stages": "heal", "seed": 0}`` (HEAL) or ``{"iterations": 100,
                "lambda": 0.5, "seed": 0}`` (GMM); missing keys take the library's defaults.
            waitForCompletion: block until done (scripting); False returns the running job.
            onProgress: called with each progress event dict (stage, fraction, message).
            device: ``"auto"``, ``"cuda"`` or ``"cpu"``.

        Returns:
            With ``waitForCompletion=True`` the new nodes by key (``segmentation``,
            ``map_entropy``, ``map_nig_variance``, ``candidates``, ``candidate_browser``,
            ``candidate_scores``, ``statistics``, ...; see ``mrml.add_result_to_scene``);
            otherwise the started :class:`BackgroundJob`; pass it to :meth:`finishJob` once it
            ended (or to :meth:`discardJob` to drop it).

        Raises:
            ValueError: no input volume or no checkpoint file.
            RuntimeError: the job failed; the message is the library's (what and how to fix).
        """
        if inputVolume is None:
            raise ValueError("Select an input volume.")
        checkpointPath = os.fspath(checkpointPath)
        if not os.path.isfile(checkpointPath):
            raise ValueError(f"Checkpoint file not found: '{checkpointPath}'. Choose a *.sfuda "
                             "file (the demo one is in the module's Resources/SampleData).")
        from SFUDASegmentLib.data.io import write_image
        from SFUDASegmentLib.slicer_bridge import mrml

        workDir = tempfile.mkdtemp(prefix="SFUDASegment-", dir=_temporaryFolder())
        try:
            imagePath = os.path.join(workDir, "input.nrrd")
            outDir = os.path.join(workDir, "result")
            write_image(mrml.volume_from_node(inputVolume), imagePath)
            arguments = support.build_adapt_arguments(method, checkpointPath, imagePath, outDir,
                                                      parameters, device)
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        logging.info("SFUDASegment: sfuda " + " ".join(arguments))

        if waitForCompletion:
            try:
                outcome = run_job(arguments, on_event=onProgress, between_polls=_processEvents,
                                  module=self.jobModule, env=self.jobEnvironment)
                if not outcome.ok:
                    raise RuntimeError(f"SFUDA Segment ({method}) failed: {outcome.error_message}")
                return self._loadResult(outDir, inputVolume)
            finally:
                shutil.rmtree(workDir, ignore_errors=True)

        job = BackgroundJob(arguments, module=self.jobModule, env=self.jobEnvironment)
        try:
            job.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self._jobFolders[job] = (workDir, outDir)
        return job

    def finishJob(self, job: BackgroundJob, inputVolume: vtkMRMLScalarVolumeNode,
                  outDir: Optional[str] = None) -> dict:
        """Add the result of an ended job (from ``process(waitForCompletion=False)``) to the
        scene and remove its temporary folder.

        Raises:
            RuntimeError: the job still runs or failed (with the library's message).
        """
        if job.running:
            raise RuntimeError("The job is still running; call finishJob once job.running is False.")
        workDir, jobOutDir = self._jobFolders.get(job, (None, None))
        try:
            if job.wait() != 0:
                raise RuntimeError(f"SFUDA Segment failed: {job.error_message()}")
            return self._loadResult(outDir or jobOutDir, inputVolume)
        finally:
            self.discardJob(job)

    def discardJob(self, job: BackgroundJob) -> None:
        """Stop a job if it still runs (its whole process tree) and delete its temporary
        folder; the scene is not touched."""
        if job.running:
            job.cancel()
        workDir, _ = self._jobFolders.pop(job, (None, None))
        if workDir:
            shutil.rmtree(workDir, ignore_errors=True)

    def _loadResult(self, outDir: str, inputVolume: vtkMRMLScalarVolumeNode) -> dict:
        """Read a result folder and add it to the input's scene as new nodes."""
        from SFUDASegmentLib.results.files import read_result
        from SFUDASegmentLib.slicer_bridge import mrml

        return mrml.add_result_to_scene(read_result(outDir), inputVolume)


def _temporaryFolder() -> Optional[str]:
    """Slicer's temporary folder (None: the system's)."""
    app = getattr(slicer, "app", None)
    path = getattr(app, "temporaryPath", None) if app is not None else None
    return path if path and os.path.isdir(path) else None


def _processEvents() -> None:
    """Keep the GUI alive while a blocking call waits for its job."""
    app = getattr(slicer, "app", None)
    if app is not None:
        app.processEvents()


#
# SFUDASegmentTest
#


class SFUDASegmentTest(ScriptedLoadableModuleTest):
    """Self-test on the bundled phantom and demo checkpoint (a few minutes on a CPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NoAdaptationAndHeal()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    def _inputVolume(self):
        """The bundled target scan, or a generated phantom when the file is absent."""
        if os.path.isfile(sampleScanPath()):
            return slicer.util.loadVolume(sampleScanPath())
        from SFUDASegmentLib.data.synthetic import make_phantom
        from SFUDASegmentLib.slicer_bridge import mrml

        return mrml.add_volume_node(make_phantom((24, 64, 64), seed=3).target, SAMPLE_NAME)

    def _checkpoint(self) -> str:
        path = demoCheckpointPath()
        self.assertTrue(os.path.isfile(path), f"the demo checkpoint {path} is missing")
        return path

    def test_NoAdaptationAndHeal(self):
        """No adaptation and HEAL (tiny config): output nodes on the input's geometry, entropy
        within [0, log2 K], the input unchanged."""
        import numpy as np

        self.delayDisplay("Starting the test")
        logic = SFUDASegmentLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        checkpoint = self._checkpoint()
        volume = self._inputVolume()
        before = slicer.util.arrayFromVolume(volume).copy()
        classes = logic.modelCard(checkpoint)["classes"]
        maxEntropy = math.log2(1 + len(classes))
        expectedGeometry = _serializedGeometry(volume)

        runs = (("none", {}), ("heal", {"candidates": 2, "sampler": "ddim", "steps": 5,
                                        "seed": 0}))
        for method, parameters in runs:
            self.delayDisplay(f"Running {method}")
            nodes = logic.process(volume, checkpoint, method=method, parameters=parameters,
                                  waitForCompletion=True, device="auto")
            segmentation = nodes["segmentation"]
            self.assertTrue(segmentation.IsA("vtkMRMLSegmentationNode"))
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(classes))
            referenceGeometry = segmentation.GetSegmentation().GetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
            self.assertEqual(referenceGeometry, expectedGeometry)

            entropy = nodes["map_entropy"]
            self.assertEqual(_serializedGeometry(entropy), expectedGeometry)
            values = slicer.util.arrayFromVolume(entropy)
            self.assertEqual(values.shape, before.shape)
            self.assertGreaterEqual(float(values.min()), -1e-6)
            self.assertLessEqual(float(values.max()), maxEntropy + 1e-4)
            if method == "heal":
                self.assertIn("map_nig_variance", nodes)
                self.assertEqual(nodes["candidates"].GetNumberOfDataNodes(), 2)
                self.assertEqual(nodes["candidate_scores"].GetNumberOfRows(), 2)
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        """Cancelling a running HEAL job ends it and adds nothing to the scene."""
        import time

        import numpy as np

        logic = SFUDASegmentLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        checkpoint = self._checkpoint()
        volume = self._inputVolume()
        before = slicer.util.arrayFromVolume(volume).copy()
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.process(volume, checkpoint, method="heal",
                            parameters={"candidates": 4, "sampler": "ddpm", "seed": 0},
                            waitForCompletion=False)
        deadline = time.monotonic() + 300
        while job.running and not job.poll() and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.1)
        logic.discardJob(job)
        self.assertFalse(job.running)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
        self.delayDisplay("Test passed")


def _serializedGeometry(volumeNode: Any) -> str:
    """A volume's grid geometry as Slicer serializes a segmentation's reference geometry."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix, volumeNode.GetImageData())
