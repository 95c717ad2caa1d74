"""The one gate for every attribute a derived object copies from its source header.

Sources are imperfect: anonymizers write ``***`` dates, scanners write lowercase code strings
or over-long names, archives mix character sets. The objects sprim writes must validate anyway
(0 dciodvfy errors), so each copied value is checked against its VR (format, length, allowed
characters, decodable in the source's character set) and VM (number of values), and then, by
the attribute's type in the derived object:

- **type 1** (the derived object cannot exist without it: StudyInstanceUID,
  FrameOfReferenceUID, and what a writer names as ``required``): the write is refused with a
  :class:`~workers.reading.source.SeriesError` naming the series, the attribute and the defect;
- **type 2** (:data:`TYPE2`): written empty;
- **type 3** (everything else): left out.

Two defects are repaired instead, because the value is clear: a decimal string (DS) longer than
16 characters is rounded to 16, an age (AS) like ``0Y`` or ``45 Y`` is padded to ``000Y``.
In sequences, an item holding an invalid value (or a code item without code value and meaning)
is left out whole; a sequence left without items is written empty when type 2, else left out
(an empty type 3 sequence is a dciodvfy error). Every change is a sentence in ``notes``
(``StudyDate '***' is not a date (DA, YYYYMMDD): written empty``), which the writers attach to
what they write (:attr:`workers.writers.WrittenObject.notes`) for the job report and summary.

Checks are sprim's own (pydicom's validators accept date ranges, impossible dates and control
characters, and switching them on is a process-wide setting).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Iterable
from datetime import datetime

from pydicom import DataElement, Dataset
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

from workers.reading.source import SeriesError

#: Copied attributes a derived object cannot exist without: invalid means no derived object.
TYPE1 = frozenset({"StudyInstanceUID", "FrameOfReferenceUID"})

#: Type 2 Patient / General Study attributes: present (maybe empty) in every object we write.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: Type 2 (or 2C) in the modules sprim copies: an invalid value is written empty.
TYPE2 = frozenset(
    {
        # Patient, General Study, Clinical Trial Subject / Study
        *PATIENT_STUDY_TYPE2,
        "ClinicalTrialProtocolName",
        "ClinicalTrialSiteID",
        "ClinicalTrialSiteName",
        "ClinicalTrialTimePointID",
        # Frame of Reference, General Series, General Image
        "PositionReferenceIndicator",
        "PatientPosition",
        "Laterality",
        "AcquisitionNumber",
        # Contrast/Bolus, CT Image, MR Image
        "ContrastBolusAgent",
        "KVP",
        "ScanOptions",
        "MRAcquisitionType",
        "EchoTime",
        "EchoTrainLength",
        "RepetitionTime",
        "InversionTime",
        # PET Series, PET Isotope, PET Image
        "CorrectedImage",
        "RadiopharmaceuticalInformationSequence",
        "AcquisitionDate",
        "AcquisitionTime",
        "ActualFrameDuration",
    }
)

#: Enumerated values dciodvfy checks (an unknown value is an error, not a warning).
ENUMERATED = {
    "PatientSex": {"M", "F", "O"},
    "PatientIdentityRemoved": {"YES", "NO"},
    "QualityControlSubject": {"YES", "NO"},
    "SmokingStatus": {"YES", "NO", "UNKNOWN"},
    "PatientSexNeutered": {"ALTERED", "UNALTERED"},
    "TypeOfPatientID": {"TEXT", "RFID", "BARCODE"},
    "Laterality": {"R", "L"},
}

_MAX_CHARS = {"AE": 16, "CS": 16, "IS": 12, "LO": 64, "SH": 16, "ST": 1024, "LT": 10240}
_MAX_CHARS |= {"UI": 64, "DA": 8, "TM": 13, "DT": 26}
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR"}
) | {"UT"}
_TM = r"(?:[01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?"
_FORMAT = {
    "DA": (re.compile(r"\d{8}"), "is not a date (DA, YYYYMMDD)"),
    "TM": (re.compile(_TM), "is not a time (TM, HHMMSS.FFFFFF)"),
    "DT": (
        re.compile(rf"\d{{4}}(?:\d{{2}}(?:\d{{2}}(?:{_TM})?)?)?(?:[+-]\d{{4}})?"),
        "is not a date-time (DT, YYYYMMDDHHMMSS.FFFFFF&ZZXX)",
    ),
    "AS": (re.compile(r"\d{3}[DWMY]"), "is not an age (AS, nnnD/W/M/Y)"),
    "CS": (re.compile(r"[A-Z0-9 _]*"), "is not a code string (CS: A-Z, 0-9, space, _)"),
    "DS": (
        re.compile(r" *[+-]?(?:\d+|\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)? *"),
        "is not a decimal number (DS)",
    ),
    "IS": (re.compile(r" *[+-]?\d+ *"), "is not an integer (IS)"),
    "UI": (
        re.compile(r"(?:0|[1-9]\d*)(?:\.(?:0|[1-9]\d*))*"),
        "is not a UID (digits and dots, no leading zero in a component)",
    ),
    "AE": (re.compile(r"[\x20-\x5b\x5d-\x7e]*"), "is not an application entity title (AE)"),
    "UR": (re.compile(r"[A-Za-z_\d:/?#\[\]@!$&'()*+,;=%\-.~]* *"), "is not a URI (UR)"),
}
# Control characters: ESC only (ISO 2022 code extensions); text VRs also allow TAB, LF, FF, CR.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


def _vm_allows(spec: str, n: int) -> bool:
    """Whether ``n`` values fit the dictionary VM ``spec`` ("1", "1-n", "2-2n", "1-3")."""
    try:
        lo_s, _, hi = spec.partition("-")
        lo = int(lo_s)
        if not hi:
            return n == lo
        if hi == "n":
            return n >= lo
        if hi.endswith("n"):
            return n >= lo and n % int(hi[:-1]) == 0
        return lo <= n <= int(hi)
    except ValueError:  # unusual dictionary forms ("1-n or 1"): no VM check
        return True


def _as_strings(elem: DataElement) -> list[str]:
    value = elem.value
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    out = []
    for v in values:
        if isinstance(v, bytes):  # not decoded by pydicom: only ASCII is certain
            v = v.decode("ascii", "replace")
        out.append("" if v is None else str(v))
    return out


def _ds16(text: str) -> str | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return ds_str(x) if x == x and abs(x) != float("inf") else None


def _value_defect(vr: str, kw: str, text: str) -> tuple[str | None, str | None]:
    """(defect in words, repaired value) of one value; (None, None) when it is valid as it is."""
    defect = _character_defect(vr, text)
    if defect:
        return defect, None
    if vr == "PN":
        return _person_name_defect(text), None
    if vr == "AS" and (age := _age_repaired(text)):
        return None, age
    defect = _format_defect(vr, text) or _length_defect(vr, text)
    if defect:
        return defect, None
    if vr == "DS" and len(text.strip()) > 16:
        fixed = _ds16(text)
        return (None, fixed) if fixed else ("is not a decimal number (DS)", None)
    allowed = ENUMERATED.get(kw)
    if allowed and text and text not in allowed:
        return f"is not one of {', '.join(sorted(allowed))}", None
    return None, None


def _character_defect(vr: str, text: str) -> str | None:
    if "\ufffd" in text:
        return "has bytes that are not valid in the source's character set"
    control = _CONTROL_TEXT if vr in ("ST", "LT", "UT") else _CONTROL
    if control.search(text):
        return "contains control characters"
    return None


def _person_name_defect(text: str) -> str | None:
    groups = text.split("=")
    if len(groups) > 3 or any(len(g) > 64 or g.count("^") > 4 for g in groups):
        return "is not a person name (PN: at most 3 groups of 64 characters, 5 parts)"
    return None


def _age_repaired(text: str) -> str | None:
    """A loosely written age (``45y``, ``7 D``) as an AS value (``045Y``); None if valid or not one."""
    if _FORMAT["AS"][0].fullmatch(text):
        return None
    m = re.fullmatch(r"(\d{1,3})\s*([DWMY])", text.strip().upper())
    return f"{int(m.group(1)):03d}{m.group(2)}" if m else None


def _format_defect(vr: str, text: str) -> str | None:
    """The VR's pattern, a real calendar date (DA, DT), the IS range."""
    if vr in _FORMAT:
        regex, what = _FORMAT[vr]
        if not regex.fullmatch(text):
            return what
    if vr == "DA" or (vr == "DT" and len(text) >= 8):
        try:
            datetime.strptime(text[:8], "%Y%m%d")
        except ValueError:
            return _FORMAT[vr][1].replace("is not a ", "is not a real ", 1)
    if vr == "IS" and not -(2**31) <= int(text) < 2**31:
        return "is out of the range of an integer string (IS)"
    return None


def _length_defect(vr: str, text: str) -> str | None:
    limit = _MAX_CHARS.get(vr)
    if limit and len(text) > limit:
        return f"is longer than {limit} characters ({vr})"
    return None


def check_element(elem: DataElement, kw: str) -> tuple[str | None, DataElement | None]:
    """(defect, repaired element) of a non-sequence element: (None, None) when valid as it is."""
    vr = elem.VR
    if vr == "UN":
        return "has an unknown value representation (UN)", None
    n = elem.VM
    if n and not elem.tag.is_private:
        try:
            spec = dictionary_VM(elem.tag)
        except KeyError:
            spec = ""
        if spec and not _vm_allows(spec, n):
            return f"has {n} values where the standard allows {spec}", None
    if vr not in _TEXT_VRS or elem.is_empty:
        return None, None
    texts = _as_strings(elem)
    fixed: list[str] = []
    changed = False
    for t in texts:
        defect, repaired = _value_defect(vr, kw, t)
        if defect:
            return defect, None
        fixed.append(repaired if repaired is not None else t)
        changed = changed or repaired is not None
    if not changed:
        return None, None
    return None, DataElement(elem.tag, vr, fixed if len(fixed) > 1 else fixed[0])


def _shown(elem: DataElement | None) -> str:
    if elem is None:
        return ""
    try:
        text = "\\".join(_as_strings(elem))
    except Exception:  # noqa: BLE001  (a value that cannot even be shown)
        return ""
    return f" {text[:40] + '...' if len(text) > 40 else text!r}"


def _item_defect(item: Dataset, code: bool) -> str | None:
    """Why a sequence item cannot be copied (the first defect found), or None."""
    for elem in item:
        kw = elem.keyword or str(elem.tag)
        if elem.tag.is_private:
            continue
        if elem.VR == "SQ":
            nested = elem.keyword.endswith("CodeSequence")
            for sub in elem.value:
                if d := _item_defect(sub, nested):
                    return f"{kw}: {d}"
            continue
        defect, _ = check_element(elem, kw)
        if defect:
            return f"{kw}{_shown(elem)} {defect}"
    if code:
        has_value = any(item.get(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
        if not has_value or not item.get("CodeMeaning"):
            return "a code without code value or meaning"
        if item.get("CodeValue") and not item.get("CodingSchemeDesignator"):
            return "a code without coding scheme"
    return None


def _clean_sequence(elem: DataElement, kw: str, notes: list[str]) -> list[Dataset]:
    items = []
    for i, item in enumerate(elem.value, start=1):
        defect = _item_defect(item, kw.endswith("CodeSequence"))
        if defect:
            notes.append(f"{kw} item {i} left out: {defect}")
        else:
            items.append(copy.deepcopy(item))
    return items


def _refuse(src: Dataset, kw: str, why: str) -> SeriesError:
    from workers.reading.series import series_name

    return SeriesError(
        f"{series_name(src)}: cannot write a derived object: {kw} {why}, and a derived object "
        "must carry it unchanged",
        code="values",
    )


def copy_checked(
    src: Dataset,
    dst: Dataset,
    keywords: Iterable[str],
    notes: list[str],
    required: Collection[str] = (),
) -> None:
    """Copy the attributes of ``keywords`` present in ``src`` into ``dst``, each checked.

    ``required``: attributes type 1 in the object being written (besides :data:`TYPE1`):
    absent, empty or invalid, the write is refused (SeriesError naming the attribute).
    """
    for kw in keywords:
        _copy_attribute(src, dst, kw, notes, required)


def _copy_attribute(
    src: Dataset, dst: Dataset, kw: str, notes: list[str], required: Collection[str]
) -> None:
    """One attribute of :func:`copy_checked`: copied, repaired, emptied, left out or refused."""
    type1 = kw in TYPE1 or kw in required
    tag = tag_for_keyword(kw)
    if tag is None:
        return
    if tag not in src:
        if kw in required:
            raise _refuse(src, kw, "is missing in the source")
        return
    elem, defect, fixed = _read_checked(src, tag, kw)
    if elem is not None and elem.VR == "SQ":
        _copy_sequence(src, dst, tag, elem, kw, type1, notes)
        return
    if type1 and defect is None and (elem is None or elem.is_empty):
        defect = "is empty"
    if defect is None:
        if fixed is not None:
            notes.append(f"{kw}{_shown(elem)} written as{_shown(fixed)}")
            dst[tag] = fixed
        elif elem is not None:  # always: a read failure is a defect
            dst[tag] = copy.deepcopy(elem)
        return
    _copy_defective(src, dst, tag, elem, kw, defect, type1, notes)


def _read_checked(
    src: Dataset, tag: int, kw: str
) -> tuple[DataElement | None, str | None, DataElement | None]:
    """(element, defect, repaired element); element None when pydicom cannot read it."""
    try:
        elem = src[tag]
        if elem.VR == "SQ":
            return elem, None, None
        return elem, *check_element(elem, kw)
    except Exception as e:  # noqa: BLE001  (pydicom could not even convert the value)
        return None, f"cannot be read ({type(e).__name__})", None


def _copy_sequence(
    src: Dataset,
    dst: Dataset,
    tag: int,
    elem: DataElement,
    kw: str,
    type1: bool,
    notes: list[str],
) -> None:
    """A sequence with its defective items left out; refused if type 1 and none is left."""
    items = _clean_sequence(elem, kw, notes)
    if items or kw in TYPE2:
        dst[tag] = DataElement(tag, "SQ", items)
    elif type1:
        raise _refuse(src, kw, "has no usable item")
    else:
        dst.pop(tag, None)
        notes.append(f"{kw} left out: an empty sequence is not allowed there")


def _copy_defective(
    src: Dataset,
    dst: Dataset,
    tag: int,
    elem: DataElement | None,
    kw: str,
    defect: str,
    type1: bool,
    notes: list[str],
) -> None:
    """A defective value: refused (type 1), written empty (type 2) or left out (type 3)."""
    if type1:
        raise _refuse(src, kw, f"{_shown(elem).strip()} {defect}".strip())
    if kw in TYPE2:
        vr = elem.VR if elem is not None else dictionary_VR(tag)
        dst[tag] = DataElement(tag, vr, "" if vr in _TEXT_VRS else None)
        notes.append(f"{kw}{_shown(elem)} {defect}: written empty")
    else:
        dst.pop(tag, None)
        notes.append(f"{kw}{_shown(elem)} {defect}: left out")


def checked_character_set(src: Dataset, dst: Dataset, notes: list[str]) -> None:
    """SpecificCharacterSet of the source when pydicom knows every term, else ISO_IR 192.

    The values were decoded to text with the source's character set (or a fallback pydicom
    chose); UTF-8 can encode whatever text that gave. A source without SpecificCharacterSet but
    with non-ASCII text (invalid: the default repertoire is ASCII) gets ISO_IR 100, the
    Latin-1 pydicom decoded it with, so the same bytes become valid.
    """
    if "SpecificCharacterSet" not in src:
        if _has_non_ascii(src):  # pydicom read it as Latin-1: declare what the bytes will be
            dst.SpecificCharacterSet = "ISO_IR 100"
            notes.append(
                "SpecificCharacterSet missing although the source has non-ASCII text: "
                "ISO_IR 100 (Latin-1, as it was read) declared"
            )
        return
    elem = src["SpecificCharacterSet"]
    terms = _as_strings(elem)
    if all(t.strip() in python_encoding for t in terms):
        dst["SpecificCharacterSet"] = copy.deepcopy(elem)
        return
    dst.SpecificCharacterSet = "ISO_IR 192"
    notes.append(
        f"SpecificCharacterSet{_shown(elem)} is not a known character set: "
        "text written as ISO_IR 192 (UTF-8)"
    )


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR in _TEXT_VRS and not elem.tag.is_private and not elem.is_empty:
            if any(not t.isascii() for t in _as_strings(elem)):
                return True
    return False


def unique(notes: Iterable[str]) -> tuple[str, ...]:
    """Notes in first-seen order without repeats."""
    return tuple(dict.fromkeys(notes))


def valid_text(vr: str, text: str) -> bool:
    """Whether ``text`` is a valid single value of ``vr`` as it is (no repair)."""
    return _value_defect(vr, "", text) == (None, None)


def ds_str(x: float) -> str:
    """A DS value of at most 16 characters (dciodvfy rejects longer ones).

    Uses the most significant digits that fit: ``ds_str(-117.37698364257812) == '-117.37698364258'``.
    """
    x = float(x)
    if x == 0.0:
        return "0"
    for digits in range(15, 0, -1):
        s = f"{x:.{digits}g}"
        if "e" in s:
            mant, exp = s.split("e")
            s = f"{mant}e{int(exp)}"  # e-05 -> e-5 saves characters
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot format {x!r} as DS")  # pragma: no cover - 1 digit always fits
