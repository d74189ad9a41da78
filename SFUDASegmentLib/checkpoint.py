"""The ``*.sfuda`` source checkpoint: one file with everything the target site needs.

Contents (nothing of the source data): format name and version; classes (values, names,
colours); the input spec (dims, modality, channels, spacing, patch size, normalisation); the
segmentation network config and weights; optionally the conditional diffusion model (config,
schedule, EMA weights, intensity scale), the per-class Gaussian prototypes, and provenance.

The file is written with :func:`torch.save` holding only tensors and plain values (metadata as a
JSON string) and read with ``torch.load(weights_only=True)``: loading never executes code from
the file. A file that tries to (a crafted pickle) is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import (DiffusionNetConfig, InputSpec, LabelClass, ScheduleConfig, SegNetConfig,
                     to_dict)
from .errors import CheckpointError, InputError
from .utils.device import inference_layout

FORMAT_NAME = "sfuda-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".sfuda"


@dataclass
class DiffusionPart:
    """The conditional diffusion model stored in a checkpoint.

    Attributes:
        net_config: network architecture.
        schedule: noise schedule.
        state_dict: EMA weights.
        intensity_scale: z-scores are divided by this and clipped to [-1, 1] for the diffusion.
    """

    net_config: DiffusionNetConfig
    schedule: ScheduleConfig
    state_dict: dict[str, torch.Tensor]
    intensity_scale: float = 3.0


@dataclass
class SourceCheckpoint:
    """A source model and everything shipped with it.

    Attributes:
        classes: foreground classes in network order (index i = classes[i-1]).
        input_spec: what the network expects.
        seg_config: segmentation network architecture.
        seg_state: segmentation network weights.
        diffusion: conditional diffusion model (HEAL, Diffuse-UDA) or None.
        prototypes: per-class Gaussian prototypes state (GMM) or None; see
            ``gmm.prototypes.ClassPrototypes.to_state``.
        provenance: training data description, versions, validation metrics, adaptations.
        temperature: the temperature T fitted on labelled source cases
            (``uncertainty.temperature``), applied to the probabilities of the uncertainty
            maps; None when none was fitted (every checkpoint written before it existed).
    """

    classes: list[LabelClass]
    input_spec: InputSpec
    seg_config: SegNetConfig
    seg_state: dict[str, torch.Tensor]
    diffusion: Optional[DiffusionPart] = None
    prototypes: Optional[dict[str, Any]] = None
    provenance: dict[str, Any] = field(default_factory=dict)
    temperature: Optional[float] = None

    @property
    def num_classes(self) -> int:
        """Network output channels: background + foreground classes."""
        return 1 + len(self.classes)

    def build_segmentation_net(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The segmentation network with its weights, in eval mode.

        Raises:
            CheckpointError: the weights do not fit the stored architecture.
        """
        from .nets.unet import ResidualUNet

        net = ResidualUNet.from_config(self.seg_config)
        _load_state(net, self.seg_state, "segmentation network")
        return net.to(device).eval()

    def build_diffusion_net(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The conditional diffusion network with its EMA weights, in eval mode.

        Raises:
            CheckpointError: the checkpoint has no diffusion model or its weights do not fit.
        """
        from .nets.diffusion_unet import ConditionalDiffusionUNet

        if self.diffusion is None:
            raise CheckpointError(
                "This checkpoint has no diffusion model, which HEAL and synthesis need. Train one "
                "with `sfuda train-source ... --diffusion` (or use method 'none' or 'gmm').")
        net = ConditionalDiffusionUNet.from_config(self.diffusion.net_config)
        _load_state(net, self.diffusion.state_dict, "diffusion network")
        return inference_layout(net.to(device).eval(), device, self.diffusion.net_config.spatial_dims)

    # ------------------------------------------------------------------ file I/O
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (a temp file, then rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "classes": [{"value": c.value, "name": c.name, "color": list(c.color)} for c in self.classes],
            "input_spec": to_dict(self.input_spec),
            "seg_config": to_dict(self.seg_config),
            "diffusion": None if self.diffusion is None else {
                "net_config": to_dict(self.diffusion.net_config),
                "schedule": to_dict(self.diffusion.schedule),
                "intensity_scale": self.diffusion.intensity_scale},
            "provenance": self.provenance,
            **({} if self.temperature is None else {"temperature": float(self.temperature)}),
        }
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "metadata": json.dumps(meta),
            "segmentation_state": {k: v.detach().cpu() for k, v in self.seg_state.items()},
            "diffusion_state": None if self.diffusion is None else
            {k: v.detach().cpu() for k, v in self.diffusion.state_dict.items()},
            "prototypes": self.prototypes,
        }
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(payload, tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a checkpoint is shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SourceCheckpoint":
        """Read and validate a checkpoint without executing any code from it.

        Raises:
            CheckpointError: missing, corrupt, truncated, hostile, other format/version, or
                inconsistent file; the message says what is wrong and what to do.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"Checkpoint file not found: '{path}'. Check the path, or create one with "
                "`sfuda train-source ... --out model.sfuda` (the demo writes one too).")
        payload = _safe_torch_load(path)
        return cls.from_payload(payload, source=str(path))

    @classmethod
    def from_payload(cls, payload: Any, source: str = "checkpoint") -> "SourceCheckpoint":
        """Validate a loaded payload dict and build the checkpoint object."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f"'{source}' is not an SFUDASegment checkpoint (no '{FORMAT_NAME}' header). "
                "Use a *.sfuda file written by `sfuda train-source`, not a bare PyTorch state dict.")
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise CheckpointError(
                f"'{source}' has checkpoint format version {version!r}; this SFUDASegment reads "
                f"versions 1..{FORMAT_VERSION}. Update SFUDASegment (or re-export the checkpoint "
                "with the version that wrote it).")
        try:
            meta = json.loads(payload["metadata"])
            classes = [LabelClass(int(c["value"]), str(c["name"]), tuple(c["color"]))
                       for c in meta["classes"]]
            spec = InputSpec.from_dict(meta["input_spec"])
            seg_config = SegNetConfig.from_dict(meta["seg_config"])
            diffusion = None
            if meta.get("diffusion") is not None:
                d = meta["diffusion"]
                diffusion = DiffusionPart(DiffusionNetConfig.from_dict(d["net_config"]),
                                          ScheduleConfig.from_dict(d["schedule"]),
                                          _tensor_dict(payload.get("diffusion_state"), "diffusion_state"),
                                          float(d.get("intensity_scale", 3.0)))
            seg_state = _tensor_dict(payload.get("segmentation_state"), "segmentation_state")
        except CheckpointError as error:
            raise CheckpointError(f"'{source}': {error}") from error
        except (KeyError, TypeError, ValueError, InputError) as error:
            raise CheckpointError(
                f"'{source}' has damaged metadata ({type(error).__name__}: {error}). The file was "
                "edited or written by an incompatible tool; re-export it with `sfuda train-source`.") from error
        ckpt = cls(classes, spec, seg_config, seg_state, diffusion, payload.get("prototypes"),
                   meta.get("provenance", {}), meta.get("temperature"))
        ckpt.validate(source)
        return ckpt

    def validate(self, source: str = "checkpoint") -> None:
        """Check that the parts agree with each other and that the weights fit the networks.

        The declared sizes are checked against :data:`SIZE_BOUNDS` and the stored weights
        against the architecture built on PyTorch's ``meta`` device (no memory) before any
        network is built for real, so that a hostile or damaged model card cannot make the
        library allocate memory for a network the file does not hold.

        Raises:
            CheckpointError: naming the inconsistent part.
        """
        check_declared_sizes(self, source)
        if self.seg_config.out_channels != self.num_classes:
            raise CheckpointError(
                f"'{source}': the network predicts {self.seg_config.out_channels} classes but the "
                f"class list has {self.num_classes} (background + {len(self.classes)}). The "
                "metadata and weights do not belong together; re-export the checkpoint.")
        if self.seg_config.in_channels != self.input_spec.network_channels:
            raise CheckpointError(
                f"'{source}': the network takes {self.seg_config.in_channels} input channels but "
                f"the input spec ({self.input_spec.dims}, {self.input_spec.image_channels} channel(s)) "
                f"needs {self.input_spec.network_channels}. Re-export the checkpoint.")
        from .nets.unet import ResidualUNet

        try:
            _check_state_shapes(lambda: ResidualUNet.from_config(self.seg_config), self.seg_state,
                                "segmentation network")
            self.build_segmentation_net("cpu")
        except (CheckpointError, InputError) as error:
            raise CheckpointError(f"'{source}': {error}") from error
        if self.diffusion is not None:
            from .nets.diffusion_unet import ConditionalDiffusionUNet

            if self.diffusion.net_config.cond_channels != self.num_classes + 1:
                raise CheckpointError(
                    f"'{source}': the diffusion model is conditioned on "
                    f"{self.diffusion.net_config.cond_channels} channels but the classes need "
                    f"{self.num_classes + 1} (one-hot + body). Retrain it with --diffusion.")
            try:
                _check_state_shapes(lambda: ConditionalDiffusionUNet.from_config(self.diffusion.net_config),
                                    self.diffusion.state_dict, "diffusion network")
                self.build_diffusion_net("cpu")
            except (CheckpointError, InputError) as error:
                raise CheckpointError(f"'{source}': {error}") from error
        if self.temperature is not None:
            from .uncertainty.temperature import check_temperature

            try:
                check_temperature(self.temperature, "stored temperature")
            except InputError as error:
                raise CheckpointError(f"'{source}': {error}") from error
        if self.prototypes is not None:
            from .gmm.prototypes import ClassPrototypes, check_compatible

            try:
                prototypes = ClassPrototypes.from_state(self.prototypes)
                check_compatible(prototypes, self.seg_config.channels[0], self.num_classes)
            except InputError as error:
                raise CheckpointError(f"'{source}': {error}") from error

    def describe(self) -> dict[str, Any]:
        """The model card: classes, modality, dims, contents and provenance (JSON-friendly)."""
        n_seg = sum(int(v.numel()) for v in self.seg_state.values())
        card: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "classes": [{"value": c.value, "name": c.name, "color": list(c.color)} for c in self.classes],
            "modality": self.input_spec.modality,
            "dims": self.input_spec.dims,
            "input_spec": to_dict(self.input_spec),
            "segmentation_network": {**to_dict(self.seg_config), "parameters": n_seg},
            "diffusion_model": None,
            "prototypes": None,
            "temperature": self.temperature,
            "provenance": self.provenance,
        }
        if self.diffusion is not None:
            card["diffusion_model"] = {
                **to_dict(self.diffusion.net_config), "schedule": to_dict(self.diffusion.schedule),
                "parameters": sum(int(v.numel()) for v in self.diffusion.state_dict.values())}
        if self.prototypes is not None:
            from .gmm.prototypes import ClassPrototypes

            card["prototypes"] = ClassPrototypes.from_state(self.prototypes).describe()
        # HEAL's denoising needs only the source model; its diffusion stages need the diffusion model
        card["methods"] = ["none", "heal"] + (["gmm"] if self.prototypes else [])
        card["heal_stages"] = ["hd", "hd+egs", "heal"] if self.diffusion else ["hd"]
        return card


#: Largest sizes a checkpoint may declare: far above any model this library trains or runs
#: (they bound memory before a network is built), far below what a hostile card can ask for.
SIZE_BOUNDS: dict[str, int] = {
    "classes": 255,              # foreground classes
    "label value": 2 ** 31 - 1,  # a class's value in label files
    "image channels": 4,         # grey 1, RGB 3
    "context slices": 16,        # 2.5D: neighbouring slices on each side
    "input channels": 64,        # network input channels (2.5D: channels x slices)
    "output channels": 256,      # segmentation classes, background included
    "condition channels": 257,   # diffusion condition: one-hot classes + body
    "levels": 8,                 # U-Net levels (widths per level)
    "width": 2048,               # channels of any layer
    "residual units": 16,        # sub-layers per residual unit / blocks per level
    "patch axes": 3,             # a patch / window is 2D or 3D
    "patch size": 4096,          # voxels along any axis of a training patch / window
    "patch voxels": 512 ** 3,    # voxels of one patch / window
    "timesteps": 10000,          # diffusion steps T
}


def _bounded(name: str, value: Any, low: int = 1) -> None:
    """Raise :class:`CheckpointError` unless ``value`` is an int in ``[low, SIZE_BOUNDS[name]]``."""
    high = SIZE_BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(
            f"its model card declares {name} = {value!r}, outside the sane range {low}..{high}; the "
            "file was refused before any network was built. It is damaged or was crafted; use a "
            "checkpoint written by `sfuda train-source` from a trusted source.")


def check_declared_sizes(checkpoint: "SourceCheckpoint", source: str = "checkpoint") -> None:
    """Check every size a checkpoint's metadata declares against :data:`SIZE_BOUNDS`.

    Runs before any network is built or memory is allocated for it.

    Raises:
        CheckpointError: the first size out of bounds, named.
    """
    try:
        _bounded("classes", len(checkpoint.classes))
        for c in checkpoint.classes:
            _bounded("label value", c.value)
        spec, seg = checkpoint.input_spec, checkpoint.seg_config
        _bounded("image channels", spec.image_channels)
        _bounded("context slices", spec.context_slices, low=0)
        patch = tuple(spec.patch_size)
        _bounded("patch axes", len(patch), low=2)
        for size in patch:
            _bounded("patch size", size)
        voxels = 1
        for size in patch:
            voxels *= size
        _bounded("patch voxels", voxels)
        _bounded("input channels", seg.in_channels)
        _bounded("output channels", seg.out_channels)
        _bounded("levels", len(seg.channels))
        for width in seg.channels:
            _bounded("width", width)
        _bounded("residual units", seg.res_units)
        if checkpoint.diffusion is not None:
            net, schedule = checkpoint.diffusion.net_config, checkpoint.diffusion.schedule
            _bounded("image channels", net.image_channels)
            _bounded("condition channels", net.cond_channels)
            _bounded("levels", len(net.channel_mults))
            for mult in net.channel_mults:
                _bounded("width", mult)
                _bounded("width", net.base_channels * mult)
            _bounded("residual units", net.num_res_blocks)
            _bounded("width", net.groups)
            _bounded("timesteps", schedule.timesteps)
    except TypeError as error:  # a list where a number belongs, and the like
        raise CheckpointError(f"'{source}': its model card holds a malformed size ({error}); the "
                              "file was refused. Re-export it with `sfuda train-source`.") from error
    except CheckpointError as error:
        raise CheckpointError(f"'{source}': {error}") from error


def _check_state_shapes(build: Any, state: dict[str, torch.Tensor], what: str) -> None:
    """Compare the stored weights with the architecture built on the ``meta`` device.

    Args:
        build: builds the network (called under ``torch.device("meta")``: no memory).
        state: the stored weights.
        what: the network's name in messages.

    Raises:
        CheckpointError: missing, unexpected or differently shaped weights.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or wrong:
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {unexpected[:3]}"] if unexpected else []) + (
            [f"shape of {k}: stored {stored[k]}, architecture {expected[k]}" for k in wrong[:2]])
        raise CheckpointError(
            f"The {what} weights do not match its stored architecture ({'; '.join(parts)}). The "
            "checkpoint is damaged or was edited; re-export it.")


def _tensor_dict(value: Any, name: str) -> dict[str, torch.Tensor]:
    """Check that ``value`` is a str -> tensor dict."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise CheckpointError(f"The checkpoint's '{name}' is not a dictionary of tensors; the file "
                              "is damaged. Re-export it with `sfuda train-source`.")
    return value


def _load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[:4]
        raise CheckpointError(
            f"The {what} weights do not match its stored architecture ({' '.join(first)}). The "
            "checkpoint is damaged or was edited; re-export it.") from error


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with each failure turned into a clear CheckpointError."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if len(head) == 0:
        raise CheckpointError(f"Checkpoint '{path}' is empty (0 bytes). The copy or download was "
                              "interrupted; copy the file again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if any(marker in text for marker in _CODE_MARKERS):
            raise CheckpointError(
                f"Refused to load '{path}': it contains Python objects that would run code when "
                f"loaded ({_unpickler_reason(text)}). SFUDASegment never executes code from a "
                "checkpoint. Only use *.sfuda files from a trusted source; ask its author for a "
                "file written by `sfuda train-source`.") from error
        raise CheckpointError(f"Checkpoint '{path}' is corrupt or not a checkpoint "
                              f"({_unpickler_reason(text)}). Copy the file again or re-export it.") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, io.UnsupportedOperation) as error:
        text = str(error)
        # a zip archive (the current format) cut short has lost its central directory
        cut_zip = head.startswith(b"PK") and not zipfile.is_zipfile(path)
        hint = "truncated or corrupt" if ("zip" in text.lower() or "EOF" in text or cut_zip or
                                          isinstance(error, EOFError)) else "unreadable"
        raise CheckpointError(f"Checkpoint '{path}' is {hint} ({type(error).__name__}: "
                              f"{_unpickler_reason(text)}). Copy the file again, or re-export it with "
                              "`sfuda train-source`.") from error


#: phrases of PyTorch's weights-only unpickler that mean the file asked to import or call code
#: (every weights-only failure mentions "weights only"; random bytes fail on an unknown opcode)
_CODE_MARKERS = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build")

#: words of PyTorch's advice on how to load a refused file anyway (``weights_only=False``,
#: allow-listing globals): never shown, since following it runs the file's code
_UNSAFE_ADVICE = ("weights_only", "safe_globals", "allowlist", "trust", "Weights only load failed",
                  "Please file an issue", "Check the documentation", "two options")


def _unpickler_reason(message: str) -> str:
    """The specific reason in PyTorch's error text, in our words where it names a Python object,
    and never any of its advice to load the file unsafely (:data:`_UNSAFE_ADVICE`)."""
    named = re.search(r"GLOBAL ([\w.]+)", message)
    if named:
        return f"it names the Python object '{named.group(1)}'"
    for line in _ANSI.sub("", message).splitlines():
        line = line.strip()
        if line and not any(word.lower() in line.lower() for word in _UNSAFE_ADVICE):
            return line[:160]
    return "not a valid weights-only pickle"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
