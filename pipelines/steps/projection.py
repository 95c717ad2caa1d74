"""Rotating maximum intensity projection: N views about the patient's head-foot axis (cine loop).

Each axial slice is projected in 2D: in-plane voxels are binned by their position along the
view's horizontal axis and the max taken per bin (one gather + ``np.maximum.reduceat`` per view),
on a grid block-max-pooled to about ``pixel_mm``. No 3D resampling per view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from pipelines.registry import step
from pipelines.steps._masks import Grid
from pipelines.steps.mesh import labelmap_for
from pipelines.types import ImageSeries, Output, StepError, Volume


class MipParams(BaseModel, frozen=True, extra="forbid"):
    views: int = Field(36, ge=1, le=360, description="Number of views over a full turn.")
    arc_deg: float = Field(360.0, gt=0.0, le=360.0, description="Total rotation (degrees).")
    pixel_mm: float = Field(
        1.5, gt=0.0, description="Pixel size of the views (mm) along the rotated horizontal axis."
    )
    lower_hu: float | None = Field(
        None, description="Ignore voxels below this value (HU or source units); None = no limit."
    )
    upper_hu: float | None = Field(
        None, description="Ignore voxels above this value (HU or source units); None = no limit."
    )
    exclude_segment: str | None = Field(
        None, description="Remove this segment before projecting (e.g. bone); None = keep all."
    )
    only_segment: str | None = Field(
        None, description="Project only inside this segment (e.g. lungs); None = everywhere."
    )
    cine_rate: float = Field(10.0, gt=0.0, le=60.0, description="Cine playback (frames/s).")


def _axial(image: sitk.Image) -> bool:
    """Slices are axial: third axis along LPS z, in-plane axes horizontal."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    return abs(d[2, 2]) > 0.999 and abs(d[2, 0]) < 1e-3 and abs(d[2, 1]) < 1e-3


def _to_axial(image: sitk.Image) -> sitk.Image:
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
        -1024.0,
        image.GetPixelID(),
    )


@step("projection.rotating_mip", version="1.0.0", params=MipParams, produces="series")
def rotating_mip(volume: Volume, params: MipParams, prior: Sequence[Output] = ()) -> ImageSeries:
    """Rotating MIP about the head-foot axis (default 36 views, 10° apart), played as a cine."""
    image = volume.image
    if image.GetDimension() != 3:
        raise StepError("a rotating MIP needs a 3D volume")
    masks: list[tuple[np.ndarray, bool]] = []
    for name, inside in ((params.exclude_segment, False), (params.only_segment, True)):
        if name:
            lm, segs = labelmap_for(volume, name, prior)
            lab = sitk.GetArrayFromImage(lm.image)
            masks.append((np.isin(lab, [s.label for s in segs]), inside))
    if not _axial(image):
        image = _to_axial(image)
        masks = (
            [
                (sitk.GetArrayFromImage(_to_axial(sitk.GetImageFromArray(m.view(np.uint8)))) > 0, i)
                for m, i in masks
            ]
            if masks
            else []
        )
    a = sitk.GetArrayViewFromImage(image)
    floor = np.iinfo(np.int16).min if a.dtype == np.int16 else float(a.min())
    background = params.lower_hu if params.lower_hu is not None else float(a.min())
    if masks or params.lower_hu is not None or params.upper_hu is not None:
        keep = np.ones(a.shape, bool)
        for m, inside in masks:
            keep &= m if inside else ~m
        if params.lower_hu is not None:
            keep &= a >= params.lower_hu
        if params.upper_hu is not None:
            keep &= a <= params.upper_hu
        if not keep.any():
            raise StepError("nothing left to project inside the chosen window/segment")
        a = np.where(keep, a, np.asarray(floor, a.dtype))
    # Pool in-plane to about pixel_mm (max keeps small bright vessels and bone).
    sx, sy, sz = image.GetSpacing()
    fxy = max(1, int(round(params.pixel_mm / min(sx, sy))))
    grid = Grid(tuple(reversed(image.GetSize())), (1, fxy, fxy))  # type: ignore[arg-type]
    pooled = grid.block_max(np.asarray(a)) if fxy > 1 else np.ascontiguousarray(a)
    nz, ny, nx = pooled.shape
    d = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin())
    # Physical x, y of each pooled in-plane voxel centre (the same for every axial slice).
    jj, ii = np.meshgrid(
        np.arange(ny) * fxy + (fxy - 1) / 2, np.arange(nx) * fxy + (fxy - 1) / 2, indexing="ij"
    )
    pos = origin[:2, None] + d[:2, :2] @ np.stack([ii.ravel() * sx, jj.ravel() * sy])
    centre = pos.mean(axis=1)
    half = float(np.max(np.hypot(*(pos - centre[:, None])))) + params.pixel_mm
    width = int(np.ceil(2 * half / params.pixel_mm))
    # Rows go head -> foot: slice order by descending z.
    z_of = origin[2] + d[2, 2] * sz * np.arange(nz)
    rows = np.argsort(-z_of, kind="stable")
    # (in-plane voxel, slice) layout: a view is a row gather + a reduceat over contiguous rows.
    flat = np.ascontiguousarray(pooled.reshape(nz, -1)[rows].T)
    out = np.full((params.views, nz, width), background, dtype=np.int16)
    geometry = []
    for k in range(params.views):
        theta = np.deg2rad(params.arc_deg * k / params.views)
        u = np.array([np.cos(theta), np.sin(theta)])  # view's horizontal axis (row direction)
        s = ((u @ (pos - centre[:, None])) + half) / params.pixel_mm
        bins = np.clip(s.astype(np.int64), 0, width - 1)
        order = np.argsort(bins, kind="stable")
        sorted_bins = bins[order]
        starts = np.flatnonzero(np.r_[True, sorted_bins[1:] != sorted_bins[:-1]])
        mip = np.maximum.reduceat(flat[order], starts, axis=0)
        out[k][:, sorted_bins[starts]] = np.maximum(mip, background).T
        first = np.r_[centre - half * u, z_of[rows[0]]]
        orient = (u[0], u[1], 0.0, 0.0, 0.0, -1.0)
        geometry.append(
            (
                tuple(float(x) for x in first + np.r_[u, 0] * params.pixel_mm / 2),
                tuple(float(x) for x in orient),
            )
        )
    img = sitk.GetImageFromArray(out)
    img.SetSpacing((params.pixel_mm, sz, 1.0))
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
