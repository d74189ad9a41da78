"""Is a file that was just written complete? Checked before an output is committed.

Writers do not always say when a write came up short: SimpleITK's NIfTI writer prints an error
and leaves a truncated file when the disk is full, and a delayed write can fail only when the
data reaches the disk. So every staged file is read back and checked for its kind, recognised
by its first bytes (not its name, which the user chooses):

- NIfTI (plain or gzip): the header read back by SimpleITK, and the bytes it declares present
  (a plain file's size; a gzip file's trailer, which records the uncompressed length);
- NRRD with attached data (raw or gzip): the same, from its text header;
- gzip of anything else: decompressed to its end (which checks the length and CRC-32);
- PNG: signature and the closing ``IEND`` chunk;
- zip (a ``*.sfuda`` checkpoint written by ``torch.save``): the central directory and every
  member's CRC-32;
- JSON (``.json``): parsed;
- anything else: not empty, and its header read back by SimpleITK when its name is an image's.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data.io import image_extension, parse_nifti_header
from ..errors import OutputError

_GZIP_MAGIC = b"\x1f\x8b"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t",
                     "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
                     "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long",
                     "signed long long int", "int64", "int64_t", "ulonglong", "unsigned long long",
                     "unsigned long long int", "uint64", "uint64_t", "double"), 8),
}


def verify_file(path: Path) -> None:
    """Raise :class:`OutputError` when the file at ``path`` is not complete.

    Raises:
        OutputError: naming the file and what is missing (the usual cause: a full disk).
    """
    size = path.stat().st_size
    if size == 0:
        _incomplete(path, "it is empty")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(_GZIP_MAGIC):
        _verify_gzip(path, size)
    elif head.startswith(b"NRRD"):
        _verify_nrrd(path, size)
    elif head.startswith(_PNG_SIGNATURE):
        _verify_png(path, size)
    elif head.startswith(b"PK\x03\x04"):
        _verify_zip(path)
    elif path.suffix.lower() == ".json":
        try:
            json.loads(path.read_bytes())
        except ValueError as error:
            _incomplete(path, f"it is not valid JSON ({error})")
    else:
        with open(path, "rb") as handle:
            header = parse_nifti_header(handle.read(540))
        if header is not None or image_extension(path):
            _verify_image_header(path)
        if header is not None:
            _expect_length(path, header.voxel_offset + header.voxel_bytes, size)


def _incomplete(path: Path, reason: str) -> None:
    raise OutputError(f"Writing '{path.name}' failed: {reason}. The disk is probably full or was "
                      "disconnected; free space or choose another output location and run again. "
                      "Nothing was written.")


def _expect_length(path: Path, expected: int, actual: int) -> None:
    if actual < expected:
        _incomplete(path, f"it holds {actual} of the {expected} bytes its header declares")


def _verify_image_header(path: Path) -> None:
    """SimpleITK must be able to read the header back."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        _incomplete(path, f"its header cannot be read back ({str(error).strip().splitlines()[-1]})")


def _gzip_length(path: Path, size: int) -> int:
    """The uncompressed length (mod 2**32) recorded in the gzip trailer."""
    if size < 18:
        _incomplete(path, "its gzip stream is cut short")
    with open(path, "rb") as handle:
        handle.seek(size - 4)
        return struct.unpack("<I", handle.read(4))[0]


def _verify_gzip(path: Path, size: int) -> None:
    try:
        with gzip.open(path, "rb") as handle:
            start = handle.read(540)
    except (EOFError, OSError, zlib.error) as error:
        _incomplete(path, f"its gzip stream is cut short or corrupt ({type(error).__name__})")
    header = parse_nifti_header(start)
    if header is None:
        _read_to_end(path)
        return
    _verify_image_header(path)
    expected = header.voxel_offset + header.voxel_bytes
    recorded = _gzip_length(path, size)
    if recorded != expected % 2 ** 32:
        _incomplete(path, f"its compressed data ends early (the gzip trailer records {recorded} "
                          f"bytes, the header declares {expected})")


def _read_to_end(path: Path) -> None:
    """Decompress a whole gzip file; gzip checks the CRC-32 and length at the end."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (EOFError, OSError, zlib.error) as error:
        _incomplete(path, f"its gzip stream is cut short or corrupt ({type(error).__name__})")


def _verify_nrrd(path: Path, size: int) -> None:
    with open(path, "rb") as handle:
        text = handle.read(64 * 1024)
    end = text.find(b"\n\n")
    if end < 0:
        _incomplete(path, "its NRRD header is cut short")
    fields: dict[str, str] = {}
    for line in text[:end].decode("latin-1").splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    _verify_image_header(path)
    if "data file" in fields or "datafile" in fields:
        return
    data_bytes = int(np.prod([int(v) for v in fields.get("sizes", "0").split()]))
    data_bytes *= _NRRD_TYPE_BYTES.get(fields.get("type", "").lower(), 1)
    data_start = end + 2
    if fields.get("encoding", "raw").lower() in ("gzip", "gz"):
        with open(path, "rb") as handle:
            handle.seek(data_start)
            if handle.read(2) != _GZIP_MAGIC:
                _incomplete(path, "its gzip data is missing")
        recorded = _gzip_length(path, size)
        if recorded != data_bytes % 2 ** 32:
            _incomplete(path, f"its compressed data ends early (the gzip trailer records {recorded} "
                              f"bytes, the header declares {data_bytes})")
    else:
        _expect_length(path, data_start + data_bytes, size)


def _verify_png(path: Path, size: int) -> None:
    with open(path, "rb") as handle:
        handle.seek(max(0, size - len(_PNG_END)))
        if handle.read() != _PNG_END:
            _incomplete(path, "the PNG ends before its closing IEND chunk")


def _verify_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        _incomplete(path, f"its zip archive is cut short ({error})")
    if bad is not None:
        _incomplete(path, f"its member '{bad}' is damaged")


def sync_file(path: Path) -> None:
    """Flush a written file to the disk (a late write error surfaces here, as ``OSError``)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
