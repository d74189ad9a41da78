"""Seeded two-modality phantoms with known labels, for tests, benchmarks and ``sfuda demo``.

Anatomy. A *body* (an ellipse in 2D, an ellipsoid in 3D, with random semi-axes, a slight random
rotation and a wavy boundary) lies on a dark background. Inside it are three labelled
structures of very different sizes, each a randomly rotated, randomly deformed star-shaped
blob or tube at a random position: label 1 *organ* (15-25 % of the body's voxels), label 2
*vessel* (a curved, tapering tube, 3-6 %) and label 3 *lesion* (a small blob, 0.3-0.9 %, that
sits inside the organ, on its rim or elsewhere in the body). Sizes are exact by construction:
each structure is the set of the k available voxels with the lowest value of its shape
function. Shapes are built in millimetres, so a 3D phantom with anisotropic spacing (default
``(2, 1, 1)`` mm per ``(z, y, x)``) shows the same anatomy as an isotropic one.

Contrasts. The *source* modality looks like a contrast-enhanced T1 scan: background 0, body
0.45, organ 0.75 (bright), vessel 0.25 (dark), lesion 1.0 (brightest, strongly enhancing),
with a mild multiplicative texture (4 %), a 0.4 mm blur and Gaussian noise (sigma 0.02); it
has no bias field. The *target* modality renders the same anatomy with a real domain gap: body
0.55, organ 0.30 (now *darker* than the body), vessel 0.85 (now *brighter* than the body) and
lesion 0.50 (moderately bright, only 0.20 above the organ instead of 0.25), a stronger texture
(12 %), a smooth multiplicative bias field (log-amplitude up to 0.25), a 1.0 mm blur and Rician
noise (sigma 0.06). ``gap`` in ``[0, 1]`` moves the target's tissue contrasts linearly from
the source's (``gap = 0``) to the full target ones (``gap = 1``); texture, bias, blur and
noise scale with it too. The anatomy and every random field depend only on the seed, so
changing ``gap`` changes the appearance of one and the same case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..config import LabelClass
from ..errors import InputError
from .geometry import Geometry, Volume

ORGAN, VESSEL, LESION = 1, 2, 3

PHANTOM_CLASSES: list[LabelClass] = [
    LabelClass(ORGAN, "organ", (0.86, 0.58, 0.42)),
    LabelClass(VESSEL, "vessel", (0.84, 0.16, 0.20)),
    LabelClass(LESION, "lesion", (0.98, 0.86, 0.15)),
]

MODALITIES = ("source", "target")

MIN_AXIS = 16
"""Smallest accepted size of every axis (voxels): below it the lesion has no room."""

DEFAULT_SPACING_2D = (1.0, 1.0)
DEFAULT_SPACING_3D = (2.0, 1.0, 1.0)
ORIGIN_OFFSET_XYZ = (12.5, -31.0, 47.0)
"""Added to the centred origin (ITK x-first order), so that the origin is not trivial."""

ORGAN_FRACTION = (0.15, 0.25)
VESSEL_FRACTION = (0.03, 0.06)
LESION_FRACTION = (0.003, 0.009)
TEXTURE_SCALE_MM = 1.5
_BODY_INDEX = 4  # row of TissueContrasts.lookup() used for body voxels without a label


@dataclass(frozen=True)
class TissueContrasts:
    """Mean intensity of each tissue in a rendered image (before texture, bias and noise)."""

    background: float
    body: float
    organ: float
    vessel: float
    lesion: float

    def lookup(self) -> np.ndarray:
        """Intensities indexed by tissue code: 0 background, 1-3 the labels, 4 the body.

        Returns:
            ``(5,)`` float64 array.
        """
        return np.array([self.background, self.organ, self.vessel, self.lesion, self.body])

    def blend(self, other: "TissueContrasts", t: float) -> "TissueContrasts":
        """Linear interpolation: ``self`` at ``t = 0``, ``other`` at ``t = 1``."""
        mix = (1.0 - t) * self.lookup() + t * other.lookup()
        return TissueContrasts(background=float(mix[0]), organ=float(mix[1]),
                               vessel=float(mix[2]), lesion=float(mix[3]), body=float(mix[4]))


SOURCE_CONTRASTS = TissueContrasts(background=0.0, body=0.45, organ=0.75, vessel=0.25, lesion=1.0)
TARGET_CONTRASTS = TissueContrasts(background=0.0, body=0.55, organ=0.30, vessel=0.85, lesion=0.50)


@dataclass(frozen=True)
class RenderSettings:
    """Everything that distinguishes one modality's appearance.

    Attributes:
        contrasts: tissue intensities.
        noise_sigma: standard deviation of the (Gaussian or Rician) noise.
        rician: True for magnitude (Rician) noise, False for additive Gaussian noise.
        blur_mm: sigma of the Gaussian blur, in mm.
        bias_log_amplitude: the bias field is ``exp(a * f)`` with ``f`` in ``[-1, 1]``.
        texture_amplitude: relative amplitude of the unit-variance smoothed-noise texture.
    """

    contrasts: TissueContrasts
    noise_sigma: float
    rician: bool
    blur_mm: float
    bias_log_amplitude: float
    texture_amplitude: float


def render_settings(modality: str, gap: float = 1.0) -> RenderSettings:
    """The appearance of ``modality`` (``"source"`` or ``"target"``) at domain gap ``gap``.

    The source ignores ``gap``. The target's contrasts are the source's blended towards
    :data:`TARGET_CONTRASTS` by ``gap``; its noise, blur, bias and texture grow with ``gap``.
    """
    gap = _check_gap(gap)
    if modality == "source":
        return RenderSettings(SOURCE_CONTRASTS, noise_sigma=0.02, rician=False, blur_mm=0.4,
                              bias_log_amplitude=0.0, texture_amplitude=0.04)
    if modality == "target":
        return RenderSettings(SOURCE_CONTRASTS.blend(TARGET_CONTRASTS, gap),
                              noise_sigma=0.02 + 0.04 * gap, rician=True,
                              blur_mm=0.4 + 0.6 * gap, bias_log_amplitude=0.25 * gap,
                              texture_amplitude=0.04 + 0.08 * gap)
    raise InputError(f"Unknown modality '{modality}'. Use one of {MODALITIES}.")


@dataclass
class Phantom:
    """One synthetic case: the same anatomy in two modalities, with its labels.

    Attributes:
        source: float32 image in the source modality, ``(z, y, x)`` or ``(y, x)``.
        target: float32 image in the target modality, same shape and geometry.
        labels: uint8 label map (0 background, values of ``classes``), same geometry.
        body: bool mask of the body, same shape.
        classes: the foreground classes (:data:`PHANTOM_CLASSES`).
        seed: the seed it was generated from.
        gap: the target's domain gap.
    """

    source: Volume
    target: Volume
    labels: Volume
    body: np.ndarray
    classes: list[LabelClass] = field(default_factory=lambda: list(PHANTOM_CLASSES))
    seed: int = 0
    gap: float = 1.0


# --------------------------------------------------------------------------- validation


def _check_gap(gap: float) -> float:
    try:
        value = float(gap)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise InputError(f"gap must be a number in [0, 1] (0 = no domain gap, 1 = full gap), "
                         f"got {gap!r}.")
    return value


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) not in (2, 3) or any(n < MIN_AXIS for n in dims):
        raise InputError(f"Phantom shape must be (y, x) or (z, y, x) with every axis at least "
                         f"{MIN_AXIS} voxels, got {shape!r}. Example: (48, 96, 96).")
    return dims


def _check_spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return DEFAULT_SPACING_3D if ndim == 3 else DEFAULT_SPACING_2D
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(s) and s > 0 for s in values):
        raise InputError(f"spacing must be {ndim} positive numbers (mm per array axis), got "
                         f"{spacing!r}.")
    return values


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


# --------------------------------------------------------------------------- geometry helpers


def _grid_coordinates(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Open-grid physical coordinates (mm) of voxel centres, relative to the grid centre.

    Returns:
        ``ndim`` arrays; array ``i`` has length ``shape[i]`` along axis ``i`` and 1 elsewhere.
    """
    coords = []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        view = [1] * len(shape)
        view[axis] = n
        coords.append(((np.arange(n) - (n - 1) / 2.0) * s).reshape(view))
    return coords


def _to_index(points: np.ndarray, shape: tuple[int, ...],
              spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxel of each physical point.

    Args:
        points: ``(m, ndim)`` coordinates in mm (grid-centred).

    Returns:
        ``(m, ndim)`` int indices (clipped into the grid) and a ``(m,)`` bool "was inside" mask.
    """
    n = np.asarray(shape, dtype=float)
    idx = np.rint(points / np.asarray(spacing) + (n - 1) / 2.0).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < n), axis=1)
    return np.clip(idx, 0, np.asarray(shape) - 1), inside


def _plane_rotation(ndim: int, axis_a: int, axis_b: int, angle: float) -> np.ndarray:
    rot = np.eye(ndim)
    c, s = np.cos(angle), np.sin(angle)
    rot[axis_a, axis_a], rot[axis_a, axis_b] = c, -s
    rot[axis_b, axis_a], rot[axis_b, axis_b] = s, c
    return rot


def _small_rotation(ndim: int, max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Product of rotations in every coordinate plane, each by at most ``max_degrees``."""
    rot = np.eye(ndim)
    for a in range(ndim):
        for b in range(a + 1, ndim):
            angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
            rot = rot @ _plane_rotation(ndim, a, b, angle)
    return rot


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix ``(ndim, ndim)``."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_unit(ndim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(ndim)
    return v / np.linalg.norm(v)


def _random_in_ball(ndim: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A point uniformly distributed in the ball of ``radius`` around the origin."""
    return _random_unit(ndim, rng) * radius * rng.uniform() ** (1.0 / ndim)


@dataclass(frozen=True)
class _StarShape:
    """A rotated ellipsoid whose radius is modulated by a smooth function of direction.

    ``value(p) = |q| / (1 + w(q / |q|))`` with ``q = R^T (p - center) / axes`` and
    ``w(d) = sum_k amp_k cos(freq_k <u_k, d> + phase_k)``. Every sublevel set is star-shaped
    around ``center`` (hence connected), the level 1 is the shape's boundary.
    """

    center: np.ndarray       # (ndim,) mm
    rotation: np.ndarray     # (ndim, ndim), columns are the shape's axes
    axes: np.ndarray         # (ndim,) semi-axes in mm
    directions: np.ndarray   # (k, ndim) unit vectors
    frequencies: np.ndarray  # (k,)
    phases: np.ndarray       # (k,)
    amplitudes: np.ndarray   # (k,), sum < 1

    def value(self, coords: Sequence[np.ndarray]) -> np.ndarray:
        """Shape function at ``coords`` (``ndim`` broadcastable arrays of mm coordinates)."""
        ndim = len(coords)
        shifted = [coords[i] - self.center[i] for i in range(ndim)]
        q = [sum(self.rotation[i, j] * shifted[i] for i in range(ndim)) / self.axes[j]
             for j in range(ndim)]
        radius = np.sqrt(sum(qj * qj for qj in q))
        safe = np.maximum(radius, 1e-12)
        modulation = np.zeros_like(radius)
        for u, f, ph, a in zip(self.directions, self.frequencies, self.phases, self.amplitudes):
            projection = sum(u[j] * q[j] for j in range(ndim)) / safe
            modulation += a * np.cos(f * projection + ph)
        return radius / (1.0 + modulation)

    def value_at(self, points: np.ndarray) -> np.ndarray:
        """Shape function at ``(m, ndim)`` points; returns ``(m,)``."""
        return self.value([points[:, i] for i in range(points.shape[1])])


def _random_star(rng: np.random.Generator, center: np.ndarray, rotation: np.ndarray,
                 axes: np.ndarray, terms: int, frequency: tuple[float, float],
                 amplitude: float) -> _StarShape:
    ndim = len(center)
    weights = rng.uniform(0.3, 1.0, terms)
    return _StarShape(
        center=np.asarray(center, dtype=float), rotation=rotation,
        axes=np.asarray(axes, dtype=float),
        directions=np.stack([_random_unit(ndim, rng) for _ in range(terms)]),
        frequencies=rng.uniform(*frequency, terms), phases=rng.uniform(0, 2 * np.pi, terms),
        amplitudes=amplitude * weights / weights.sum())


def _lowest(values: np.ndarray, available: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` available voxels with the lowest ``values`` (ties included)."""
    pool = values[available]
    count = int(min(max(count, 1), pool.size))
    threshold = np.partition(pool, count - 1)[count - 1]
    return available & (values <= threshold)


# --------------------------------------------------------------------------- anatomy


def _make_body(shape: tuple[int, ...], spacing: tuple[float, ...],
               rng: np.random.Generator) -> _StarShape:
    """A wavy, slightly rotated ellipse/ellipsoid that fits inside the grid."""
    ndim = len(shape)
    half = np.asarray(shape) * np.asarray(spacing) / 2.0
    rotation = _small_rotation(ndim, 12.0, rng)
    axes = half * rng.uniform(0.72, 0.86, ndim)
    center = half * rng.uniform(-0.04, 0.04, ndim)
    amplitude = 0.06
    extent = np.sqrt(((rotation * axes) ** 2).sum(axis=1)) * (1.0 + amplitude)
    axes = axes * min(1.0, float(np.min((0.94 * half - np.abs(center)) / extent)))
    return _random_star(rng, center, rotation, axes, terms=4, frequency=(3.0, 7.0),
                        amplitude=amplitude)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, count: int) -> np.ndarray:
    """``count`` points of the quadratic Bezier curve from p0 to p2 pulled towards p1.

    Returns:
        ``(count, ndim)`` points.
    """
    t = np.linspace(0.0, 1.0, count)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _vessel_centreline(body: _StarShape, organ_distance: np.ndarray, shape: tuple[int, ...],
                       spacing: tuple[float, ...], count: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A curved centreline inside the body that keeps clear of the organ.

    Returns:
        the three Bezier control points ``(3, ndim)`` (mm) and the estimated tube radius (mm).
    """
    ndim = len(shape)
    voxel = float(np.prod(spacing))
    aspect = rng.uniform(4.0, 7.0) if ndim == 2 else rng.uniform(5.0, 8.0)
    if ndim == 2:  # area = width * length, length = aspect * width
        radius = 0.5 * np.sqrt(count * voxel / aspect)
    else:          # volume = pi r^2 * length, length = 2 aspect r
        radius = (count * voxel / (2 * np.pi * aspect)) ** (1.0 / 3.0)
    length = min(2.0 * aspect * radius, 1.6 * float(np.mean(body.axes)))
    best, best_penalty = None, np.inf
    for _ in range(30):
        start = body.center + body.rotation @ (body.axes * _random_in_ball(ndim, 0.6, rng))
        direction = _random_unit(ndim, rng)
        side = _random_unit(ndim, rng)
        side -= side.dot(direction) * direction
        side /= max(np.linalg.norm(side), 1e-12)
        end = start + length * direction
        control = (start + end) / 2 + rng.uniform(-0.3, 0.3) * length * side
        points = _bezier(start, control, end, 32)
        idx, inside = _to_index(points, shape, spacing)
        clearance = organ_distance[tuple(idx.T)]
        penalty = int(np.sum(body.value_at(points) > 0.85) + np.sum(~inside)
                      + np.sum(clearance < 1.5 * radius))
        if penalty < best_penalty:
            best, best_penalty = np.stack([start, control, end]), penalty
        if penalty == 0:
            break
    return best, float(radius)


def _tube_function(controls: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...],
                   taper: float) -> np.ndarray:
    """Distance to the centreline divided by the relative radius there (tapering tube).

    Returns:
        float array of ``shape``; its sublevel sets are tubes narrowing from start to end.
    """
    length = float(np.sum(np.linalg.norm(np.diff(controls, axis=0), axis=1)))
    count = int(np.ceil(2.0 * length / min(spacing))) + 2
    points = _bezier(controls[0], controls[1], controls[2], count)
    idx, inside = _to_index(points, shape, spacing)
    position = np.linspace(0.0, 1.0, count)
    line = np.zeros(shape, dtype=bool)
    along = np.zeros(shape, dtype=float)
    line[tuple(idx[inside].T)] = True
    along[tuple(idx[inside].T)] = position[inside]
    distance, nearest = ndimage.distance_transform_edt(~line, sampling=spacing,
                                                       return_indices=True)
    return distance / (1.0 - taper * along[tuple(nearest)])


def _lesion_centre(organ: np.ndarray, organ_value: np.ndarray, organ_level: float,
                   elsewhere: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index ``(ndim,)`` of the lesion's centre: deep in the organ, on its rim, or elsewhere."""
    choices = (organ & (organ_value < 0.6 * organ_level),
               organ & (organ_value >= 0.85 * organ_level),
               elsewhere)
    first = int(rng.integers(len(choices)))
    for k in range(len(choices)):
        candidates = np.flatnonzero(choices[(first + k) % len(choices)])
        if candidates.size:
            return np.array(np.unravel_index(rng.choice(candidates), organ.shape))
    return np.array(np.unravel_index(rng.choice(np.flatnonzero(organ)), organ.shape))


def make_anatomy(shape: Sequence[int], spacing: Optional[Sequence[float]],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random body with an organ, a vessel and a lesion.

    Args:
        shape: ``(y, x)`` or ``(z, y, x)``, every axis at least :data:`MIN_AXIS`.
        spacing: mm per array axis; None takes :data:`DEFAULT_SPACING_2D` / ``_3D``.
        rng: the only source of randomness.

    Returns:
        ``labels`` (uint8, values 0-3, every label inside the body) and ``body`` (bool), both of
        ``shape``.
    """
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing, len(shape))
    ndim = len(shape)
    coords = _grid_coordinates(shape, spacing)

    body_shape = _make_body(shape, spacing, rng)
    body_value = body_shape.value(coords)
    body = body_value <= 1.0
    total = int(body.sum())
    n_lesion = max(3, int(round(rng.uniform(*LESION_FRACTION) * total)))
    n_vessel = max(3 * n_lesion, int(round(rng.uniform(*VESSEL_FRACTION) * total)))
    n_organ = max(3 * n_vessel, int(round(rng.uniform(*ORGAN_FRACTION) * total)))

    scale = float(np.mean(body_shape.axes))
    organ_centre = body_shape.center + body_shape.rotation @ (
        body_shape.axes * _random_in_ball(ndim, 0.35, rng))
    organ_axes = scale * rng.permutation(np.array([1.0, rng.uniform(0.55, 0.85),
                                                   rng.uniform(0.7, 1.0)])[:ndim])
    organ_shape = _random_star(rng, organ_centre, _random_rotation(ndim, rng), organ_axes,
                               terms=4, frequency=(1.5, 3.5), amplitude=0.18)
    organ_value = organ_shape.value(coords)
    organ = _lowest(organ_value, body, n_organ)
    organ_level = float(organ_value[organ].max())

    organ_distance = ndimage.distance_transform_edt(~organ, sampling=spacing)
    controls, radius = _vessel_centreline(body_shape, organ_distance, shape, spacing,
                                          n_vessel, rng)
    tube = _tube_function(controls, shape, spacing, taper=rng.uniform(0.0, 0.4))
    vessel = _lowest(tube, body & ~organ, n_vessel)

    elsewhere = body & ~organ & ~vessel & (body_value < 0.75)
    centre = _lesion_centre(organ, organ_value, organ_level, elsewhere, rng)
    centre_mm = np.array([coords[i].ravel()[centre[i]] for i in range(ndim)])
    lesion_axes = scale * 0.1 * rng.uniform(0.75, 1.0, ndim)
    lesion_shape = _random_star(rng, centre_mm, _random_rotation(ndim, rng), lesion_axes,
                                terms=3, frequency=(1.5, 3.0), amplitude=0.2)
    lesion = _lowest(lesion_shape.value(coords), body & ~vessel, n_lesion)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[organ] = ORGAN
    labels[vessel] = VESSEL
    labels[lesion] = LESION
    return labels, body


# --------------------------------------------------------------------------- rendering


def _smooth_noise(shape: tuple[int, ...], spacing: tuple[float, ...], scale_mm: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise with zero mean and unit standard deviation, ``shape``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape),
                                    sigma=[scale_mm / s for s in spacing])
    noise -= noise.mean()
    std = noise.std()
    return noise / std if std > 0 else noise


def _bias_field(shape: tuple[int, ...], spacing: tuple[float, ...],
                rng: np.random.Generator) -> np.ndarray:
    """Smooth field in ``[-1, 1]`` (max |value| = 1): a sum of four long plane waves.

    Wavelengths are 1-2.5 times the largest physical extent of the grid.
    """
    ndim = len(shape)
    coords = _grid_coordinates(shape, spacing)
    extent = float(np.max(np.asarray(shape) * np.asarray(spacing)))
    field_ = np.zeros(shape)
    for _ in range(4):
        direction = _random_unit(ndim, rng)
        wavelength = extent * rng.uniform(1.0, 2.5)
        phase = rng.uniform(0, 2 * np.pi)
        amplitude = rng.uniform(0.5, 1.0)
        projection = sum(direction[i] * coords[i] for i in range(ndim))
        field_ = field_ + amplitude * np.cos(2 * np.pi * projection / wavelength + phase)
    peak = np.abs(field_).max()
    return field_ / peak if peak > 0 else field_


def render(labels: np.ndarray, body: np.ndarray, modality: str, rng: np.random.Generator,
           gap: float = 1.0, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Image of an anatomy in one modality.

    Tissue intensities from :func:`render_settings`, multiplied by ``1 + a * texture`` (unit
    smoothed noise, made zero-mean within each tissue so that it keeps the tissue's mean),
    blurred, multiplied by the bias field ``exp(b * f)``, plus Gaussian
    (source) or Rician (target) noise. The random draws do not depend on ``gap`` or on
    ``modality``, so the same ``rng`` state gives the same texture, bias and noise fields.

    Args:
        labels: ``(y, x)`` or ``(z, y, x)`` integer labels in ``{0, 1, 2, 3}``.
        body: bool mask of the same shape; unlabelled body voxels get the body intensity.
        modality: ``"source"`` or ``"target"``.
        rng: random generator (advanced by the call).
        gap: domain gap of the target in ``[0, 1]``; ignored by the source.
        spacing: mm per array axis (for the blur and texture scales); default 1 mm.

    Returns:
        float32 image of the same shape. The inputs are not modified.
    """
    labels = np.asarray(labels)
    body = np.asarray(body)
    settings = render_settings(modality, gap)
    if labels.shape != body.shape or labels.ndim not in (2, 3) or labels.size == 0:
        raise InputError(f"labels {labels.shape} and body {body.shape} must be the same 2D or "
                         "3D shape.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > LESION:
        raise InputError(f"labels must be integers in 0..{LESION} (background, "
                         + ", ".join(c.name for c in PHANTOM_CLASSES) + ").")
    shape = labels.shape
    spacing = _check_spacing(spacing, len(shape)) if spacing is not None else (1.0,) * len(shape)

    tissue = np.where(labels > 0, labels, np.where(body.astype(bool), _BODY_INDEX, 0))
    texture = _smooth_noise(shape, spacing, TEXTURE_SCALE_MM, rng)
    codes = len(settings.contrasts.lookup())
    sums = np.bincount(tissue.ravel(), weights=texture.ravel(), minlength=codes)
    counts = np.bincount(tissue.ravel(), minlength=codes)
    texture -= (sums / np.maximum(counts, 1))[tissue]  # zero mean in each tissue
    bias = _bias_field(shape, spacing, rng)
    noise = rng.standard_normal((2,) + shape)

    image = settings.contrasts.lookup()[tissue] * (1.0 + settings.texture_amplitude * texture)
    image = ndimage.gaussian_filter(image, sigma=[settings.blur_mm / s for s in spacing])
    image *= np.exp(settings.bias_log_amplitude * bias)
    sigma = settings.noise_sigma
    if settings.rician:
        image = np.hypot(image + sigma * noise[0], sigma * noise[1])
    else:
        image = image + sigma * noise[0]
    return image.astype(np.float32)


# --------------------------------------------------------------------------- public factories


def phantom_geometry(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> Geometry:
    """Geometry of a phantom grid: the given spacing, identity direction, and an origin that
    centres the grid and then shifts it by :data:`ORIGIN_OFFSET_XYZ` (ITK x-first order)."""
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing, len(shape))
    centred = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing)]
    origin = tuple(c + o for c, o in zip(reversed(centred), ORIGIN_OFFSET_XYZ))
    return Geometry(spacing=spacing, origin=origin)


def make_phantom(shape: Sequence[int], seed: int, gap: float = 1.0,
                 spacing: Optional[Sequence[float]] = None) -> Phantom:
    """One seeded two-modality phantom.

    Args:
        shape: ``(y, x)`` or ``(z, y, x)``, every axis at least :data:`MIN_AXIS` voxels.
        seed: non-negative integer; equal seeds give identical phantoms.
        gap: domain gap of the target in ``[0, 1]`` (see the module docstring). The anatomy,
            the source image and the target's random fields do not depend on it.
        spacing: mm per array axis; default ``(2, 1, 1)`` in 3D and ``(1, 1)`` in 2D.

    Returns:
        :class:`Phantom` whose three volumes share one :class:`Geometry`.
    """
    shape = _check_shape(shape)
    seed = _check_seed(seed)
    gap = _check_gap(gap)
    spacing = _check_spacing(spacing, len(shape))
    anatomy_seq, source_seq, target_seq = np.random.SeedSequence(seed).spawn(3)
    labels, body = make_anatomy(shape, spacing, np.random.default_rng(anatomy_seq))
    source = render(labels, body, "source", np.random.default_rng(source_seq), gap, spacing)
    target = render(labels, body, "target", np.random.default_rng(target_seq), gap, spacing)
    geometry = phantom_geometry(shape, spacing)
    return Phantom(source=Volume(source, geometry), target=Volume(target, geometry),
                   labels=Volume(labels, geometry), body=body,
                   classes=list(PHANTOM_CLASSES), seed=seed, gap=gap)


def make_phantom_set(n: int, shape: Sequence[int], seed: int, gap: float = 1.0,
                     spacing: Optional[Sequence[float]] = None) -> list[Phantom]:
    """``n`` phantoms with different anatomies, deterministic in ``seed``.

    Case ``i`` is ``make_phantom(shape, s_i, gap, spacing)`` with ``s_i`` the ``i``-th word of
    ``numpy.random.SeedSequence(seed).generate_state(n)``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive integer (number of phantoms), got {n!r}.")
    seed = _check_seed(seed)
    case_seeds = np.random.SeedSequence(seed).generate_state(int(n), dtype=np.uint32)
    return [make_phantom(shape, int(s), gap, spacing) for s in case_seeds]
