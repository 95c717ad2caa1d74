"""The sanitizer every copied source attribute goes through: checks, actions by type, notes."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom import DataElement, Dataset

from workers.reading.source import SeriesError
from workers.writers.common import copy_patient_study
from workers.writers.sanitize import check_element, copy_checked, valid_text


def _source(**values) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SeriesNumber = 7
    ds.SeriesDescription = "CHEST 1mm"
    ds.StudyInstanceUID = "1.2.3"
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def _roundtrip(ds: Dataset) -> Dataset:
    """``ds`` written and read back, as the writers see a source header."""
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_invalid_values_are_emptied_dropped_or_repaired_with_a_note() -> None:
    src = _roundtrip(
        _source(
            StudyDate="***",  # type 2: emptied
            PatientBirthDate="20230230",  # no 30 February
            StudyTime="25:00",
            PatientSex="m",  # CS lowercase, type 2
            StudyDescription="X" * 70,  # LO type 3 over 64: dropped
            EthnicGroup="E" * 20,  # SH over 16
            PatientAge="45Y",  # repaired
            PatientWeight="70.12345678901234567",  # DS over 16: rounded
            AdditionalPatientHistory="line 1\r\nline 2",  # LT allows CR LF
            PatientComments="ok",
        )
    )
    src.ReferringPhysicianName = "Doe^John\x07"  # control character
    src.ProcedureCodeSequence = []
    dst, notes = Dataset(), []
    copy_patient_study(src, dst, notes)
    assert (dst.StudyDate, dst.PatientBirthDate, dst.StudyTime, dst.PatientSex) == ("",) * 4
    assert dst.ReferringPhysicianName == ""
    for kw in ("StudyDescription", "EthnicGroup", "ProcedureCodeSequence"):
        assert kw not in dst, kw
    assert dst.PatientAge == "045Y" and str(dst.PatientWeight) == "70.1234567890124"
    assert dst.AdditionalPatientHistory == "line 1\r\nline 2" and dst.PatientComments == "ok"
    assert dst.StudyInstanceUID == "1.2.3"
    text = "\n".join(notes)
    for expected in (
        "StudyDate '***' is not a date (DA, YYYYMMDD): written empty",
        "PatientBirthDate '20230230' is not a real date",
        "StudyTime '25:00' is not a time",
        "PatientSex 'm' is not a code string",
        "StudyDescription 'XXXX",
        "is longer than 64 characters (LO): left out",
        "EthnicGroup",
        "ReferringPhysicianName",
        "contains control characters: written empty",
        "ProcedureCodeSequence left out: an empty sequence is not allowed there",
        "PatientAge '45Y' written as '045Y'",
        "PatientWeight '70.12345678901234567' written as '70.1234567890124'",
    ):
        assert expected in text, expected
    assert len(notes) == 10  # one sentence per change, nothing for valid values


def test_invalid_type1_value_refuses_the_write_naming_series_and_attribute() -> None:
    src = _source(StudyDate="20240101")
    src.StudyInstanceUID = "1.2.03.4"  # leading zero in a component
    with pytest.raises(SeriesError) as e:
        copy_patient_study(src, Dataset(), [])
    msg = str(e.value)
    assert 'series 7 "CHEST 1mm" (1.2.3.4)' in msg
    assert "StudyInstanceUID '1.2.03.4' is not a UID" in msg and e.value.code == "values"
    with pytest.raises(SeriesError, match="Units is missing in the source"):
        copy_checked(src, Dataset(), ("Units",), [], required=("Units",))


def test_sequence_items_with_invalid_values_or_incomplete_codes_are_left_out() -> None:
    good = Dataset()
    good.CodeValue, good.CodingSchemeDesignator, good.CodeMeaning = "P5-0080C", "SRT", "CT chest"
    no_meaning = Dataset()
    no_meaning.CodeValue, no_meaning.CodingSchemeDesignator = "X", "99LOCAL"
    bad_value = Dataset()
    bad_value.PatientID = "ID\x01"
    src = _source(ProcedureCodeSequence=[no_meaning, good])
    src.OtherPatientIDsSequence = [bad_value]
    dst, notes = Dataset(), []
    copy_checked(src, dst, ("ProcedureCodeSequence", "OtherPatientIDsSequence"), notes)
    assert [i.CodeMeaning for i in dst.ProcedureCodeSequence] == ["CT chest"]
    assert "OtherPatientIDsSequence" not in dst  # type 3, no item left
    assert notes == [
        "ProcedureCodeSequence item 1 left out: a code without code value or meaning",
        "OtherPatientIDsSequence item 1 left out: PatientID 'ID\\x01' contains control characters",
        "OtherPatientIDsSequence left out: an empty sequence is not allowed there",
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_badly_encoded_text_and_unknown_character_sets() -> None:
    ds = _source(PatientID="P1", SpecificCharacterSet="ISO_IR 192")
    ds[0x00100010] = DataElement(0x00100010, "PN", b"M\xfcller^Hans")  # latin-1 under UTF-8
    src = _roundtrip(ds)
    dst, notes = Dataset(), []
    copy_patient_study(src, dst, notes)
    assert dst.PatientName == "" and dst.PatientID == "P1"
    assert notes == [
        "PatientName 'M\ufffdller^Hans' has bytes that are not valid in the source's character "
        "set: written empty"
    ]
    ds = _source(SpecificCharacterSet="ISO_IR 999")
    dst, notes = Dataset(), []
    copy_patient_study(ds, dst, notes)
    assert dst.SpecificCharacterSet == "ISO_IR 192" and "ISO_IR 999" in notes[0]


def test_value_multiplicity_is_checked_against_the_dictionary() -> None:
    src = _source()
    src.PatientName = ["A^B", "C^D"]  # PN, VM 1
    src.PatientSize = "1.8"
    dst, notes = Dataset(), []
    copy_checked(src, dst, ("PatientName", "PatientSize"), notes)
    assert dst.PatientName == "" and str(dst.PatientSize) == "1.8"
    assert notes == [
        "PatientName 'A^B\\\\C^D' has 2 values where the standard allows 1: written empty"
    ]


@pytest.mark.parametrize(
    "vr, text, ok",
    [
        ("DA", "20240229", True),
        ("DA", "20230229", False),
        ("DA", "2024-01-01", False),
        ("DA", "20240101-20240201", False),  # ranges are for queries, not for stored objects
        ("TM", "235960.123456", True),
        ("TM", "2359", True),
        ("TM", "24", False),
        ("DT", "20240101120000.5+0100", True),
        ("DT", "20241301", False),
        ("AS", "045Y", True),
        ("CS", "ORIGINAL", True),
        ("CS", "Original", False),
        ("CS", "A" * 17, False),
        ("IS", "12", True),
        ("IS", "1.0", False),
        ("IS", "99999999999", False),
        ("DS", "-1.5e-3", True),
        ("DS", "1,5", False),
        ("UI", "1.2.840.10008.1.2", True),
        ("UI", "1.2.840.", False),
        ("LO", "é" * 64, True),
        ("LO", "x" * 65, False),
        ("SH", "line\nbreak", False),
        ("PN", "Doe^John^^Dr^Jr", True),
        ("PN", "a^b^c^d^e^f", False),
        ("PN", "=".join(["x"] * 4), False),
        ("UR", "http://example.org/a b", False),
    ],
)
def test_vr_rules(vr: str, text: str, ok: bool) -> None:
    assert valid_text(vr, text) is ok


def test_repairs_are_returned_as_new_elements() -> None:
    defect, fixed = check_element(DataElement(0x00101010, "AS", "3 M"), "PatientAge")
    assert defect is None and fixed.value == "003M"
    assert check_element(DataElement(0x00101010, "AS", "045Y"), "PatientAge") == (None, None)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_numbers_as_read_from_a_file() -> None:
    ds = _source(PatientSize="1.80", AcquisitionNumber="15", PatientWeight="70")
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    raw = buf.getvalue().replace(b"1.80", b"1,80").replace(b"15", b"1X").replace(b"70", b"7e")
    src = pydicom.dcmread(io.BytesIO(raw), force=True)
    dst, notes = Dataset(), []
    copy_checked(src, dst, ("PatientSize", "AcquisitionNumber", "PatientWeight"), notes)
    assert dst.AcquisitionNumber == "" and "PatientSize" not in dst and "PatientWeight" not in dst
    assert notes == [
        "PatientSize '1,80' is not a decimal number (DS): left out",
        "AcquisitionNumber '1X' is not an integer (IS): written empty",
        "PatientWeight '7e' is not a decimal number (DS): left out",
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_ascii_text_without_character_set_is_declared_latin1() -> None:
    ds = _source(PatientID="P1")
    ds[0x00100010] = DataElement(0x00100010, "PN", b"M\xfcller^Hans")
    src = _roundtrip(ds)
    dst, notes = Dataset(), []
    copy_patient_study(src, dst, notes)
    assert dst.SpecificCharacterSet == "ISO_IR 100" and dst.PatientName == "Müller^Hans"
    assert notes == [
        "SpecificCharacterSet missing although the source has non-ASCII text: ISO_IR 100 "
        "(Latin-1, as it was read) declared"
    ]
    buf = io.BytesIO()
    dst.save_as(buf, implicit_vr=False, little_endian=True)
    assert b"M\xfcller^Hans" in buf.getvalue()
