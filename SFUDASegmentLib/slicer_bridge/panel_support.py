"""Pure helpers of the Slicer panel: the ``sfuda adapt`` command line, model-card checks and
texts (what to install is ``dependencies.py``).

Everything the module file ``SFUDASegment.py`` decides without Qt lives here so that it is
tested without Slicer. This module imports neither Slicer, Qt nor PyTorch: the panel imports it
before it has checked that PyTorch is installed.
"""

from __future__ import annotations

import html
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

from ..config import LabelClass
from ..errors import InputError
from .child_queries import Answer
from .terminology import card_terminology, class_terminology, type_code

#: The methods the panel offers, with their labels.
METHODS: tuple[str, ...] = ("none", "heal", "gmm")
METHOD_LABELS: dict[str, str] = {
    "none": "No adaptation",
    "heal": "HEAL (learning-free)",
    "gmm": "GMM-adapted inference (SFS)",
}

#: Compute devices and their labels.
DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")
DEVICE_LABELS: dict[str, str] = {"auto": "Auto (GPU when available)", "cuda": "GPU (CUDA)",
                                 "cpu": "CPU"}

#: ``parameters`` key -> ``sfuda adapt`` option, in command-line order.
ADAPT_OPTIONS: dict[str, str] = {
    "tau1": "--tau1",
    "tau2": "--tau2",
    "candidates": "--candidates",
    "sampler": "--sampler",
    "steps": "--steps",
    "stages": "--stages",
    "denoise": "--denoise",
    "seed": "--seed",
    "iterations": "--iterations",
    "lambda": "--lambda",
    "guard_agreement": "--guard-agreement",
}

#: The parameters each method uses; the others are left off its command line.
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "heal": ("tau1", "tau2", "candidates", "sampler", "steps", "stages", "denoise", "seed"),
    "gmm": ("iterations", "lambda", "guard_agreement", "seed"),
}

SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")
SAMPLER_LABELS: dict[str, str] = {"ddim": "DDIM (fast, uses the steps below)",
                                  "ddpm": "DDPM (ancestral, all T steps, as in the paper)"}
HEAL_STAGES: tuple[str, ...] = ("heal", "hd+egs", "hd")
STAGE_LABELS: dict[str, str] = {"heal": "Full HEAL (with size-aware fusion)",
                                "hd+egs": "Denoising + edge-guided selection",
                                "hd": "Hierarchical denoising only"}

#: HEAL's denoising modes (``HEALConfig.denoise``) and their labels.
DENOISE_MODES: tuple[str, ...] = ("components", "paper")
DENOISE_LABELS: dict[str, str] = {"components": "Components of the source labels (keeps boundaries)",
                                  "paper": "Paper: only the voxels the NIG stage keeps"}

#: Review overlays: panel choice -> key of the node dict of ``mrml.add_result_to_scene``.
OVERLAY_NODE_KEYS: dict[str, str] = {
    "recommended": "",  # the map the result names in its reliability statement (see recommended_map_key)
    "entropy": "map_entropy",
    "nig_variance": "map_nig_variance",
    "candidate": "candidate_proxy",
}
OVERLAY_LABELS: dict[str, str] = {"recommended": "Recommended map", "entropy": "Entropy",
                                  "nig_variance": "NIG variance", "candidate": "Selected candidate"}

#: Title of each uncertainty map's colour legend in the views (every map a result can carry).
OVERLAY_LEGEND_TITLES: dict[str, str] = {
    "entropy": "Voxel entropy (bits)",
    "nig_variance": "NIG variance (normalised)",
    "calibrated_entropy": "Entropy of the temperature-scaled probabilities (bits)",
    "flip_entropy": "Entropy over flipped inputs (bits)",
    "flip_variance": "Variance over flipped inputs",
    "mahalanobis": "Distance to the source class Gaussians",
    "disagreement": "Source vs adapted disagreement",
    "ensemble_entropy": "Entropy of the source and adapted networks over flips (bits)",
    "label_disagreement": "Labels changed by the adaptation",
    "candidate_spread": "Spread of the candidates' segmentations",
}


def recommended_map_key(reliability: Mapping[str, Any], nodes: Mapping[str, Any]) -> Optional[str]:
    """The node key (``"map_<name>"``) of the map a result recommends, when that node exists.

    Args:
        reliability: the result's reliability statement (``Result.reliability``).
        nodes: the result's nodes by key (``mrml.add_result_to_scene``).
    """
    name = reliability.get("map")
    key = f"map_{name}" if name else None
    return key if key in nodes else None


def overlay_title(choice: str, recommended: Optional[str]) -> str:
    """The legend title of an overlay choice; ``recommended`` is the map name the result named,
    said in the title so the reader knows which map the colours are."""
    if choice == "recommended":
        if not recommended:
            return ""
        return f"Recommended: {OVERLAY_LEGEND_TITLES.get(recommended, recommended)}"
    return OVERLAY_LEGEND_TITLES.get(choice, "")


# ----------------------------------------------------------------------------- command line


def _number(key: str, value: Any, kind: type, low: float, high: float = math.inf) -> str:
    """``value`` as command-line text after checking its type and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"Parameter '{key}' must be a number, got {value!r}.")
    if kind is int and float(value) != int(value):
        raise InputError(f"Parameter '{key}' must be a whole number, got {value!r}.")
    if not low <= float(value) <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise InputError(f"Parameter '{key}' must be {bounds}, got {value!r}.")
    return str(int(value)) if kind is int else repr(float(value))


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(f"Parameter '{key}' must be one of {', '.join(choices)}, got {value!r}.")
    return str(value)


_VALIDATORS: dict[str, Callable[[str, Any], str]] = {
    "tau1": lambda k, v: _number(k, v, float, 0.0, 1.0),
    "tau2": lambda k, v: _number(k, v, float, 0.0, 1.0),
    "candidates": lambda k, v: _number(k, v, int, 1),
    "sampler": lambda k, v: _choice(k, v, SAMPLERS),
    "steps": lambda k, v: _number(k, v, int, 1),
    "stages": lambda k, v: _choice(k, v, HEAL_STAGES),
    "seed": lambda k, v: _number(k, v, int, 0),
    "iterations": lambda k, v: _number(k, v, int, 1),
    "lambda": lambda k, v: _number(k, v, float, 0.0),
    "denoise": lambda k, v: _choice(k, v, DENOISE_MODES),
    "guard_agreement": lambda k, v: _number(k, v, float, 0.0, 1.0),
}


def check_device(device: str) -> str:
    """``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.

    Raises:
        InputError: any other value.
    """
    if device in DEVICES or re.fullmatch(r"cuda:\d+", str(device)):
        return str(device)
    raise InputError(f"Unknown device '{device}'. Use 'auto', 'cpu', 'cuda' or 'cuda:<index>'.")


def build_adapt_arguments(method: str, checkpoint_path: str | os.PathLike,
                          image_path: str | os.PathLike, out_dir: str | os.PathLike,
                          parameters: Optional[Mapping[str, Any]] = None,
                          device: str = "auto") -> list[str]:
    """The ``sfuda`` arguments (after the program name) that run one method on one image.

    Args:
        method: ``"none"``, ``"heal"`` or ``"gmm"``.
        checkpoint_path: the ``*.sfuda`` file.
        image_path: the target image (the panel writes the input volume to a temporary NRRD).
        out_dir: folder the command writes its result to.
        parameters: any of ``tau1, tau2, candidates, sampler, steps, stages, denoise, seed``
            (HEAL) and ``iterations, lambda, guard_agreement, seed`` (GMM); None values are left out, and so are the
            parameters the method does not use (see :data:`METHOD_PARAMETERS`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.

    Returns:
        ``["adapt", "--method", method, "--checkpoint", ..., "--image", ..., "--out", ...,
        "--device", device, <options in the order of ADAPT_OPTIONS>]``.

    Raises:
        InputError: unknown method, device or parameter name, or a value of the wrong type or
            out of range (the message names it).
    """
    if method not in METHODS:
        raise InputError(f"Unknown method '{method}'. Use one of {', '.join(METHODS)}.")
    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - set(ADAPT_OPTIONS))
    if unknown:
        raise InputError(f"Unknown parameter(s) {', '.join(unknown)}. Known parameters: "
                         f"{', '.join(ADAPT_OPTIONS)}.")
    arguments = ["adapt", "--method", method, "--checkpoint", os.fspath(checkpoint_path),
                 "--image", os.fspath(image_path), "--out", os.fspath(out_dir),
                 "--device", check_device(device)]
    used = METHOD_PARAMETERS[method]
    for key, option in ADAPT_OPTIONS.items():
        value = parameters.get(key)
        if key in used and value is not None:
            arguments += [option, _VALIDATORS[key](key, value)]
    return arguments


# ----------------------------------------------------------------------------- model card checks

#: MR sequences: an ``MR`` model or image is compatible with each of them.
MR_SEQUENCES = frozenset({"T1", "T1C", "T2", "FLAIR", "PD", "DWI", "ADC", "SWI"})

#: Words in node names (lower case) -> canonical modality.
_NAME_MODALITIES: dict[str, str] = {
    "mr": "MR", "mri": "MR", "t1": "T1", "t1w": "T1", "t1c": "T1C", "t1ce": "T1C",
    "t1gd": "T1C", "t1post": "T1C", "t2": "T2", "t2w": "T2", "flair": "FLAIR",
    "t2flair": "FLAIR", "pdw": "PD", "dwi": "DWI", "adc": "ADC", "swi": "SWI", "ct": "CT",
    "cta": "CT", "cbct": "CT", "pet": "PET", "ultrasound": "US", "endoscopy": "ENDOSCOPY",
    "colonoscopy": "ENDOSCOPY", "xray": "XRAY",
}

#: DICOM (0008,0060) Modality codes -> canonical modality.
_DICOM_MODALITIES: dict[str, str] = {
    "MR": "MR", "CT": "CT", "PT": "PET", "US": "US", "ES": "ENDOSCOPY", "CR": "XRAY",
    "DX": "XRAY", "MG": "XRAY", "XA": "XRAY",
}


def _words(text: str) -> list[str]:
    """Lower-case words of a name: split at non-alphanumerics and at camel-case humps
    (``"MRHead_T1c"`` -> ``["mr", "head", "t1c"]``)."""
    words = []
    for chunk in re.split(r"[^0-9A-Za-z]+", text or ""):
        if not chunk:
            continue
        if chunk.lower() in _NAME_MODALITIES:
            words.append(chunk.lower())
            continue
        parts = re.split(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", chunk)
        words.extend(p.lower() for p in parts if p)
    return words


def name_modalities(text: str) -> set[str]:
    """Canonical modalities named in ``text`` (a node or model-card name); an MR sequence
    makes a bare ``MR`` redundant, so ``"MR T2"`` gives ``{"T2"}``."""
    found = {_NAME_MODALITIES[w] for w in _words(text) if w in _NAME_MODALITIES}
    if found & MR_SEQUENCES:
        found.discard("MR")
    return found


def _compatible(a: str, b: str) -> bool:
    """Same modality, or a bare ``MR`` against any MR sequence."""
    return a == b or (a == "MR" and b in MR_SEQUENCES) or (b == "MR" and a in MR_SEQUENCES)


def _spatial_axes(shape: Sequence[int]) -> int:
    """Number of axes with more than one voxel."""
    return sum(1 for n in shape if int(n) > 1)


def checkpoint_warnings(card: Mapping[str, Any], volume_shape: Sequence[int], volume_name: str,
                        volume_modality: Optional[str] = None) -> list[str]:
    """Why a checkpoint may not fit a volume; an empty list when nothing is suspicious.

    Args:
        card: the model card (``SourceCheckpoint.describe()``): ``dims``, ``modality``,
            ``input_spec.image_channels``.
        volume_shape: the volume's voxel grid ``(z, y, x)`` (a 2D image has one slice).
        volume_name: the node name, searched for modality words (``CT``, ``T1c``, ``FLAIR``...).
        volume_modality: the DICOM modality code of the series (``MR``, ``CT``...) when known.

    Returns:
        Readable warnings: a 3D (or 2.5D) model on a 2D image, an RGB model on a grey volume,
        a modality named in the volume's name or DICOM tags that differs from the model's.
    """
    warnings: list[str] = []
    dims = str(card.get("dims", ""))
    shape = tuple(int(n) for n in volume_shape)
    flat = _spatial_axes(shape) < 3
    if dims == "3d" and flat:
        warnings.append(
            f"The model is 3D but '{volume_name}' is a 2D image (grid {shape}). Pick a 3D scan, "
            "or a checkpoint trained for 2D images (sfuda train-source --dims 2d).")
    elif dims == "2.5d" and flat:
        warnings.append(
            f"The model is 2.5D (it reads neighbouring slices) but '{volume_name}' has a single "
            "slice, so the neighbours are copies of it and accuracy drops. Prefer a 2D checkpoint.")
    channels = int(card.get("input_spec", {}).get("image_channels", 1))
    if channels != 1:
        warnings.append(
            f"The model expects {channels}-channel (colour) images but '{volume_name}' is a grey "
            "scalar volume. Use a checkpoint trained on grey images.")

    model = name_modalities(str(card.get("modality", "")))
    image = name_modalities(volume_name)
    if volume_modality:
        code = _DICOM_MODALITIES.get(str(volume_modality).strip().upper())
        if code and not any(_compatible(code, m) for m in image):
            image.add(code)
    if model and image and not any(_compatible(a, b) for a in model for b in image):
        warnings.append(
            f"The model was trained on {card.get('modality')} images but '{volume_name}' looks "
            f"like {', '.join(sorted(image))}. HEAL and GMM adapt to such a shift; without "
            "adaptation expect a poor result. Check that this is the scan you meant.")
    return warnings


def methods_available(card: Optional[Mapping[str, Any]]) -> tuple[str, ...]:
    """The methods the checkpoint supports (all of :data:`METHODS` when no card is known)."""
    if not card:
        return METHODS
    return tuple(m for m in METHODS if m in card.get("methods", ()))


def method_unavailable_reason(card: Optional[Mapping[str, Any]], method: str,
                              heal_stages: str = "hd") -> Optional[str]:
    """Why ``method`` (with HEAL's ``heal_stages``) cannot run with this checkpoint, or None when
    it can. HEAL's denoising needs only the source model; its diffusion stages need the
    checkpoint's diffusion model."""
    if method == "heal" and card and heal_stages not in card.get("heal_stages", ("hd",)):
        return ("This checkpoint has no diffusion model, which HEAL's diffusion stages need. Choose the "
                "stages 'denoising only', or a checkpoint trained with `sfuda train-source --diffusion`.")
    if method in methods_available(card):
        return None
    if method == "gmm":
        return ("This checkpoint has no class prototypes, which GMM-adapted inference needs. "
                "Choose another method, or a checkpoint trained with prototypes.")
    return f"This checkpoint does not support method '{method}'."


# ----------------------------------------------------------------------------- texts


def _color_hex(color: Sequence[float]) -> str:
    r, g, b = (min(255, max(0, int(round(float(c) * 255)))) for c in list(color)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _label_class(entry: Mapping[str, Any]) -> LabelClass:
    """A model card's class entry (``{"value", "name", "color"}``) as a :class:`LabelClass`."""
    return LabelClass(int(entry["value"]), str(entry["name"]), tuple(entry.get("color", (1, 0, 0))))


def card_classes(card: Optional[Mapping[str, Any]]) -> list[LabelClass]:
    """The classes of a model card."""
    return [_label_class(c) for c in (card or {}).get("classes", [])]


def format_model_card(card: Mapping[str, Any]) -> str:
    """The model card as short rich text for a label: classes with their colours, modality,
    dims, networks, what the file contains, the methods, the classes' standard terminology
    (and card entries that could not be used) and the training provenance."""
    esc = html.escape
    classes = ", ".join(
        f'<span style="color:{_color_hex(c.get("color", (1, 0, 0)))}">&#9632;</span> '
        f'{int(c["value"])}&nbsp;{esc(str(c["name"]))}' for c in card.get("classes", []))
    lines = [f"<b>Classes:</b> {classes or 'none'}",
             f"<b>Modality:</b> {esc(str(card.get('modality', '?')))} &nbsp; "
             f"<b>Dims:</b> {esc(str(card.get('dims', '?')).upper())}"]
    seg = card.get("segmentation_network") or {}
    if seg:
        channels = ",".join(str(c) for c in seg.get("channels", []))
        lines.append(f"<b>Segmentation network:</b> {seg.get('spatial_dims', '?')}D U-Net "
                     f"({channels}), {int(seg.get('parameters', 0)):,} parameters")
    diffusion = card.get("diffusion_model")
    lines.append("<b>Diffusion model:</b> " + (
        "none (HEAL denoising only; its diffusion stages unavailable)" if not diffusion else
        f"{int(diffusion.get('parameters', 0)):,} parameters, "
        f"T = {diffusion.get('schedule', {}).get('timesteps', '?')}"))
    lines.append("<b>Class prototypes:</b> " + ("none (GMM unavailable)" if not card.get("prototypes")
                                                 else "yes"))
    lines.append("<b>Methods:</b> " + ", ".join(
        METHOD_LABELS.get(m, m) for m in card.get("methods", [])))
    known = class_terminology(card_classes(card), card)
    _, problems = card_terminology(card)
    if known:
        lines.append("<b>Terminology:</b> " + ", ".join(
            "{0} = {3} ({1} {2})".format(esc(name), *(esc(code) for code in type_code(entry)))
            for name, entry in known.items()))
    lines.extend(f'<span style="color:#d35400">{esc(p)}</span>' for p in problems)
    provenance = card.get("provenance") or {}
    if provenance.get("data"):
        trained = f"<b>Trained on:</b> {esc(str(provenance['data']))}"
        dice = provenance.get("validation_mean_dice")
        if isinstance(dice, (int, float)) and math.isfinite(dice):
            trained += f"; validation mean Dice {dice:.3f}"
        lines.append(trained)
    return "<br>".join(lines)


def devices_text(answer: Optional[Answer]) -> str:
    """The answer of ``sfuda devices --json`` (a :class:`child_queries.Answer`) as panel text."""
    if answer is None:
        return "Looking for GPUs..."
    if not answer.ok:
        return f"Could not list the compute devices: {html.escape(str(answer.error))}"
    inventory = answer.value
    gpus = inventory.get("gpus") or []
    if not gpus:
        build = "CPU-only build" if not inventory.get("cuda_build") else \
            f"CUDA {inventory.get('cuda_build')} build, no usable GPU"
        return (f"No CUDA GPU found (PyTorch {html.escape(str(inventory.get('torch')))}, {build}): "
                "the methods run on the CPU (slower).")
    return "<br>".join(
        f"{html.escape(str(g['device']))}: {html.escape(str(g['name']))}, "
        f"{float(g['free_mib']) / 1024:.1f} GiB free of {float(g['total_mib']) / 1024:.1f} GiB"
        for g in gpus)


def overlay_legend_text(choice: str, low: float, high: float, color_table: str,
                        hidden_below: Optional[float] = None, recommended: Optional[str] = None) -> str:
    """The colour legend of an overlay map: what it shows (for ``"recommended"``, the map the
    result named), what the colours mean, and below which value it is transparent."""
    if choice == "candidate":
        return ("Selected HEAL candidate (source-style image rendered from the denoised labels; "
                "slices without denoised labels are not rendered and stay blank); "
                "browse the others with the slider below.")
    what = overlay_title(choice, recommended) or choice
    text = (f"{what}, colour table {color_table}: dark = {low:.3g} (confident) to "
            f"bright = {high:.3g} (uncertain).")
    if hidden_below is not None and hidden_below > low:
        text += f" Transparent below {hidden_below:.3g}, where the model is confident."
    return text


# ----------------------------------------------------------------------------- result notes


def result_notes(report: Mapping[str, Any],
                 reliability: Optional[Mapping[str, Any]] = None) -> list[tuple[str, str]]:
    """What a reader of a result should be told beside the images, from its ``report.json``
    entries: the method's warnings and the uncertainty map's (a map known to mislead), how far
    the recommended map is to be trusted, whether GMM's guard kept the source segmentation, and
    what HEAL's denoising removed and kept per class (with the reminder that it cannot add
    structure).

    Args:
        report: the result's report entries (``Result.extra`` as read back by ``read_result``).
        reliability: the result's reliability statement (``Result.reliability``).

    Returns:
        ``(kind, text)`` pairs, ``kind`` ``"warning"`` or ``"info"``, warnings first.
    """
    reliability = reliability or {}
    notes = [("warning", str(w)) for w in [*(report.get("warnings") or []), *(reliability.get("warnings") or [])]]
    if reliability.get("text"):
        notes.append(("info", str(reliability["text"])))
    guard = report.get("guard")
    if guard and not guard.get("fired"):
        notes.append(("info", f"GMM changed the foreground to Dice {guard['signals']['foreground_agreement']:.2f} "
                              "agreement with the source model's; the guard kept the adapted segmentation."))
    denoising = report.get("denoising")
    if denoising:
        parts = []
        for entry in denoising.get("classes", []):
            parts.append(f"{entry['name']} {entry['kept_ml']:.1f} of {entry['source_ml']:.1f} ml kept")
        mode = DENOISE_LABELS.get(denoising.get("mode"), denoising.get("mode"))
        notes.append(("info", f"Denoising ({mode}): " + "; ".join(parts) + "."))
        missing = denoising.get("classes_without_markers") or []
        if missing:
            notes.append(("info", "No confident voxel of " + ", ".join(missing) + ": kept as the source model "
                                  "found it (" + denoising.get("orphan_rule", "keep") + " rule)."))
        notes.append(("info", str(denoising.get("note", ""))))
    return [(kind, text) for kind, text in notes if text]
