"""mesh.surface: geometry in patient coordinates, on the mask boundary, triangle budget, prior lookup."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines import Code, Labelmap, Segment, StepError, Volume, get_step
from pipelines.testing import chest_ct

# 30° about z, then a mirrored third axis (det = -1): exercises the index -> LPS transform.
C, S = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE = (C, -S, 0.0, S, C, 0.0, 0.0, 0.0, -1.0)
BONE = Segment(1, "Bone", Code("85756007", "SCT", "Tissue"), Code("272673000", "SCT", "Bone"))


def blob_labelmap(direction=OBLIQUE) -> Labelmap:
    """An ellipsoid plus a thin plate (to test the boundary) on an anisotropic oblique grid."""
    z, y, x = np.ogrid[:30, :48, :40]
    mask = ((x - 18) / 12.0) ** 2 + ((y - 22) / 15.0) ** 2 + ((z - 14) / 9.0) ** 2 <= 1
    mask |= (np.abs(x - 30) <= 1) & (y > 5) & (y < 40) & (z > 3) & (z < 26)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((0.9, 0.8, 2.0))
    img.SetDirection(direction)
    img.SetOrigin((-30.0, 12.0, 400.0))
    return Labelmap("Bone", img, (BONE,))


def mesh_of(lm: Labelmap, **params):
    volume = Volume(sitk.Cast(lm.image, sitk.sitkInt16), "CT")
    st = get_step("mesh.surface")
    (mesh,) = st(volume, st.validate({"segment": "bone", **params}), (lm,))
    return mesh


def bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Patient-space box of the voxels' extent (centres +- half a voxel)."""
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in idx])
        for idx in np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size])).reshape(3, -1).T
    ]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def test_vertices_in_patient_space_on_the_mask_boundary() -> None:
    lm = blob_labelmap()
    mesh = mesh_of(lm, contour_mm=0.0)
    assert mesh.kind == "mesh" and mesh.segment == BONE
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int32
    lo, hi = bounds(lm.image)
    assert np.all(mesh.vertices >= lo - 1e-3) and np.all(mesh.vertices <= hi + 1e-3)
    mask = np.pad(sitk.GetArrayFromImage(lm.image), 2)
    rng = np.random.default_rng(0)
    for p in mesh.vertices[rng.choice(len(mesh.vertices), 400, replace=False)]:
        i, j, k = np.rint(lm.image.TransformPhysicalPointToContinuousIndex(p.tolist())).astype(int)
        nb = mask[k + 1 : k + 4, j + 1 : j + 4, i + 1 : i + 4]  # +-1 voxel (array padded by 2)
        assert nb.min() == 0 and nb.max() == 1, f"vertex {p} is not within 1 voxel of the boundary"


def test_mesh_volume_matches_mask_and_normals_point_outward() -> None:
    for direction in (OBLIQUE, (1, 0, 0, 0, 1, 0, 0, 0, 1)):
        lm = blob_labelmap(direction)
        mesh = mesh_of(lm, contour_mm=0.0, smoothing_iterations=10)
        tri = mesh.vertices.astype(np.float64)[mesh.faces]
        signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
        voxels = sitk.GetArrayFromImage(lm.image).sum() * np.prod(lm.image.GetSpacing())
        assert signed > 0  # outward normals even on a mirrored grid
        assert abs(signed - voxels) / voxels < 0.08


def test_triangle_budget() -> None:
    mesh = mesh_of(blob_labelmap(), contour_mm=0.0, max_triangles=500)
    assert 0 < len(mesh.faces) <= 500


def test_segment_is_computed_when_not_in_prior_and_missing_names_fail() -> None:
    ph = chest_ct(n_slices=24, size=96, spacing=(3.0, 3.0, 3.0))
    st = get_step("mesh.surface")
    (mesh,) = st(ph.volume, st.validate({"segment": "lungs"}))
    assert mesh.segment.name == "Lungs"
    lo, hi = bounds(ph.volume.image)
    assert np.all(mesh.vertices >= lo - 1e-3) and np.all(mesh.vertices <= hi + 1e-3)
    with pytest.raises(StepError, match="no segment 'liver'"):
        st(ph.volume, st.validate({"segment": "liver"}))
