"""segment.body / segment.lungs / segment.bone on the analytic phantom (real CT: tests/workers)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines import StepError, Volume, get_step
from pipelines.testing import chest_ct


def run(name: str, volume: Volume, **params) -> tuple[np.ndarray, list]:
    st = get_step(name)
    (lm,) = st(volume, st.validate(params))
    assert lm.kind == "labelmap"
    assert lm.image.GetPixelID() == sitk.sitkUInt8
    assert lm.image.GetSize() == volume.image.GetSize()
    assert lm.image.GetOrigin() == volume.image.GetOrigin()
    assert lm.image.GetDirection() == volume.image.GetDirection()
    return sitk.GetArrayFromImage(lm.image), list(lm.segments)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def phantom():
    return chest_ct()


def test_body_is_the_patient_without_the_table(phantom) -> None:
    labels, segs = run("segment.body", phantom.volume)
    assert [(s.name, s.type.value, s.category.value) for s in segs] == [
        ("Body", "38266002", "91723000")
    ]
    body = labels == 1
    assert dice(body, phantom.body) > 0.99
    assert not (body & phantom.table).any()
    # Lungs and trachea are inside the patient: filled, not holes.
    assert body[phantom.lungs > 0].all()


def test_lungs_left_right_and_airways_excluded(phantom) -> None:
    labels, segs = run("segment.lungs", phantom.volume)
    assert [(s.label, s.name, s.type.value) for s in segs] == [
        (1, "Right lung", "3341006"),
        (2, "Left lung", "44029006"),
    ]
    for label in (1, 2):  # right lung is at LPS -x in the phantom, left at +x
        assert dice(labels == label, phantom.lungs == label) > 0.97
    in_lung = np.count_nonzero((labels > 0) & phantom.trachea)
    assert in_lung < 0.05 * np.count_nonzero(phantom.trachea)


def test_lungs_touching_first_and_last_slice_are_found() -> None:
    ph = chest_ct(lungs_touch_ends=True)
    assert (ph.lungs[0] > 0).any() and (ph.lungs[-1] > 0).any()
    labels, segs = run("segment.lungs", ph.volume)
    assert len(segs) == 2
    for z in (0, -1):  # 3D hole filling would leave these slices empty
        assert dice(labels[z] > 0, ph.lungs[z] > 0) > 0.95
    assert dice(labels > 0, ph.lungs > 0) > 0.97


def test_bone_excludes_dense_table(phantom) -> None:
    labels, segs = run("segment.bone", phantom.volume)
    assert [(s.name, s.type.value, s.category.value) for s in segs] == [
        ("Bone", "272673000", "85756007")
    ]
    assert dice(labels == 1, phantom.bone) > 0.97
    assert not (labels.astype(bool) & phantom.table).any()


@pytest.mark.parametrize("name", ["segment.body", "segment.lungs", "segment.bone"])
def test_non_ct_is_refused(phantom, name: str) -> None:
    mr = Volume(phantom.volume.image, "MR")
    with pytest.raises(StepError, match="needs a CT"):
        run(name, mr)


def test_nothing_found_is_an_error_not_an_empty_labelmap() -> None:
    air = sitk.Image(64, 64, 20, sitk.sitkInt16) - 1000
    with pytest.raises(StepError, match="no patient found"):
        run("segment.body", Volume(air, "CT"))
    no_lungs = chest_ct(n_slices=20, size=96, spacing=(3.0, 3.0, 3.0), with_lungs=False)
    with pytest.raises(StepError, match="no lungs found"):
        run("segment.lungs", no_lungs.volume)
    no_bone = chest_ct(n_slices=20, size=96, spacing=(3.0, 3.0, 3.0), with_bone=False)
    with pytest.raises(StepError, match="no bone found"):
        run("segment.bone", no_bone.volume)


def test_grid_block_max_and_refine_against_brute_force() -> None:
    from pipelines.steps._masks import Grid, refine

    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, (13, 17, 22)).astype(np.int16)
    grid = Grid(a.shape, (3, 4, 5))  # no axis divides evenly: short last blocks
    top = grid.block_max(a)
    ref = np.full(grid.coarse_shape, np.iinfo(np.int16).min, np.int16)
    for (z, y, x), v in np.ndenumerate(a):
        ref[z // 3, y // 4, x // 5] = max(ref[z // 3, y // 4, x // 5], v)
    assert np.array_equal(top, ref)
    coarse = np.zeros(grid.coarse_shape, np.uint8)
    coarse[1:4, 1:4, 1:4] = 1  # coarse voxel (2, 2, 2) is the only interior one
    out = refine(grid, coarse, a, lambda sub: sub > 0).astype(bool)
    interior = np.zeros_like(coarse)
    interior[2, 2, 2] = 1
    interior = grid.upsample(interior).astype(bool)
    band = np.zeros_like(coarse)
    band[0:5, 0:5, 0:5] = 1  # within one coarse voxel of the label
    band = grid.upsample(band).astype(bool) & ~interior
    assert out[interior].all()  # interior kept whatever the threshold says
    assert np.array_equal(out[band], a[band] > 0)  # boundary band follows the threshold
    assert not out[~interior & ~band].any()
