"""pipelines.testing: the phantoms step authors test with hold the anatomy and geometry they claim."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.testing import (
    HU_AIR,
    HU_BONE,
    HU_LUNG,
    HU_SOFT_TISSUE,
    MR_CSF,
    MR_WHITE,
    chest_ct,
    head_mr,
    oblique,
    run_step,
)


def _value_at(image: sitk.Image, lps: tuple[float, float, float]) -> float:
    return float(image[image.TransformPhysicalPointToIndex(lps)])


def test_chest_ct_tissues_at_their_patient_coordinates() -> None:
    ph = chest_ct()
    img = ph.volume.image
    assert ph.volume.modality == "CT" and img.GetPixelID() == sitk.sitkInt16
    # The grid's centre is at LPS (10, -20, 100): lungs 60 mm either side, spine 70 mm behind.
    cx, cy, cz = 10.0, -20.0, 100.0
    tol = 5 * 15  # five noise sigmas
    assert abs(_value_at(img, (cx - 60, cy - 5, cz - 10)) - HU_LUNG) < tol  # right lung (-x)
    assert abs(_value_at(img, (cx + 60, cy - 5, cz - 10)) - HU_LUNG) < tol
    assert abs(_value_at(img, (cx, cy + 70, cz)) - HU_BONE) < tol
    assert abs(_value_at(img, (cx, cy + 40, cz)) - HU_SOFT_TISSUE) < tol
    assert abs(_value_at(img, (cx + 130, cy - 90, cz)) - HU_AIR) < tol
    a = sitk.GetArrayViewFromImage(img)
    assert abs(a[ph.lungs == 1].mean() - HU_LUNG) < 2 and abs(a[ph.bone].mean() - HU_BONE) < 2
    # right lung is the one at lower x (LPS +x = patient's left)
    xs = [np.nonzero(ph.lungs == k)[2].mean() for k in (1, 2)]
    assert xs[0] < xs[1]


def test_phantoms_are_deterministic_and_seeded() -> None:
    a, b, c = (
        chest_ct(n_slices=10, size=64),
        chest_ct(n_slices=10, size=64),
        chest_ct(10, 64, seed=1),
    )
    va, vb, vc = (sitk.GetArrayFromImage(p.volume.image) for p in (a, b, c))
    assert np.array_equal(va, vb) and not np.array_equal(va, vc)
    m1, m2 = head_mr(n_slices=8, size=64), head_mr(n_slices=8, size=64)
    assert np.array_equal(
        sitk.GetArrayViewFromImage(m1.volume.image), sitk.GetArrayViewFromImage(m2.volume.image)
    )


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_oblique_is_a_rotation_and_keeps_the_centre(axis: str) -> None:
    d = np.array(oblique(25, axis)).reshape(3, 3)
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(d), 1.0)
    ph = chest_ct(n_slices=21, size=65, spacing=(2.0, 2.5, 3.0), direction=oblique(25, axis))
    img = ph.volume.image
    assert img.GetSpacing() == (2.0, 2.5, 3.0)
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((32, 32, 10)), (10, -20, 100))
    # The anatomy turns with the grid: the spine lies 70 mm along the rotated row axis.
    spine = np.array((10.0, -20.0, 100.0)) + 70.0 * d[:, 1]
    assert abs(_value_at(img, tuple(spine)) - HU_BONE) < 75


def test_head_mr_tissues_and_masks() -> None:
    ph = head_mr()
    a = sitk.GetArrayViewFromImage(ph.volume.image)
    assert ph.volume.modality == "MR"
    assert abs(a[ph.white_matter].mean() - MR_WHITE) < 5
    assert abs(a[ph.ventricles].mean() - MR_CSF) < 5
    assert not (ph.ventricles & ph.white_matter).any() and (ph.brain >= ph.ventricles).all()
    assert (ph.head >= ph.brain).all() and not (ph.skull & ph.brain).any()
    # two lateral ventricles of 4/3 pi 6x20x12 mm each
    ml = ph.ventricles.sum() * np.prod(ph.volume.image.GetSpacing()) / 1000
    assert abs(ml - 2 * 4 / 3 * np.pi * 6 * 20 * 12 / 1000) < 0.25 * ml


def test_run_step_validates_params_and_passes_prior() -> None:
    ph = chest_ct(n_slices=24, size=96, spacing=(3.0, 3.0, 3.0))
    (lungs,) = run_step("segment.lungs", ph.volume)
    assert [s.name for s in lungs.segments] == ["Right lung", "Left lung"]
    (mesh,) = run_step("mesh.surface", ph.volume, prior=[lungs], segment="left lung")
    assert mesh.segment is not None and mesh.segment.name == "Left lung"
    with pytest.raises(ValueError, match="sigma|segment|extra"):
        run_step("mesh.surface", ph.volume, no_such_param=1)
