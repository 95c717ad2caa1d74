"""Geometry of a stack of parallel slices: sorting, checks and regular-grid plans.

Shared by classic (one file per slice) and enhanced multi-frame series. Everything here works on
plain arrays (positions, orientations, spacings); the callers turn DICOM headers into those and
pixel data into the volume.

Decisions (what a PACS administrator will read in refusals and notes):

- **Gantry tilt** (slice positions move along a line that is not the slice normal, CT with a
  tilted gantry): resampled onto a regular orthogonal grid whose slices are perpendicular to the
  table travel, like dcm2niix does. The tilted slices are exact planes at known positions, so
  trilinear resampling is geometrically exact (only interpolation blur); refusing would drop
  most routine sequential head CTs. The whole tilted slab is kept (corners filled with the
  lowest pixel value, i.e. air).
- **Uneven slice spacing** is resampled onto a regular grid at the finest block spacing (no
  detail lost) only when the stack is piecewise regular: each gap belongs to a run of equal
  gaps (a deliberate variable-spacing protocol such as GE sequential heads with 4 mm / 7 mm
  blocks), apart from short transition gaps smaller than both neighbours. Anything else is
  refused: jittery positions mean the scanner's geometry cannot be trusted.
- **Missing slices**: a gap at least 1.5 times both neighbouring gaps is refused, naming
  where it is: interpolating across a hole would invent anatomy.
- Several images at one slice position (echoes, phases, repeated acquisitions), mixed
  orientations, sizes or pixel spacings, a single image, positions off a straight line:
  refused.
- **Orientation**: ImageOrientationPatient must be two unit vectors at a right angle within
  the tolerances of :mod:`workers.reading.validate` (which checks every slice's geometry
  values first);
  within them the vectors are normalised, beyond them the series is refused (never
  straightened silently). Slice spacing must be plausible (:func:`validate.check_slice_spacing`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from workers.reading import validate
from workers.reading.source import SeriesError

#: Slices closer than this along the normal are "at the same position" (mm).
SAME_POSITION_MM = 0.01


@dataclass
class StackPlan:
    """Where each slice goes and how the regular grid looks.

    Attributes
    ----------
    order : list[int]
        Input slice indices in volume order (ascending along the stacking direction),
        duplicates of the same instance removed.
    origin, spacing, direction
        Geometry of the *acquired* stack: origin = first slice position, spacing =
        (column spacing, row spacing, slice spacing), direction = 3x3 with columns row cosine,
        column cosine, slice normal.
    positions : np.ndarray
        (n, 3) slice positions in volume order.
    tilt_deg : float
        Angle between the table travel and the slice normal (0 if none).
    uneven : bool
        The slice spacing is piecewise regular and must be resampled.
    notes : list[str]
    """

    order: list[int]
    origin: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray
    positions: np.ndarray
    tilt_deg: float = 0.0
    uneven: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def needs_resampling(self) -> bool:
        return self.uneven or self.tilt_deg > 0.0


def plane_name(normal: np.ndarray) -> str:
    """``axial``, ``coronal`` or ``sagittal`` by the dominant normal axis (LPS), else oblique."""
    a = np.abs(normal)
    if a.max() < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(a.argmax())]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def plan_stack(
    name: str,
    positions: np.ndarray,
    orientations: np.ndarray,
    pixel_spacings: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    keys: Sequence[str],
    *,
    unit: str = "image",
    why_same_position: Callable[[list[int]], str] | None = None,
    labels: Sequence[str] | None = None,
) -> StackPlan:
    """Check a stack of slices and plan its volume.

    Parameters
    ----------
    name : str
        The series as a PACS admin knows it; every refusal starts with it.
    positions, orientations, pixel_spacings : np.ndarray
        (n, 3) ImagePositionPatient, (n, 6) ImageOrientationPatient, (n, 2) PixelSpacing
        (row spacing, column spacing) per slice, in input order.
    sizes : sequence of (Rows, Columns)
    keys : sequence of str
        Identity of each slice (SOPInstanceUID, or UID + frame): equal keys at one position are
        copies of the same instance and are dropped.
    unit : str
        What a slice is called in messages ("image" or "frame").
    why_same_position : callable, optional
        Given indices of slices sharing one position, names what differs between them
        (e.g. "4 temporal positions"); used in the refusal.
    labels : sequence of str, optional
        How each slice is named in refusals (e.g. "image IM0012.dcm").

    Raises
    ------
    SeriesError
        The slices do not form one volume; the message names the defect.
    """
    if not keys:
        raise SeriesError(f"{name}: no images with pixel data", code="pixel-format")
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{c}x{r}" for r, c in sorted(set(sizes))[:4])
        raise SeriesError(
            f"{name}: mixed image sizes ({shown}); a volume needs one size", code="pixel-format"
        )
    validate.check_geometry(name, positions, orientations, pixel_spacings, labels)
    _check_one_plane(name, orientations, pixel_spacings)
    iop0 = orientations[0]
    r = _unit(iop0[:3])
    # Within the orthogonality tolerance: make the column vector exactly perpendicular.
    c = _unit(iop0[3:] - np.dot(iop0[3:], r) * r)
    normal = np.cross(r, c)
    notes: list[str] = []
    unique = _one_per_position(name, positions @ normal, keys, unit, why_same_position, notes)
    pos = positions[unique]
    px = float(min(pixel_spacings[0]))
    t, tilt = _travel(name, pos, normal, px)
    gaps = np.diff(t)
    step = float(t[-1] / (len(t) - 1))
    tol = max(0.02, 0.02 * step)
    uneven = bool(np.abs(t - step * np.arange(len(t))).max() > tol)
    if uneven:
        step = _classify_uneven(name, gaps, t, tol)
        notes.append(
            f"uneven slice spacing ({gaps.min():.2f}–{gaps.max():.2f} mm) resampled onto a "
            f"regular {step:.2f} mm grid"
        )
    validate.check_slice_spacing(name, step)
    if tilt:
        notes.append(f"gantry tilt {tilt:.1f}° resampled onto a regular orthogonal grid")
    direction = np.stack([r, c, normal], axis=1)
    spacing = (float(pixel_spacings[0][1]), float(pixel_spacings[0][0]), step)
    return StackPlan(unique, pos[0].copy(), spacing, direction, pos, tilt, uneven, notes)


def _check_one_plane(name: str, orientations: np.ndarray, pixel_spacings: np.ndarray) -> None:
    """One orientation and one pixel spacing for every slice: else the series is not one volume."""
    iop0 = orientations[0]
    if (np.abs(orientations - iop0).max(axis=1) > 1e-3).any():
        planes: list[str] = []
        for iop in orientations:
            p = plane_name(np.cross(iop[:3], iop[3:]))
            if p not in planes:
                planes.append(p)
        kinds = ", ".join(planes) if len(planes) > 1 else f"{planes[0]} at different angles"
        raise SeriesError(
            f"{name}: mixed slice orientations ({kinds}); a volume needs one", code="geometry"
        )
    if (np.abs(pixel_spacings - pixel_spacings[0]).max(axis=1) > 1e-3).any():
        raise SeriesError(f"{name}: mixed pixel spacings; a volume needs one", code="geometry")


def _one_per_position(
    name: str,
    d: np.ndarray,
    keys: Sequence[str],
    unit: str,
    why_same_position: Callable[[list[int]], str] | None,
    notes: list[str],
) -> list[int]:
    """Slice indices sorted along the normal (``d``: each slice's distance along it), one per
    position: copies of one instance are dropped (noted), different images at one position
    refuse the series."""
    # Stable sort: the caller's order (InstanceNumber) breaks ties.
    order = list(np.argsort(d, kind="stable"))
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        if d[i] - d[groups[-1][0]] < SAME_POSITION_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    dropped = 0
    unique: list[int] = []
    for g in groups:
        k = len(dict.fromkeys(keys[i] for i in g))
        if k > 1:
            why = why_same_position(g) if why_same_position else ""
            why = why or "several echoes, phases or acquisitions in one series"
            raise SeriesError(
                f"{name}: {k} {unit}s at the same slice position ({d[g[0]]:.2f} mm along the "
                f"slice normal): {why}; a volume needs one {unit} per position"
            )
        dropped += len(g) - 1
        unique.append(g[0])
    if dropped:
        notes.append(f"{dropped} duplicate copies of the same {unit}s ignored")
    if len(unique) == 1:
        raise SeriesError(f"{name}: a single {unit}, not a volume")
    return unique


def _travel(name: str, pos: np.ndarray, normal: np.ndarray, px: float) -> tuple[np.ndarray, float]:
    """Each slice's distance from the first along the line they lie on, and the gantry tilt
    (degrees between that line and the slice normal; 0 when within tolerance)."""
    travel = pos[-1] - pos[0]
    along = _unit(travel)
    # Off-line residual of each slice: positions must lie on one straight line.
    rel = pos - pos[0]
    t = rel @ along
    resid = np.linalg.norm(rel - np.outer(t, along), axis=1).max()
    if resid > max(0.05, 0.1 * px):
        raise SeriesError(
            f"{name}: slice positions do not lie on a straight line (off by up to "
            f"{resid:.2f} mm); a volume needs parallel slices along one axis",
            code="geometry",
        )
    shear = np.linalg.norm(travel - np.dot(travel, normal) * normal)
    tilt = 0.0
    if shear > max(0.01, 0.05 * px):
        tilt = math.degrees(math.atan2(shear, float(np.dot(travel, normal))))
    return t, tilt


def _classify_uneven(name: str, gaps: np.ndarray, t: np.ndarray, tol: float) -> float:
    """Refuse missing slices and irregular spacing; piecewise regular: the finest block gap."""
    n = len(gaps)
    for i, g in enumerate(gaps):
        neigh = [gaps[j] for j in (i - 1, i + 1) if 0 <= j < n]
        if neigh and all(g >= 1.5 * x for x in neigh):
            ref = float(np.median(neigh))
            missing = max(1, round(g / ref) - 1)
            raise SeriesError(
                f"{name}: missing slices – a gap of {g:.2f} mm after slice {i + 1} of "
                f"{n + 1} where the spacing is {ref:.2f} mm (about {missing} slice(s) missing)"
            )
    for i, g in enumerate(gaps):
        neigh = [gaps[j] for j in (i - 1, i + 1) if 0 <= j < n]
        in_run = any(abs(g - x) <= tol for x in neigh)
        transition = len(neigh) == 2 and all(g < x - tol for x in neigh)
        if not (in_run or transition):
            raise SeriesError(
                f"{name}: uneven slice spacing (gaps from {gaps.min():.2f} to "
                f"{gaps.max():.2f} mm, irregular around slice {i + 1}); a volume needs "
                "regular spacing"
            )
    # The finest spacing of a block keeps every detail; transition gaps are not blocks.
    return float(
        min(
            g
            for i, g in enumerate(gaps)
            if any(abs(g - gaps[j]) <= tol for j in (i - 1, i + 1) if 0 <= j < n)
        )
    )


def regularize_spacing(
    volume: np.ndarray, t: np.ndarray, step: float, fill_dtype: np.dtype
) -> np.ndarray:
    """Linearly resample slices at positions ``t`` (mm, ascending) onto ``t[0] + k * step``."""
    m = int(math.floor((t[-1] - t[0]) / step + 1e-6)) + 1
    out = np.empty((m, *volume.shape[1:]), dtype=fill_dtype)
    for k in range(m):
        tk = t[0] + k * step
        j = int(min(np.searchsorted(t, tk, side="right") - 1, len(t) - 2))
        w = (tk - t[j]) / (t[j + 1] - t[j])
        blend = volume[j].astype(np.float32) * np.float32(1 - w)
        blend += volume[j + 1].astype(np.float32) * np.float32(w)
        if np.issubdtype(fill_dtype, np.integer):
            np.rint(blend, out=blend)
        out[k] = blend
    return out


def resample_tilted(image: sitk.Image, travel: np.ndarray) -> sitk.Image:
    """Resample a sheared stack onto an orthogonal grid perpendicular to the table travel.

    Parameters
    ----------
    image : sitk.Image
        The acquired slices on a *fake* orthonormal grid: origin = first slice position,
        direction columns (row, column, normal), third spacing = slice step along the normal.
        Real voxel (i, j, k) lies at ``origin + i*sx*row + j*sy*col + k*step*travel_unit``.
    travel : np.ndarray
        Direction along which the slice positions move (table travel).
    """
    dmat = np.array(image.GetDirection()).reshape(3, 3)
    r, c, n = dmat[:, 0], dmat[:, 1], dmat[:, 2]
    origin = np.array(image.GetOrigin())
    w = _unit(travel)
    cos_t = float(np.dot(w, n))
    s_perp = w - cos_t * n
    # Real point p -> fake point q: q = p - s_perp * ((p - origin) . n) / cos_t.
    a = np.eye(3) - np.outer(s_perp, n) / cos_t
    to_fake = sitk.AffineTransform(a.flatten().tolist(), (0.0, 0.0, 0.0), origin.tolist())

    u = _unit(r - np.dot(r, w) * w)
    v = np.cross(w, u)
    out_dir = np.stack([u, v, w], axis=1)
    sx, sy, sz = image.GetSpacing()
    step = sz / cos_t  # slice step along the travel
    size = image.GetSize()
    corners = []
    for i in (0, size[0] - 1):
        for j in (0, size[1] - 1):
            for k in (0, size[2] - 1):
                corners.append(origin + i * sx * r + j * sy * c + k * step * w)
    local = (np.array(corners) - origin) @ out_dir
    lo, hi = local.min(axis=0), local.max(axis=0)
    spacing = np.array([sx, sy, step])
    out_size = [int(x) for x in np.floor((hi - lo) / spacing + 1e-6) + 1]
    out_origin = origin + out_dir @ lo
    fill = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(
        image,
        out_size,
        to_fake,
        sitk.sitkLinear,
        out_origin.tolist(),
        spacing.tolist(),
        out_dir.flatten().tolist(),
        fill,
        image.GetPixelID(),
    )


def output_shape(plan: StackPlan, rows: int, cols: int) -> tuple[int, int, int]:
    """(slices, rows, columns) of the volume :func:`apply_plan` makes (to bound memory first)."""
    along = _unit(plan.positions[-1] - plan.positions[0])
    t = (plan.positions - plan.positions[0]) @ along
    step = plan.spacing[2]
    nz = int(math.floor((t[-1] - t[0]) / step + 1e-6)) + 1 if plan.uneven else len(plan.order)
    if not plan.tilt_deg:
        return nz, rows, cols
    r, c = plan.direction[:, 0], plan.direction[:, 1]
    u = _unit(r - np.dot(r, along) * along)
    out_dir = np.stack([u, np.cross(along, u), along], axis=1)
    sx, sy = plan.spacing[0], plan.spacing[1]
    corners = np.array(
        [
            i * sx * r + j * sy * c + k * step * along
            for i in (0, cols - 1)
            for j in (0, rows - 1)
            for k in (0, nz - 1)
        ]
    )
    local = corners @ out_dir
    size = np.floor((local.max(axis=0) - local.min(axis=0)) / np.array([sx, sy, step]) + 1e-6) + 1
    return int(size[2]), int(size[1]), int(size[0])


def apply_plan(image: sitk.Image, plan: StackPlan) -> sitk.Image:
    """Give ``image`` (slices filled in ``plan.order``) its geometry; resample if planned."""
    travel = plan.positions[-1] - plan.positions[0]
    along = _unit(travel)
    if plan.uneven:
        t = (plan.positions - plan.positions[0]) @ along
        arr = sitk.GetArrayViewFromImage(image)
        image = sitk.GetImageFromArray(regularize_spacing(arr, t, plan.spacing[2], arr.dtype))
    cos_t = float(np.dot(along, plan.direction[:, 2]))
    image.SetOrigin(plan.origin.tolist())
    image.SetDirection(plan.direction.flatten().tolist())
    image.SetSpacing((plan.spacing[0], plan.spacing[1], plan.spacing[2] * cos_t))
    if plan.tilt_deg:
        image = resample_tilted(image, travel)
    return image
