"""Helpers shared by every derived-object writer (series, SEG, SR, Encapsulated STL).

What each helper is for
-----------------------
``copy_patient_study`` / ``copy_frame_of_reference`` / ``copy_laterality`` / ``copy_attributes``
    Copy the Patient, General Study, Patient Study (and Clinical Trial) modules, the Frame of
    Reference module and BodyPartExamined/Laterality from a source header: a derived object lives
    in the source study and frame. Every value goes through ``workers.writers.sanitize``; what
    it changed is appended to the caller's ``notes``.
``set_general_equipment`` / ``acquisition_equipment_item``
    The General Equipment module of a derived object names *sprim* (the equipment that produced
    it); the source scanner (Manufacturer, model, serial, software) is kept as a Contributing
    Equipment item with purpose "Acquisition Equipment" (DCM 109101).
``contributing_equipment`` / ``software_versions`` / ``derivation_description``
    Provenance: sprim version, step name, step version and canonical params.
``derived_series_number`` / ``series_description`` / ``series_folder``
    SeriesNumber scheme avoiding the source series, a radiologist-readable SeriesDescription, the
    output folder ``<SeriesNumber>_<slug>``.
``referenced_series_item`` / ``source_image_item`` / ``code_item``
    Items of ReferencedSeriesSequence, SourceImageSequence and coded sequences.
``file_meta`` / ``dicom_now``
    File Meta Information, DA/TM of now (DS values: ``sanitize.ds_str``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from workers.core.config import settings
from workers.core.uids import derive_uid
from workers.reading.source import SourceSeries
from workers.writers.base import Provenance
from workers.writers.sanitize import (
    PATIENT_STUDY_TYPE2,
    checked_character_set,
    copy_checked,
    valid_text,
)

# Patient module (C.7.1.1); SpecificCharacterSet travels with the names it encodes.
PATIENT_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "EthnicGroup",
)
# General Study module (C.7.2.1).
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    "ReferencedStudySequence",
    "RequestingService",
)
# Patient Study module (C.7.2.2).
PATIENT_STUDY_KEYWORDS = (
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientSexNeutered",
    "Occupation",
    "AdditionalPatientHistory",
    "SmokingStatus",
    "PregnancyStatus",
    "LastMenstrualDate",
)
# Clinical Trial Subject / Study modules: keep de-identified research data traceable.
CLINICAL_TRIAL_KEYWORDS = (
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)
FRAME_OF_REFERENCE_KEYWORDS = ("FrameOfReferenceUID", "PositionReferenceIndicator")
# Source scanner identification, kept in the "Acquisition Equipment" contributing item.
ACQUISITION_EQUIPMENT_KEYWORDS = (
    "Manufacturer",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "InstitutionalDepartmentName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
)

SPRIM = "sprim"
SPRIM_MODEL = "sprim post-processing"


@lru_cache
def sprim_version() -> str:
    """Installed version of the ``sprim`` distribution ("0+unknown" when not installed)."""
    try:
        return version("sprim")
    except PackageNotFoundError:
        return "0+unknown"


def dicom_now() -> tuple[str, str]:
    """(DA, TM) strings of the current UTC time."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def copy_attributes(
    src: Dataset,
    dst: Dataset,
    keywords: tuple[str, ...],
    notes: list[str],
    required: tuple[str, ...] = (),
) -> None:
    """Copy the attributes of ``keywords`` present in ``src`` into ``dst`` through the sanitizer
    (:func:`workers.writers.sanitize.copy_checked`); what it changed goes to ``notes``."""
    copy_checked(src, dst, keywords, notes, required)


# Clinical Trial Subject module: present only with its type 1 attributes, type 2 ones filled.
_TRIAL_TYPE1 = ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID")
_TRIAL_SUBJECT = ("ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID")
_TRIAL_TYPE2 = ("ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName")


def copy_patient_study(src: Dataset, dst: Dataset, notes: list[str]) -> None:
    """Copy Patient, General Study, Patient Study and Clinical Trial modules, each value checked.

    Type 2 attributes missing in the source are written empty (dciodvfy requires them present).
    """
    checked_character_set(src, dst, notes)
    copy_checked(src, dst, PATIENT_KEYWORDS[1:] + STUDY_KEYWORDS + PATIENT_STUDY_KEYWORDS, notes)
    for kw in PATIENT_STUDY_TYPE2:
        if kw not in dst:
            setattr(dst, kw, "")
    _copy_clinical_trial(src, dst, notes)
    _repair_deidentification(dst, notes)


def _copy_clinical_trial(src: Dataset, dst: Dataset, notes: list[str]) -> None:
    trial = Dataset()
    copy_checked(src, trial, CLINICAL_TRIAL_KEYWORDS, notes)
    for kw in CLINICAL_TRIAL_KEYWORDS:
        dst.pop(kw, None)
    if not len(trial):
        return
    missing = [kw for kw in _TRIAL_TYPE1 if not trial.get(kw)]
    if not any(trial.get(kw) for kw in _TRIAL_SUBJECT):
        missing.append(" or ".join(_TRIAL_SUBJECT))
    if missing:
        notes.append(f"Clinical Trial attributes left out: no valid {', '.join(missing)}")
        return
    for kw in _TRIAL_TYPE2:
        if kw not in trial:
            setattr(trial, kw, "")
    dst.update(trial)


def _repair_deidentification(dst: Dataset, notes: list[str]) -> None:
    """DeidentificationMethod is type 1C when PatientIdentityRemoved is YES: some sources leave
    it empty (dciodvfy error); say so rather than copy the defect."""
    if str(dst.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    if not dst.get("DeidentificationMethod") and not dst.get("DeidentificationMethodCodeSequence"):
        dst.DeidentificationMethod = "not stated in the source images"
        notes.append(
            "DeidentificationMethod missing although PatientIdentityRemoved is YES: "
            "written as 'not stated in the source images'"
        )


def frame_of_reference(source: SourceSeries) -> tuple[str, str]:
    """The FrameOfReferenceUID every output of ``source`` uses, and the provenance sentence
    stating the choice when the source slices carried different ones ("" otherwise).

    The reader accepts such a stack when its geometry is one (an anonymizer artifact) and picks
    the first slice's UID in volume order (``SourceSeries.frame_of_reference_uid``).
    """
    chosen = source.frame_of_reference_uid or str(source.first.get("FrameOfReferenceUID") or "")
    found = {str(h.get("FrameOfReferenceUID") or "") for h in source.headers} - {""}
    if len(found) <= 1:
        return chosen, ""
    return chosen, (
        f"frame of reference {chosen} (the first slice's) for all outputs: the "
        f"{len(source.headers)} source slices carried {len(found)} different "
        "FrameOfReferenceUIDs for one consistent geometry"
    )


def copy_frame_of_reference(source: SourceSeries, dst: Dataset, notes: list[str]) -> None:
    """FrameOfReferenceUID (the one of :func:`frame_of_reference`) and PositionReferenceIndicator
    (type 2: empty when absent or invalid).

    A source without FrameOfReferenceUID (type 1 in every image IOD) gets one derived from its
    SeriesInstanceUID: deterministic, and shared by every object derived from that series.
    """
    src = source.first
    chosen = frame_of_reference(source)[0]  # the choice is stated in the provenance
    if chosen:
        probe = Dataset()
        probe.FrameOfReferenceUID = chosen
        probe.SeriesInstanceUID = src.get("SeriesInstanceUID", "")
        probe.SeriesNumber = src.get("SeriesNumber", "")
        probe.SeriesDescription = src.get("SeriesDescription", "")
        copy_checked(probe, dst, ("FrameOfReferenceUID",), notes)  # refuses an invalid UID
    else:
        dst.FrameOfReferenceUID = derive_uid(str(src.SeriesInstanceUID), "frame-of-reference")
        notes.append(f"no FrameOfReferenceUID in the source: {dst.FrameOfReferenceUID} derived")
    copy_checked(src, dst, ("PositionReferenceIndicator",), notes)
    if "PositionReferenceIndicator" not in dst:
        dst.PositionReferenceIndicator = ""


def copy_laterality(src: Dataset, dst: Dataset, notes: list[str]) -> None:
    """BodyPartExamined and Laterality (General Series) as dciodvfy accepts them.

    Laterality (2C) is copied when it has a valid value; left out for a known body part (empty
    is an error for unpaired parts); written empty when the body part is unknown (it may be
    paired).
    """
    copy_checked(src, dst, ("BodyPartExamined", "Laterality"), notes)
    if not dst.get("Laterality"):
        dst.pop("Laterality", None)
        if not dst.get("BodyPartExamined"):
            dst.Laterality = ""


def set_general_equipment(dst: Dataset) -> None:
    """General Equipment module naming sprim, the equipment that produced the derived object."""
    dst.Manufacturer = SPRIM
    dst.ManufacturerModelName = SPRIM_MODEL
    dst.SoftwareVersions = sprim_version()
    dst.StationName = settings().station_name[:16]
    if settings().institution_name:
        dst.InstitutionName = settings().institution_name[:64]


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One item of a code sequence (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def software_versions(prov: Provenance) -> list[str]:
    """SoftwareVersions values: ``["sprim 0.1.0", "reformat.mpr 1.0.0"]`` (LO, ≤ 64 each)."""
    return [f"{SPRIM} {sprim_version()}"[:64], f"{prov.step.name} {prov.step.version}"[:64]]


def derivation_description(prov: Provenance, what: str = "") -> str:
    """DerivationDescription / ContributionDescription text (ST, ≤ 1024 characters).

    ``sprim 0.1.0 reformat.mpr 1.0.0 rule=ct-chest params={...}: <what>``; params are the canonical
    JSON (sorted keys, defaults filled) that also feeds the UIDs.
    """
    text = (
        f"{SPRIM} {sprim_version()} {prov.step.name} {prov.step.version}"
        f" rule={prov.rule} params={prov.params_canonical}"
    )
    if what:
        text += f": {what}"
    return text if len(text) <= 1024 else text[:1021] + "..."


def acquisition_equipment_item(source_header: Dataset, notes: list[str]) -> Dataset | None:
    """A Contributing Equipment item describing the source scanner, or None when unknown."""
    item = Dataset()
    copy_checked(source_header, item, ACQUISITION_EQUIPMENT_KEYWORDS, notes)
    if not item.get("Manufacturer"):
        return None
    item.PurposeOfReferenceCodeSequence = [code_item("109101", "DCM", "Acquisition Equipment")]
    return item


def contributing_equipment(
    prov: Provenance, source: SourceSeries, notes: list[str]
) -> list[Dataset]:
    """ContributingEquipmentSequence items: the source scanner (if known), then sprim.

    The sprim item ("Processing Equipment", DCM 109102) carries SoftwareVersions (sprim and step
    versions), ContributionDateTime and ContributionDescription (step, rule, canonical params,
    and the frame of reference decision when the source slices disagreed).
    """
    items: list[Dataset] = []
    if acq := acquisition_equipment_item(source.first, notes):
        items.append(acq)
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [code_item("109102", "DCM", "Processing Equipment")]
    item.Manufacturer = SPRIM
    item.ManufacturerModelName = SPRIM_MODEL
    item.StationName = settings().station_name[:16]
    if settings().institution_name:
        item.InstitutionName = settings().institution_name[:64]
    item.SoftwareVersions = software_versions(prov)
    item.ContributionDateTime = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = derivation_description(prov, frame_of_reference(source)[1])
    items.append(item)
    return items


def derived_series_number(source_header: Dataset, prov: Provenance, sub_index: int = 0) -> int:
    """SeriesNumber of a derived series: ``source * 1000 + 100 * rule + 10 * step + output + 1``.

    The derived numbers of source series N are N001..N999, so they sort right after their source
    in a viewer and never equal a source series number below 1000 * N; distinct rules (up to 10),
    steps (up to 10) and outputs (up to 9 per step) get distinct numbers: source 201 gives 201001
    (rule 0, step 0, first output) ... 201121 (rule 1, step 2). ``sub_index`` separates several
    objects written from one output (SEG = 0, SR = 1). A source without SeriesNumber uses 999.
    """
    try:
        base = int(source_header.get("SeriesNumber") or 999)
    except (TypeError, ValueError):
        base = 999
    offset = (
        100 * min(prov.rule_index, 9)
        + 10 * min(prov.step_index, 9)
        + min(prov.output_index + sub_index, 8)
        + 1
    )
    number = abs(base) * 1000 + offset
    return number if number < 2**31 else 999000 + offset  # IS is a signed 32-bit integer


def series_description(
    description: str, source_header: Dataset | None = None, suffix: str = ""
) -> str:
    """SeriesDescription (LO, ≤ 64): the output's label, e.g. ``COR 3mm AVG``.

    ``suffix`` says what a reprocessing request changed (``thickness_mm=5``) and is always kept.
    With ``source_header`` the source SeriesDescription is appended in brackets when it fits, so a
    radiologist sees which series it was made from: ``COR 3mm AVG [Thorax 1mm B70f]``.
    """
    text = description.strip() or "DERIVED"
    if suffix:
        text = f"{text[: 63 - len(suffix)]} {suffix}"
    src = str(source_header.get("SeriesDescription", "")).strip() if source_header else ""
    if src and valid_text("LO", src) and len(text) + len(src) + 3 <= 64:
        text = f"{text} [{src}]"
    return text[:64]


def slug(text: str) -> str:
    """File-system-safe short form of a description: ``COR 3mm AVG`` -> ``COR_3mm_AVG``."""
    s = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.")
    return s[:48] or "series"


def series_folder(out_dir: Path, series_number: int, description: str) -> Path:
    """``out_dir/<SeriesNumber>_<slug>``, created."""
    folder = Path(out_dir) / f"{series_number}_{slug(description)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def referenced_series_item(headers: Dataset | Sequence[Dataset]) -> Dataset:
    """ReferencedSeriesSequence item (Common Instance Reference module) for the source series.

    ``headers`` are the source instances (or one header): SeriesInstanceUID plus a
    ReferencedInstanceSequence (type 1) of their SOP class/instance UIDs. No StudyInstanceUID:
    dciodvfy refuses it there when the source is in the same study (always, for sprim).
    """
    heads = [headers] if isinstance(headers, Dataset) else list(headers)
    item = Dataset()
    item.SeriesInstanceUID = heads[0].SeriesInstanceUID
    refs = []
    for h in heads:
        ref = Dataset()
        ref.ReferencedSOPClassUID = h.SOPClassUID
        ref.ReferencedSOPInstanceUID = h.SOPInstanceUID
        refs.append(ref)
    item.ReferencedInstanceSequence = refs
    return item


def source_image_item(source_header: Dataset) -> Dataset:
    """SourceImageSequence item referencing one source instance, purpose DCM 121322."""
    item = Dataset()
    item.ReferencedSOPClassUID = source_header.SOPClassUID
    item.ReferencedSOPInstanceUID = source_header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        code_item("121322", "DCM", "Source image for image processing operation")
    ]
    return item


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """File Meta Information for an Explicit VR Little Endian Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"SPRIM_{sprim_version()}"[:16]
    return meta
