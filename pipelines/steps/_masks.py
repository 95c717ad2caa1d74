"""Mask helpers shared by the segmentation, mesh and projection steps.

Full-resolution 3D morphology on a 512²x400 CT costs seconds (measured: closing radius 2 takes
12.6 s), so the segmentations decide *which* region on a coarse grid (~3 mm voxels, ~50x fewer
voxels) and only refine the region's boundary at full resolution with a threshold.
Arrays are numpy in sitk order (z, y, x); masks stay uint8/bool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipelines.types import StepError, Volume

#: Coarse slices per slab in :func:`refine`.
_SLAB = 8
#: 2D (in-plane) connectivity in a (z, y, x) array: no link between slices.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def require_ct(volume: Volume, what: str) -> np.ndarray:
    """The volume's voxels as a read-only (z, y, x) view; StepError unless it is a CT in HU."""
    if (volume.modality or "").upper() != "CT":
        raise StepError(
            f"{what} needs a CT series (Hounsfield units); this series is {volume.modality or '?'}"
        )
    if volume.image.GetDimension() != 3:
        raise StepError(f"{what} needs a 3D volume, got {volume.image.GetDimension()}D")
    return sitk.GetArrayViewFromImage(volume.image)


@dataclass(frozen=True)
class Grid:
    """An integer subsampling of a (z, y, x) array: coarse voxel i covers fine voxels i*f..i*f+f-1."""

    shape: tuple[int, int, int]
    factors: tuple[int, int, int]

    @classmethod
    def for_image(cls, image: sitk.Image, target_mm: float) -> Grid:
        """Factors that bring each axis close to ``target_mm`` (never below 1)."""
        sx, sy, sz = image.GetSpacing()
        f = tuple(max(1, round(target_mm / s)) for s in (sz, sy, sx))
        return cls(tuple(int(n) for n in reversed(image.GetSize())), f)  # type: ignore[arg-type]

    @property
    def coarse_shape(self) -> tuple[int, ...]:
        return tuple(-(-n // f) for n, f in zip(self.shape, self.factors, strict=True))

    def subsample(self, a: np.ndarray) -> np.ndarray:
        """Every f-th voxel (centre of each block); cheap, fine for wide structures."""
        sl = tuple(slice(f // 2, None, f) for f in self.factors)
        out = a[sl]
        # Pad when the last block has no centre voxel so shapes match coarse_shape.
        pad = [(0, c - o) for c, o in zip(self.coarse_shape, out.shape, strict=True)]
        return (
            np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else np.ascontiguousarray(out)
        )

    def block_max(self, a: np.ndarray) -> np.ndarray:
        """Max over each block, so thin bright structures (cortex, ribs) survive.

        Separable (x, then y, then z): each pass shrinks the array, so the whole costs about
        ``fx`` strided reads of ``a``.
        """
        out = a
        for axis in (2, 1, 0):
            f, n = self.factors[axis], out.shape[axis]
            if f == 1:
                continue
            c = -(-n // f)
            lead = (slice(None),) * axis
            red = out[lead + (slice(0, None, f),)].copy()
            for d in range(1, f):
                part = out[lead + (slice(d, None, f),)]
                # The last block may be short: it then has fewer candidates.
                dst = red[lead + (slice(0, part.shape[axis]),)] if part.shape[axis] < c else red
                np.maximum(dst, part, out=dst)
            out = red
        return out if out is not a else a.copy()

    def box(self, coarse_mask: np.ndarray) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(coarse, fine) slices of the bounding box of ``coarse_mask``; None when empty."""
        cs, fs = [], []
        for axis, (n, f) in enumerate(zip(self.shape, self.factors, strict=True)):
            other = tuple(i for i in range(3) if i != axis)
            nz = np.flatnonzero(coarse_mask.any(axis=other))
            if not len(nz):
                return None
            c0, c1 = int(nz[0]), int(nz[-1]) + 1
            cs.append(slice(c0, c1))
            fs.append(slice(c0 * f, min(c1 * f, n)))
        return tuple(cs), tuple(fs)

    def upsample(self, c: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Nearest-neighbour to the fine grid (or to ``shape``, for a box starting on a block)."""
        out = c
        for axis, (n, f) in enumerate(zip(shape or self.shape, self.factors, strict=True)):
            if f > 1:
                out = np.repeat(out, f, axis=axis)
                if out.shape[axis] != n:
                    out = out[(slice(None),) * axis + (slice(0, n),)]
        return np.ascontiguousarray(out)

    def voxel_ml(self, image: sitk.Image) -> float:
        """Volume of one coarse voxel in mL."""
        sx, sy, sz = image.GetSpacing()
        fz, fy, fx = self.factors
        return float(sx * fx * sy * fy * sz * fz) / 1000.0


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (background not connected to the slice border in-plane).

    Per-slice filling does not have the 3D trap (lungs touching the first or last
    slice leak to the volume border in 3D and are silently left unfilled).
    """
    from scipy import ndimage

    labels, n = ndimage.label(~mask, structure=_IN_PLANE)
    if n == 0:
        return mask.copy()
    border = np.zeros(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(face)] = True
    border[0] = True  # label 0 = the mask itself
    filled: np.ndarray = mask | ~border[labels]
    return filled


def components(mask: np.ndarray, min_voxels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """3D face-connected components: (labels, sizes) with sizes[0] = 0 for the background."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    if min_voxels > 1:
        sizes[sizes < min_voxels] = 0
    return labels, sizes


def erode(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """Binary erosion by a box of half-widths (z, y, x): separable, fast on coarse grids."""
    from scipy import ndimage

    size = tuple(2 * r + 1 for r in radius)
    eroded: np.ndarray = ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="nearest")
    return eroded.view(bool)


def dilate(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """Binary dilation by a box of half-widths (z, y, x)."""
    from scipy import ndimage

    size = tuple(2 * r + 1 for r in radius)
    dilated: np.ndarray = ndimage.maximum_filter(mask.view(np.uint8), size=size, mode="constant")
    return dilated.view(bool)


def refine(
    grid: Grid,
    coarse_labels: np.ndarray,
    a: np.ndarray,
    condition: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Full-resolution labels from coarse labels: interior kept, boundary band thresholded.

    A coarse voxel whose 3x3x3 neighbourhood holds one label is interior: all its fine voxels
    take the label. Fine voxels near a boundary (coarse neighbourhood touches a label) take the
    label only where ``condition(a)`` holds, so the surface follows the full-resolution
    threshold instead of the coarse blocks. Only the labels' bounding box is computed (lungs
    fill a fraction of a chest CT); the rest stays zero pages. Labels must be < 16.
    """
    from scipy import ndimage

    lo = ndimage.minimum_filter(coarse_labels, size=3, mode="nearest")
    hi = ndimage.maximum_filter(coarse_labels, size=3, mode="nearest")
    out = np.zeros(grid.shape, np.uint8)
    box = grid.box(hi > 0)
    if box is None:
        return out
    (cz, cy, cx), (fz, fy, fx) = box
    interior = np.where(lo == hi, coarse_labels, 0).astype(np.uint8)
    # One upsampled array carries both: high nibble interior label, low nibble band label.
    code_c = (interior << 4) | hi.astype(np.uint8)
    single = int(coarse_labels.max()) <= 1
    f = grid.factors[0]
    # Slabs of coarse slices keep the temporaries small (peak memory) and in cache.
    for c0 in range(cz.start, cz.stop, _SLAB):
        c1 = min(c0 + _SLAB, cz.stop)
        z = slice(c0 * f, min(c1 * f, grid.shape[0]))
        shape = (z.stop - z.start, fy.stop - fy.start, fx.stop - fx.start)
        code = grid.upsample(code_c[c0:c1, cy, cx], shape)
        cond = condition(a[z, fy, fx]).view(np.uint8)
        if single:  # interior (code 17) or band (1) with the condition
            code += cond
            np.greater_equal(code, 2, out=out.view(bool)[z, fy, fx])
            continue
        # Interior label where set (band equals it there), else band label where the condition
        # holds; in-place uint8 arithmetic (np.where on 100M voxels is several times slower).
        band = code & 15
        np.multiply(band, cond, out=band)
        code >>= 4
        np.maximum(code, band, out=out[z, fy, fx])
    return out


def to_labelmap_image(labels: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A uint8 sitk image on ``like``'s grid."""
    img = sitk.GetImageFromArray(labels.astype(np.uint8, copy=False))
    img.CopyInformation(like)
    return img
