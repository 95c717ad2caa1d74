"""TID 1500 Measurement Reports as DICOM Comprehensive 3D SR (highdicom).

Two reports: the volumes of a labelmap's segments (written with its SEG: one Volumetric ROI
group per segment, referencing the segment and the source series), and a step's own
:class:`~pipelines.Measurements` (the ``measurements`` writer: the step's concepts and UCUM units,
one group per segment referencing the SEG this job wrote for it, or the source images when none).
The procedure reported follows the source modality (CID 100).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pipelines import Code, Labelmap, Measurement, Measurements, Segment
from workers.reading.source import SourceSeries
from workers.writers.base import Provenance, WrittenObject, writer
from workers.writers.common import (
    SPRIM,
    SPRIM_MODEL,
    contributing_equipment,
    copy_patient_study,
    derived_series_number,
    series_description,
    series_folder,
)
from workers.writers.sanitize import unique

MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
#: Source Modality -> CID 100 "Quantitative Diagnostic Imaging Procedures" (LOINC).
PROCEDURES = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
}
#: Any other modality: CID 100's generic "Imaging procedure".
OTHER_PROCEDURE = codes.cid100.ImagingProcedure


def procedure_reported(modality: str) -> hd.sr.CodedConcept:
    """The TID 1500 Procedure Reported of a source of ``modality``."""
    code = PROCEDURES.get(modality.strip().upper(), OTHER_PROCEDURE)
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def coded(code: Code) -> hd.sr.CodedConcept:
    """highdicom form of a pipelines Code."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _observation_context(prov: Provenance, source: SourceSeries) -> hd.sr.ObservationContext:
    """sprim as the observing device."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=prov.uids(source).uid("observer-device"),
        name=SPRIM,
        manufacturer_name=SPRIM,
        model_name=SPRIM_MODEL,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def segment_volumes_ml(labelmap: Labelmap) -> dict[int, float]:
    """Volume (mL) of each segment label: voxel count x voxel volume."""
    a = sitk.GetArrayViewFromImage(labelmap.image)
    voxel_ml = float(np.prod(labelmap.image.GetSpacing())) / 1000.0
    # count_nonzero per label: np.bincount would first copy the uint8 array to int64.
    return {s.label: np.count_nonzero(a == s.label) * voxel_ml for s in labelmap.segments}


def build_volume_report(
    labelmap: Labelmap, seg: hd.seg.Segmentation, source: SourceSeries, prov: Provenance
) -> tuple[hd.sr.Comprehensive3DSR, int, str, tuple[str, ...]]:
    """The TID 1500 report of ``labelmap``'s segment volumes, referencing ``seg``."""
    src = source.first
    notes: list[str] = []
    uids = prov.uids(source)
    number = derived_series_number(src, prov, 1)
    description = series_description(
        f"SR volumes {labelmap.description}", src, prov.description_suffix
    )
    context = _observation_context(prov, source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{SPRIM} {prov.step.name}"[:64], version=prov.step.version
    )
    volumes = segment_volumes_ml(labelmap)
    groups = []
    for number_in_seg, segment in enumerate(labelmap.segments, start=1):
        finding = hd.sr.CodedConcept(segment.type.value, segment.type.scheme, segment.type.meaning)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.uid(f"tracking-{number_in_seg}"), identifier=segment.name[:64]
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number_in_seg,
                    source_series=hd.sr.SourceSeriesForSegmentation(source.series_uid),
                ),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=round(volumes[segment.label], 3),
                        unit=MILLILITER,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=procedure_reported(source.modality),
        imaging_measurements=groups,
    )
    # highdicom copies the SEG's (already sanitized) patient/study modules; the shared helper
    # gives the same values and the notes.
    sr = _report_sr(
        report, [seg], (uids.uid("sr-series"), uids.uid("sr-instance")), number, description,
        source, prov, notes,
    )  # fmt: skip
    return sr, number, description, unique(notes)


def _report_sr(
    report: hd.sr.MeasurementReport,
    evidence: list[Dataset],
    series_and_instance_uid: tuple[str, str],
    number: int,
    description: str,
    source: SourceSeries,
    prov: Provenance,
    notes: list[str],
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report as a Comprehensive 3D SR of sprim, in the source's patient and study."""
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_and_instance_uid[0],
        series_number=number,
        sop_instance_uid=series_and_instance_uid[1],
        instance_number=1,
        manufacturer=SPRIM,
        is_complete=True,
    )
    sr.SeriesDescription = description
    copy_patient_study(source.first, sr, notes)
    # as plain items (highdicom types the attribute with its own item class)
    sr_ds: Dataset = sr
    sr_ds.ContributingEquipmentSequence = contributing_equipment(prov, source, notes)
    return sr


def write_volume_report(
    labelmap: Labelmap,
    seg: hd.seg.Segmentation,
    source: SourceSeries,
    prov: Provenance,
    out_dir: Path,
) -> WrittenObject:
    """Write the SR of ``labelmap``'s volumes (called by the labelmap writer after the SEG)."""
    return _save(*build_volume_report(labelmap, seg, source, prov), out_dir)


def _save(
    sr: hd.sr.Comprehensive3DSR,
    number: int,
    description: str,
    notes: tuple[str, ...],
    out_dir: Path,
) -> WrittenObject:
    """Save an SR in its series folder under ``out_dir``; what was written."""
    path = series_folder(out_dir, number, description) / "SR0001.dcm"
    sr.save_as(path)
    return WrittenObject(
        path, "sr", sr.SOPClassUID, sr.SOPInstanceUID, sr.SeriesInstanceUID, number,
        description, notes,
    )  # fmt: skip


def _evidence(source: SourceSeries, patient_study: Dataset) -> list[Dataset]:
    """The source images as SR evidence: references only, the first carrying the sanitized
    patient and study (highdicom copies them from it)."""
    out = []
    for i, h in enumerate(source.headers):
        d = Dataset()
        if i == 0:
            d.update(patient_study)
        d.StudyInstanceUID = patient_study.StudyInstanceUID
        d.SeriesInstanceUID = h.SeriesInstanceUID
        d.SOPClassUID = h.SOPClassUID
        d.SOPInstanceUID = h.SOPInstanceUID
        out.append(d)
    return out


def _seg_of(segment: Segment, earlier: Sequence[WrittenObject]) -> tuple[WrittenObject, int] | None:
    """The SEG this job wrote holding ``segment``, and its segment number there (latest first)."""
    for w in reversed(earlier):
        if w.kind == "seg" and segment in w.segments:
            return w, w.segments.index(segment) + 1
    return None


def _measurement(m: Measurement, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=coded(m.name),
        value=m.value,
        unit=coded(m.unit),
        method=coded(m.method) if m.method else None,
        derivation=coded(m.derivation) if m.derivation else None,
        algorithm_id=algorithm,
    )


def build_measurement_report(
    output: Measurements, source: SourceSeries, prov: Provenance
) -> tuple[hd.sr.Comprehensive3DSR, int, str, tuple[str, ...]]:
    """The TID 1500 report of a step's measurements (see module docstring)."""
    src = source.first
    notes: list[str] = []
    uids = prov.uids(source)
    number = derived_series_number(src, prov, 0)
    description = series_description(f"SR {output.description}", src, prov.description_suffix)
    patient_study = Dataset()
    copy_patient_study(src, patient_study, notes)
    evidence = _evidence(source, patient_study)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{SPRIM} {prov.step.name}"[:64], version=prov.step.version
    )
    segs: dict[str, Dataset] = {}
    Group = (
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    )
    groups: list[Group] = []
    for k, (segment, measurements) in enumerate(output.by_segment().items(), start=1):
        tracking = hd.sr.TrackingIdentifier(
            uid=uids.uid(f"measurement-group-{k}"),
            identifier=(segment.name if segment else output.description)[:64],
        )
        values = [_measurement(m, algorithm) for m in measurements]
        found = _seg_of(segment, prov.earlier) if segment else None
        group: Group
        if segment and found:
            seg, segment_number = found
            if seg.sop_instance_uid not in segs:
                segs[seg.sop_instance_uid] = pydicom.dcmread(seg.path, stop_before_pixels=True)
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.sop_class_uid,
                    sop_instance_uid=seg.sop_instance_uid,
                    segment_number=segment_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source.series_uid),
                ),
                finding_type=coded(segment.type),
                finding_category=coded(segment.category),
                algorithm_id=algorithm,
                measurements=values,
            )
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=coded(segment.type) if segment else None,
                finding_category=coded(segment.category) if segment else None,
                algorithm_id=algorithm,
                measurements=values,
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup.from_source_image(h)
                    for h in source.headers
                ],
            )
        groups.append(group)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(prov, source),
        procedure_reported=procedure_reported(source.modality),
        imaging_measurements=groups,
    )
    sr = _report_sr(
        report, [*evidence, *segs.values()], (uids.series_uid, uids.instance_uid(0)), number,
        description, source, prov, notes,
    )  # fmt: skip
    return sr, number, description, unique(notes)


@writer("measurements")
def write_measurements(
    output: Measurements, source: SourceSeries, prov: Provenance, out_dir: Path
) -> list[WrittenObject]:
    """Write a step's Measurements as a TID 1500 Comprehensive 3D SR."""
    return [_save(*build_measurement_report(output, source, prov), out_dir)]
