"""SFUDA Segment: source-free domain adaptation of a segmentation model to the scan in front of you.

The module is thin: the panel (``Resources/UI/SFUDASegment.ui``) is bound to a
``parameterNodeWrapper`` parameter node; the logic writes the input volume to a temporary file,
runs ``sfuda adapt`` from ``SFUDASegmentLib`` in a child process (``jobs.BackgroundJob``), and
adds the result to the scene with ``SFUDASegmentLib.slicer_bridge.mrml``. Decisions that need no
Qt live in ``SFUDASegmentLib.slicer_bridge`` (``panel_support``, ``dependencies``,
``overall_progress``, ``run_log``, ``terminology``) and are tested without Slicer.

Slicer's own process never imports PyTorch: the model card (``sfuda info --json``), the device
list (``sfuda devices --json``) and the methods run in child processes; only torch-free parts of
the library are imported here.

Console use::

    logic = slicer.util.getModuleLogic("SFUDASegment")
    nodes = logic.process(volumeNode, "/path/model.sfuda", method="heal",
                          parameters={"candidates": 6, "sampler": "ddim", "steps": 50},
                          waitForCompletion=True)
    nodes["segmentation"], nodes["map_entropy"], nodes["statistics"]
"""

import importlib
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
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

# Only torch-free parts of the library are imported here, at module level or anywhere in the
# widget and the logic: Slicer's process never imports PyTorch (a test checks every import).
from SFUDASegmentLib.slicer_bridge import dependencies  # noqa: E402
from SFUDASegmentLib.slicer_bridge import overlay_display  # noqa: E402
from SFUDASegmentLib.slicer_bridge import panel_support as support  # noqa: E402
from SFUDASegmentLib.slicer_bridge.child_queries import (DeviceInventory, ModelCards,  # noqa: E402
                                                         checkpoint_key)
from SFUDASegmentLib.slicer_bridge.jobs import DEFAULT_MODULE, BackgroundJob, run_job  # noqa: E402
from SFUDASegmentLib.slicer_bridge.overall_progress import (OverallProgress, StagePlan,  # noqa: E402
                                                            expected_stage_seconds)
from SFUDASegmentLib.slicer_bridge.run_log import RunLog  # noqa: E402

#: Name of the sample in Sample Data and of the volume it loads.
SAMPLE_NAME = "SFUDA phantom target"
SAMPLE_SCAN_FILE = "phantom_target.nrrd"
#: SHA256 of Resources/SampleData/phantom_target.nrrd (Sample Data checks the copy it loads).
SAMPLE_SCAN_SHA256 = "a9d6560d31aeea5d233eb98356461a40274382f7c93aeb05ed27f5eb01d6dafb"
DEMO_CHECKPOINT_FILE = "phantom_demo.sfuda"
JOB_POLL_MSEC = 200
#: The progress bar's maximum (Resources/UI/SFUDASegment.ui): a tenth of a percent per step.
PROGRESS_STEPS = 1000


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
Measured on real BraTS scans of patients the source model never saw (README, "Measured figures"):
HEAL's default (its boundary-preserving denoising alone) stayed within one Dice point of no
adaptation; <b>the paper-exact HEAL lost</b> (its denoising erased nearly all of the tumour, its
diffusion stages lost in every direction), and <b>GMM lost on 20 of 30 scans</b>. Compare an
adapted result with no adaptation before trusting it.<br>
Try it: Sample Data &gt; SFUDA Segment &gt; {SAMPLE_NAME} loads a phantom and selects the demo
checkpoint. Each run's nodes go into one folder in the Data module; delete the folder to remove
the run. The README of the SFUDASegment sources (section "For clinicians") walks through the
panel, console scripting and the <code>sfuda</code> command line.
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
        checksums=f"SHA256:{SAMPLE_SCAN_SHA256}",
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
    tau1, tau2, candidates, sampler, steps, healStages, seed - HEAL (paper defaults);
    healDenoise - its denoising mode (the library's default).
    gmmIterations, gmmLambda - GMM-adapted inference (SFS code defaults); gmmGuard - the
    agreement below which the source segmentation is kept (the library's default).
    overlayMap, overlayOpacity - the coloured foreground shown over the input ("recommended":
    the map the result names as the one that finds its errors best, named in the legend);
    overlayThreshold - the fraction of the map's range below which it is transparent.
    resultInput ... reviewQueue - the nodes of the last result (filled by the panel);
    recommendedMap is the recommended map's node, reviewQueue the table of regions to check.
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
    healStages: Annotated[str, Choice(["heal", "hd+egs", "hd"])] = "hd"
    healDenoise: Annotated[str, Choice(["components", "paper"])] = "components"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    gmmIterations: Annotated[int, WithinRange(1, 100000)] = 100
    gmmLambda: Annotated[float, WithinRange(0.0, 10.0)] = 0.5
    gmmGuard: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    overlayMap: Annotated[str, Choice(["recommended", "entropy", "nig_variance", "candidate"])] = "recommended"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    overlayThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.1
    resultInput: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    entropyMap: vtkMRMLScalarVolumeNode
    nigVarianceMap: vtkMRMLScalarVolumeNode
    candidateImage: vtkMRMLScalarVolumeNode
    candidateBrowser: vtkMRMLSequenceBrowserNode
    candidateScores: vtkMRMLTableNode
    statistics: vtkMRMLTableNode
    recommendedMap: vtkMRMLScalarVolumeNode
    recommendedMapName: str = ""
    reviewQueue: vtkMRMLTableNode


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
    """The panel: inputs, parameters, run (Apply / Cancel with progress and log), review."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobInput = None
        self._jobMethod = None
        self._progress = None
        self._runLog = None
        self._card = None
        self._cardError = None
        self._cardKey = None
        self._torch = None
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
        self._timer.connect("timeout()", self._onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.reviewQueueTableView.connect("clicked(QModelIndex)", self._jumpToReviewRegion)

        self.ui.progressBar.setValue(0)
        self.ui.stageLabel.text = ""
        self.ui.timeLabel.text = ""
        self.ui.statusLabel.text = "Select a volume and a checkpoint, then click Apply."
        self.ui.compatibilityWarningLabel.visible = False
        self._torch = dependencies.torch_status(dependencies.installed_versions())
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes: stop the running job and queries, drop observers."""
        self._cancelJob("Slicer is closing")
        if self.logic is not None:
            self.logic.modelCards.cancel()
            self.logic.devices.cancel()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self._updateDevices()

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
        _relabel(self.ui.denoiseComboBox, support.DENOISE_MODES, support.DENOISE_LABELS)
        _relabel(self.ui.overlayComboBox, tuple(support.OVERLAY_NODE_KEYS), support.OVERLAY_LABELS)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateModelCard()
        self._updateWarnings()
        self._updateApplyButton()
        self._updateReview()

    # ------------------------------------------------------------------ child queries
    def _onTimer(self) -> None:
        """Every JOB_POLL_MSEC while something runs: model cards and the device list read in
        child processes, and the job's progress. Stops when nothing runs."""
        if self.logic.modelCards.poll():
            self._cardKey = None
            if self._parameterNode:
                self._onParameterNodeModified()
        if self.logic.devices.poll():
            self._updateDevices()
        if self._job is not None:
            self._pollJob()
        if self._job is None and not self.logic.modelCards.pending and not self.logic.devices.pending:
            self._timer.stop()

    def _startTimer(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def _updateModelCard(self) -> None:
        """Show the checkpoint's model card, read once per file version in a child process."""
        key = checkpoint_key(self._parameterNode.checkpointPath)
        if key == self._cardKey:
            return
        self._cardKey = key
        self._card, self._cardError = None, None
        if key is None:
            self.ui.modelCardLabel.text = "Choose a checkpoint (*.sfuda) to see its model card."
            return
        if not self._torch.installed:
            self.ui.modelCardLabel.text = ("PyTorch is not installed yet; it is installed when you "
                                           "click Apply, and the model card shows then.")
            return
        answer = self.logic.modelCards.request(key[0])
        if answer is None:
            self.ui.modelCardLabel.text = "Reading the model card..."
            self._startTimer()
        elif answer.ok:
            self._card = answer.value
            self.ui.modelCardLabel.text = support.format_model_card(self._card)
        else:  # the library's message says what is wrong with the file
            self._cardError = answer.error
            self.ui.modelCardLabel.text = f'<span style="color:#c0392b">{_escape(answer.error)}</span>'

    def _updateWarnings(self) -> None:
        """The compatibility warnings of the card and the input volume, of the method, and of
        an outdated PyTorch."""
        warnings = []
        volume = self._parameterNode.inputVolume
        if self._card is not None and volume is not None and _volumeShape(volume):
            warnings += support.checkpoint_warnings(self._card, _volumeShape(volume),
                                                    volume.GetName(), _dicomModality(volume))
        reason = support.method_unavailable_reason(self._card, self._parameterNode.method,
                                                  self._parameterNode.healStages)
        if reason:
            warnings.append(reason)
        if self._torch.installed and not self._torch.ok:
            warnings.append(self._torch.message())
        self.ui.compatibilityWarningLabel.text = "<br>".join(
            f'<span style="color:#d35400">&#9888; {_escape(w)}</span>' for w in warnings)
        self.ui.compatibilityWarningLabel.visible = bool(warnings)

    def _updateDevices(self) -> None:
        """The compute devices and their free memory beside the device selector."""
        if not self._torch.installed:
            self.ui.gpuMemoryLabel.text = "PyTorch is not installed yet (installed on Apply)."
            return
        answer = self.logic.devices.request()
        if self.logic.devices.pending:
            self._startTimer()
        self.ui.gpuMemoryLabel.text = support.devices_text(answer)

    def _applyBlocker(self) -> Optional[str]:
        """Why Apply cannot run now, or None."""
        p = self._parameterNode
        if p is None or p.inputVolume is None:
            return "Select an input volume."
        key = checkpoint_key(p.checkpointPath)
        if key is None:
            return "Choose a checkpoint file (*.sfuda)."
        if self._cardError:
            return self._cardError
        if self._card is None and self._torch.installed:
            return "Reading the model card..."
        return support.method_unavailable_reason(self._card, p.method, p.healStages)

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
                "steps": p.steps, "stages": p.healStages, "denoise": p.healDenoise, "seed": p.seed,
                "iterations": p.gmmIterations, "lambda": p.gmmLambda, "guard_agreement": p.gmmGuard}

    def onApplyButton(self) -> None:
        """Apply starts a job; while it runs the same button cancels it."""
        if self._job is not None:
            self._cancelJob("cancelled by the user")
            return
        with slicer.util.tryWithErrorDisplay("SFUDA Segment could not start.", waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = "Dependencies were not installed; nothing was run."
                return
            self._torch = dependencies.torch_status(dependencies.installed_versions())
            self._cardKey = None
            self._onParameterNodeModified()
            self._updateDevices()
            blocker = self._applyBlocker()
            if blocker:
                self.ui.statusLabel.text = blocker
                return
            p = self._parameterNode
            parameters = self._parameters()
            self._job = self.logic.process(p.inputVolume, str(p.checkpointPath), method=p.method,
                                           parameters=parameters, waitForCompletion=False,
                                           device=p.device)
            self._jobInput = p.inputVolume
            self._jobMethod = p.method
            self._progress = OverallProgress(self.logic.stagePlan(p.method, parameters, self._card))
            self._runLog = RunLog()
            self.ui.logTextEdit.clear()
            self._appendLog(self._runLog.add_text("sfuda " + " ".join(self._job.args)))
            self.ui.progressBar.setValue(0)
            self.ui.stageLabel.text = "Starting"
            self.ui.statusLabel.text = (f"Running {support.METHOD_LABELS[p.method]} on "
                                        f"'{p.inputVolume.GetName()}'...")
            self._startTimer()
        self._updateApplyButton()

    def _appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _showEvent(self, event: dict) -> None:
        """Show one job event: overall progress, stage, times, status, log."""
        for line in self._runLog.add_event(event):
            self._appendLog(line)
        if event.get("type") == "progress":
            self.ui.progressBar.setValue(int(round(PROGRESS_STEPS * self._progress.update(event))))
            self.ui.stageLabel.text = self._progress.stage_text()
            self.ui.statusLabel.text = str(event.get("message", ""))
        elif event.get("type") == "error":
            self.ui.statusLabel.text = str(event.get("message", ""))

    def _showJobOutput(self, job: BackgroundJob) -> None:
        """The events and plain lines that arrived since the last call."""
        for event in job.poll():
            self._showEvent(event)
        for line in job.read_log_lines():
            self._appendLog(self._runLog.add_text(line))
        self.ui.timeLabel.text = self._progress.time_text()

    def _pollJob(self) -> None:
        """Show new output; when the job ended, load its result or report why it failed."""
        job = self._job
        self._showJobOutput(job)
        if job.running:
            return
        job.wait()
        self._showJobOutput(job)
        self._job = None
        try:
            if job.returncode == 0:
                with slicer.util.tryWithErrorDisplay("The results could not be loaded.",
                                                     waitCursor=True):
                    nodes = self.logic.finishJob(job, self._jobInput)
                    self._storeResult(nodes, self._jobInput, self.logic.lastResultReliability)
                    self._showResultNotes(self.logic.lastResultNotes)
                    self._progress.finish()
                    self.ui.progressBar.setValue(PROGRESS_STEPS)
                    self.ui.timeLabel.text = self._progress.time_text()
                    self.ui.statusLabel.text = (
                        f"Done: {support.METHOD_LABELS[self._jobMethod]} added {len(nodes)} nodes "
                        "in one folder of the Data module (delete the folder to remove them).")
            else:
                message = job.error_message() or "The job failed."
                self.ui.statusLabel.text = "Failed; nothing was added to the scene (see the log)."
                slicer.util.errorDisplay(f"SFUDA Segment failed:\n\n{message}")
        finally:
            self.logic.discardJob(job)
            self._updateApplyButton()
            self.logic.devices.refresh()
            self._updateDevices()

    def _showResultNotes(self, notes: list) -> None:
        """The last result's warnings (orange) and notes under the status line."""
        colours = {"warning": "#d35400", "info": "#555555"}
        self.ui.resultNotesLabel.text = "<br>".join(
            f'<span style="color:{colours[kind]}">{"&#9888; " if kind == "warning" else ""}{_escape(text)}</span>'
            for kind, text in notes)

    def _cancelJob(self, reason: str) -> None:
        """Kill the running job's whole process tree; the scene stays as it was."""
        job = self._job
        if job is None:
            return
        self._job = None
        self.logic.discardJob(job)
        self.ui.progressBar.setValue(0)
        self.ui.stageLabel.text = ""
        self.ui.statusLabel.text = f"Stopped ({reason}); nothing was added to the scene."
        if self._runLog is not None:
            self._appendLog(self._runLog.add_text(f"Stopped: {reason}."))
        self._updateApplyButton()

    # ------------------------------------------------------------------ review
    def _storeResult(self, nodes: dict, inputVolume: Any, reliability: dict) -> None:
        """Remember the result's nodes in the parameter node (saved with the scene); the overlay
        returns to the map the result recommends."""
        p = self._parameterNode
        if p is None:
            return
        recommended = support.recommended_map_key(reliability, nodes)
        with slicer.util.NodeModify(p.parameterNode):
            p.resultInput = inputVolume
            p.segmentation = nodes.get("segmentation")
            p.entropyMap = nodes.get("map_entropy")
            p.nigVarianceMap = nodes.get("map_nig_variance")
            p.candidateImage = nodes.get("candidate_proxy")
            p.candidateBrowser = nodes.get("candidate_browser")
            p.candidateScores = nodes.get("candidate_scores")
            p.statistics = nodes.get("statistics")
            p.reviewQueue = nodes.get("review_queue")
            p.recommendedMap = nodes.get(recommended) if recommended else None
            p.recommendedMapName = reliability.get("map", "") if recommended else ""
            p.overlayMap = "recommended" if recommended else "entropy"
        self._overlayKey = None
        self._updateReview()

    def _overlayNode(self) -> Any:
        """The node chosen as coloured foreground (None when the result has no such layer)."""
        p = self._parameterNode
        return {"recommended": p.recommendedMap, "entropy": p.entropyMap, "nig_variance": p.nigVarianceMap,
                "candidate": p.candidateImage}.get(p.overlayMap)

    def _jumpToReviewRegion(self, index: Any) -> None:
        """A click on a row of the review queue: every slice view goes to that region."""
        p = self._parameterNode
        if p is None or p.reviewQueue is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not go to the region.", waitCursor=False):
            from SFUDASegmentLib.slicer_bridge.review_queue_nodes import jump_slices_to_row

            jump_slices_to_row(p.reviewQueue, index.row(), p.resultInput)

    def _updateReview(self) -> None:
        """Tables, candidate browser, overlay (transparent below the threshold), legend and
        outline of the last result."""
        p = self._parameterNode
        if p is None:
            return
        reviewKey = tuple(n.GetID() if n is not None else None
                          for n in (p.candidateScores, p.statistics, p.candidateBrowser, p.reviewQueue))
        if reviewKey != self._reviewKey:
            self._reviewKey = reviewKey
            self.ui.candidateTableView.setMRMLTableNode(p.candidateScores)
            self.ui.statisticsTableView.setMRMLTableNode(p.statistics)
            self.ui.reviewQueueTableView.setMRMLTableNode(p.reviewQueue)
            self.ui.candidateSeekWidget.setMRMLSequenceBrowserNode(p.candidateBrowser)
        overlay = self._overlayNode()
        overlayKey = (p.resultInput.GetID() if p.resultInput else None,
                      overlay.GetID() if overlay else None, round(p.overlayOpacity, 3),
                      round(p.overlayThreshold, 3), p.segmentation.GetID() if p.segmentation else None)
        if overlayKey == self._overlayKey or p.resultInput is None:
            return
        self._overlayKey = overlayKey
        title = support.overlay_title(p.overlayMap, p.recommendedMapName) if overlay is not None else ""
        overlay_display.show_review(
            p.resultInput, overlay, p.segmentation, p.overlayOpacity, p.overlayThreshold, title,
            (p.entropyMap, p.nigVarianceMap, p.recommendedMap))
        self.ui.colorLegendLabel.text = _legendText(p.overlayMap, overlay, p.overlayThreshold, p.recommendedMapName)


def _relabel(comboBox: Any, values: tuple, labels: dict) -> None:
    """Set readable item texts on a combo box whose items are ``values`` in this order."""
    for index, value in enumerate(values):
        if index < comboBox.count:
            comboBox.setItemText(index, labels.get(value, value))


def _legendText(choice: str, overlayNode: Any, hideBelow: float, recommended: str) -> str:
    """The colour legend of the overlay node (colour table, range, transparency threshold)."""
    if overlayNode is None:
        return ("This result has no such layer (HEAL writes NIG variance and candidates; a result "
                "recommends a map when it has one).")
    display = overlayNode.GetDisplayNode()
    colorNode = display.GetColorNode() if display is not None else None
    low, high = overlay_display.map_range(overlayNode)
    return support.overlay_legend_text(choice, low, high,
                                       colorNode.GetName() if colorNode is not None else "grey",
                                       low + hideBelow * (high - low), recommended)


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
        modelCards: model cards read by ``sfuda info --json`` in child processes, cached per
            checkpoint file (path, modification time, size).
        devices: the device inventory (``sfuda devices --json``, in a child process).
        stageSeconds: method -> (stage seconds, parameters) of the last run of that method here;
            the next run's progress is weighted with them.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobModule = DEFAULT_MODULE
        self.jobEnvironment = {}
        self.modelCards = ModelCards()
        self.devices = DeviceInventory()
        self.stageSeconds = {}
        self.lastResultNotes = []
        self.lastResultReliability = {}
        self._jobFolders = {}

    def getParameterNode(self) -> SFUDASegmentParameterNode:
        return SFUDASegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the library needs without replacing anything; True when all is there.

        PyTorch: when it is missing or older than the library's minimum, the PyTorch
        extension's PyTorch Utils installs (or upgrades to) a build that fits this machine,
        after one confirmation. The other packages (``dependencies.LIBRARY_REQUIREMENTS``) are
        installed with ``slicer.util.pip_install`` only when missing, with every distribution
        already installed in Slicer's Python given to pip as a constraint at its installed
        version (numpy, scipy, SimpleITK... stay exactly as Slicer ships them).

        Raises:
            RuntimeError: the PyTorch extension is missing, PyTorch is still too old after the
                upgrade, or a package Slicer ships is older than the library needs.
        """
        ask = askConfirmation and not slicer.app.commandOptions().testingEnabled
        installed = dependencies.installed_versions()
        torch = dependencies.torch_status(installed)
        if not torch.ok:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(
                    "SFUDA Segment needs PyTorch " + torch.requirement + ". Install the 'PyTorch' "
                    "extension from the Extensions Manager (View > Extensions Manager), restart "
                    "Slicer, and click Apply again.") from None
            if ask and not slicer.util.confirmOkCancelDisplay(
                    torch.message() + "\n\nInstall it now through PyTorch Utils?",
                    "SFUDA Segment: PyTorch"):
                return False
            PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=torch.requirement)
            importlib.invalidate_caches()
            self.modelCards.clear()  # cards read before could not load PyTorch
            installed = dependencies.installed_versions()
            torch = dependencies.torch_status(installed)
            if not torch.ok:
                raise RuntimeError(torch.message())
        plan = dependencies.install_plan(installed)
        if plan.problems:
            raise RuntimeError(" ".join(plan.problems))
        if plan.needed:
            if ask and not slicer.util.confirmOkCancelDisplay(
                    dependencies.describe_install(plan), "SFUDA Segment: install dependencies"):
                return False
            folder = tempfile.mkdtemp(prefix="SFUDASegment-pip-", dir=_temporaryFolder())
            try:
                constraints = dependencies.write_constraints(plan, folder)
                slicer.util.pip_install(dependencies.pip_arguments(plan, constraints))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            importlib.invalidate_caches()
            self.modelCards.clear()
        return True

    def modelCard(self, checkpointPath: str) -> dict:
        """The checkpoint's model card (``sfuda info --json``, read in a child process and
        cached per file version).

        Raises:
            RuntimeError: the file is missing, damaged or not a checkpoint (the library's message).
        """
        answer = self.modelCards.get(checkpointPath)
        if not answer.ok:
            raise RuntimeError(answer.error)
        return answer.value

    def stagePlan(self, method: str, parameters: Optional[dict] = None,
                  card: Optional[dict] = None) -> StagePlan:
        """The stages of a run and their weights for its overall progress: the stage times of
        the last run of ``method`` here (else of the reference run on the bundled sample),
        scaled to ``parameters`` (HEAL candidates and steps, GMM iterations)."""
        seconds, reference = self.stageSeconds.get(method, (None, None))
        schedule = ((card or {}).get("diffusion_model") or {}).get("schedule") or {}
        return StagePlan.from_stage_seconds(expected_stage_seconds(
            method, parameters or {}, seconds, reference, int(schedule.get("timesteps", 1000))))

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
                "steps": 50, "stages": "heal", "denoise": "components", "seed": 0}`` (HEAL) or
                ``{"iterations": 100, "lambda": 0.5, "guard_agreement": 0.5, "seed": 0}`` (GMM);
                missing keys take the library's defaults.
            waitForCompletion: block until done (scripting); False returns the running job.
            onProgress: called with each progress event dict (stage, fraction, message).
            device: ``"auto"``, ``"cuda"`` or ``"cpu"``.

        After a result is loaded, ``lastResultNotes`` holds what its report says a reader should
        know: ``(kind, text)`` pairs, the method's warnings first (see
        ``panel_support.result_notes``), and ``lastResultReliability`` its reliability statement
        (the map to review, its measured AUROC, the words for the reader).

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
        self.modelCards.request(checkpointPath)  # its terminology is read beside the job
        run = _Run(workDir, outDir, method, dict(parameters or {}), checkpointPath)

        if waitForCompletion:
            try:
                outcome = run_job(arguments, on_event=onProgress, between_polls=_processEvents,
                                  module=self.jobModule, env=self.jobEnvironment)
                if not outcome.ok:
                    raise RuntimeError(f"SFUDA Segment ({method}) failed: {outcome.error_message}")
                return self._loadResult(run, inputVolume)
            finally:
                shutil.rmtree(workDir, ignore_errors=True)

        job = BackgroundJob(arguments, module=self.jobModule, env=self.jobEnvironment)
        try:
            job.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self._jobFolders[job] = run
        return job

    def finishJob(self, job: BackgroundJob, inputVolume: vtkMRMLScalarVolumeNode) -> dict:
        """Add the result of an ended job (from ``process(waitForCompletion=False)``) to the
        scene and remove its temporary folder.

        Raises:
            RuntimeError: the job still runs or failed (with the library's message).
        """
        if job.running:
            raise RuntimeError("The job is still running; call finishJob once job.running is False.")
        try:
            if job.wait() != 0:
                raise RuntimeError(f"SFUDA Segment failed: {job.error_message()}")
            run = self._jobFolders.get(job)
            if run is None:
                raise RuntimeError("This job was not started by this logic's process(); "
                                   "nothing to load.")
            return self._loadResult(run, inputVolume)
        finally:
            self.discardJob(job)

    def discardJob(self, job: BackgroundJob) -> None:
        """Stop a job if it still runs (its whole process tree) and delete its temporary
        folder; the scene is not touched."""
        if job.running:
            job.cancel()
        run = self._jobFolders.pop(job, None)
        if run is not None:
            shutil.rmtree(run.workDir, ignore_errors=True)

    def _loadResult(self, run: "_Run", inputVolume: vtkMRMLScalarVolumeNode) -> dict:
        """Read a result folder and add it to the input's scene as new nodes, in one
        subject-hierarchy folder, with the classes' standard terminology; remember its stage
        times for the next run's progress."""
        from SFUDASegmentLib.results.files import read_result
        from SFUDASegmentLib.slicer_bridge import mrml
        from SFUDASegmentLib.slicer_bridge.run_folder import run_folder_name
        from SFUDASegmentLib.slicer_bridge.terminology import class_terminology

        result = read_result(run.outDir)
        self.lastResultNotes = support.result_notes(result.extra, result.reliability)
        self.lastResultReliability = dict(result.reliability)
        seconds = (result.timings or {}).get("seconds")
        if seconds:
            self.stageSeconds[run.method] = (dict(seconds), run.parameters)
        card = self.modelCards.get(run.checkpointPath)
        return mrml.add_result_to_scene(
            result, inputVolume, terminology=class_terminology(result.classes, card.value if card.ok else None),
            folder_name=run_folder_name(support.METHOD_LABELS.get(run.method, run.method),
                                        inputVolume.GetName()))


@dataclass
class _Run:
    """What the logic keeps about one run until its result is loaded."""

    workDir: str
    outDir: str
    method: str
    parameters: dict
    checkpointPath: str


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
        within [0, log2 K], the input unchanged, each run's nodes in one folder."""
        import numpy as np

        from SFUDASegmentLib.slicer_bridge.run_folder import run_folder_of

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
            folder = run_folder_of(segmentation)
            self.assertTrue(folder)
            self.assertEqual({run_folder_of(n) for n in nodes.values()}, {folder})
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
