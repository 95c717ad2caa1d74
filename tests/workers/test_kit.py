"""The step author's kit (workers.processing.testing): phantoms as DICOM, run, write, validate.

The kit's own checks are tested against the truth: the source series it writes reads back
voxel-exact at the right patient coordinates and passes dciodvfy; its read-back finds a SEG that
does not match the labelmap; a failed step and a missing dciodvfy are reported, not hidden.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipelines import Labelmap
from pipelines.testing import chest_ct, head_mr, oblique
from workers.processing import testing as kit

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason=kit.NO_DCIODVFY)


@pytest.mark.parametrize(
    "phantom",
    [
        lambda: chest_ct(n_slices=24, size=96, spacing=(2.0, 3.0, 4.5), direction=oblique(20)),
        lambda: head_mr(n_slices=16, size=96, direction=oblique(-10, "y")),
    ],
    ids=["ct-oblique-anisotropic", "mr-oblique"],
)
def test_source_series_reads_back_voxel_exact_in_patient_coordinates(phantom, tmp_path) -> None:
    volume = phantom().volume
    files = kit.write_source_series(volume, tmp_path)
    src = kit.read_source(tmp_path, tmp_path / "unused")
    assert src.modality == volume.modality and len(files) == volume.image.GetSize()[2]
    got, want = src.volume.image, volume.image
    assert np.array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(want))
    np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(got.GetSpacing(), want.GetSpacing(), atol=1e-5)
    for k in (0, len(files) - 1):
        ipp = [float(v) for v in pydicom.dcmread(files[k]).ImagePositionPatient]
        np.testing.assert_allclose(ipp, want.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
        np.testing.assert_allclose(got.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=1e-4)
    if DCIODVFY:
        assert kit.dciodvfy_errors(files[0]) == []


def test_same_volume_same_series(tmp_path) -> None:
    volume = chest_ct(n_slices=6, size=48).volume
    a = kit.write_source_series(volume, tmp_path / "a")
    b = kit.write_source_series(volume, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_refuses_what_it_cannot_write(tmp_path) -> None:
    pet = chest_ct(n_slices=4, size=32).volume
    pet.modality = "PT"
    with pytest.raises(ValueError, match="CT or MR"):
        kit.write_source_series(pet, tmp_path)
    floats = chest_ct(n_slices=4, size=32).volume
    floats.image = sitk.Cast(floats.image, sitk.sitkFloat32)
    with pytest.raises(ValueError, match="int16"):
        kit.write_source_series(floats, tmp_path)


def test_a_folder_of_two_series_is_refused_naming_them(tmp_path) -> None:
    kit.write_source_series(chest_ct(n_slices=4, size=32).volume, tmp_path / "in" / "a")
    kit.write_source_series(head_mr(n_slices=4, size=32).volume, tmp_path / "in" / "b")
    with pytest.raises(ValueError, match="exactly one series, found 2"):
        kit.read_source(tmp_path / "in", tmp_path)


@needs_dciodvfy
def test_lungs_and_mesh_written_and_every_file_valid(ct_phantom, ct_source, tmp_path) -> None:
    result = kit.run_and_write(
        ct_source, ["segment.lungs", ("mesh.surface", {"segment": "lungs"})], tmp_path
    )
    result.assert_valid()
    assert [w.kind for w in result.written] == ["seg", "sr", "stl"]
    assert all(c.dciodvfy == [] for c in result.checks) and not result.notes
    (labelmap,) = result.outputs["segment.lungs"]
    seg = result.check("seg")
    labels = sitk.GetArrayViewFromImage(labelmap.image)
    assert seg.segments == {
        "Right lung": int(np.count_nonzero(labels == 1)),
        "Left lung": int(np.count_nonzero(labels == 2)),
    }
    # ... and those are the phantom's lungs
    truth = ct_phantom.lungs
    assert (
        2
        * np.count_nonzero((labels > 0) & (truth > 0))
        / (np.count_nonzero(labels) + np.count_nonzero(truth))
        > 0.95
    )
    (seg_file,) = result.files("seg")
    refs = [m.segment for m in result.measurements("Volume")]
    assert refs == [(seg_file.sop_instance_uid, 1), (seg_file.sop_instance_uid, 2)]
    volumes = {m.group: m.value for m in result.check("sr").measurements}
    voxel_ml = np.prod(ct_source.volume.image.GetSpacing()) / 1000
    assert volumes == pytest.approx({k: n * voxel_ml for k, n in seg.segments.items()}, rel=1e-3)
    (mesh,) = result.outputs["mesh.surface"]
    assert result.check("stl").triangles == len(mesh.faces) > 100


def test_series_outputs_are_sampled_and_read_back(mr_source, tmp_path) -> None:
    result = kit.run_and_write(mr_source, ("reformat.mpr", {"planes": ["coronal"]}), tmp_path)
    result.assert_valid()
    n = len(result.files("series"))
    assert n > 3 and len(result.checks) == 3  # first, middle, last


def test_read_back_finds_a_seg_that_is_not_the_labelmap(ct_source, tmp_path) -> None:
    result = kit.run_and_write(ct_source, "segment.lungs", tmp_path, validate=False)
    (labelmap,) = result.outputs["segment.lungs"]
    seg_file = next(w for w in result.written if w.kind == "seg")
    assert kit.check_file(seg_file, labelmap).problems == []
    shifted = sitk.GetArrayFromImage(labelmap.image)
    shifted = np.roll(shifted, 1, axis=2)
    other = sitk.GetImageFromArray(shifted)
    other.CopyInformation(labelmap.image)
    wrong = Labelmap(labelmap.description, other, labelmap.segments)
    assert "SEG voxels differ" in " ".join(kit.check_file(seg_file, wrong).problems)
    one = Labelmap(labelmap.description, labelmap.image, labelmap.segments[:1])
    assert kit.check_file(seg_file, one).problems  # the SEG holds a segment the step did not


def test_a_failed_step_is_an_error_with_its_reason(ct_source, tmp_path) -> None:
    result = kit.run_and_write(
        ct_source, ("segment.bone", {"lower_hu": 3000, "core_hu": 3000}), tmp_path
    )
    assert result.written == []
    assert result.errors == [
        "failed: segment.bone: no bone found at or above 3000 HU inside the patient "
        "(with cortex at or above 3000 HU)"
    ]
    with pytest.raises(AssertionError, match="no bone found"):
        result.assert_valid()


def test_without_dciodvfy_the_files_are_still_read_back_and_the_gap_is_said(
    ct_source, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    result = kit.run_and_write(ct_source, "segment.body", tmp_path)
    assert result.notes == [kit.NO_DCIODVFY]
    assert [c.dciodvfy for c in result.checks] == [None, None]
    assert result.check("seg").segments["Body"] > 0
    result.assert_valid()


def test_unknown_step_names_the_known_ones(ct_source, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown step 'segment.liver'"):
        kit.run_and_write(ct_source, "segment.liver", tmp_path)
