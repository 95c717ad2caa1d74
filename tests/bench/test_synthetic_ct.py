"""The synthetic CT generator (bench/synthetic.py): reproducible, valid, anatomically labelled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from bench.synthetic import write_synthetic_ct
from pipelines.testing import SLICES_HU_BONE as HU_BONE
from pipelines.testing import SLICES_HU_LUNG as HU_LUNG
from pipelines.testing import SLICES_HU_SOFT as HU_SOFT
from pipelines.testing import SLICES_HU_TABLE as HU_TABLE
from workers.reading.series import read_series, scan
from workers.reading.source import SeriesError

SMALL = {"n_slices": 24, "size": 128, "spacing": (3.6, 3.6, 5.0)}


def test_same_seed_same_bytes_other_seed_other_series(tmp_path: Path) -> None:
    a = write_synthetic_ct(tmp_path / "a", **SMALL)
    b = write_synthetic_ct(tmp_path / "b", **SMALL)
    c = write_synthetic_ct(tmp_path / "c", seed=1, **SMALL)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    da, dc = pydicom.dcmread(a[3]), pydicom.dcmread(c[3])
    assert da.SeriesInstanceUID != dc.SeriesInstanceUID
    assert not np.array_equal(da.pixel_array, dc.pixel_array)


def _hu_at(img: sitk.Image, x: float, y: float, z: float) -> float:
    return float(img[img.TransformPhysicalPointToIndex((x, y, z))])


def test_reads_back_as_a_ct_volume_with_the_labelled_anatomy(tmp_path: Path) -> None:
    files = write_synthetic_ct(tmp_path, **SMALL)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.RescaleIntercept == -1024
    src = read_series(scan(tmp_path)[0])
    img = src.volume.image
    assert img.GetPixelID() == sitk.sitkInt16 and img.GetSize() == (128, 128, 24)
    np.testing.assert_allclose(img.GetSpacing(), (3.6, 3.6, 5.0))
    assert src.files[0] == files[-1]  # InstanceNumber 1 is the top slice; volume runs upwards
    z = 0.0  # mid-scan: lungs at their widest
    assert abs(_hu_at(img, 0, -200, z) + 1000) < 50  # air in front of the body
    assert abs(_hu_at(img, 0, 30, z) - HU_SOFT) < 50  # mediastinum
    assert (
        abs(_hu_at(img, 75, -5, z) - HU_LUNG) < 50 and abs(_hu_at(img, -75, -5, z) - HU_LUNG) < 50
    )
    assert abs(_hu_at(img, 0, 70, z) - HU_BONE) < 50  # vertebral body
    assert abs(_hu_at(img, 0, 135, z) - HU_TABLE) < 50  # table, below the body
    assert abs(_hu_at(img, 0, 126, z) + 1000) < 50  # the air gap between body and table


@pytest.mark.parametrize("touch", [False, True])
def test_lungs_touch_the_end_slices_only_when_asked(tmp_path: Path, touch: bool) -> None:
    write_synthetic_ct(tmp_path, lungs_touch_ends=touch, **SMALL)
    img = read_series(scan(tmp_path)[0]).volume.image
    arr = sitk.GetArrayFromImage(img)
    lung = (arr > -900) & (arr < -700)
    per_slice = lung.reshape(len(arr), -1).sum(axis=1)
    assert per_slice[len(arr) // 2] > 100
    assert (per_slice[0] > 100 and per_slice[-1] > 100) == touch
    assert (per_slice[0] == 0 and per_slice[-1] == 0) == (not touch)


def test_irregular_spacing_and_mixed_sizes_are_refused(tmp_path: Path) -> None:
    files = write_synthetic_ct(tmp_path / "s", n_slices=8, size=32, spacing=(14.4, 14.4, 5.0))
    # sorted gaps 5.3, 4.3, 5.5, 5.4, 4.2, 5.7, 4.6 mm: jitter, neither blocks nor a hole
    for f, dz in zip(files, [0, 0.4, -0.3, 0.5, 0.1, -0.4, 0.3, 0], strict=True):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + dz
        ds.save_as(f)
    with pytest.raises(SeriesError, match="uneven slice spacing"):
        read_series(scan(tmp_path / "s")[0])
    a = write_synthetic_ct(tmp_path / "m", n_slices=3, size=32, spacing=(14.4, 14.4, 5.0))
    b = write_synthetic_ct(tmp_path / "n", n_slices=3, size=48, spacing=(9.6, 9.6, 5.0))
    uid = pydicom.dcmread(a[0]).SeriesInstanceUID
    for f in b:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(tmp_path / "m" / f"x{f.name}")
    with pytest.raises(SeriesError, match=r"mixed image sizes \(32x32, 48x48\)"):
        read_series(scan(tmp_path / "m")[0])


def test_header_only_objects_have_no_pixel_data(tmp_path: Path) -> None:
    for f in write_synthetic_ct(tmp_path, n_slices=3, size=32, spacing=(14.4, 14.4, 5.0)):
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    with pytest.raises(SeriesError, match="no pixel data"):
        read_series(scan(tmp_path)[0])
