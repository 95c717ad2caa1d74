"""segment.bone on a real contrast-enhanced abdomen CT: bone in, contrast-filled blood out.

The shared series (134 x 3 mm, Philips, portal-venous/late-arterial phase) has its aorta and left
ventricle at 250-350 HU, above the 300 HU bone threshold: a plain threshold put both into the bone
segment. Points below are patient coordinates (LPS, mm) read off this series:
- aortic lumen centres from the diaphragm to the arch (descending aorta, anterior-left of the
  vertebral bodies), mean 260-315 HU within 6 mm;
- the left ventricle cavity centre, mean about 310 HU within 6 mm;
- vertebral body centres (L4, L1, T10 levels), marrow of 200-300 HU inside cortex.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipelines import Volume, get_step
from workers.reading.series import read_series, scan

CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-abdomen-tcia" / "series"
pytestmark = pytest.mark.skipif(not CT.is_dir(), reason="shared data absent")

AORTA = [
    (26.9, 109.8, 337.9),
    (27.9, 114.1, 361.9),
    (30.1, 119.5, 385.9),  # 209 voxels of a 300 HU threshold within 6 mm here
    (31.2, 124.8, 409.9),
    (29.0, 129.1, 433.9),
    (27.9, 130.2, 457.9),
]
LEFT_VENTRICLE = (67.7, 49.6, 403.9)
VERTEBRAL_BODIES = [(7.5, 117.3, 175.9), (7.5, 117.3, 265.9), (7.5, 128.1, 370.9)]
RIB_LEVEL_Z = 430.9  # an axial slice through the lower thorax: ribs on both sides
SPINE_X = 7.5


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_series(scan([CT])[0]).volume


def _label(name: str, volume: Volume, **params) -> np.ndarray:
    st = get_step(name)
    (lm,) = st(volume, st.validate(params))
    return sitk.GetArrayFromImage(lm.image)


@pytest.fixture(scope="module")
def bone(ct: Volume) -> np.ndarray:
    return _label("segment.bone", ct) > 0


def _sphere(image: sitk.Image, centre: tuple[float, float, float], r_mm: float) -> np.ndarray:
    """(z, y, x) mask of the voxels whose centres lie within r_mm of ``centre`` (LPS mm)."""
    nx, ny, nz = image.GetSize()
    sx, sy, sz = image.GetSpacing()
    i, j, k = image.TransformPhysicalPointToContinuousIndex(centre)
    z, y, x = np.ogrid[:nz, :ny, :nx]
    return ((x - i) * sx) ** 2 + ((y - j) * sy) ** 2 + ((z - k) * sz) ** 2 <= r_mm**2


def test_contrast_filled_aorta_and_heart_are_not_bone(ct: Volume, bone: np.ndarray) -> None:
    a = sitk.GetArrayViewFromImage(ct.image)
    for centre in [*AORTA, LEFT_VENTRICLE]:
        ball = _sphere(ct.image, centre, 6.0)
        assert 240 < a[ball].mean() < 330, (centre, a[ball].mean())  # enhanced blood is there
        assert np.count_nonzero(bone & ball) == 0, centre
    # What the plain 300 HU threshold did (the defect this guards against): blood counted.
    plain = _label("segment.bone", ct, core_hu=300.0) > 0
    assert np.count_nonzero(plain & _sphere(ct.image, AORTA[2], 6.0)) > 100
    assert np.count_nonzero(plain & _sphere(ct.image, LEFT_VENTRICLE, 6.0)) > 100


def test_vertebrae_and_ribs_stay_bone(ct: Volume, bone: np.ndarray) -> None:
    for centre in VERTEBRAL_BODIES:
        ball = _sphere(ct.image, centre, 6.0)
        assert np.count_nonzero(bone & ball) > 0.1 * np.count_nonzero(ball), centre
    k = ct.image.TransformPhysicalPointToIndex((SPINE_X, 0.0, RIB_LEVEL_Z))[2]
    spine_i = ct.image.TransformPhysicalPointToIndex((SPINE_X, 0.0, RIB_LEVEL_Z))[0]
    labels, n = ndimage.label(bone[k])
    sizes = ndimage.sum(bone[k], labels, range(1, n + 1))
    xs = [c[1] for c in ndimage.center_of_mass(bone[k], labels, range(1, n + 1))]
    lateral = [x for x, s in zip(xs, sizes, strict=True) if s >= 20 and abs(x - spine_i) > 80]
    left = sum(x > spine_i for x in lateral)
    assert left >= 3 and len(lateral) - left >= 3, lateral  # rib sections on both sides


def test_body_and_bone_volumes_are_plausible(ct: Volume, bone: np.ndarray) -> None:
    voxel_ml = float(np.prod(ct.image.GetSpacing())) / 1000.0
    body = _label("segment.body", ct) > 0
    body_l = np.count_nonzero(body) * voxel_ml / 1000.0
    bone_ml = np.count_nonzero(bone) * voxel_ml
    # 134 x 3 mm of an adult abdomen and lower chest: tens of litres, about a litre of bone.
    assert 20.0 < body_l < 50.0, body_l
    assert 700.0 < bone_ml < 1500.0, bone_ml
    assert np.count_nonzero(bone & ~body) < 0.01 * np.count_nonzero(bone)
