"""The archives against a real Orthanc: QIDO-RS routing attributes, WADO-RS streaming fetch,
STOW-RS confirmation, permanent refusals vs transient outages, C-STORE write-back.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.harness.fixtures import REJECTED_DESCRIPTION
from tests.harness.orthanc import free_port
from tests.harness.studies import copy_as_new_study
from workers.archives import ArchiveError, destination_for, open_archive
from workers.archives.dicomweb import DicomWebArchive
from workers.archives.dimse import DimseArchive
from workers.core.config import settings

INTEGRATION = pytest.mark.integration


@INTEGRATION
def test_stow_qido_wado_roundtrip(orthanc, ct_files, tmp_path):
    study, files = copy_as_new_study(ct_files[:24], tmp_path / "src", "loop-roundtrip")
    archive = DicomWebArchive(orthanc.dicomweb_url, batch_bytes=4 * 2**20)  # several batches
    archive.store(files)
    [series] = archive.series_of_study(study)
    assert series["StudyInstanceUID"] == study
    assert series["Modality"] == "CT"
    assert series["NumberOfSeriesRelatedInstances"] == 24
    assert series["ImageType"][:2] == ["ORIGINAL", "PRIMARY"]
    assert series["SliceThickness"] == pytest.approx(3.0)
    assert series["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert series["BodyPartExamined"]
    # every routing attribute, as sprim run sees it (from the series' WADO-RS metadata)
    assert series["ConvolutionKernel"] == "B"
    assert series["PixelSpacing"] == pytest.approx([1.07421875, 1.07421875])
    assert (series["Rows"], series["PatientPosition"]) == (512, "HFS")
    assert series["ManufacturerModelName"] == "Brilliance Big Bore"
    assert (series["NumberOfImages"], series["IsVolume"]) == (24, True)
    out = archive.fetch_series(study, series["SeriesInstanceUID"], tmp_path / "job" / "in")
    assert len(out) == 24
    assert not list((tmp_path / "job" / "in").glob("*.part"))
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    got = pydicom.dcmread(out[0])
    assert got.PixelData == sent[got.SOPInstanceUID].PixelData
    # same instances again: replaced, not duplicated
    archive.store(files)
    assert archive.series_of_study(study)[0]["NumberOfSeriesRelatedInstances"] == 24
    assert archive.series_of_study("1.2.826.0.1.3680043.8.498.1") == []


@INTEGRATION
def test_refused_instance_is_a_permanent_error_with_the_reason(orthanc, ct_files, tmp_path):
    _, files = copy_as_new_study(
        ct_files[:2], tmp_path, "loop-refused",
        edit=lambda ds: setattr(ds, "SeriesDescription", REJECTED_DESCRIPTION),
    )  # fmt: skip
    with pytest.raises(ArchiveError) as e:
        DicomWebArchive(orthanc.dicomweb_url).store(files)
    assert not e.value.transient
    assert "absent after STOW-RS success" in e.value.reason


@INTEGRATION
def test_not_dicom_is_refused_permanently(orthanc, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(ArchiveError) as e:
        DicomWebArchive(orthanc.dicomweb_url).store([bad])
    assert not e.value.transient


@INTEGRATION
def test_archive_down_is_transient_and_back_on_the_same_storage(orthanc, ct_files, tmp_path):
    study, files = copy_as_new_study(ct_files[:3], tmp_path, "loop-down")
    archive = DicomWebArchive(orthanc.dicomweb_url, timeout=5)
    archive.store(files)
    orthanc.stop()
    try:
        for call in (
            lambda: archive.store(files),
            lambda: archive.series_of_study(study),
            lambda: archive.fetch_series(study, "1.2.3", tmp_path / "x"),
        ):
            with pytest.raises(ArchiveError) as e:
                call()
            assert e.value.transient, e.value
    finally:
        orthanc.start()
    assert archive.series_of_study(study)[0]["NumberOfSeriesRelatedInstances"] == 3


@INTEGRATION
def test_c_store_write_back(orthanc, ct_files, tmp_path):
    study, files = copy_as_new_study(ct_files[:5], tmp_path, "loop-cstore")
    read = DicomWebArchive(orthanc.dicomweb_url)
    dimse = DimseArchive.from_url(
        f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}?calling=SPRIM", read_from=read
    )
    dimse.store(files)
    assert dimse.series_of_study(study)[0]["NumberOfSeriesRelatedInstances"] == 5
    with pytest.raises(ArchiveError) as e:
        DimseArchive("NOBODY", "127.0.0.1", free_port(), timeout=5).store(files[:1])
    assert e.value.transient


@INTEGRATION
def test_open_archive_names_and_destinations(monkeypatch, orthanc):
    monkeypatch.setenv(
        "SPRIM_ARCHIVES",
        f'{{"pacs": "{orthanc.dicomweb_url}", "cstore": "dicom://ORTHANC@127.0.0.1:{orthanc.dicom_port}"}}',
    )
    monkeypatch.setenv("SPRIM_DESTINATIONS", '{"SITE A": "cstore"}')
    settings.cache_clear()
    try:
        pacs = open_archive("pacs")
        assert isinstance(pacs, DicomWebArchive) and pacs.name == "pacs"
        assert isinstance(open_archive("cstore"), DimseArchive)
        assert destination_for("pacs", "SITE A") == "cstore"
        assert destination_for("pacs", "SITE B") is None
    finally:
        monkeypatch.undo()
        settings.cache_clear()


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("with_length", [True, False])
def test_multipart_stream_is_split_into_parts_whatever_the_chunking(chunk, with_length):
    from workers.archives.multipart import iter_parts

    parts = [b"DICM" + bytes([i]) * (i * 37) + b"\r\n--not-the-boundary" for i in range(5)]
    body = b""
    for p in parts:
        length = f"Content-Length: {len(p)}\r\n" if with_length else ""
        body += (
            f"--b0undary\r\nContent-Type: application/dicom\r\n{length}\r\n".encode() + p + b"\r\n"
        )
    body += b"--b0undary--\r\n"
    chunks = (body[i : i + chunk] for i in range(0, len(body), chunk))
    assert list(iter_parts(chunks, b"b0undary")) == parts
    with pytest.raises(ArchiveError) as e:  # cut short: transient
        list(iter_parts(iter([body[: len(body) // 2]]), b"b0undary"))
    assert e.value.transient


@INTEGRATION
def test_c_store_refusal_status_is_a_permanent_error_with_its_meaning(ct_files, tmp_path):
    """sprim's own listener as the C-STORE peer: it answers 0xA900 to a data set without UIDs."""
    from workers.ingest.listener import Listener, ListenerStore

    ds = pydicom.dcmread(ct_files[0])
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "no-study.dcm")
    with Listener(ListenerStore(tmp_path / "store"), port=0, allowed_aets=["SPRIM"]) as lst:
        with pytest.raises(ArchiveError) as e:
            DimseArchive("SPRIM", "127.0.0.1", lst.port).store([tmp_path / "no-study.dcm"])
        assert not e.value.transient
        assert e.value.reason.startswith("0xA900")
        with pytest.raises(ArchiveError) as e:  # calling AE not allowed: association rejected
            DimseArchive("SPRIM", "127.0.0.1", lst.port, calling_aet="OTHER").store(ct_files[:1])
        assert e.value.transient and "rejected" in e.value.reason
