"""Multiplanar reformats (MPR) in patient axes: thin or thick slabs, average / MIP / MinIP.

Planes are defined in patient (LPS) axes whatever the acquisition orientation, with the display
orientation radiologists expect (ImageOrientationPatient):

========  ===============  ==========================  ==============================
plane     row direction    column direction            slices stacked along
========  ===============  ==========================  ==============================
axial     +x (R -> L)      +y (A -> P)                 +z (foot -> head)
coronal   +x (R -> L)      -z (head -> foot)           +y (anterior -> posterior)
sagittal  +y (A -> P)      -z (head -> foot)           -x (left -> right)
========  ===============  ==========================  ==============================

Two paths: when the source grid is axis-aligned (any flip or permutation of the
patient axes) slabs are reduced in numpy directly on the source voxels (exact partial-voxel
weights at slab ends, no resampling of the volume); otherwise (oblique acquisition) the source is
resampled once per plane with ``sitk.Resample`` onto a fine grid in patient axes, then reduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field, field_validator, model_validator

from pipelines.registry import Shape, Spacing, step
from pipelines.types import ImageSeries, StepError, Volume

Plane = Literal["axial", "coronal", "sagittal"]
Mode = Literal["AVG", "MIP", "MinIP"]
PLANE_ORDER: tuple[Plane, ...] = ("axial", "coronal", "sagittal")
# (row direction, column direction) in LPS; the slice normal is row x col.
PLANE_AXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
PLANE_ABBREV = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}

PRESETS: dict[str, dict[str, Any]] = {
    "MPR 3mm": {"planes": ["axial", "coronal", "sagittal"], "thickness_mm": 3.0, "mode": "AVG"},
    "AX 3mm": {"planes": ["axial"], "thickness_mm": 3.0, "mode": "AVG"},
    "COR 3mm": {"planes": ["coronal"], "thickness_mm": 3.0, "mode": "AVG"},
    "SAG 3mm": {"planes": ["sagittal"], "thickness_mm": 3.0, "mode": "AVG"},
    "AX 5mm": {"planes": ["axial"], "thickness_mm": 5.0, "mode": "AVG"},
    "COR 2mm": {"planes": ["coronal"], "thickness_mm": 2.0, "mode": "AVG"},
    "SAG 2mm": {"planes": ["sagittal"], "thickness_mm": 2.0, "mode": "AVG"},
    "AX 10mm MIP": {"planes": ["axial"], "thickness_mm": 10.0, "mode": "MIP"},
    "COR 10mm MIP": {"planes": ["coronal"], "thickness_mm": 10.0, "mode": "MIP"},
    "SAG 10mm MIP": {"planes": ["sagittal"], "thickness_mm": 10.0, "mode": "MIP"},
    "AX 5mm MinIP": {"planes": ["axial"], "thickness_mm": 5.0, "mode": "MinIP"},
    "COR 5mm MinIP": {"planes": ["coronal"], "thickness_mm": 5.0, "mode": "MinIP"},
}
PresetName = Literal[
    "MPR 3mm",
    "AX 3mm",
    "COR 3mm",
    "SAG 3mm",
    "AX 5mm",
    "COR 2mm",
    "SAG 2mm",
    "AX 10mm MIP",
    "COR 10mm MIP",
    "SAG 10mm MIP",
    "AX 5mm MinIP",
    "COR 5mm MinIP",
]
_ALIGN_TOL = 1e-4  # direction cosine tolerance of the fast path: < 0.05 mm over 500 mm
#: Largest row or column count of an output image (a 4096² int16 image is 32 MB).
MAX_PIXELS = 4096


class Params(BaseModel, frozen=True, extra="forbid"):
    """Parameters of ``reformat.mpr``. A preset fills planes/thickness/mode not given explicitly."""

    preset: PresetName | None = Field(
        None,
        description="Named protocol (e.g. 'COR 3mm', 'AX 10mm MIP'); fills planes, thickness_mm "
        "and mode unless given explicitly (unitless).",
    )
    planes: tuple[Plane, ...] = Field(
        PLANE_ORDER, description="Planes in patient axes: axial, coronal, sagittal (unitless)."
    )
    thickness_mm: float = Field(3.0, ge=0.1, le=500.0, description="Slab thickness (mm), 0.1-500.")
    spacing_mm: float | None = Field(
        None,
        ge=0.1,
        le=500.0,
        description="Distance between slices (mm), 0.1-500; default = thickness.",
    )
    mode: Mode = Field("AVG", description="Slab reduction: AVG, MIP or MinIP (unitless).")
    pixel_spacing_mm: float | None = Field(
        None,
        ge=0.1,
        le=50.0,
        description="In-plane pixel spacing (mm), 0.1-50; default = the source's finest voxel "
        "spacing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("preset") is not None:
            if data["preset"] not in PRESETS:
                return data  # the Literal check reports the known names
            data = {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("planes")
    @classmethod
    def _canonical_planes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one plane is required")
        return tuple(p for p in PLANE_ORDER if p in v)  # canonical order: stable UIDs

    @property
    def spacing(self) -> float:
        return self.spacing_mm if self.spacing_mm is not None else self.thickness_mm


def _mm(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def describe(plane: str, thickness_mm: float, mode: str) -> str:
    """Radiologist-readable label: ``COR 3mm AVG``, ``AX 10mm MIP``."""
    return f"{PLANE_ABBREV[plane]} {_mm(thickness_mm)}mm {mode}"


def _plane_frame(plane: str) -> np.ndarray:
    """3x3 matrix whose columns are row, column and slice-normal directions (LPS)."""
    row, col = (np.array(v) for v in PLANE_AXES[plane])
    return np.column_stack([row, col, np.cross(row, col)])


def _axis_map(direction: np.ndarray) -> list[tuple[int, int]] | None:
    """For an axis-aligned direction matrix: per patient axis, (image axis, sign); else None."""
    ad = np.abs(direction)
    perm = np.round(ad)
    if np.max(np.abs(ad - perm)) > _ALIGN_TOL or not np.allclose(perm.sum(0), 1):
        return None
    if not np.allclose(perm.sum(1), 1):
        return None
    out = []
    for lps in range(3):
        ax = int(np.argmax(ad[lps]))
        out.append((ax, int(np.sign(direction[lps, ax]))))
    return out


def _is_whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-6


def _slab_plan(
    first: float, step_mm: float, n: int, thickness: float, spacing: float, mip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Slab centres and per-slab source indices/weights along one axis of samples.

    Samples are ``first + i * step_mm`` (i < n), each standing for ``step_mm`` of tissue. Slabs of
    ``thickness`` every ``spacing`` are centred in the covered extent (snapped to sample edges when
    thickness and spacing are whole numbers of samples, so that no slab blurs two slices).
    Returns (centres, index matrix, weight matrix, effective thickness); a slab's indices are a
    contiguous run, weights its overlap with each sample (normalised), padded with zeros.
    """
    t_eff = max(thickness, step_mm)  # thinner than one sample cannot be honest
    lo = first - step_mm / 2
    extent = n * step_mm
    if t_eff > extent + 1e-6:
        raise StepError(
            f"slab thickness {t_eff:g} mm exceeds the volume extent {extent:.1f} mm along the "
            "plane normal"
        )
    n_out = int(math.floor((extent - t_eff) / spacing + 1e-6)) + 1
    margin = (extent - t_eff - (n_out - 1) * spacing) / 2
    if _is_whole(t_eff / step_mm) and _is_whole(spacing / step_mm):
        margin = math.floor(margin / step_mm + 1e-6) * step_mm
    centres = lo + margin + t_eff / 2 + spacing * np.arange(n_out)
    ea = (centres - t_eff / 2 - lo) / step_mm  # slab edges in sample units
    eb = ea + t_eff / step_mm
    i0 = np.clip(np.floor(ea + 1e-6).astype(int), 0, n - 1)
    i1 = np.clip(np.ceil(eb - 1e-6).astype(int) - 1, 0, n - 1)
    k = int((i1 - i0).max()) + 1
    idx = i0[:, None] + np.arange(k)[None, :]
    w = np.minimum(eb[:, None], idx + 1) - np.maximum(ea[:, None], idx)
    w = np.where(idx <= i1[:, None], np.clip(w, 0.0, None), 0.0)
    if mip:  # every sample the slab really touches counts, whatever its overlap
        w = (w > 1e-3).astype(np.float64)
    w /= w.sum(1, keepdims=True)
    idx = np.minimum(idx, i1[:, None])  # padding repeats the last sample: harmless for MIP/MinIP
    return centres, idx, w.astype(np.float32), t_eff


def _slab(src: np.ndarray, idx: np.ndarray, w: np.ndarray, mode: str, buf: np.ndarray) -> None:
    """One slab of ``src`` (slices along axis 0) into ``buf`` (float32 for AVG, else src dtype)."""
    used = w > 0
    order = np.argsort(idx[used])  # flipped axes give descending runs
    run, wts = idx[used][order], w[used][order]
    block = src[run[0] : run[-1] + 1]
    if mode == "MIP":
        np.maximum.reduce(block, axis=0, out=buf)
    elif mode == "MinIP":
        np.minimum.reduce(block, axis=0, out=buf)
    elif np.allclose(wts, wts[0]):
        np.add.reduce(block, axis=0, dtype=np.float32, out=buf)
        buf *= wts[0]
    else:
        tmp = np.empty_like(buf)
        np.multiply(block[0], wts[0], out=buf, dtype=np.float32)
        for sl, wt in zip(block[1:], wts[1:], strict=True):
            np.multiply(sl, wt, out=tmp, dtype=np.float32)
            buf += tmp


def _slabs_last_axis(arr: np.ndarray, idx: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    """All slabs along the contiguous last axis, laid out (slab, z, y).

    Reducing that axis slab by slab would stream the whole volume once per sample: gather every
    slab's r-th sample at once, a few slices at a time so the data stays in cache.
    """
    n_out, k = idx.shape
    nz, ny, _ = arr.shape
    out = np.empty((n_out, nz, ny), np.float32 if mode == "AVG" else arr.dtype)
    ufunc = np.maximum if mode == "MIP" else np.minimum
    for z0 in range(0, nz, 4):
        chunk = arr[z0 : z0 + 4]
        acc = np.take(chunk, idx[:, 0], axis=2)
        if mode == "AVG":
            acc = acc * w[:, 0]
            for r in range(1, k):
                acc += np.take(chunk, idx[:, r], axis=2) * w[:, r]
        else:
            for r in range(1, k):
                ufunc(acc, np.take(chunk, idx[:, r], axis=2), out=acc)
        out[:, z0 : z0 + 4] = acc.transpose(2, 0, 1)
    return out


def _interp_plan(n: int, step_mm: float, target: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Linear resampling of an axis of ``n`` samples from ``step_mm`` to ``target`` spacing (same
    first sample): (lower indices, fractions), or None when the spacings agree."""
    if abs(step_mm - target) <= 1e-6 * step_mm:
        return None
    m = int(math.floor((n - 1) * step_mm / target + 1e-6)) + 1
    pos = np.arange(m) * (target / step_mm)
    i0 = np.minimum(np.floor(pos).astype(int), n - 2)
    return i0, (pos - i0).astype(np.float32)


#: An axis resampling plan of :func:`_interp_plan` (None = keep the axis).
Plan = tuple[np.ndarray, np.ndarray] | None


def _resample_2d(img: np.ndarray, rows: Plan, cols: Plan, out: np.ndarray) -> None:
    """Separable linear resampling of a 2D slice into ``out`` (rounded for integer ``out``).

    ``img`` may be overwritten (it is the caller's scratch buffer).
    """
    v = img
    for axis, plan in ((0, rows), (1, cols)):
        if plan is None:
            continue
        i0, t = plan
        lo = np.take(v, i0, axis=axis).astype(np.float32, copy=False)
        hi = np.take(v, i0 + 1, axis=axis).astype(np.float32, copy=False)
        hi -= lo
        hi *= t[:, None] if axis == 0 else t[None, :]
        hi += lo
        v = hi
    if np.issubdtype(out.dtype, np.integer) and v.dtype.kind == "f":
        np.rint(v, out=v)  # rounding, not truncation: an average of -3 and -4 is not -3
    out[...] = v


def _aligned(
    img: sitk.Image, amap: list[tuple[int, int]], frame: np.ndarray, p: Params, pixel: float
) -> tuple[np.ndarray, tuple[float, float, float], float]:
    """Fast path: slabs and in-plane resampling directly on the source voxels, slice by slice."""
    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x) = image axes (2, 1, 0)
    spacing = np.array(img.GetSpacing())
    origin = np.array(img.GetOrigin())
    size = img.GetSize()
    axes, signs, firsts, steps = [], [], [], []
    for t in range(3):  # row, column, normal of the plane
        lps = int(np.argmax(np.abs(frame[:, t])))
        ax, sign = amap[lps]
        sign *= int(np.sign(frame[lps, t]))
        first = float(origin @ frame[:, t])
        if sign < 0:  # coordinates increase along the plane axis from the far end
            first -= (size[ax] - 1) * spacing[ax]
        axes.append(2 - ax)
        signs.append(sign)
        firsts.append(first)
        steps.append(float(spacing[ax]))
    n_normal = arr.shape[axes[2]]
    centres, idx, w, t_eff = _slab_plan(
        firsts[2], steps[2], n_normal, p.thickness_mm, p.spacing, p.mode != "AVG"
    )
    if signs[2] < 0:
        idx = n_normal - 1 - idx  # flip by indexing: no reversed view of the volume
    rest = [a for a in range(3) if a != axes[2]]  # numpy axes of a slab, in memory order
    row_pos, col_pos = rest.index(axes[0]), rest.index(axes[1])
    rows = _interp_plan(arr.shape[axes[1]], steps[1], pixel)
    cols = _interp_plan(arr.shape[axes[0]], steps[0], pixel)
    n_rows = arr.shape[axes[1]] if rows is None else len(rows[0])
    n_cols = arr.shape[axes[0]] if cols is None else len(cols[0])
    out = np.empty((len(centres), n_rows, n_cols), arr.dtype)
    slab_shape = [arr.shape[a] for a in rest]
    buf = np.empty(slab_shape, np.float32 if p.mode == "AVG" else arr.dtype)
    if axes[2] == 2:
        slabs = _slabs_last_axis(arr, idx, w, p.mode)
    else:
        src = np.moveaxis(arr, axes[2], 0)
    for j in range(len(centres)):
        if axes[2] == 2:
            view = slabs[j]
        else:
            _slab(src, idx[j], w[j], p.mode, buf)
            view = buf
        if signs[0] < 0:
            view = np.flip(view, axis=row_pos)
        if signs[1] < 0:
            view = np.flip(view, axis=col_pos)
        if col_pos != 0:
            view = view.T  # (plane rows, plane columns)
        _resample_2d(view, rows, cols, out[j])
    return out, (firsts[0], firsts[1], float(centres[0])), t_eff


def _oblique(
    img: sitk.Image, frame: np.ndarray, p: Params, pixel: float
) -> tuple[np.ndarray, tuple[float, float, float], float]:
    """Generic path: resample each slab at evenly spaced depths (midpoint rule), then reduce.

    A slab of thickness T is sampled at n = ceil(T / finest source spacing) planes T/n apart,
    centred in the slab, so a thin slab is exactly the trilinear interpolation of the source at
    its plane and a thick AVG slab is exact for intensities varying linearly across it.
    """
    size = np.array(img.GetSize())
    grid = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).T.reshape(-1, 3)
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint(list(c)) for c in grid])
    coords = corners @ frame  # corners in (row, column, normal) coordinates
    lo, hi = coords.min(0), coords.max(0)
    n_in = [max(1, int(math.floor((hi[t] - lo[t]) / pixel))) for t in (0, 1)]
    if max(n_in) > MAX_PIXELS:
        raise StepError(f"pixel spacing {pixel:g} mm gives images over {MAX_PIXELS} pixels wide")
    firsts = [lo[t] + (hi[t] - lo[t] - (n_in[t] - 1) * pixel) / 2 for t in (0, 1)]
    finest = min(img.GetSpacing())
    t_eff = max(p.thickness_mm, finest)
    extent = hi[2] - lo[2]
    if t_eff > extent + 1e-6:
        raise StepError(
            f"slab thickness {t_eff:g} mm exceeds the volume extent {extent:.1f} mm along the "
            "plane normal"
        )
    n_out = int(math.floor((extent - t_eff) / p.spacing + 1e-6)) + 1
    centre0 = lo[2] + (extent - t_eff - (n_out - 1) * p.spacing) / 2 + t_eff / 2
    n_sub = max(1, math.ceil(t_eff / finest - 1e-6))
    delta = t_eff / n_sub
    arr = sitk.GetArrayViewFromImage(img)
    background = float(arr.min())  # outside the source: its darkest value (air on CT)

    def resample(first_depth: float, count: int) -> np.ndarray:
        origin = frame @ np.array([firsts[0], firsts[1], first_depth])
        res = sitk.Resample(
            img,
            [n_in[0], n_in[1], count],
            sitk.Transform(),
            sitk.sitkLinear,
            [float(v) for v in origin],
            [pixel, pixel, delta],
            [float(v) for v in frame.flatten()],
            background,
            sitk.sitkFloat32,
        )
        return sitk.GetArrayFromImage(res)  # (depth, column, row)

    out = np.empty((n_out, n_in[1], n_in[0]), arr.dtype)
    buf = np.empty((n_in[1], n_in[0]), np.float32)
    step = p.spacing / delta
    one_grid = _is_whole(step) and round(step) <= 2 * n_sub  # few unused planes in between
    if one_grid:
        m = round(step)
        planes = resample(centre0 - t_eff / 2 + delta / 2, (n_out - 1) * m + n_sub)
    for j in range(n_out):
        if one_grid:
            block = planes[j * m : j * m + n_sub]
        else:
            block = resample(centre0 + j * p.spacing - t_eff / 2 + delta / 2, n_sub)
        if p.mode == "MIP":
            np.maximum.reduce(block, axis=0, out=buf)
        elif p.mode == "MinIP":
            np.minimum.reduce(block, axis=0, out=buf)
        else:
            np.add.reduce(block, axis=0, out=buf)
            buf /= n_sub
        _resample_2d(buf, None, None, out[j])
    return out, (firsts[0], firsts[1], centre0), t_eff


def _estimate(
    params: Params,
    shape_zyx: Shape,
    spacing_xyz: Spacing,
    direction: Sequence[float] | None = None,
) -> tuple[int, str]:
    """Largest plane's image stack, 4 bytes a pixel (AVG slabs and resampled planes are float32).

    The output grid covers the source's box in patient axes: pixels of ``pixel_spacing_mm`` in
    plane, a slice every ``spacing_mm`` along the normal (oblique sources: every resampled plane).
    """
    nz, ny, nx = shape_zyx
    d = np.eye(3) if direction is None else np.array(direction, float).reshape(3, 3)
    extent = np.abs(d) @ (np.array([nx, ny, nz], float) * np.array(spacing_xyz, float))
    finest = float(min(spacing_xyz))
    pixel = params.pixel_spacing_mm or finest
    oblique = _axis_map(d) is None
    best: tuple[float, str] = (0.0, "")
    for plane in params.planes:
        frame = np.abs(_plane_frame(plane))
        e_row, e_col, e_normal = (float(extent @ frame[:, t]) for t in range(3))
        t_eff = max(params.thickness_mm, finest)
        n = math.floor(max(e_normal - t_eff, 0.0) / params.spacing + 1e-6) + 1
        if oblique:  # the planes resampled along the normal, one per finest spacing at least
            n = max(n, math.ceil(e_normal / finest))
        cols, rows = math.ceil(e_row / pixel), math.ceil(e_col / pixel)
        if max(cols, rows) > MAX_PIXELS:
            raise StepError(
                f"the {plane} reformat at pixel_spacing_mm={pixel:g} would be {cols}x{rows} pixels"
                f" (at most {MAX_PIXELS} a side)"
            )
        n_bytes = 4.0 * cols * rows * n
        if n_bytes > best[0]:
            best = (
                n_bytes,
                f"the {plane} reformat of {cols}x{rows}x{n} pixels (spacing_mm={params.spacing:g},"
                f" pixel_spacing_mm={pixel:g})",
            )
    return int(best[0]), best[1]


def reformat_plane(image: sitk.Image, plane: str, params: Params) -> ImageSeries:
    """One MPR plane of ``image`` (see :func:`mpr`)."""
    frame = _plane_frame(plane)
    src_spacing = image.GetSpacing()
    pixel = params.pixel_spacing_mm or float(min(src_spacing))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    amap = _axis_map(direction)
    if amap is not None:
        extent = [image.GetSize()[i] * src_spacing[i] for i in range(3)]
        if max(extent) / pixel > MAX_PIXELS:
            raise StepError(
                f"pixel spacing {pixel:g} mm gives images over {MAX_PIXELS} pixels wide"
            )
        pix, first, t_eff = _aligned(image, amap, frame, params, pixel)
    else:
        pix, first, t_eff = _oblique(image, frame, params, pixel)
    out = sitk.GetImageFromArray(pix)
    out.SetSpacing((pixel, pixel, params.spacing))
    out.SetDirection([float(v) for v in frame.flatten()])
    out.SetOrigin([float(v) for v in frame @ np.array(first)])
    return ImageSeries(
        description=describe(plane, t_eff, params.mode),
        image=out,
        plane=plane,
        slab_thickness_mm=t_eff,
        slab_mode=params.mode,
    )


@step("reformat.mpr", version="1.0.0", params=Params, produces="series", estimate=_estimate)
def mpr(volume: Volume, params: Params) -> list[ImageSeries]:
    """Axial, coronal and sagittal reformats in patient axes (AVG/MIP/MinIP slabs).

    One derived series per plane, slices of ``thickness_mm`` every ``spacing_mm`` covering the
    volume, square pixels of ``pixel_spacing_mm``. int16 input gives int16 output (averages are
    rounded). Oblique sources are resampled so the planes follow the patient's axes.
    """
    image = volume.image
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise StepError("reformat needs a 3D scalar volume")
    if min(image.GetSize()) < 2:
        raise StepError(
            f"reformat needs a volume of at least 2 voxels along each axis, got {image.GetSize()}"
            " (a single image or a 2D series)"
        )
    return [reformat_plane(image, plane, params) for plane in params.planes]
