"""Rotating maximum intensity projection: N views about the patient's head-foot axis (cine loop).

Each axial slice is projected in 2D: in-plane voxels are binned by their position along the
view's horizontal axis and the max taken per bin (one gather + ``np.maximum.reduceat`` per view),
on a grid block-max-pooled to about ``pixel_mm``. No 3D resampling per view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from pipelines.registry import Shape, Spacing, default_estimate, shape_text, step
from pipelines.steps._masks import Grid
from pipelines.steps.mesh import labelmap_for
from pipelines.steps.reformat import MAX_PIXELS
from pipelines.types import ImageSeries, Output, StepError, Volume


class MipParams(BaseModel, frozen=True, extra="forbid"):
    views: int = Field(36, ge=1, le=360, description="Number of views over a full turn.")
    arc_deg: float = Field(360.0, gt=0.0, le=360.0, description="Total rotation (degrees).")
    pixel_mm: float = Field(
        2.0,
        ge=0.5,  # work grows as 1/pixel² to 1/pixel³: 0.5 mm costs 16-64x the default
        le=20.0,
        description="Pixel size of the views (mm); slices are pooled to about this too.",
    )
    lower_hu: float | None = Field(
        None,
        ge=-1e5,
        le=1e5,
        description="Ignore voxels below this value (HU or source units); None = no limit.",
    )
    upper_hu: float | None = Field(
        None,
        ge=-1e5,
        le=1e5,
        description="Ignore voxels above this value (HU or source units); None = no limit.",
    )
    exclude_segment: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Remove this segment before projecting (e.g. bone); None = keep all.",
    )
    only_segment: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Project only inside this segment (e.g. lungs); None = everywhere.",
    )
    cine_rate: float = Field(10.0, gt=0.0, le=60.0, description="Cine playback (frames/s).")


def _axial(image: sitk.Image) -> bool:
    """Slices are axial: third axis along LPS z, in-plane axes horizontal."""
    return _axial_direction(np.array(image.GetDirection()).reshape(3, 3))


def _axial_direction(d: np.ndarray) -> bool:
    return bool(abs(d[2, 2]) > 0.999 and abs(d[2, 0]) < 1e-3 and abs(d[2, 1]) < 1e-3)


def _too_wide(params: MipParams, width: int) -> str:
    return (
        f"pixel_mm={params.pixel_mm:g} would make views {width} pixels wide over this field of "
        f"view (at most {MAX_PIXELS})"
    )


def _estimate(
    params: MipParams,
    shape_zyx: Shape,
    spacing_xyz: Spacing,
    direction: Sequence[float] | None = None,
) -> tuple[int, str]:
    """Largest buffer: the views (int16), the axial resampling of a non-axial source, or a
    segmentation / masked copy on the source grid."""
    nz, ny, nx = shape_zyx
    d = np.eye(3) if direction is None else np.abs(np.array(direction, float).reshape(3, 3))
    extent = d @ (np.array([nx, ny, nz], float) * np.array(spacing_xyz, float))  # LPS box, mm
    out: list[tuple[float, str]] = [default_estimate(params, shape_zyx, spacing_xyz)]
    sz = float(spacing_xyz[2])
    if direction is not None and not _axial_direction(np.array(direction, float).reshape(3, 3)):
        sp = float(min(spacing_xyz))
        grid = np.ceil(extent / sp) + 1
        out.append((2.0 * float(np.prod(grid)), f"an axial resampling of {shape_text(grid[::-1])}"))
        sz = sp
    width = math.ceil((math.hypot(extent[0], extent[1]) + 2 * params.pixel_mm) / params.pixel_mm)
    rows = max(1, round(extent[2] / max(sz, round(params.pixel_mm / sz) * sz)))
    if width > MAX_PIXELS:
        raise StepError(_too_wide(params, width))
    out.append(
        (
            2.0 * params.views * rows * width,
            f"{params.views} views of {width}x{rows} pixels (pixel_mm={params.pixel_mm:g})",
        )
    )
    n_bytes, what = max(out)
    return int(n_bytes), what


def _to_axial(image: sitk.Image, background: float = -1024.0) -> sitk.Image:
    """Resample a non-axial volume onto an identity-direction grid covering it (rare path)."""
    size = np.array(image.GetSize())
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (size - 1) * m])
            for m in np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T
        ]
    )
    lo, hi = corners.min(0), corners.max(0)
    sp = float(min(image.GetSpacing()))
    out_size = [int(np.ceil((h - low) / sp)) + 1 for low, h in zip(lo, hi, strict=True)]
    return sitk.Resample(
        image,
        out_size,
        sitk.Transform(),
        sitk.sitkLinear,
        lo.tolist(),
        [sp] * 3,
        [1, 0, 0, 0, 1, 0, 0, 0, 1],
        background,
        image.GetPixelID(),
    )


def _segment_masks(
    volume: Volume, params: MipParams, prior: Sequence[Output]
) -> list[tuple[np.ndarray, bool]]:
    """(mask, inside) of ``exclude_segment`` then ``only_segment``: voxels of the named segments."""
    masks: list[tuple[np.ndarray, bool]] = []
    for name, inside in ((params.exclude_segment, False), (params.only_segment, True)):
        if name:
            lm, segs = labelmap_for(volume, name, prior)
            lab = sitk.GetArrayViewFromImage(lm.image)
            m = lab == segs[0].label
            for seg in segs[1:]:
                m |= lab == seg.label
            masks.append((m, inside))
    return masks


def _mask_to_axial(mask: np.ndarray, source: sitk.Image) -> np.ndarray:
    """A mask on ``source``'s grid moved onto the axial grid of ``_to_axial(source)``.

    Interpolated like the volume: an axial voxel any segment voxel contributes to is in it.
    """
    m = sitk.GetImageFromArray(mask.astype(np.float32))
    m.CopyInformation(source)
    return sitk.GetArrayFromImage(_to_axial(m, background=0.0)) > 0


def _windowed(
    a: np.ndarray, masks: list[tuple[np.ndarray, bool]], params: MipParams, floor: float
) -> np.ndarray:
    """``a``, or a copy whose voxels outside the segments or the HU window are the floor."""
    if not (masks or params.lower_hu is not None or params.upper_hu is not None):
        return a
    a = np.array(a)  # private copy; excluded voxels become the floor (copyto: no temporaries)
    for m, inside in masks:
        np.copyto(a, floor, where=~m if inside else m)
    if params.lower_hu is not None:
        np.copyto(a, floor, where=a < params.lower_hu)
    if params.upper_hu is not None:
        np.copyto(a, floor, where=a > params.upper_hu)
    if not (a > floor).any():
        raise StepError("nothing left to project inside the chosen window/segment")
    return a


def _ray_field(
    pooled: np.ndarray,
    origin: np.ndarray,
    d2: np.ndarray,
    fxy: int,
    spacing_xy: tuple[float, float],
    params: MipParams,
) -> tuple[np.ndarray, float, int]:
    """Centre (LPS x, y), half width (mm) and width (pixels) of the views' field.

    Rays only cross the in-plane box of what is not air (a 550 mm field of view often holds a
    350 mm patient): centre and radius of that box. Threshold: 10% up the value range.
    """
    top = pooled.max(axis=0).astype(np.float32)
    lo_v, hi_v = float(top.min()), float(np.percentile(top, 99.5))
    jy, ix = np.nonzero(top > lo_v + 0.1 * (hi_v - lo_v))
    if not len(ix):
        raise StepError("the volume is uniform: nothing to project")
    x0, x1, y0, y1 = ix.min(), ix.max(), jy.min(), jy.max()
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], float)
    corner_pos = origin[:2] + (corners * fxy + (fxy - 1) / 2) * spacing_xy @ d2.T
    centre = corner_pos.mean(axis=0)
    half = float(np.max(np.hypot(*(corner_pos - centre).T))) + params.pixel_mm
    width = int(np.ceil(2 * half / params.pixel_mm))
    if width > MAX_PIXELS:
        raise StepError(_too_wide(params, width))
    return centre, half, width


@step(
    "projection.rotating_mip",
    version="1.0.0",
    params=MipParams,
    produces="series",
    estimate=_estimate,
)
def rotating_mip(volume: Volume, params: MipParams, prior: Sequence[Output] = ()) -> ImageSeries:
    """Rotating MIP about the head-foot axis (default 36 views, 10° apart), played as a cine."""
    image = volume.image
    if image.GetDimension() != 3:
        raise StepError("a rotating MIP needs a 3D volume")
    masks = _segment_masks(volume, params, prior)
    if not _axial(image):
        masks = [(_mask_to_axial(m, image), i) for m, i in masks]
        image = _to_axial(image)
    a = sitk.GetArrayViewFromImage(image)
    floor = np.iinfo(np.int16).min if a.dtype == np.int16 else float(a.min())
    background = params.lower_hu if params.lower_hu is not None else float(a.min())
    a = _windowed(a, masks, params, floor)
    # Pool to blocks of at least pixel_mm (max keeps small bright vessels and bone): rays
    # sampled every pixel_mm then visit every block.
    sx, sy, sz = image.GetSpacing()
    fxy = max(1, int(np.ceil(params.pixel_mm / min(sx, sy) - 0.01)))
    fz = max(1, int(round(params.pixel_mm / sz)))
    nx0, ny0, nz0 = image.GetSize()
    grid = Grid((nz0, ny0, nx0), (fz, fxy, fxy))
    pooled = grid.block_max(np.asarray(a)) if (fz, fxy) != (1, 1) else np.ascontiguousarray(a)
    nz, ny, nx = pooled.shape
    d = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin())
    d2 = d[:2, :2]
    centre, half, width = _ray_field(pooled, origin, d2, fxy, (sx, sy), params)
    # Rows go head -> foot: pooled slices by descending z.
    z_of = origin[2] + d[2, 2] * sz * (np.arange(nz) * fz + (fz - 1) / 2)
    rows = np.argsort(-z_of, kind="stable")
    # (in-plane voxel, slice) layout with one extra row of floor for rays outside the volume.
    flat = np.empty((ny * nx + 1, nz), dtype=pooled.dtype)
    flat[:-1] = pooled.reshape(nz, -1)[rows].T
    flat[-1] = floor
    del pooled
    out = np.full((params.views, nz, width), background, dtype=np.int16)
    steps_mm = (np.arange(width) + 0.5) * params.pixel_mm - half
    # ~8 MB of gathered samples and ~8 MB of ray positions at a time
    chunk = max(1, min((8 << 20) // (width * nz * 2), (8 << 20) // (width * 16)))
    geometry = []
    for k in range(params.views):
        theta = np.deg2rad(params.arc_deg * k / params.views)
        u = np.array([np.cos(theta), np.sin(theta)])  # view's horizontal axis (row direction)
        w = np.array([-np.sin(theta), np.cos(theta)])  # ray direction (into the screen)
        view = out[k]
        # Ray sample positions a few columns at a time: (columns, depth, 2) for the whole view
        # is width² x 16 bytes, gigabytes when the pixel spacing claimed by a header is absurd.
        for c0 in range(0, width, chunk):
            cols = steps_mm[c0 : c0 + chunk]
            p = centre + cols[:, None, None] * u + steps_mm[None, :, None] * w  # (col, depth, 2)
            q = (p - origin[:2]) @ d2 / (sx, sy)  # continuous fine indices (i, j)
            ij = np.rint((q - (fxy - 1) / 2) / fxy).astype(np.int64)
            inside = (ij[..., 0] >= 0) & (ij[..., 0] < nx) & (ij[..., 1] >= 0) & (ij[..., 1] < ny)
            index = np.where(inside, ij[..., 1] * nx + ij[..., 0], ny * nx)
            block = flat[index.ravel()].reshape(-1, width, nz)
            view[:, c0 : c0 + chunk] = np.maximum(block.max(axis=1), background).T
        first = np.r_[centre + u * steps_mm[0], z_of[rows[0]]]
        geometry.append(
            (tuple(float(x) for x in first), (float(u[0]), float(u[1]), 0.0, 0.0, 0.0, -1.0))
        )
    img = sitk.GetImageFromArray(out)
    img.SetSpacing((params.pixel_mm, sz * fz, 1.0))
    img.SetOrigin(geometry[0][0])
    u0 = np.array(geometry[0][1][:3])
    v0 = np.array(geometry[0][1][3:])
    img.SetDirection(tuple(np.c_[u0, v0, np.cross(u0, v0)].ravel()))
    label = "MIP" if not params.exclude_segment else f"MIP no {params.exclude_segment}"
    return ImageSeries(
        f"{label} {params.views}x{params.arc_deg / params.views:g}deg",
        image=img,
        plane="projection",
        slab_mode="MIP",
        cine_rate=params.cine_rate,
        slice_geometry=geometry,
    )
