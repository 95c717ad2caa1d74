"""reformat.mpr on synthetic volumes: plane geometry in patient axes, slab values, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from pipelines import StepError, Volume, get_step
from pipelines.steps.reformat import PRESETS, Params, mpr

EXPECTED_IOP = {
    "axial": (1, 0, 0, 0, 1, 0),
    "coronal": (1, 0, 0, 0, 0, -1),
    "sagittal": (0, 1, 0, 0, 0, -1),
}
RAMP = np.array([0.7, -1.3, 2.1])  # value = RAMP . P + 5: averages/interpolation are exact


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    return np.array(
        sitk.VersorTransform(axis, math.radians(degrees)).GetMatrix(), dtype=float
    ).reshape(3, 3)


def _ramp_image(size, spacing, direction, origin=(-20.0, 15.0, -30.0)) -> sitk.Image:
    """float32 image whose value is a linear function of the patient coordinate."""
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(v) for v in np.asarray(direction).flatten()])
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([i, j, k], -1).reshape(-1, 3) * np.array(spacing)
    phys = idx @ np.asarray(direction).T + np.array(origin)
    arr = (phys @ RAMP + 5.0).reshape(size[::-1]).astype(np.float32)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _physical_points(out: sitk.Image, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = np.array(out.GetSize())
    idx = rng.integers(0, size, size=(n, 3))
    d = np.array(out.GetDirection()).reshape(3, 3)
    pts = idx * np.array(out.GetSpacing()) @ d.T + np.array(out.GetOrigin())
    return idx, pts


def _inside(src: sitk.Image, pts: np.ndarray, margin_mm: float) -> np.ndarray:
    d = np.array(src.GetDirection()).reshape(3, 3)
    cidx = (pts - np.array(src.GetOrigin())) @ d / np.array(src.GetSpacing())
    lo = margin_mm / np.array(src.GetSpacing())
    return np.all((cidx >= lo) & (cidx <= np.array(src.GetSize()) - 1 - lo), axis=1)


@pytest.mark.parametrize(
    "direction",
    [
        np.eye(3),  # axial acquisition
        np.diag([1.0, -1.0, -1.0]),  # flipped axes
        np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),  # sagittal acquisition
        _rotation((0.3, 1.0, 0.2), 13.0),  # oblique (generic path)
    ],
    ids=["axial", "flipped", "sagittal-acq", "oblique"],
)
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_patient_point_has_source_value(direction: np.ndarray, plane: str) -> None:
    src = _ramp_image((40, 36, 30), (0.8, 0.9, 1.5), direction)
    (out,) = mpr(Volume(src, "CT"), Params(planes=[plane], thickness_mm=3.0, spacing_mm=2.0))
    img = out.image
    assert out.plane == plane
    np.testing.assert_allclose(
        np.array(img.GetDirection()).reshape(3, 3)[:, :2].T.flatten(),
        EXPECTED_IOP[plane],
        atol=1e-12,
    )
    assert img.GetSpacing() == pytest.approx((0.8, 0.8, 2.0))
    idx, pts = _physical_points(img)
    ok = _inside(src, pts, margin_mm=1.6)  # the whole slab lies inside the source
    assert ok.sum() > 30
    arr = sitk.GetArrayViewFromImage(img)
    got = arr[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
    # Slabs weight each voxel by its overlap (partial volume): on a ramp, a slab end cutting a
    # voxel of thickness s errs by at most slope * s^2 / (8 T) per end; oblique sources are
    # resampled onto a grid that divides T, hence exact.
    normal = np.array(img.GetDirection()).reshape(3, 3)[:, 2]
    proj = np.abs(np.asarray(direction).T @ normal)
    s = np.array(src.GetSpacing())[np.argmax(proj)] if proj.max() > 0.9999 else 0.0
    tol = 2e-3 + abs(RAMP @ normal) * s**2 / (4 * 3.0)
    np.testing.assert_allclose(got, pts[ok] @ RAMP + 5.0, atol=tol)


def test_slices_stack_along_the_plane_normal() -> None:
    src = _ramp_image((20, 20, 20), (1.0, 1.0, 1.0), np.eye(3))
    outs = mpr(Volume(src, "CT"), Params(thickness_mm=2.0))
    normals = {o.plane: np.array(o.image.GetDirection()).reshape(3, 3)[:, 2] for o in outs}
    np.testing.assert_allclose(normals["axial"], [0, 0, 1])  # foot -> head
    np.testing.assert_allclose(normals["coronal"], [0, 1, 0])  # anterior -> posterior
    np.testing.assert_allclose(normals["sagittal"], [-1, 0, 0])  # left -> right
    for o in outs:
        assert o.image.GetSize()[2] == 10  # 20 mm of tissue / 2 mm slabs
        assert o.slab_thickness_mm == 2.0


def _int_volume(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def test_axial_slab_values_avg_mip_minip_int16() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 1500, size=(12, 8, 9)).astype(np.int16)
    vol = Volume(_int_volume(arr), "CT")
    groups = arr.reshape(4, 3, 8, 9).astype(np.float64)
    for mode, expect in [
        ("AVG", np.floor(groups.mean(1) + 0.5)),  # rounded half up; exact .5 cannot occur
        ("MIP", groups.max(1)),
        ("MinIP", groups.min(1)),
    ]:
        (out,) = mpr(vol, Params(planes=["axial"], thickness_mm=3.0, mode=mode))
        assert out.image.GetPixelID() == sitk.sitkInt16
        assert out.description == f"AX 3mm {mode}"
        got = sitk.GetArrayFromImage(out.image)
        np.testing.assert_array_equal(got, expect.astype(np.int16))


@pytest.mark.parametrize("plane,axis", [("coronal", 1), ("sagittal", 2)])
def test_coronal_sagittal_mip_reduce_the_right_axis(plane: str, axis: int) -> None:
    rng = np.random.default_rng(2)
    arr = rng.integers(-1000, 1500, size=(6, 12, 12)).astype(np.int16)
    (out,) = mpr(
        Volume(_int_volume(arr), "CT"), Params(planes=[plane], thickness_mm=4.0, mode="MIP")
    )
    got = sitk.GetArrayFromImage(out.image)  # (slab, image row, image column)
    mip = np.moveaxis(arr, axis, 0).reshape(3, 4, 6, 12).max(1)  # (slab, z, other)
    if plane == "sagittal":
        mip = mip[::-1]  # slabs run left -> right: x decreasing
    np.testing.assert_array_equal(got, mip[:, ::-1, :])  # image rows run head -> foot


def test_avg_rounds_instead_of_truncating() -> None:
    arr = np.zeros((3, 2, 2), np.int16)
    arr[:, 0, 0] = (-3, -4, -4)  # mean -3.67 -> -4 (truncation would give -3)
    arr[:, 0, 1] = (1, 1, 0)  # mean 0.67 -> 1
    (out,) = mpr(Volume(_int_volume(arr), "CT"), Params(planes=["axial"], thickness_mm=3.0))
    assert sitk.GetArrayFromImage(out.image)[0, 0].tolist() == [-4, 1]


def test_presets_fill_unset_fields_and_describe() -> None:
    p = Params(preset="COR 10mm MIP")
    assert (p.planes, p.thickness_mm, p.mode, p.spacing) == (("coronal",), 10.0, "MIP", 10.0)
    p = Params(preset="AX 10mm MIP", spacing_mm=5)
    assert (p.thickness_mm, p.spacing) == (10.0, 5.0)
    assert Params(planes=["sagittal", "axial", "axial"]).planes == ("axial", "sagittal")
    for name in PRESETS:
        Params(preset=name)
    src = _ramp_image((12, 12, 30), (1.0, 1.0, 1.0), np.eye(3))
    (out,) = mpr(Volume(src, "CT"), Params(preset="AX 10mm MIP"))
    assert out.description == "AX 10mm MIP"
    assert get_step("reformat.mpr").produces == ("series",)


def test_bad_params_and_inputs_are_refused() -> None:
    with pytest.raises(ValidationError):
        Params(thickness_mm=0)
    with pytest.raises(ValidationError):
        Params(preset="COR 7mm")
    with pytest.raises(ValidationError):
        Params(slab="MIP")
    with pytest.raises(ValidationError):
        Params(planes=[])
    flat = sitk.Image([16, 16, 1], sitk.sitkInt16)
    with pytest.raises(StepError, match="2D"):
        mpr(Volume(flat, "CT"), Params())
    small = _int_volume(np.zeros((4, 8, 8)))
    with pytest.raises(StepError, match="exceeds the volume extent"):
        mpr(Volume(small, "CT"), Params(planes=["axial"], thickness_mm=10.0))


def test_thinner_than_a_slice_reports_the_real_thickness() -> None:
    src = _ramp_image((10, 10, 10), (1.0, 1.0, 3.0), np.eye(3))
    (out,) = mpr(Volume(src, "CT"), Params(planes=["axial"], thickness_mm=1.0))
    assert out.slab_thickness_mm == 3.0
    assert out.description == "AX 3mm AVG"
