"""DICOM series -> volume on the real data in ../shared/data: geometry, pixels, refusals."""

from __future__ import annotations

import gc
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset

from tests.series_kit import (
    DATA,
    EDGE,
    FAILING,
    assert_classic_geometry,
    assert_pixels,
    cached,
    needs_data,
    only,
    read,
    rescaled,
)
from workers.reading.pixels import read_pixels
from workers.reading.series import SeriesFiles, read_series, scan
from workers.reading.source import SeriesError

pytestmark = needs_data


# --- scan -------------------------------------------------------------------------------------


def test_scan_groups_series_and_skips_non_dicom() -> None:
    found = scan(EDGE / "series" / "generic" / "anatomical")  # also holds .nii.gz files
    assert len(found) == 3
    assert sorted(len(s.files) for s in found) == [4, 4, 4]
    attrs = found[0].attributes
    assert attrs["Modality"] == "MR"
    assert isinstance(attrs["SeriesNumber"], int)
    assert isinstance(attrs["ImageType"], list) and all(
        isinstance(v, str) for v in attrs["ImageType"]
    )
    assert attrs["NumberOfSeriesRelatedInstances"] == 4
    assert attrs["Rows"] == 256 and attrs["Columns"] == 256
    for v in attrs.values():
        assert isinstance(v, str | int | float | list)
    ct = only(DATA / "ct-head-tilted-ge").attributes  # LICENSE beside the images is skipped
    assert ct["SliceThickness"] == 4.0 and ct["BodyPartExamined"] == "HEAD"
    assert ct["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL", "ADD"]
    assert ct["NumberOfSeriesRelatedInstances"] == 28


def test_scan_tells_classic_and_enhanced_apart_with_one_series_uid(tmp_path: Path) -> None:
    classic = EDGE / "series" / "generic" / "anatomical" / "001"
    for f in classic.iterdir():
        shutil.copy(f, tmp_path / f.name)
    uid = pydicom.dcmread(next(classic.iterdir())).SeriesInstanceUID
    enh = pydicom.dcmread(
        EDGE / "series" / "siemens_multiframe" / "anatomical" / "001" / "IM-0001-0001-0001.dcm"
    )
    enh.SeriesInstanceUID = uid
    enh.save_as(tmp_path / "enhanced.dcm")
    (tmp_path / "README.txt").write_text("not DICOM")
    found = scan(tmp_path)
    assert sorted((s.attributes["SOPClassUID"], len(s.files)) for s in found) == [
        ("1.2.840.10008.5.1.4.1.1.4", 4),
        ("1.2.840.10008.5.1.4.1.1.4.1", 1),
    ]
    assert found[1].attributes["NumberOfFrames"] in (4, 8)


def test_scan_zip_reads_and_cleans_up(tmp_path: Path) -> None:
    src_dir = EDGE / "series" / "generic" / "anatomical" / "001"
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src_dir.iterdir():
            zf.write(f, f"DICOM/{f.name}")
        zf.writestr("LICENSE", "MIT")
    series = only(archive)
    source = read_series(series)
    folder = series.files[0].parent
    assert folder.is_dir() and source.volume.image.GetSize() == (256, 256, 4)
    del series, source
    gc.collect()
    assert not folder.exists(), "zip extraction folder leaked"


def test_duplicate_copies_of_instances_are_ignored(tmp_path: Path) -> None:
    src_dir = EDGE / "series" / "generic" / "anatomical" / "001"
    for sub in ("a", "b"):
        shutil.copytree(src_dir, tmp_path / sub)
    source = read(tmp_path)
    assert source.volume.image.GetSize()[2] == 4
    assert any("duplicate" in n for n in source.notes)


# --- real volumes -----------------------------------------------------------------------------


def test_ct_abdomen_int16_hu_geometry_and_pixels() -> None:
    src = read(DATA / "ct-abdomen-tcia" / "series")
    img = src.volume.image
    assert img.GetPixelID() == sitk.sitkInt16
    assert img.GetSize() == (512, 512, 134)
    assert src.modality == "CT" and src.volume.modality == "CT"
    assert_classic_geometry(src)
    assert_pixels(src)
    arr = sitk.GetArrayViewFromImage(img)
    assert -1100 <= np.median(arr[:, :20, :20]) <= -900  # corners are air in HU
    z = [float(h.ImagePositionPatient[2]) for h in src.headers]
    assert z == sorted(z)


def test_mr_oblique_geometry_and_pixels() -> None:
    src = read(DATA / "mr-brain-oblique-ge")
    img = src.volume.image
    assert img.GetSize() == (256, 256, 130)
    assert img.GetPixelID() == sitk.sitkInt16
    assert_classic_geometry(src)
    assert_pixels(src)
    normal = np.array(img.GetDirection()).reshape(3, 3)[:, 2]
    assert 10 < np.degrees(np.arccos(abs(normal[2]))) < 16  # the ~13 degree obliquity
    np.testing.assert_allclose(img.GetSpacing()[2], 1.2, atol=1e-3)


def test_pet_float32_with_rescale_slope() -> None:
    src = read(DATA / "pet-seg-qin" / "PET")
    img = src.volume.image
    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSize() == (128, 128, 299)
    assert float(src.first.RescaleSlope) != 1.0
    assert_classic_geometry(src)
    assert_pixels(src)


def test_seg_is_not_an_image_series() -> None:
    with pytest.raises(SeriesError, match="not an image series.*Segmentation"):
        read(DATA / "pet-seg-qin" / "SEG")


# --- transfer syntaxes ------------------------------------------------------------------------


def test_every_transfer_syntax_gives_the_uncompressed_pixels() -> None:
    files = sorted((EDGE / "transfer-syntaxes" / "In").glob("*.dcm"))
    assert len(files) == 9
    ref = read_pixels(files[0])
    assert ref.shape == (1, 384, 384) and ref.any()
    for f in files[1:]:
        np.testing.assert_array_equal(read_pixels(f), ref, err_msg=f.name)


GENERIC = EDGE / "series" / "generic"


@pytest.mark.parametrize(
    ("reference", "others"),
    [
        (
            "emri_small.dcm",
            [
                "emri_small_big_endian.dcm",
                "emri_small_RLE.dcm",
                "emri_small_jpeg_2k_lossless.dcm",
                "emri_small_jpeg_ls_lossless.dcm",
            ],
        ),
        ("693_UNCR.dcm", ["693_J2KR.dcm"]),
    ],
)
def test_multiframe_and_ct_transfer_syntaxes_agree(reference: str, others: list[str]) -> None:
    folder = EDGE / "single-images" / "pydicom-data"
    ref = read_pixels(folder / reference)
    assert ref.shape[0] == (10 if "emri" in reference else 1)
    if "693" in reference:  # (693_UNCI is another image of that series)
        assert ref.dtype == np.int16 and ref.min() < -900  # CT in HU
    for name in others:
        np.testing.assert_array_equal(read_pixels(folder / name), ref, err_msg=name)


@pytest.mark.parametrize(
    "path",
    sorted((EDGE / "single-images" / "pylibjpeg-data").glob("*.dcm")),
    ids=lambda p: p.stem,
)
def test_vendor_jpeg_quirks_decode_to_rescaled_values(path: Path) -> None:
    got = read_pixels(path)
    ref = rescaled(path)
    np.testing.assert_allclose(got[0], ref, rtol=1e-6, atol=1e-3)
    integral = np.array_equal(ref, np.round(ref))
    fits = integral and ref.min() >= -(2**15) and ref.max() < 2**15
    assert got.dtype == (np.int16 if fits else np.float32)


def test_files_without_preamble_are_read(tmp_path: Path) -> None:
    """Old exports start straight with the dataset (no 128-byte preamble, no 'DICM')."""
    src_dir = EDGE / "series" / "generic" / "anatomical" / "001"
    for f in src_dir.iterdir():
        ds = pydicom.dcmread(f)
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()  # no file meta either
        pydicom.dcmwrite(
            tmp_path / f.name, ds, implicit_vr=True, little_endian=True, enforce_file_format=False
        )
        assert (tmp_path / f.name).read_bytes()[:2] == b"\x08\x00"
    got = read(tmp_path)
    ref = cached(src_dir)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(got.volume.image), sitk.GetArrayViewFromImage(ref.volume.image)
    )


def test_series_files_without_headers_are_read_from_the_files() -> None:
    folder = EDGE / "series" / "generic" / "anatomical" / "001"
    bare = SeriesFiles(files=sorted(folder.glob("*.dcm")), attributes={"SeriesNumber": 4})
    src = read_series(bare)
    assert src.volume.image.GetSize() == (256, 256, 4)
    assert_classic_geometry(src)


@pytest.mark.parametrize(
    "folder",
    [
        "anatomical/001",
        "anatomical/001_implicit",
        "anatomical/002_non_isotropic",
        "compressed/001",
        "compressed_j2k/001",
        "compressed_jpeg/001",
        "compressed_jpegls/001",
        "compressed_rle/001",
    ],
)
def test_series_match_dicom2nifti_ground_truth_in_patient_space(folder: str) -> None:
    """Same voxel values at the same patient points as an independent converter's NIfTI."""
    src = read(GENERIC / folder)
    assert_classic_geometry(src)
    assert_pixels(src)
    path = GENERIC / folder
    truth = sitk.ReadImage(str(path.parent / f"{path.name}_ground_truth.nii.gz"))
    on_ours = sitk.Resample(
        truth,
        src.volume.image,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        -9999.0,
        sitk.sitkFloat32,
    )
    got = sitk.GetArrayViewFromImage(on_ours)
    assert (got != -9999.0).all(), "grids do not cover the same patient space"
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(src.volume.image), got, rtol=1e-5, atol=1e-4
    )


def test_float_rescale_mr_series() -> None:
    src = read(EDGE / "series" / "generic" / "anatomical" / "002_non_isotropic")
    assert src.volume.image.GetPixelID() == sitk.sitkFloat32
    assert_classic_geometry(src)
    assert_pixels(src)


# --- enhanced multi-frame ---------------------------------------------------------------------


def _frames(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-frame ImagePositionPatient and rescaled pixels, the slow way."""
    ds = pydicom.dcmread(path)
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    pos, values = [], []
    arr = ds.pixel_array.astype(np.float64)
    for i, fr in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos.append(np.array(fr.PlanePositionSequence[0].ImagePositionPatient, dtype=float))
        pvt = fr.get("PixelValueTransformationSequence") or shared.get(
            "PixelValueTransformationSequence"
        )
        slope, icpt = (
            (float(pvt[0].RescaleSlope), float(pvt[0].RescaleIntercept)) if pvt else (1, 0)
        )
        values.append(arr[i] * slope + icpt)
    return pos, values


@pytest.mark.parametrize(
    "relpath",
    [
        "series/philips_enhanced/anatomical/001/IM-0001-0170-0001.dcm",
        "series/philips_enhanced/anatomical/001_implicit/IM1.dcm",
        "series/siemens_multiframe/anatomical/001/IM-0001-0001-0001.dcm",
        "single-images/pydicom-data/eCT_Supplemental.dcm",
    ],
)
def test_enhanced_frames_land_at_their_positions(relpath: str, tmp_path: Path) -> None:
    path = EDGE / relpath
    shutil.copy(path, tmp_path / path.name)  # alone: the folders hold other series too
    src = read(tmp_path)
    img = src.volume.image
    arr = sitk.GetArrayViewFromImage(img)
    assert len(src.headers) == 1 and "PixelData" not in src.headers[0]
    positions, values = _frames(path)
    assert img.GetSize()[2] == len(positions)
    for p, v in zip(positions, values, strict=True):
        k = int(round(img.TransformPhysicalPointToContinuousIndex(p.tolist())[2]))
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((0, 0, k)), p, atol=1e-3)
        np.testing.assert_allclose(arr[k], v, rtol=1e-5, atol=1e-3)
    if "eCT" in relpath:
        assert img.GetPixelID() == sitk.sitkInt16


def test_enhanced_with_several_stacks_is_refused_naming_them() -> None:
    with pytest.raises(SeriesError, match=r"2 image types \(.*M, .*FIELD_MAP\)"):
        read(EDGE / "enhanced-mr" / "In" / "Philips")
    with pytest.raises(SeriesError, match=r"4 temporal positions"):
        read(EDGE / "enhanced-mr" / "In" / "Siemens")


# --- refusals and corrections -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("notavolume", r"4 images at the same slice position"),
        ("sliceincrement/001", r"missing slices – a gap of 10\.00 mm .* spacing is 5\.00 mm"),
        ("sliceincrement/002", r"missing slices – a gap of 1\.56 mm .* spacing is 0\.78 mm"),
        ("sliceorientation", r"mixed slice orientations \(sagittal, axial\)"),
        ("../generic/rgb", r"colour images \(RGB\)"),
        ("../../single-images/pydicom-data/emri_small.dcm", r"without functional groups"),
        ("../../single-images/pylibjpeg-data/MAROTECH_CT_JP2Lossy.dcm", r"a single image"),
    ],
)
def test_refusals_name_the_series_and_the_defect(case: str, words: str) -> None:
    series = only((FAILING / case).resolve())
    with pytest.raises(SeriesError, match=words) as err:
        read_series(series)
    message = str(err.value)
    assert series.attributes["SeriesInstanceUID"] in message
    if "SeriesNumber" in series.attributes:
        assert f"series {series.attributes['SeriesNumber']} " in message
