"""Derived MPR series written from real CT and oblique MR: geometry read back, dciodvfy, UIDs."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipelines import ImageSeries, Volume, get_step
from workers.processing.runner import StepCall, run_steps
from workers.processing.testing import dciodvfy, dciodvfy_errors
from workers.reading.series import read_series, scan
from workers.reading.source import SeriesError, SourceSeries
from workers.writers import Provenance, WrittenObject, write_output
from workers.writers.derived_series import sop_class_for

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CT = DATA / "ct-abdomen-tcia" / "series"
MR = DATA / "mr-brain-oblique-ge"
TILTED = DATA / "ct-head-tilted-ge"  # the reader resamples the 18.5° gantry tilt
DCIODVFY = dciodvfy()
needs_data = pytest.mark.skipif(not CT.is_dir() or not MR.is_dir(), reason="shared data absent")
pytestmark = needs_data

# Thin slabs (clamped to one sample: linear interpolation along the normal) 10 mm apart: every
# written pixel is the trilinear interpolation of the source at its patient coordinate.
THIN = {"thickness_mm": 0.1, "spacing_mm": 10.0}


def _source(path: Path) -> SourceSeries:
    (series,) = scan(path)
    return read_series(series)


def _run(source: SourceSeries, params: dict, out: Path, rule: str = "test") -> list[WrittenObject]:
    step = get_step("reformat.mpr")
    report = run_steps(source, [StepCall(step, step.validate(params))], rule, out)
    return report.written


@pytest.fixture(scope="module")
def ct() -> SourceSeries:
    return _source(CT)


@pytest.fixture(scope="module")
def mr() -> SourceSeries:
    return _source(MR)


@pytest.fixture(scope="module")
def tilted() -> SourceSeries:
    return _source(TILTED)


@pytest.fixture(scope="module")
def tilted_thin(
    tilted: SourceSeries, tmp_path_factory: pytest.TempPathFactory
) -> list[WrittenObject]:
    return _run(tilted, THIN, tmp_path_factory.mktemp("tilted_thin"))


@pytest.fixture(scope="module")
def ct_mpr(ct: SourceSeries, tmp_path_factory: pytest.TempPathFactory) -> list[WrittenObject]:
    return _run(ct, {}, tmp_path_factory.mktemp("ct_mpr"))


@pytest.fixture(scope="module")
def ct_thin(ct: SourceSeries, tmp_path_factory: pytest.TempPathFactory) -> list[WrittenObject]:
    return _run(ct, THIN, tmp_path_factory.mktemp("ct_thin"))


@pytest.fixture(scope="module")
def mr_thin(mr: SourceSeries, tmp_path_factory: pytest.TempPathFactory) -> list[WrittenObject]:
    return _run(mr, THIN, tmp_path_factory.mktemp("mr_thin"))


def _trilinear(image: sitk.Image, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``image`` at patient points by trilinear interpolation, and an inside mask."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    cidx = (pts - np.array(image.GetOrigin())) @ d / np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    inside = np.all((cidx >= 0) & (cidx <= size - 1), axis=1)
    arr = sitk.GetArrayViewFromImage(image)
    c = np.clip(cidx, 0, size - 1 - 1e-9)
    i0 = np.floor(c).astype(int)
    f = c - i0
    val = np.zeros(len(pts))
    for corner in np.ndindex(2, 2, 2):
        o = np.array(corner)
        w = np.prod(np.where(o, f, 1 - f), axis=1)
        idx = np.minimum(i0 + o, size - 1)
        val += w * arr[idx[:, 2], idx[:, 1], idx[:, 0]].astype(np.float64)
    return val, inside


def _pixel_points(ds: pydicom.Dataset, rc: np.ndarray) -> np.ndarray:
    """Patient coordinates of pixels (row, column) of a written image."""
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
    return (
        np.array(ds.ImagePositionPatient, float)
        + rc[:, 1:2] * dc * iop[:3]
        + rc[:, 0:1] * dr * iop[3:]
    )


def _compare(source: SourceSeries, written: list[WrittenObject], shift_mm: float = 0.0):
    """|written - source| at random pixels of every written file inside the source, per plane."""
    rng = np.random.default_rng(0)
    diffs: dict[str, list[np.ndarray]] = {}
    for w in written:
        ds = pydicom.dcmread(w.path)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        pix = ds.pixel_array * slope + intercept
        rc = rng.integers(0, pix.shape, size=(200, 2))
        pts = _pixel_points(ds, rc)
        iop = np.array(ds.ImageOrientationPatient, float)
        expect, inside = _trilinear(source.volume.image, pts + shift_mm * iop[:3])
        got = pix[rc[:, 0], rc[:, 1]]
        diffs.setdefault(w.series_description.split()[0], []).append(np.abs(got - expect)[inside])
    return {plane: np.concatenate(d) for plane, d in diffs.items()}


@pytest.mark.parametrize("which", ["ct", "mr", "tilted"])
def test_written_pixels_have_the_source_value_at_their_patient_point(
    which: str, request: pytest.FixtureRequest
) -> None:
    source = request.getfixturevalue(which)
    written = request.getfixturevalue(f"{which}_thin")
    diffs = _compare(source, written)
    assert set(diffs) == {"AX", "COR", "SAG"}
    for plane, d in diffs.items():
        assert d.size > 1000, plane
        # int16 rounding of the same interpolation: never more than one unit apart.
        assert d.max() <= 1.0 + 1e-6, (plane, d.max())
    # The check can fail: half a source voxel off along the rows and contents disagree.
    half = min(source.volume.image.GetSpacing()) / 2
    shifted = _compare(source, written, shift_mm=half)
    for plane, d in shifted.items():
        assert d.max() > 10.0, plane


def test_written_series_stack_in_patient_axes_when_read_by_simpleitk(
    ct_mpr: list[WrittenObject], ct: SourceSeries
) -> None:
    expected = {
        "AX": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "COR": [[1, 0, 0], [0, 0, 1], [0, -1, 0]],
        "SAG": [[0, 0, -1], [1, 0, 0], [0, -1, 0]],
    }
    src = ct.volume.image
    lo = np.array(src.TransformIndexToPhysicalPoint((0, 0, 0)))
    hi = np.array(src.TransformIndexToPhysicalPoint([s - 1 for s in src.GetSize()]))
    for plane, rows in expected.items():
        files = sorted(str(w.path) for w in ct_mpr if w.series_description.startswith(plane))
        img = sitk.ReadImage(files[:2])  # SimpleITK stacks slices as a viewer would
        np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), rows, atol=1e-6)
        assert img.GetSpacing()[2] == pytest.approx(3.0, abs=1e-3)  # slabs 3 mm apart
        # The reformat covers the source volume (within one slab) and not more.
        last = pydicom.dcmread(files[-1], stop_before_pixels=True)
        size = (last.Columns - 1, last.Rows - 1)
        far = _pixel_points(last, np.array([[size[1], size[0]]]))[0]
        a, b = np.array(img.GetOrigin()), far
        assert np.all(np.minimum(a, b) >= np.minimum(lo, hi) - 3.0)
        assert np.all(np.maximum(a, b) <= np.maximum(lo, hi) + 3.0)
        assert np.all(np.abs(np.maximum(a, b) - np.maximum(lo, hi)) < 3.0 + 1.1)
        assert np.all(np.abs(np.minimum(a, b) - np.minimum(lo, hi)) < 3.0 + 1.1)


def _dciodvfy_errors(path: Path) -> list[str]:
    return [f"{path.name}: {line}" for line in dciodvfy_errors(path)]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("which", ["ct_mpr", "mr_thin", "tilted_thin"])
def test_dciodvfy_reports_no_error_on_any_written_file(
    which: str, request: pytest.FixtureRequest
) -> None:
    written = request.getfixturevalue(which)
    assert len(written) > 50
    with ThreadPoolExecutor(2) as pool:
        errors = [e for errs in pool.map(_dciodvfy_errors, (w.path for w in written)) for e in errs]
    assert errors == []


def _uids(written: list[WrittenObject]) -> list[tuple[str, str, str]]:
    return sorted((w.path.name, w.series_uid, w.sop_instance_uid) for w in written)


def test_uids_are_deterministic_and_change_with_params(
    ct: SourceSeries, ct_mpr: list[WrittenObject], tmp_path: Path
) -> None:
    again = _run(ct, {}, tmp_path / "again")  # same source, rule, step, params
    assert _uids(again) == _uids(ct_mpr)
    assert len({w.series_uid for w in ct_mpr}) == 3
    assert len({w.sop_instance_uid for w in ct_mpr}) == len(ct_mpr)
    changed = _run(ct, {"thickness_mm": 4.0}, tmp_path / "changed")
    assert {w.series_uid for w in changed}.isdisjoint({w.series_uid for w in ct_mpr})
    assert {w.sop_instance_uid for w in changed}.isdisjoint({w.sop_instance_uid for w in ct_mpr})
    other_rule = _run(ct, {}, tmp_path / "rule", rule="another-rule")
    assert {w.series_uid for w in other_rule}.isdisjoint({w.series_uid for w in ct_mpr})


def test_written_objects_live_in_the_source_study_and_reference_it(
    ct: SourceSeries, ct_mpr: list[WrittenObject]
) -> None:
    source_uids = {str(h.SOPInstanceUID) for h in ct.headers}
    source_for = str(ct.first.FrameOfReferenceUID)
    numbers = {w.series_number for w in ct_mpr}
    assert len(numbers) == 3 and int(ct.first.SeriesNumber) not in numbers
    for w in ct_mpr[::5] + ct_mpr[-1:]:  # every 5th file: reading 500 headers is slow
        ds = pydicom.dcmread(w.path, stop_before_pixels=True)
        assert ds.SOPClassUID == sop_class_for(ct) == pydicom.uid.CTImageStorage
        assert ds.StudyInstanceUID == ct.study_uid
        assert ds.FrameOfReferenceUID == source_for
        assert ds.SeriesInstanceUID == w.series_uid != ct.series_uid
        assert ds.SOPInstanceUID == w.sop_instance_uid
        assert list(ds.ImageType[:3]) == ["DERIVED", "SECONDARY", "AXIAL"]
        refs = {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence}
        assert refs and refs <= source_uids
        if w.series_description.startswith("AX"):
            assert len(refs) <= 3  # a 3 mm axial slab is made of at most 3 source slices
        else:
            assert len(refs) == len(source_uids)  # a coronal image crosses every slice
        assert "reformat.mpr 1.0.0" in ds.DerivationDescription
        assert '"thickness_mm":3.0' in ds.DerivationDescription
        assert "reformat.mpr 1.0.0" in ds.ContributingEquipmentSequence[-1].SoftwareVersions
        assert ds.RescaleType == "HU" and float(ds.RescaleIntercept) == 0.0
        assert (ds.WindowCenter, ds.WindowWidth) == (ct.first.WindowCenter, ct.first.WindowWidth)
        assert (
            w.path.parent.name
            == f"{w.series_number}_{w.series_description.split(' [')[0].replace(' ', '_')}"
        )


def test_projection_views_keep_their_own_plane_and_validate(
    ct: SourceSeries, tmp_path: Path
) -> None:
    """A rotating-MIP-like output: one plane per view (slice_geometry), written in order."""
    step = get_step("reformat.mpr")
    params = step.validate({})
    views = []
    for deg in (0.0, 30.0, 60.0):  # rotation about the patient's vertical (z) axis
        a = np.radians(deg)
        row = (np.cos(a), np.sin(a), 0.0)
        views.append(((-250.0 * np.cos(a), -250.0 * np.sin(a), 480.0), (*row, 0.0, 0.0, -1.0)))
    arr = (np.arange(3 * 40 * 50, dtype=np.int16).reshape(3, 40, 50) % 1500) - 500
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 2.0, 1.0))
    out = ImageSeries(
        description="ROT MIP 3 views", image=img, plane="projection", slab_mode="MIP",
        cine_rate=10.0, slice_geometry=views,
    )  # fmt: skip
    prov = Provenance("test", step, params, 1, 0, "0:rot")
    written = write_output(out, ct, prov, tmp_path)
    assert [w.path.name for w in written] == ["IM_0001.dcm", "IM_0002.dcm", "IM_0003.dcm"]
    assert written[0].series_number == int(ct.first.SeriesNumber) * 1000 + 11
    for k, w in enumerate(written):
        ds = pydicom.dcmread(w.path)
        np.testing.assert_allclose(
            np.array(ds.ImageOrientationPatient, float), views[k][1], atol=1e-9
        )
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), views[k][0], atol=1e-6)
        assert [float(v) for v in ds.PixelSpacing] == [2.0, 1.5]  # row spacing \ column spacing
        assert ds.InstanceNumber == k + 1 and list(ds.ImageType)[-1] == "MIP"
        assert ds.CineRate == ds.RecommendedDisplayFrameRate == 10
        np.testing.assert_array_equal(ds.pixel_array, arr[k])
        if DCIODVFY:
            assert _dciodvfy_errors(w.path) == []


def test_float_volumes_are_written_with_a_rescale(ct: SourceSeries, tmp_path: Path) -> None:
    step = get_step("reformat.mpr")
    params = step.validate({"planes": ["axial"], "thickness_mm": 6.0})
    src = sitk.Cast(ct.volume.image, sitk.sitkFloat32) * 0.37 + 0.25  # fractional units
    (out,) = step(Volume(src, "CT"), params)
    written = write_output(out, ct, Provenance("test", step, params), tmp_path)
    values = sitk.GetArrayViewFromImage(out.image)
    for k in (0, len(written) // 2):
        ds = pydicom.dcmread(written[k].path)
        slope = float(ds.RescaleSlope)
        got = ds.pixel_array * slope + float(ds.RescaleIntercept)
        np.testing.assert_allclose(got, values[k], atol=slope / 2 + 1e-3)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
def test_enhanced_mr_source_gives_valid_classic_mr_images(tmp_path: Path) -> None:
    folder = DATA / "edge-cases" / "series" / "philips_enhanced"
    if not folder.is_dir():
        pytest.skip("edge-case data absent")
    source = read_series(scan(folder)[0])
    assert source.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    written = _run(source, {"planes": ["coronal"], "thickness_mm": 2.0}, tmp_path)
    assert {w.sop_class_uid for w in written} == {pydicom.uid.MRImageStorage}
    errors = [e for w in written[::10] for e in _dciodvfy_errors(w.path)]
    assert errors == []
    ds = pydicom.dcmread(written[0].path, stop_before_pixels=True)
    # A multi-frame source: the one instance is the source of every derived image.
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [
        str(source.first.SOPInstanceUID)
    ]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
def test_pet_source_gives_valid_pet_images_in_its_units(tmp_path: Path) -> None:
    folder = DATA / "pet-seg-qin" / "PET"
    if not folder.is_dir():
        pytest.skip("PET data absent")
    source = read_series(scan(folder)[0])
    src = source.first
    written = _run(source, {"planes": ["coronal"], **THIN}, tmp_path)
    assert {w.sop_class_uid for w in written} == {
        pydicom.uid.PositronEmissionTomographyImageStorage
    }
    assert [e for w in written[::20] for e in _dciodvfy_errors(w.path)] == []
    # Values: trilinear source values at each pixel's patient point, in the source's units.
    (diffs,) = _compare(source, written).values()
    ds = pydicom.dcmread(written[len(written) // 2].path)
    assert float(ds.RescaleIntercept) == 0.0  # PET Image requires it
    assert diffs.size > 1000 and diffs.max() <= float(ds.RescaleSlope) + 1e-6
    for kw in ("Units", "DecayCorrection", "CountsSource", "SeriesDate", "SeriesTime"):
        assert ds.get(kw) == src.get(kw), kw  # SeriesTime: the decay correction reference
    dose = ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose
    assert dose == src.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose
    assert list(ds.ImageType[:2]) == ["DERIVED", "PRIMARY"]
    assert ds.NumberOfSlices == len(written) and ds.ImageIndex == len(written) // 2 + 1


def test_pet_without_units_is_refused_naming_the_attribute(tmp_path: Path) -> None:
    folder = DATA / "pet-seg-qin" / "PET"
    if not folder.is_dir():
        pytest.skip("PET data absent")
    source = read_series(scan(folder)[0])
    first = pydicom.Dataset({t: e for t, e in source.first.items() if t != 0x00541001})
    broken = dataclasses.replace(source, headers=[first, *source.headers[1:]])
    step = get_step("reformat.mpr")
    params = step.validate({"planes": ["axial"], "thickness_mm": 20.0})
    (out,) = step(source.volume, params)
    with pytest.raises(SeriesError, match=r"series .*PET WB_0.*: cannot write .*Units is missing"):
        write_output(out, broken, Provenance("test", step, params), tmp_path)
