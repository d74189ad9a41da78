"""Image geometry and the array convention of the whole library.

Convention: a 3D image is a numpy array indexed ``(z, y, x)`` (SimpleITK's
``GetArrayFromImage`` order). A 2D image is ``(y, x)``, an RGB 2D image ``(y, x, 3)``.
``spacing`` is given **per array axis** in millimetres, i.e. ``(sz, sy, sx)`` for 3D, so that
``spacing[i]`` belongs to ``array.shape[i]``. ``origin`` and ``direction`` are kept exactly as
SimpleITK/ITK stores them (physical LPS, x-first; ``direction`` row-major, length 4 or 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Geometry:
    """Physical placement of an image grid.

    Attributes:
        spacing: mm per array axis, ``(sz, sy, sx)`` in 3D, ``(sy, sx)`` in 2D.
        origin: ITK origin, ``(x, y, z)`` (3D) or ``(x, y)`` (2D), in mm, LPS.
        direction: ITK direction cosine matrix, row-major, 9 (3D) or 4 (2D) values.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        ndim = len(self.spacing)
        if not self.origin:
            object.__setattr__(self, "origin", (0.0,) * ndim)
        if not self.direction:
            object.__setattr__(self, "direction", tuple(np.eye(ndim).ravel().tolist()))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.spacing)

    def voxel_volume_mm3(self) -> float:
        """Volume (3D) or area (2D) of one voxel in mm^3 / mm^2."""
        return float(np.prod(self.spacing))

    def matches(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """True when spacing, origin and direction agree within ``tol``."""
        return (
            self.ndim == other.ndim
            and np.allclose(self.spacing, other.spacing, atol=tol, rtol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10, rtol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    def index_to_lps(self, index: Sequence[float]) -> tuple[float, ...]:
        """Physical point (mm, LPS, x-first) of a continuous array index.

        ``p = origin + direction @ diag(spacing_xyz) @ index_xyz`` with the array index given
        in array order (``(z, y, x)`` in 3D, ``(y, x)`` in 2D): ITK's
        ``TransformContinuousIndexToPhysicalPoint``.

        Returns:
            ``(x, y, z)`` in 3D, ``(x, y)`` in 2D.
        """
        if len(index) != self.ndim:
            raise InputError(f"The index {tuple(index)} has {len(index)} values; a {self.ndim}D image needs "
                             f"{self.ndim} (array order, z first).")
        xyz = np.asarray(index, dtype=float)[::-1] * np.asarray(self.spacing, dtype=float)[::-1]
        direction = np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)
        return tuple(float(v) for v in np.asarray(self.origin, dtype=float) + direction @ xyz)


def lps_to_ras(point: Sequence[float]) -> tuple[float, ...]:
    """An LPS point as RAS (Slicer's convention): x and y change sign (2 or 3 values)."""
    return tuple(-float(v) if axis < 2 else float(v) for axis, v in enumerate(point))


@dataclass
class Volume:
    """An image or label array with its geometry.

    Attributes:
        array: ``(z, y, x)`` 3D, ``(y, x)`` 2D, or ``(y, x, 3)`` RGB 2D.
        geometry: where the array sits in physical space.
    """

    array: np.ndarray
    geometry: Geometry = field(default_factory=lambda: Geometry((1.0, 1.0, 1.0)))

    @property
    def spacing(self) -> tuple[float, ...]:
        """Spacing per array axis (mm)."""
        return self.geometry.spacing

    @property
    def is_rgb(self) -> bool:
        """True for a 2D colour image ``(y, x, 3)``."""
        return self.geometry.ndim == 2 and self.array.ndim == 3

    def like(self, array: np.ndarray) -> "Volume":
        """A new volume with ``array`` on this volume's geometry (array is not copied)."""
        return replace(self, array=array)
