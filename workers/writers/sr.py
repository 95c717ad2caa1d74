"""Segment volumes as a DICOM Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

One Volumetric ROI group per segment, each referencing the segment (SEG SOP instance + segment
number) and the source series, with its volume in mL from voxel counting.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from pipelines import Labelmap
from workers.reading.source import SourceSeries
from workers.writers.base import Provenance, WrittenObject
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
#: LOINC "CT unspecified body region", the procedure in highdicom's TID 1500 examples.
CT_PROCEDURE = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")


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
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.uid("observer-device"),
        name=SPRIM,
        manufacturer_name=SPRIM,
        model_name=SPRIM_MODEL,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
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
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report[0],
        series_instance_uid=uids.uid("sr-series"),
        series_number=number,
        sop_instance_uid=uids.uid("sr-instance"),
        instance_number=1,
        manufacturer=SPRIM,
        is_complete=True,
    )
    sr.SeriesDescription = description
    # highdicom copied the SEG's (already sanitized) patient/study modules; the shared helper
    # gives the same values and the notes.
    copy_patient_study(src, sr, notes)
    sr.ContributingEquipmentSequence = contributing_equipment(prov, source, notes)
    return sr, number, description, unique(notes)


def write_volume_report(
    labelmap: Labelmap,
    seg: hd.seg.Segmentation,
    source: SourceSeries,
    prov: Provenance,
    out_dir: Path,
) -> WrittenObject:
    """Write the SR of ``labelmap``'s volumes (called by the labelmap writer after the SEG)."""
    sr, number, description, notes = build_volume_report(labelmap, seg, source, prov)
    path = series_folder(out_dir, number, description) / "SR0001.dcm"
    sr.save_as(path)
    return WrittenObject(
        path,
        "sr",
        sr.SOPClassUID,
        sr.SOPInstanceUID,
        sr.SeriesInstanceUID,
        number,
        description,
        notes,
    )
