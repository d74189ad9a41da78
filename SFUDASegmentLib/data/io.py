"""Reading, writing and checking images and label maps (SimpleITK for every format).

Arrays follow the library convention of ``geometry.py``: a 3D image is ``(z, y, x)`` with
``spacing`` per array axis (ITK's ``GetSpacing()`` reversed), a 2D image ``(y, x)``, a 2D colour
image ``(y, x, 3)`` (RGB). ``origin`` and ``direction`` are kept exactly as ITK stores them.

Supported formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``, including a
single-layer ``.seg.nrrd``), MetaImage (``.mha``, ``.mhd``), TIFF (``.tif``, ``.tiff``) and the 2D
formats PNG, JPEG (``.jpg``, ``.jpeg``) and BMP.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .geometry import Geometry, Volume

PathLike = Union[str, Path]

#: extension (lower case, with the dot) -> format name shown in messages
FORMATS: dict[str, str] = {
    ".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD (detached header)",
    ".mha": "MetaImage", ".mhd": "MetaImage (detached header)", ".tif": "TIFF",
    ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
}
#: formats that hold only 2D images
FORMATS_2D_ONLY = (".png", ".jpg", ".jpeg", ".bmp")
#: lossy formats: label masks read from them are thresholded by default
LOSSY_FORMATS = (".jpg", ".jpeg")
#: threshold applied to JPEG masks by :func:`read_label` (values > 127 become 1)
JPEG_MASK_THRESHOLD = 127
#: ITU-R BT.601 luma weights for R, G, B
LUMA_601 = (0.299, 0.587, 0.114)

_SUPPORTED_TEXT = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr, .seg.nrrd), MetaImage (.mha, .mhd), "
                   "TIFF (.tif, .tiff), PNG, JPEG (.jpg, .jpeg), BMP")
_INT_TYPES_2D = {".png": (np.uint8, np.uint16), ".jpg": (np.uint8,), ".jpeg": (np.uint8,),
                 ".bmp": (np.uint8,)}


class ImageNotFoundError(InputError, FileNotFoundError):
    """The image or label file does not exist (an :class:`InputError` and a ``FileNotFoundError``)."""


def image_extension(path: PathLike) -> str:
    """The format extension of ``path`` in lower case (``.nii.gz`` for ``x.nii.gz``), or ``""``."""
    name = Path(path).name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return ""


def _require_supported(path: Path, action: str) -> str:
    ext = image_extension(path)
    if not ext:
        raise InputError(
            f"Cannot {action} '{path}': the file extension is not a supported image format. "
            f"Use one of: {_SUPPORTED_TEXT}.")
    return ext


# --------------------------------------------------------------------------- conversion


def to_sitk(volume: Volume) -> sitk.Image:
    """Convert a :class:`Volume` to a ``SimpleITK.Image`` carrying exactly its geometry.

    Args:
        volume: ``(z, y, x)``, ``(y, x)`` or RGB ``(y, x, 3)`` array with a matching geometry
            (3 spacings for 3D, 2 for 2D). ``bool`` becomes ``uint8`` and ``float16`` becomes
            ``float32`` (SimpleITK has neither); the volume itself is not changed.

    Raises:
        InputError: the array's dimensions do not fit the geometry.
    """
    array = np.asarray(volume.array)
    geom = volume.geometry
    _spatial_shape(array, geom)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    is_vector = array.ndim == geom.ndim + 1
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
    image.SetSpacing(tuple(reversed(geom.spacing)))
    image.SetOrigin(geom.origin)
    image.SetDirection(geom.direction)
    return image


def from_sitk(image: sitk.Image, source: str = "image") -> Volume:
    """Convert a ``SimpleITK.Image`` to a :class:`Volume` (array copied, geometry exact).

    2D images with 3 (RGB) or 4 (RGBA, alpha dropped) components become ``(y, x, 3)``; a 2D
    grey+alpha image becomes ``(y, x)`` (alpha dropped). 3D images must be scalar.

    Args:
        image: a 2D or 3D SimpleITK image.
        source: what to call the image in error messages (e.g. its file path).

    Raises:
        InputError: 1D, 4D or higher, or a multi-component 3D image.
    """
    dim = image.GetDimension()
    comps = image.GetNumberOfComponentsPerPixel()
    _check_dimensions(dim, comps, tuple(image.GetSize()), source)
    array = sitk.GetArrayFromImage(image)
    if dim == 2 and comps in (3, 4):
        array = array[..., :3]
    elif dim == 2 and comps == 2:
        array = array[..., 0]
    geometry = Geometry(spacing=tuple(reversed(image.GetSpacing())), origin=image.GetOrigin(),
                        direction=image.GetDirection())
    return Volume(np.ascontiguousarray(array), geometry)


def _check_dimensions(dim: int, comps: int, size_xyz: tuple[int, ...], source: str) -> None:
    """Reject anything but a 3D scalar volume or a 2D grey / colour image."""
    shape = tuple(reversed(size_xyz))
    expected = ("A single 3D scalar volume (z, y, x) or a 2D image (grey or RGB) is expected")
    if dim == 1:
        raise InputError(f"{source} is a 1D signal of {size_xyz[0]} samples. {expected}.")
    if dim > 3:
        raise InputError(
            f"{source} is a {dim}D image of shape {shape} (array order, e.g. time/channel first). "
            f"{expected}: select one channel/time point first (e.g. in 3D Slicer with the "
            "Sequences module, or save one volume of the series).")
    if dim == 3 and comps > 1:
        raise InputError(
            f"{source} is a 3D vector image with {comps} components per voxel, shape "
            f"{shape + (comps,)}. {expected}: select one channel/component first (e.g. "
            "Vector to Scalar Volume in 3D Slicer).")
    if dim == 2 and comps not in (1, 2, 3, 4):
        raise InputError(f"{source} is a 2D image with {comps} components per pixel. {expected}: "
                         "save it as grey or RGB.")


def _spatial_shape(array: np.ndarray, geom: Geometry) -> tuple[int, ...]:
    """Spatial shape of ``array`` under ``geom`` (drops the RGB axis), checking the pairing."""
    if array.ndim == geom.ndim:
        return tuple(array.shape)
    if geom.ndim == 2 and array.ndim == 3 and array.shape[-1] == 3:
        return tuple(array.shape[:2])
    raise InputError(
        f"An array of shape {array.shape} does not fit a {geom.ndim}D geometry "
        f"(spacing {geom.spacing}). Use (z, y, x) with 3 spacings, (y, x) or RGB (y, x, 3) "
        "with 2 spacings.")


# --------------------------------------------------------------------------- reading


def read_image(path: PathLike, as_gray: bool = False, *, kind: str = "image") -> Volume:
    """Read a 3D scalar volume or a 2D image.

    Args:
        path: a file in one of :data:`FORMATS` (``.seg.nrrd`` with one layer reads as plain NRRD).
        as_gray: convert a 2D colour image to grey with the ITU-R BT.601 luma
            ``0.299 R + 0.587 G + 0.114 B`` (result ``float32``, ``(y, x)``); grey images are
            returned unchanged.
        kind: what the file is, in messages (``"image"``, ``"label"``): a missing label file is
            reported as a missing label file.

    Returns:
        A :class:`Volume`: ``(z, y, x)`` for 3D, ``(y, x)`` for grey 2D, and ``(y, x, 3)`` RGB for
        a colour 2D image unless ``as_gray`` (RGBA loses its alpha; a BMP whose three channels
        are equal, as ITK expands grey palettes, is grey). The pixel type is kept. Spacing is per
        array axis; origin and direction are ITK's.

    Raises:
        ImageNotFoundError: the file does not exist.
        InputError: unsupported extension, unreadable, corrupt or truncated file, 1D, 4D, or a
            3D vector image.
    """
    path = Path(path)
    if not path.is_file():
        where = "a folder, not a file" if path.is_dir() else "not found"
        raise ImageNotFoundError(f"{kind.capitalize()} file '{path}' is {where}. Check the path and "
                                 "that the file was copied completely.")
    ext = _require_supported(path, "read")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, ext, exc) from None
    _check_dimensions(reader.GetDimension(), reader.GetNumberOfComponents(),
                      tuple(reader.GetSize()), f"'{path}'")
    if ext in (".nii", ".nii.gz"):
        _check_nifti_voxels(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(path, ext, exc) from None
    volume = from_sitk(image, f"'{path}'")
    if ext == ".bmp" and volume.is_rgb and _channels_equal(volume.array):
        volume = volume.like(np.ascontiguousarray(volume.array[..., 0]))  # ITK expands BMP palettes
    if as_gray and volume.is_rgb:
        volume = volume.like(rgb_to_gray(volume.array))
    return volume


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _check_nifti_voxels(path: Path) -> None:
    """Raise when a NIfTI file is cut short or holds NaN/Inf voxels.

    SimpleITK's NIfTI reader silently turns NaN and Inf into 0, and a truncated file surfaces as
    an ``EOFError`` of gzip or a short buffer, so the voxel data is checked in the file itself
    (NIfTI-1 and NIfTI-2 headers, either byte order, gzip or plain).

    Raises:
        InputError: naming the missing bytes or the NaN/Inf count, and the fix.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(
            f"'{path}' is truncated or corrupt: its compressed data ends early ({type(exc).__name__}). "
            "The copy or download was interrupted, or the disk was full when it was written; copy "
            "or export the file again.") from None
    header = parse_nifti_header(data)
    if header is None:
        return
    expected = header.voxel_offset + header.voxel_bytes
    if len(data) < expected:
        raise InputError(
            f"'{path}' is truncated: its header declares {expected} bytes of header and voxels but "
            f"the file holds {len(data)}. The copy or download was interrupted, or the disk was full "
            "when it was written; copy or export the file again.")
    if header.float_type is None:
        return
    voxels = np.frombuffer(data, header.float_type, count=header.voxel_count, offset=header.voxel_offset)
    bad = int(np.count_nonzero(~np.isfinite(voxels)))
    if bad:
        raise InputError(
            f"'{path}' contains {bad} NaN/Inf voxel(s) (SimpleITK would silently read them as 0). "
            "Replace them with a finite value (e.g. the background intensity) and save the "
            "volume again, or mask them out before segmentation.")


@dataclass(frozen=True)
class NiftiHeader:
    """What a NIfTI-1/-2 header says about the voxel data that follows it.

    Attributes:
        voxel_offset: byte offset of the voxel data in the (uncompressed) file.
        voxel_count: product of the image dimensions.
        voxel_bytes: ``voxel_count`` times the bytes per voxel (``bitpix / 8``).
        float_type: numpy dtype string (``"<f4"``...) for float data, None otherwise.
    """

    voxel_offset: int
    voxel_count: int
    voxel_bytes: int
    float_type: Optional[str]


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def parse_nifti_header(data: bytes) -> Optional[NiftiHeader]:
    """Parse the start of an uncompressed NIfTI file; None when it is not a NIfTI header."""
    if len(data) < 348:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(data[:4], f"{order}i4")[0])
        if size == 348:
            datatype = int(np.frombuffer(data[70:72], f"{order}i2")[0])
            bitpix = int(np.frombuffer(data[72:74], f"{order}i2")[0])
            dims = np.frombuffer(data[40:56], f"{order}i2").astype(np.int64)
            offset = int(np.frombuffer(data[108:112], f"{order}f4")[0])
            break
        if size == 540 and len(data) >= 540:
            datatype = int(np.frombuffer(data[12:14], f"{order}i2")[0])
            bitpix = int(np.frombuffer(data[14:16], f"{order}i2")[0])
            dims = np.frombuffer(data[16:80], f"{order}i8")
            offset = int(np.frombuffer(data[168:176], f"{order}i8")[0])
            break
    else:
        return None
    rank = int(dims[0])
    if not 1 <= rank <= 7 or bitpix <= 0 or bitpix % 8 or offset < size:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1:rank + 1]]))
    float_type = f"{order}{_NIFTI_FLOAT_TYPES[datatype]}" if datatype in _NIFTI_FLOAT_TYPES else None
    return NiftiHeader(offset, count, count * bitpix // 8, float_type)


def _unreadable(path: Path, ext: str, exc: Exception) -> InputError:
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return InputError(
        f"Could not read '{path}' as {FORMATS[ext]}: the file is corrupt, truncated or not an "
        f"image ({reason}). Re-export it in one of the supported formats: {_SUPPORTED_TEXT}.")


def _channels_equal(rgb: np.ndarray) -> bool:
    """True when the R, G and B planes of ``(y, x, 3)`` are identical (a grey image)."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def with_model_channels(volume: Volume, channels: int) -> Volume:
    """``volume`` as a model with ``channels`` image channels reads it.

    A 2D RGB image whose three channels are equal (a grey picture saved as colour, common for
    PNG exports) becomes grey ``(y, x)`` for a grey model (``channels == 1``). Everything else
    is returned unchanged: real colour stays colour, so that a grey model still refuses it
    with a clear message instead of converting it silently.
    """
    if channels == 1 and volume.is_rgb and _channels_equal(volume.array):
        return volume.like(np.ascontiguousarray(volume.array[..., 0]))
    return volume


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB array ``(..., 3)`` -> ``float32`` ``(...)``."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return (rgb[..., 0] * LUMA_601[0] + rgb[..., 1] * LUMA_601[1]
            + rgb[..., 2] * LUMA_601[2]).astype(np.float32)


def read_label(path: PathLike, allowed_values: Optional[set[int]] = None,
               binary_threshold: Optional[float] = None) -> Volume:
    """Read an integer label map.

    JPEG masks are lossy (edges carry values like 3 or 250), so they are binarised:
    ``value > 127 -> 1`` else 0. Colour masks (e.g. Kvasir-SEG's RGB JPEGs) are converted to grey
    (BT.601 luma) before thresholding. Other formats are read as they are: every value must be
    within 1e-3 of an integer (float label files such as ``0.0/1.0`` masks are accepted) and is
    rounded.

    Args:
        path: label file.
        allowed_values: label values the caller expects; background 0 is always allowed.
        binary_threshold: ``None`` thresholds JPEG files at :data:`JPEG_MASK_THRESHOLD` and no
            other format; a number thresholds any format at that value (``> t -> 1``), e.g.
            ``0.5`` for a soft mask.

    Returns:
        A :class:`Volume` with an integer array (``uint8`` when values fit in 0-255, else
        ``int16``/``int32``), ``(z, y, x)`` or ``(y, x)``, on the file's geometry.

    Raises:
        InputError: non-integer or non-finite values, a colour label without thresholding, or
            values outside ``allowed_values``.
    """
    path = Path(path)
    volume = read_image(path, kind="label")
    threshold = binary_threshold
    if threshold is None and image_extension(path) in LOSSY_FORMATS:
        threshold = JPEG_MASK_THRESHOLD
    array = volume.array
    if volume.is_rgb:
        if threshold is not None:
            array = rgb_to_gray(array)
        elif _channels_equal(array):
            array = array[..., 0]
        else:
            raise InputError(
                f"Label file '{path}' is a colour image whose channels differ; a label map needs "
                "one integer value per pixel. Save it as a single-channel (grey) label map, or pass "
                "binary_threshold=127 to binarise its brightness.")
    if threshold is not None:
        labels = (array > threshold).astype(np.uint8)
    else:
        labels = _integer_labels(array, path)
    if allowed_values is not None:
        check_label_values(labels, allowed_values, str(path))
    return Volume(labels, volume.geometry)


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Round a label array to the smallest integer type, rejecting non-integer values."""
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise InputError(f"Label file '{path}' has {int(bad.sum())} NaN/Inf voxels. Re-export "
                             "the segmentation as a label map.")
        rounded = np.rint(array)
        off = np.abs(array - rounded) > 1e-3
        if off.any():
            example = float(array[off].flat[0])
            raise InputError(
                f"Label file '{path}' is not a label map: {int(off.sum())} voxels are not integers "
                f"(e.g. {example:g}). Pass a label map (integer values), or a probability/soft "
                "mask with binary_threshold set.")
        array = rounded
    if array.size == 0:
        raise InputError(f"Label file '{path}' is empty (shape {array.shape}).")
    lo, hi = float(array.min()), float(array.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return array.astype(dtype)
    raise InputError(f"Label file '{path}' has values in [{lo:g}, {hi:g}], outside the int32 range.")


def check_label_values(labels: np.ndarray, allowed_values: set[int], name: str = "label map") -> None:
    """Raise :class:`InputError` when ``labels`` holds values other than 0 and ``allowed_values``."""
    allowed = {0} | {int(v) for v in allowed_values}
    present = {int(v) for v in np.unique(labels)}
    unexpected = sorted(present - allowed)
    if unexpected:
        raise InputError(
            f"{name} contains unexpected label values {unexpected}; allowed values are "
            f"{sorted(allowed)} (0 = background). Map those labels to allowed values (e.g. with "
            "the Segment Editor) or choose the matching class list.")


# --------------------------------------------------------------------------- writing


def write_image(volume: Volume, path: PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` with exactly its geometry, atomically.

    The file is first written in a hidden temporary folder beside ``path`` and then moved into
    place with ``os.replace``: a failing write leaves no partial file and an existing file at
    ``path`` unchanged. Parent folders are created.

    Geometry: NIfTI, NRRD and MetaImage keep spacing, origin and direction (NIfTI as float32).
    The raster formats PNG, JPEG, BMP and TIFF keep the pixels only (PNG and TIFF also the
    spacing); use them for 2D pictures, not when the placement matters.

    2D formats: PNG holds ``uint8``/``uint16``, JPEG and BMP ``uint8``; ``bool`` and integer or
    integer-valued float arrays whose values fit are converted without loss (label maps stay
    their label values, e.g. 0/1). Other float images raise :class:`InputError`: scale them to
    0-255 and cast to ``uint8`` yourself, or write TIFF/NRRD/NIfTI, which keep floats. JPEG is
    lossy; do not store label maps in it.

    Args:
        volume: image or label map (``(z, y, x)``, ``(y, x)`` or RGB ``(y, x, 3)``).
        path: target file; its extension picks the format (see :data:`FORMATS`).
        compress: compress the pixel data where the format allows (``.nii.gz`` always is).

    Returns:
        The written path.

    Raises:
        InputError: unsupported extension, a 3D volume to a 2D-only format, a pixel type the
            format cannot hold, or a failed write (with the reason).
    """
    path = Path(path)
    ext = _require_supported(path, "write")
    array = np.asarray(volume.array)
    _spatial_shape(array, volume.geometry)
    if ext in FORMATS_2D_ONLY:
        array = _array_for_2d_format(array, volume.geometry, ext, path)
    image = to_sitk(Volume(array, volume.geometry))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        try:
            sitk.WriteImage(image, str(staging / path.name), compress)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"Could not write '{path}' as {FORMATS[ext]} ({reason}). Check that the folder is "
                "writable and has free space, and that the format can hold this pixel type "
                "(NRRD/NIfTI hold all).") from None
        written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)
        for item in written:  # data files of a detached header first, the named file last
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _array_for_2d_format(array: np.ndarray, geom: Geometry, ext: str, path: Path) -> np.ndarray:
    """Check / losslessly convert ``array`` for PNG, JPEG or BMP."""
    if geom.ndim != 2:
        raise InputError(
            f"Cannot write a 3D volume of shape {array.shape} to '{path}': {FORMATS[ext]} holds 2D "
            "images only. Use .nii.gz, .nrrd or .mha for volumes.")
    allowed = _INT_TYPES_2D[ext]
    if array.dtype in allowed:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.size and (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        finite = np.isfinite(array).all()
        integral = finite and np.array_equal(array, np.rint(array))
        for dtype in allowed:
            info = np.iinfo(dtype)
            if integral and array.min() >= info.min and array.max() <= info.max:
                return array.astype(dtype)
    names = "/".join(np.dtype(d).name for d in allowed)
    raise InputError(
        f"Cannot write {array.dtype} pixels to '{path}': {FORMATS[ext]} holds {names} only and the "
        "values are not integers in that range. Rescale to 0-255 and cast to uint8 first (e.g. "
        "np.clip((a - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)), or write .tif, .nrrd or "
        ".nii.gz to keep the values.")


# --------------------------------------------------------------------------- checks


def validate_image(volume: Volume, name: str = "image") -> None:
    """Check that ``volume`` is an image a method can use.

    Raises:
        InputError: wrong dimensions (not ``(z, y, x)``, ``(y, x)`` or RGB ``(y, x, 3)``), no
            voxels, a non-numeric type, NaN/Inf voxels (counted), a constant image, or a
            non-positive / non-finite spacing. The message says how to fix it.
    """
    array = np.asarray(volume.array)
    geom = volume.geometry
    if array.ndim not in (2, 3):
        raise InputError(
            f"The {name} has {array.ndim} dimensions (shape {array.shape}). A 3D scalar volume "
            "(z, y, x) or a 2D image (y, x) / RGB (y, x, 3) is expected: select one channel or "
            "time point first.")
    _spatial_shape(array, geom)
    if array.size == 0:
        raise InputError(f"The {name} is empty (shape {array.shape}); load a non-empty image.")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"The {name} has non-numeric pixels ({array.dtype}); convert it to a number type.")
    spacing = np.asarray(geom.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            f"The {name} has an invalid spacing {geom.spacing} (mm per axis must be positive). Fix "
            "the header (e.g. Volumes module > Volume Information in 3D Slicer) or re-export.")
    if np.issubdtype(array.dtype, np.floating):
        n_nan = int(np.isnan(array).sum())
        n_inf = int(np.isinf(array).sum())
        if n_nan or n_inf:
            raise InputError(
                f"The {name} has {n_nan} NaN and {n_inf} Inf voxels out of {array.size}. Replace "
                "them (e.g. np.nan_to_num(a, nan=0.0) or fill with the background value) before "
                "running the method.")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(
            f"The {name} is constant (every voxel is {lo}); it holds no structure to segment. "
            "Check that the right volume was selected and that it loaded completely.")


def check_same_geometry(image: Volume, label: Volume, tol: float = 1e-4, *,
                        image_name: str = "image", label_name: str = "label map") -> None:
    """Raise :class:`InputError` when ``label`` is not on ``image``'s voxel grid.

    Compares the spatial shape, spacing (relative and absolute ``tol``), origin (``10 * tol``
    mm) and direction (``tol``) and lists every difference with both values.
    """
    problems: list[str] = []
    shape_i = _spatial_shape(np.asarray(image.array), image.geometry)
    shape_l = _spatial_shape(np.asarray(label.array), label.geometry)
    gi, gl = image.geometry, label.geometry
    if shape_i != shape_l:
        problems.append(f"shape {shape_i} vs {shape_l}")
    if gi.ndim != gl.ndim:
        problems.append(f"dimensions {gi.ndim}D vs {gl.ndim}D")
    else:
        if not np.allclose(gi.spacing, gl.spacing, atol=tol, rtol=tol):
            problems.append(f"spacing {gi.spacing} vs {gl.spacing}")
        if not np.allclose(gi.origin, gl.origin, atol=10 * tol, rtol=tol):
            problems.append(f"origin {gi.origin} vs {gl.origin}")
        if not np.allclose(gi.direction, gl.direction, atol=tol):
            problems.append(f"direction {gi.direction} vs {gl.direction}")
    if problems:
        raise InputError(
            f"The {label_name} is not on the {image_name}'s voxel grid ({image_name} vs "
            f"{label_name}: " + "; ".join(problems) + "). Resample the label map onto the image: in "
            "3D Slicer use 'Resample Image (BRAINS)' or 'Resample Scalar/Vector/DWI Volume' with the "
            "image as reference and nearest-neighbour interpolation, or in Python "
            "SFUDASegmentLib.data.io.resample_onto(label, image, is_label=True).")


def resample_onto(moving: Volume, reference: Volume, is_label: bool = False) -> Volume:
    """Resample ``moving`` onto ``reference``'s grid in physical space (identity transform).

    Args:
        moving: the image or label map to resample.
        reference: supplies shape, spacing, origin and direction.
        is_label: nearest-neighbour (labels keep their values) instead of linear interpolation.

    Returns:
        A :class:`Volume` on the reference geometry with ``moving``'s pixel type; points outside
        ``moving`` get 0.
    """
    ref = to_sitk(reference)
    if ref.GetNumberOfComponentsPerPixel() > 1:
        ref = sitk.VectorIndexSelectionCast(ref, 0)
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    src = to_sitk(moving)
    out = sitk.Resample(src, ref, sitk.Transform(), interpolator, 0.0, src.GetPixelID())
    return from_sitk(out)
