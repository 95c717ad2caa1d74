"""Shared helpers of the series-reading tests: data paths, reference values, geometry checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset

from workers.reading.series import SeriesFiles, read_series, scan
from workers.reading.source import SourceSeries

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EDGE = DATA / "edge-cases"

FAILING = EDGE / "series" / "failing"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data missing: {DATA}")


def only(folder: Path) -> SeriesFiles:
    found = scan(folder)
    assert len(found) == 1, [s.name for s in found]
    return found[0]


def read(folder: Path) -> SourceSeries:
    return read_series(only(folder))


_cache: dict[Path, SourceSeries] = {}


def cached(folder: Path) -> SourceSeries:
    if folder not in _cache:
        _cache[folder] = read(folder)
    return _cache[folder]


def rescaled(path: Path, frame: int | None = None) -> np.ndarray:
    """Reference values the slow, obvious way: pydicom decode, float64 rescale."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float64)
    if frame is not None:
        arr = arr[frame] if arr.ndim == 3 else arr
    return arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def assert_classic_geometry(src: SourceSeries, tol: float = 1e-3) -> None:
    """Slice k of the volume sits at header k's position; axes follow its orientation."""
    img = src.volume.image
    n = img.GetSize()[2]
    assert len(src.headers) == n == len(src.files)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    iop = np.array(src.headers[0].ImageOrientationPatient, dtype=float)
    np.testing.assert_allclose(direction[:, 0], iop[:3], atol=1e-5)
    np.testing.assert_allclose(direction[:, 1], iop[3:], atol=1e-5)
    np.testing.assert_allclose(
        img.GetSpacing()[:2], [float(x) for x in src.first.PixelSpacing][::-1]
    )
    for k in sorted({0, 1, n // 2, n - 1}):
        ipp = np.array(src.headers[k].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=tol)
        assert "PixelData" not in src.headers[k]


def assert_pixels(src: SourceSeries, samples: int = 200) -> None:
    """Sampled voxels equal pydicom's decoded + rescaled values of the same file."""
    arr = sitk.GetArrayViewFromImage(src.volume.image)
    rng = np.random.default_rng(0)
    n = arr.shape[0]
    for k in sorted({0, n // 3, n - 1}):
        ref = rescaled(src.files[k])
        ys = rng.integers(0, arr.shape[1], samples)
        xs = rng.integers(0, arr.shape[2], samples)
        np.testing.assert_allclose(arr[k, ys, xs], ref[ys, xs], rtol=1e-6, atol=1e-3)
        # and the whole slice, which also catches a transposed or flipped slice
        np.testing.assert_allclose(arr[k], ref, rtol=1e-6, atol=1e-3)


# --- scan -------------------------------------------------------------------------------------


def on_source_plane(src: SourceSeries, ds: Dataset, shift_px: float = 0.0) -> np.ndarray:
    """The volume sampled (linear) on the plane of one source slice; -30000 outside."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    r, c = iop[:3], iop[3:]
    sy, sx = (float(v) for v in ds.PixelSpacing)
    plane = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkFloat32)
    plane.SetOrigin((np.array(ds.ImagePositionPatient, dtype=float) + shift_px * sy * c).tolist())
    plane.SetSpacing((sx, sy, 1.0))
    plane.SetDirection(np.stack([r, c, np.cross(r, c)], axis=1).flatten().tolist())
    resampled = sitk.Resample(
        src.volume.image, plane, sitk.Transform(), sitk.sitkLinear, -30000.0, sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(resampled)[0]


#: HU per mm along x, y, z of a linear test pattern: trilinear resampling reproduces it exactly,
#: so any geometry error shows (half a 0.49 mm pixel = 10 HU, half a 4.2 mm slice = 63 HU).
RAMP = np.array([20.0, 25.0, 30.0])


def ramp(ds: Dataset) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    sy, sx = (float(v) for v in ds.PixelSpacing)
    j, i = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
    pts = (
        np.array(ds.ImagePositionPatient, dtype=float)
        + i[..., None] * sx * iop[:3]
        + j[..., None] * sy * iop[3:]
    )
    return pts @ RAMP
