"""projection.rotating_mip: view geometry in patient space, head-to-foot rows, windows, segments."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines import Code, Labelmap, Segment, StepError, Volume, get_step

AXIAL_FLIPPED = (1, 0, 0, 0, -1, 0, 0, 0, -1)  # rows anterior-ward, slices head -> foot
SAGITTAL = (0, 0, 1, 1, 0, 0, 0, -1, 0)  # columns along y, rows foot-ward, slices along x
BONE = Segment(1, "Bone", Code("85756007", "SCT", "Tissue"), Code("272673000", "SCT", "Bone"))


def volume_with_spot(direction, spot_ijk=(30, 14, 9)) -> tuple[Volume, np.ndarray, Labelmap]:
    """Soft tissue block with a 3-voxel bright spot (1000 HU) and a 300 HU rod; + bone labelmap."""
    a = np.full((24, 48, 56), -1000, np.int16)  # (k, j, i)
    a[4:20, 8:40, 8:48] = 40
    i, j, k = spot_ijk
    a[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = 1000
    a[4:20, 30, 40] = 300  # a vessel along the slice axis
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetDirection(direction)
    img.SetOrigin((12.0, -40.0, 300.0))
    bone = sitk.GetImageFromArray((a == 1000).astype(np.uint8))
    bone.CopyInformation(img)
    spot = np.array(img.TransformIndexToPhysicalPoint((i, j, k)))
    return Volume(img, "CT"), spot, Labelmap("Bone", bone, (BONE,))


def mip(volume: Volume, prior=(), **params):
    st = get_step("projection.rotating_mip")
    (out,) = st(volume, st.validate(params), prior)
    return out


@pytest.mark.parametrize("direction", [AXIAL_FLIPPED, SAGITTAL], ids=["axial", "sagittal"])
def test_each_view_shows_the_spot_where_its_geometry_says(direction) -> None:
    volume, spot, _ = volume_with_spot(direction)
    out = mip(volume, views=12, pixel_mm=2.0)
    assert out.kind == "series" and out.plane == "projection" and out.cine_rate == 10.0
    views = sitk.GetArrayFromImage(out.image)
    assert views.dtype == np.int16 and views.shape[0] == 12 and len(out.slice_geometry) == 12
    col_mm, row_mm = out.image.GetSpacing()[:2]
    for view, (ipp, iop) in zip(views, out.slice_geometry, strict=True):
        u, v = np.array(iop[:3]), np.array(iop[3:])
        assert np.allclose(v, (0, 0, -1)) and abs(u[2]) < 1e-9 and np.isclose(u @ u, 1.0)
        assert view.max() == 1000
        rows, cols = np.nonzero(view == 1000)
        r, c = rows.mean(), cols.mean()  # centre of the spot's image
        pixel = np.array(ipp) + c * col_mm * u + r * row_mm * v
        # The spot projects onto this pixel along the viewing direction (normal to u and v).
        assert abs((spot - pixel) @ u) <= col_mm, (spot, pixel, u)
        assert abs((spot - pixel) @ v) <= row_mm, (spot, pixel, v)


def test_views_turn_by_the_requested_angle() -> None:
    volume, _, _ = volume_with_spot(AXIAL_FLIPPED)
    out = mip(volume)
    assert len(out.slice_geometry) == 36
    us = np.array([g[1][:3] for g in out.slice_geometry])
    angles = np.degrees(np.arccos(np.clip(np.sum(us[1:] * us[:-1], axis=1), -1, 1)))
    assert np.allclose(angles, 10.0)


@pytest.mark.parametrize("direction", [AXIAL_FLIPPED, SAGITTAL], ids=["axial", "sagittal"])
def test_bone_excluded_and_hu_window(direction) -> None:
    volume, _, bone = volume_with_spot(direction)
    no_bone = sitk.GetArrayFromImage(mip(volume, (bone,), exclude_segment="bone").image)
    assert no_bone.max() == 300  # the vessel is now the brightest thing
    windowed = sitk.GetArrayFromImage(mip(volume, lower_hu=-200, upper_hu=500).image)
    assert windowed.max() == 300 and windowed.min() == -200
    only = sitk.GetArrayFromImage(mip(volume, (bone,), only_segment="bone").image)
    assert only.max() == 1000 and not (only == 300).any()


def test_nothing_to_project_is_an_error() -> None:
    volume, _, _ = volume_with_spot(AXIAL_FLIPPED)
    with pytest.raises(StepError, match="nothing left"):
        mip(volume, lower_hu=2000)
