"""The measurements writer (TID 1500 SR of a step's own concepts and units), the SR procedure
from the source modality, and the SEG algorithm family/type a step declares.

Phantoms are written as DICOM, read back, run through the runner and the real writers; every
SEG and SR must pass dciodvfy with 0 errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydantic import BaseModel
from pydicom import Dataset

from pipelines import (
    Code,
    Labelmap,
    Measurement,
    Measurements,
    SegAlgorithm,
    Segment,
    Volume,
    registry,
    step,
)
from pipelines.testing import chest_ct, head_mr
from pipelines.types import ARTIFICIAL_INTELLIGENCE, NO_UNITS
from workers.processing.testing import KitResult, dciodvfy, read_source, run_and_write
from workers.writers.sr import procedure_reported

needs_dciodvfy = pytest.mark.skipif(dciodvfy() is None, reason="dciodvfy not installed")

BRAIN = Segment(
    1,
    "Brain",
    Code("91723000", "SCT", "Anatomical Structure"),
    Code("12738006", "SCT", "Brain"),
)
SIGNAL = Code("110852", "DCM", "MR signal intensity")
MEAN = Code("373098007", "SCT", "Mean")


class NoParams(BaseModel, frozen=True, extra="forbid"):
    pass


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory):
    volume = chest_ct(n_slices=40, size=128, spacing=(2.5, 2.5, 2.5)).volume
    return read_source(volume, tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def mr():
    return head_mr(n_slices=24, size=96, spacing=(2.0, 2.0, 4.0))


@pytest.fixture(scope="module")
def mr_source(mr, tmp_path_factory):
    return read_source(mr.volume, tmp_path_factory.mktemp("mr"))


@pytest.fixture(scope="module")
def mr_steps(mr) -> Iterator[None]:
    """Plugin-like MR steps: a brain labelmap (declared AI, semi-automatic) and the mean signal
    of the whole series (a measurement without a segment)."""

    @step(
        "test.mr_brain",
        version="1.0.0",
        params=NoParams,
        produces="labelmap",
        seg_algorithm=SegAlgorithm(ARTIFICIAL_INTELLIGENCE, "SEMIAUTOMATIC"),
    )
    def brain(volume: Volume, params: NoParams) -> Labelmap:
        """The phantom's brain."""
        labels = sitk.GetImageFromArray(mr.brain.astype(np.uint8))
        labels.CopyInformation(volume.image)
        return Labelmap("Brain", labels, (BRAIN,))

    @step("test.mr_mean_signal", version="1.0.0", params=NoParams, produces="measurements")
    def mean_signal(volume: Volume, params: NoParams) -> Measurements:
        """Mean signal of the series."""
        value = float(sitk.GetArrayViewFromImage(volume.image).mean())
        return Measurements("mean signal", [Measurement(SIGNAL, value, NO_UNITS, derivation=MEAN)])

    yield
    for name in ("test.mr_brain", "test.mr_mean_signal"):
        registry._REGISTRY.pop(name, None)


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for child in getattr(ds, "ContentSequence", []):
        yield child
        yield from items(child)


def concept(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def numbers(ds: Dataset) -> list[tuple[str, float, str]]:
    return [
        (
            str(i.ConceptNameCodeSequence[0].CodeMeaning),
            float(i.MeasuredValueSequence[0].NumericValue),
            str(i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue),
        )
        for i in items(ds)
        if i.ValueType == "NUM"
    ]


def procedure(ds: Dataset) -> str:
    (item,) = [i for i in items(ds) if concept(i) == ("121058", "DCM")]  # Procedure reported
    return str(item.ConceptCodeSequence[0].CodeValue)


def evidence_uids(ds: Dataset) -> set[str]:
    return {
        str(s.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for s in series.ReferencedSOPSequence
    }


def the_sr(result: KitResult, description: str) -> tuple[Path, Dataset]:
    (w,) = [w for w in result.written if w.kind == "sr" and description in w.series_description]
    return w.path, pydicom.dcmread(w.path)


@pytest.fixture(scope="module")
def lungs_stats(ct_source, tmp_path_factory) -> KitResult:
    steps = ["segment.lungs", ("measure.segment_stats", {"segment": "lungs"})]
    return run_and_write(ct_source, steps, tmp_path_factory.mktemp("out"))


@needs_dciodvfy
def test_every_seg_and_sr_passes_dciodvfy(lungs_stats):
    assert [w.kind for w in lungs_stats.written] == ["seg", "sr", "sr"]
    lungs_stats.assert_valid()  # dciodvfy 0 errors + read-back of each SEG and SR


def test_measurement_sr_references_the_seg_segments_of_the_same_job(lungs_stats, ct_source):
    seg = next(w for w in lungs_stats.written if w.kind == "seg")
    _, sr = the_sr(lungs_stats, "Stats")
    refs = [i for i in items(sr) if i.ValueType == "IMAGE" and concept(i) == ("121191", "DCM")]
    segs = [(str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID), r) for r in refs]
    assert {uid for uid, _ in segs} == {seg.sop_instance_uid}
    assert sorted(int(r.ReferencedSOPSequence[0].ReferencedSegmentNumber) for _, r in segs) == [
        1,
        2,
    ]
    seg_ds = pydicom.dcmread(seg.path, stop_before_pixels=True)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg_ds.SegmentSequence}
    assert labels == {1: "Right lung", 2: "Left lung"}
    # the source series as well: the segmentation's source and the evidence
    assert seg.sop_instance_uid in evidence_uids(sr)
    assert {str(h.SOPInstanceUID) for h in ct_source.headers} <= evidence_uids(sr)
    assert sr.StudyInstanceUID == ct_source.study_uid
    assert sr.SeriesInstanceUID not in {w.series_uid for w in lungs_stats.written[:2]}


def test_measurement_sr_holds_the_steps_concepts_and_units(lungs_stats):
    _, sr = the_sr(lungs_stats, "Stats")
    got = numbers(sr)
    assert [(n, u) for n, _, u in got] == [
        ("Volume", "ml"),
        ("Attenuation Coefficient", "[hnsf'U]"),
        ("Attenuation Coefficient", "[hnsf'U]"),
    ] * 2
    outs = lungs_stats.outputs["measure.segment_stats"]
    assert [v for _, v, _ in got] == [m.value for m in outs[0].measurements]
    groups = [str(i.TextValue) for i in items(sr) if concept(i) == ("112039", "DCM")]
    assert groups == ["Right lung", "Left lung"]  # Tracking Identifier per segment
    assert procedure(sr) == "25045-6"  # CT unspecified body region


def test_measurements_without_a_seg_reference_the_source_images(ct_source, tmp_path):
    result = run_and_write(ct_source, ("measure.segment_stats", {"segment": "bone"}), tmp_path)
    if dciodvfy() is not None:
        result.assert_valid()
    assert [w.kind for w in result.written] == ["sr"]
    _, sr = the_sr(result, "Stats")
    refs = [i for i in items(sr) if i.ValueType == "IMAGE"]
    assert {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for r in refs} == {
        str(h.SOPInstanceUID) for h in ct_source.headers
    }
    assert [n for n, _, _ in numbers(sr)][0] == "Volume"


def test_default_seg_algorithm_is_morphological_operations(lungs_stats):
    seg = next(w for w in lungs_stats.written if w.kind == "seg")
    ds = pydicom.dcmread(seg.path, stop_before_pixels=True)
    for s in ds.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        family = s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodeMeaning) == ("123104", "Morphological Operations")


def test_mr_seg_family_from_the_step_and_sr_procedure_from_the_modality(
    mr_source, mr_steps, tmp_path
):
    result = run_and_write(mr_source, ["test.mr_brain", "test.mr_mean_signal"], tmp_path)
    if dciodvfy() is not None:
        result.assert_valid()
    assert [w.kind for w in result.written] == ["seg", "sr", "sr"]
    seg = pydicom.dcmread(result.written[0].path, stop_before_pixels=True)
    s = seg.SegmentSequence[0]
    assert s.SegmentAlgorithmType == "SEMIAUTOMATIC"
    family = s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodeMeaning) == ("123110", "Artificial Intelligence")
    _, volumes = the_sr(result, "volumes")
    _, signal = the_sr(result, "mean signal")
    assert procedure(volumes) == procedure(signal) == "25056-3"  # MRI unspecified body region
    ((name, value, unit),) = numbers(signal)
    assert (name, unit) == ("MR signal intensity", "1")
    assert value == pytest.approx(float(sitk.GetArrayViewFromImage(mr_source.volume.image).mean()))


@pytest.mark.parametrize(
    ("modality", "code"),
    [("CT", "25045-6"), ("MR", "25056-3"), ("PT", "44136-0"), ("US", "363679005")],
)
def test_procedure_reported_by_modality(modality, code):
    assert procedure_reported(modality).value == code
