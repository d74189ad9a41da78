"""Exceptions raised by SFUDASegmentLib.

Every message names the problem *and* the fix, so that the Slicer panel, the CLI and a
console user can show it as is.
"""


class SFUDAError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(SFUDAError, ValueError):
    """An image, label map or parameter that the method cannot use (shape, NaN, geometry...)."""


class CheckpointError(SFUDAError):
    """A `*.sfuda` file that is missing, corrupt, hostile, of another version or mismatched."""


class DeviceError(SFUDAError, RuntimeError):
    """The requested compute device is not available, or ran out of memory."""


class OperationCancelled(SFUDAError):
    """The user cancelled a running operation; nothing was written."""


class OutputError(SFUDAError):
    """An output that must not or cannot be written: it would overwrite an input, exists
    without ``overwrite``, or its folder is read-only or full. Nothing was written."""
