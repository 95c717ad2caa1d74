"""The input gate (workers/reading/validate.py) on mutated copies of real series: each defect family is
refused with its code and a message naming the series; tolerable quirks are accepted with a note.
"""

from __future__ import annotations

import math
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid

from tests.series_kit import DATA, EDGE, needs_data, only, rescaled
from workers.core.config import settings
from workers.reading import validate
from workers.reading.series import read_series
from workers.reading.source import SeriesError, SourceSeries

pytestmark = needs_data

CT = DATA / "ct-abdomen-tcia" / "series"
MR = EDGE / "series" / "generic" / "anatomical" / "001"


def copy_series(src: Path, dst: Path, n: int | None = None) -> list[Path]:
    files = sorted(p for p in src.iterdir() if p.suffix == ".dcm")[:n]
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, dst / f.name)) for f in files]


def mutate(
    files: list[Path], change: Callable[[Dataset], None], which: slice = slice(None)
) -> None:
    for f in files[which]:
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f)


def refused(folder: Path, code: str, words: str) -> SeriesError:
    series = only(folder)
    with pytest.raises(SeriesError, match=words) as err:
        read_series(series)
    assert err.value.code == code, str(err.value)
    assert series.attributes["SeriesInstanceUID"] in str(err.value)
    return err.value


def accepted(folder: Path) -> SourceSeries:
    return read_series(only(folder))


@pytest.fixture
def ct(tmp_path: Path) -> list[Path]:
    """12 contiguous slices of the shared abdomen CT (512x512, 3 mm, implicit VR)."""
    return copy_series(CT, tmp_path / "ct", 12)


# --- pixel format and sizes -------------------------------------------------------------------


def test_header_claiming_6000x6000_is_refused_without_allocating(ct: list[Path]) -> None:
    def big(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 6000

    mutate(ct, big)
    series = only(ct[0].parent)
    tracemalloc.start()
    try:
        with pytest.raises(SeriesError, match=r"PixelData holds 524288 bytes .*6000") as err:
            read_series(series)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code == "pixel-format"
    assert peak < 20 * 2**20, peak  # a 12 x 6000² int16 volume would be 820 MB


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda ds: setattr(ds, "BitsAllocated", 8), r"BitsStored 12 does not fit BitsAllocated 8"),
        (lambda ds: setattr(ds, "Rows", 256), r"PixelData holds 524288 bytes but 256 x 512"),
        (lambda ds: setattr(ds, "HighBit", 15), r"HighBit 15 is not BitsStored - 1"),
        (lambda ds: setattr(ds, "PixelRepresentation", 2), r"PixelRepresentation 2"),
        (lambda ds: setattr(ds, "Rows", 0), r"Rows 0 \(1 to 8192 expected\)"),
        (lambda ds: setattr(ds, "NumberOfFrames", 2), r"PixelData holds 524288 bytes"),
    ],
    ids=["bits8", "rows-halved", "highbit", "pixrep", "rows0", "frames"],
)
def test_pixel_format_lies_are_refused(
    ct: list[Path], change: Callable[[Dataset], None], words: str
) -> None:
    mutate(ct, change, slice(5, 6))
    err = refused(ct[0].parent, "pixel-format", words)
    assert ct[5].name in str(err)


def test_mixed_pixel_formats_in_one_stack_are_refused(ct: list[Path]) -> None:
    def signed(ds: Dataset) -> None:
        ds.PixelRepresentation = 1

    mutate(ct, signed, slice(3, 4))
    refused(ct[0].parent, "pixel-format", r"2 different pixel formats.*1-004\.dcm")


def test_volume_over_the_configured_limit_is_refused(
    ct: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPRIM_MAX_VOLUME_MB", "5")
    settings.cache_clear()
    try:
        refused(ct[0].parent, "size", r"6 MB, more than the 5 MB allowed \(SPRIM_MAX_VOLUME_MB\)")
    finally:
        monkeypatch.delenv("SPRIM_MAX_VOLUME_MB")
        settings.cache_clear()


def test_compressed_image_smaller_than_its_header_is_refused(tmp_path: Path) -> None:
    files = copy_series(EDGE / "series" / "generic" / "compressed_jpeg" / "001", tmp_path / "j")

    def big(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 512

    mutate(files, big)
    series = only(tmp_path / "j")
    with pytest.raises(SeriesError) as err:
        read_series(series)
    assert err.value.code in ("pixel-format", "unreadable")
    assert series.attributes["SeriesInstanceUID"] in str(err.value)


# --- unreadable files -------------------------------------------------------------------------


@pytest.mark.parametrize("index", [6, -1], ids=["inside", "last"])
def test_truncated_file_refuses_the_series_naming_it(ct: list[Path], index: int) -> None:
    data = ct[index].read_bytes()
    ct[index].write_bytes(data[: len(data) // 2])
    err = refused(ct[0].parent, "unreadable", r"1 of 12 file\(s\) cannot be used")
    assert f"{ct[index].name}: it is truncated" in str(err)


def test_image_without_pixel_data_in_a_stack_refuses_the_series(ct: list[Path]) -> None:
    mutate(ct, lambda ds: delattr(ds, "PixelData"), slice(3, 4))
    refused(ct[0].parent, "unreadable", r"1-004\.dcm: it has no pixel data")


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([math.nan, math.nan], r"PixelSpacing is missing or not finite"),
        ([0.0, 0.0], r"PixelSpacing \[0\.0, 0\.0\] mm is outside 0\.01–30 mm"),
        ([-0.7, -0.7], r"PixelSpacing .* is outside"),
        ([math.inf, 1.0], r"PixelSpacing is missing or not finite"),
        ([100.0, 100.0], r"PixelSpacing .* is outside"),
        (None, r"PixelSpacing is missing or not finite"),
    ],
    ids=["nan", "zero", "negative", "inf", "100mm", "missing"],
)
def test_pixel_spacing_must_be_plausible(
    ct: list[Path], value: list[float] | None, words: str
) -> None:
    def change(ds: Dataset) -> None:
        if value is None:
            del ds.PixelSpacing
        else:
            ds.PixelSpacing = [str(v) for v in value]

    mutate(ct, change, slice(0, 1))
    err = refused(ct[0].parent, "geometry", words)
    assert ct[0].name in str(err)


@pytest.mark.parametrize(
    ("iop", "words"),
    [
        ([1, 0, 0, math.sin(math.radians(11)), math.cos(math.radians(11)), 0], r"79\.00° apart"),
        ([1, 0, 0, 1, 0, 0], r"0\.00° apart"),
        ([1, 0, 0, 0, 0, 0], r"not two unit vectors"),
        ([1, 0, 0, 0, 1.2, 0], r"not two unit vectors"),
    ],
    ids=["11deg", "parallel", "zero", "not-unit"],
)
def test_orientation_must_be_orthonormal(ct: list[Path], iop: list[float], words: str) -> None:
    mutate(ct, lambda ds: setattr(ds, "ImageOrientationPatient", [f"{v:.6f}" for v in iop]))
    refused(ct[0].parent, "geometry", words)


def test_orientation_within_tolerance_is_normalised(ct: list[Path]) -> None:
    iop = [0.99999, 0.0, 0.0005, 0.0, 1.0, 0.0]  # 0.03° off and not quite unit
    mutate(ct, lambda ds: setattr(ds, "ImageOrientationPatient", iop))
    src = accepted(ct[0].parent)
    d = np.array(src.volume.image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)


def test_slices_500mm_apart_are_not_a_volume(tmp_path: Path) -> None:
    files = copy_series(CT, tmp_path / "s", 3)

    def spread(ds: Dataset) -> None:
        k = int(ds.InstanceNumber)
        ds.ImagePositionPatient = [-275, -178.1, 484.91 - 500 * (k - 1)]

    mutate(files, spread)
    refused(tmp_path / "s", "geometry", r"slices 500\.00 mm apart")


def test_non_finite_position_is_refused(ct: list[Path]) -> None:
    mutate(ct, lambda ds: setattr(ds, "ImagePositionPatient", ["nan", "0", "0"]), slice(4, 5))
    refused(ct[0].parent, "geometry", r"1-005\.dcm: ImagePositionPatient is missing or not finite")


# --- identity ---------------------------------------------------------------------------------


def test_slice_of_another_patient_refuses_the_series(ct: list[Path]) -> None:
    mutate(ct, lambda ds: setattr(ds, "PatientID", "SOMEONE-ELSE"), slice(7, 8))
    err = refused(ct[0].parent, "identity", r"2 different patients \(PatientID\)")
    assert "SOMEONE-ELSE in 1 image(s) (1-008.dcm)" in str(err)


def test_slice_of_another_study_refuses_the_series(ct: list[Path]) -> None:
    mutate(ct, lambda ds: setattr(ds, "StudyInstanceUID", generate_uid()), slice(2, 3))
    refused(ct[0].parent, "identity", r"2 different studies")


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID"])
def test_missing_uids_are_refused(ct: list[Path], keyword: str) -> None:
    mutate(ct, lambda ds: delattr(ds, keyword), slice(3, 4))
    refused(ct[0].parent, "identity", rf"{keyword} is missing")


def test_unknown_sop_class_is_refused(ct: list[Path]) -> None:
    def change(ds: Dataset) -> None:
        ds.SOPClassUID = "1.2.3"
        ds.file_meta.MediaStorageSOPClassUID = "1.2.3"

    mutate(ct, change)
    refused(ct[0].parent, "not-image", r"SOPClassUID 1\.2\.3 is not a known image storage class")


def test_two_images_sharing_one_sop_instance_uid_are_refused(ct: list[Path]) -> None:
    uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SOPInstanceUID)
    mutate(ct, lambda ds: setattr(ds, "SOPInstanceUID", uid), slice(5, 6))
    refused(ct[0].parent, "identity", r"two different images share SOPInstanceUID")


def test_per_slice_frames_of_reference_are_accepted_with_a_note(ct: list[Path]) -> None:
    mutate(ct, lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()))
    src = accepted(ct[0].parent)
    assert src.frame_of_reference_uid == str(src.headers[0].FrameOfReferenceUID)
    assert any("12 different FrameOfReferenceUIDs" in n for n in src.notes), src.notes
    assert src.volume.image.GetSize() == (512, 512, 12)


def test_missing_frame_of_reference_gets_one_derived_from_the_series(ct: list[Path]) -> None:
    mutate(ct, lambda ds: delattr(ds, "FrameOfReferenceUID"))
    src = accepted(ct[0].parent)
    again = accepted(ct[0].parent)
    assert src.frame_of_reference_uid == again.frame_of_reference_uid
    assert pydicom.uid.UID(src.frame_of_reference_uid).is_valid
    assert any("no valid FrameOfReferenceUID" in n for n in src.notes)


# --- values and character sets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("slope", "intercept", "words"),
    [
        ("nan", "-1000", r"RescaleSlope is not finite"),
        ("inf", "-1000", r"RescaleSlope is not finite"),
        ("0", "-1000", r"RescaleSlope is 0"),
        ("1", "1e12", r"RescaleIntercept 1e\+12 is too large"),
        ("1e38", "0", r"overflow 32-bit floats"),
    ],
)
def test_unusable_rescale_is_refused(
    ct: list[Path], slope: str, intercept: str, words: str
) -> None:
    def change(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    mutate(ct, change, slice(2, 3))
    refused(ct[0].parent, "values", words)


def test_unknown_character_set_is_read_as_latin1_with_a_note(ct: list[Path]) -> None:
    def change(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.SeriesDescription = "Bauch \xe9"

    mutate(ct, change)
    src = accepted(ct[0].parent)
    assert any("unknown character set ISO_IR 999" in n for n in src.notes)
    assert src.first.SpecificCharacterSet == "ISO_IR 100"
    assert str(src.first.SeriesDescription) == "Bauch \xe9"


# --- display semantics ------------------------------------------------------------------------


def test_monochrome1_mr_is_inverted_into_monochrome2_sense(tmp_path: Path) -> None:
    files = copy_series(MR, tmp_path / "m")
    ref = accepted(tmp_path / "m")
    mutate(files, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    src = accepted(tmp_path / "m")
    hi = 2 ** int(src.first.BitsStored) - 1
    got = sitk.GetArrayViewFromImage(src.volume.image)
    np.testing.assert_array_equal(got, hi - sitk.GetArrayViewFromImage(ref.volume.image))
    assert any("MONOCHROME1 images inverted" in n for n in src.notes)


def test_monochrome1_ct_keeps_its_hounsfield_units(ct: list[Path]) -> None:
    ref = accepted(ct[0].parent)
    mutate(ct, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    src = accepted(ct[0].parent)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(src.volume.image), sitk.GetArrayViewFromImage(ref.volume.image)
    )
    assert any("values kept" in n for n in src.notes)


def test_pixel_padding_is_set_to_the_lowest_real_value(ct: list[Path]) -> None:
    def pad(ds: Dataset) -> None:
        arr = ds.pixel_array.copy()
        arr[:40, :40] = 4000  # outside BitsStored's use by the data (max 2988)
        ds.PixelData = arr.tobytes()
        ds.add_new(0x00280120, "US", 4000)

    mutate(ct, pad)
    src = accepted(ct[0].parent)
    got = sitk.GetArrayViewFromImage(src.volume.image)
    real = np.stack([rescaled(f) for f in src.files])
    outside = np.zeros(got.shape, bool)
    outside[:, :40, :40] = True
    lowest = real[~outside].min()
    assert (got[outside] == lowest).all()
    np.testing.assert_array_equal(got[~outside], real[~outside])
    assert any("padding voxels" in n for n in src.notes)


def test_real_ge_padding_is_masked() -> None:
    src = accepted(DATA / "ct-head-tilted-ge")
    arr = sitk.GetArrayViewFromImage(src.volume.image)
    assert arr.min() == -1023  # GE's -1500 padding set to the lowest real value (air)
    assert any("padding voxels" in n for n in src.notes)


def test_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    files = copy_series(MR, tmp_path / "l")
    table = (np.arange(256, dtype=np.uint32) ** 2 // 64).astype(np.uint16)  # not linear

    def lut(ds: Dataset) -> None:
        item = Dataset()
        item.LUTDescriptor = [256, 0, 16]
        item.ModalityLUTType = "US"
        item.add_new(0x00283006, "US", table.tolist())
        ds.ModalityLUTSequence = [item]
        for kw in ("RescaleSlope", "RescaleIntercept"):
            if kw in ds:
                delattr(ds, kw)

    mutate(files, lut)
    src = accepted(tmp_path / "l")
    got = sitk.GetArrayViewFromImage(src.volume.image)
    for k, f in enumerate(src.files):
        raw = pydicom.dcmread(f).pixel_array
        np.testing.assert_array_equal(got[k], table[np.clip(raw, 0, 255)])
    assert any("Modality LUT" in n for n in src.notes)


# --- the per-instance check (listener) --------------------------------------------------------


def test_check_instance_on_real_and_broken_datasets() -> None:
    f = sorted(CT.iterdir())[0]
    ds = pydicom.dcmread(f)
    assert validate.check_instance(ds) == []
    ds.PixelSpacing = ["nan", "nan"]
    assert validate.check_instance(ds) == ["PixelSpacing is not finite (nan, nan)"]
    head = pydicom.dcmread(f, stop_before_pixels=True)
    head.Rows = 65535
    assert any("Rows 65535" in w for w in validate.check_instance(head))
    ds = pydicom.dcmread(f)
    assert any("PixelData holds" in w for w in validate.check_instance(ds, pixel_bytes=1000))
    meta = FileMetaDataset()
    ds.file_meta = meta
    assert validate.check_instance(ds) == []


# --- enhanced multi-frame ---------------------------------------------------------------------

PHILIPS = EDGE / "series" / "philips_enhanced" / "anatomical" / "001" / "IM-0001-0170-0001.dcm"


@pytest.mark.parametrize(
    ("group", "keyword", "value", "code", "words"),
    [
        ("PixelMeasuresSequence", "PixelSpacing", ["nan", "nan"], "geometry", r"frame 3 of .*"
         r"PixelSpacing is missing or not finite"),
        ("PlaneOrientationSequence", "ImageOrientationPatient", [1, 0, 0, 0.5, 0.5, 0],
         "geometry", r"not two unit vectors"),
        ("PixelValueTransformationSequence", "RescaleSlope", "nan", "values", r"not finite"),
    ],
    ids=["spacing", "orientation", "rescale"],
)  # fmt: skip
def test_enhanced_frames_pass_the_same_gate(
    tmp_path: Path, group: str, keyword: str, value: object, code: str, words: str
) -> None:
    ds = pydicom.dcmread(PHILIPS)
    setattr(ds.PerFrameFunctionalGroupsSequence[2][group][0], keyword, value)
    ds.save_as(tmp_path / PHILIPS.name)
    refused(tmp_path, code, words)


@pytest.mark.parametrize("after", [100, 400])
def test_file_cut_inside_its_header_refuses_the_series_naming_it(
    ct: list[Path], after: int
) -> None:
    """Cut after its SeriesInstanceUID: the file is known to belong to the series."""
    data = ct[4].read_bytes()
    cut = data.index(b"\x20\x00\x0e\x00") + after
    ct[4].write_bytes(data[:cut])
    err = refused(ct[0].parent, "unreadable", r"1 of 12 file\(s\) cannot be used")
    assert ct[4].name in str(err)


def test_missing_slice_thickness_is_the_slice_spacing_with_a_note(ct: list[Path]) -> None:
    mutate(ct, lambda ds: delattr(ds, "SliceThickness"))
    src = accepted(ct[0].parent)
    assert all(float(h.SliceThickness) == pytest.approx(3.0) for h in src.headers)
    assert any("SliceThickness absent in 12 image(s)" in n for n in src.notes), src.notes
