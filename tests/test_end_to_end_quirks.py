"""The default CT rules through the production path on a CT as anonymizers leave it.

A copy of the shared CT whose every slice carries its own FrameOfReferenceUID (plus ``***``
dates, an empty ProcedureCodeSequence, over-long and badly encoded strings: the quirks of
``tests/workers/test_conformance.py``) goes ``storescu`` -> Orthanc -> ``sprim watch`` ->
RabbitMQ -> ``celery -A tasks worker``; every output of the default CT rules must come back to
Orthanc in one frame of reference, the SEGs referencing their source images, 0 dciodvfy errors.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.harness.studies import copy_as_new_study
from tests.test_end_to_end import _until, loop  # noqa: F401  (fixture)
from tests.workers.test_conformance import _ct_quirks
from workers.processing.offline import load_ruleset
from workers.processing.testing import dciodvfy_errors

DEFAULT_RULES = (
    Path(__file__).resolve().parents[1] / "workers" / "processing" / "default_rules.yaml"
)
FINAL = ("done", "partial", "failed")
FOR_NOTE = "134 different FrameOfReferenceUIDs"
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]


def _default_rules_without_quiet_period() -> str:
    """The built-in rules as they are, but routed as soon as Orthanc calls the study stable."""
    text = DEFAULT_RULES.read_text()
    assert text.count("quiet_period: 30s") == 4
    return text.replace("quiet_period: 30s", "quiet_period: 0s")


def _volume_order(heads: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    iop = np.array(heads[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(heads, key=lambda h: float(np.dot(normal, np.array(h.ImagePositionPatient))))


def test_per_slice_frames_of_reference_get_every_default_ct_output_through_orthanc(
    loop,  # noqa: F811
    ct_files,
    tmp_path,
):
    orthanc = loop.orthanc
    study_uid, files = copy_as_new_study(ct_files, tmp_path / "src", "e2e-quirks", edit=_ct_quirks)
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({str(h.FrameOfReferenceUID) for h in heads}) == len(files) == 134
    source_series = str(heads[0].SeriesInstanceUID)
    source_sops = {str(h.SOPInstanceUID) for h in heads}
    first_frame = str(_volume_order(heads)[0].FrameOfReferenceUID)
    rule_names = {r.name for r in load_ruleset(None).rules if not r.name.startswith("mr-")}
    assert rule_names == {"ct-volume-mpr", "ct-chest-lungs", "ct-bone-3d"}

    watch = loop.start_watch(_default_rules_without_quiet_period(), "watch-quirks")
    try:
        t0 = time.monotonic()
        orthanc.storescu(files)
        jobs = _until(
            lambda: (
                (js := loop.jobs(study_uid))
                and len(js) == len(rule_names)
                and all(j.state in FINAL for j in js)
                and js
            ),
            600,
            1.0,
        )
        elapsed = time.monotonic() - t0
        assert jobs, (loop.jobs(study_uid), (loop.tmp / "worker.log").read_text()[-3000:])
        assert {j.rule for j in jobs} == rule_names
        assert {j.rule: (j.state, j.error) for j in jobs} == {r: ("done", None) for r in rule_names}
    finally:
        loop.stop(watch)

    outputs = {o["series_uid"]: o for j in jobs for o in j.outputs}
    # MPR x3 + rotating MIP; SEG lungs, body, bone with their SR; STL lungs and bone.
    kinds = Counter(o["kind"] for o in outputs.values())
    assert kinds == {"series": 4, "seg": 3, "sr": 3, "stl": 2}, kinds

    # Every output series is in Orthanc, in the source study, with every instance.
    in_orthanc = {
        s["MainDicomTags"]["SeriesInstanceUID"]: s
        for s in orthanc.series_of_study(study_uid)
        if s["MainDicomTags"].get("Manufacturer") == "sprim"
    }
    assert {u: len(s["Instances"]) for u, s in in_orthanc.items()} == {
        u: len(o["instances"]) for u, o in outputs.items()
    }

    frames, modalities, sop_classes = set(), Counter(), Counter()
    for uid, series in in_orthanc.items():
        path = tmp_path / "out" / f"{uid}.dcm"
        path.parent.mkdir(exist_ok=True)
        r = orthanc.get(f"/instances/{series['Instances'][0]}/file")
        r.raise_for_status()
        path.write_bytes(r.content)
        ds = pydicom.dcmread(path)
        kind = outputs[uid]["kind"]
        assert str(ds.SOPClassUID) == outputs[uid]["sop_class_uid"]
        assert str(ds.StudyInstanceUID) == study_uid
        assert ds.StudyDate == "" and ds.PatientBirthDate == ""
        assert "ProcedureCodeSequence" not in ds
        modalities[ds.Modality] += 1
        sop_classes[ds.SOPClassUID.name] += 1
        if kind != "sr":
            frames.add(str(ds.FrameOfReferenceUID))
        if kind == "series":
            assert FOR_NOTE in ds.DerivationDescription, ds.DerivationDescription
        if kind in ("seg", "stl"):  # the provenance states the frame of reference chosen
            statement = ds.ContributingEquipmentSequence[-1].ContributionDescription
            assert FOR_NOTE in statement, statement
        if kind == "seg":
            [ref] = ds.ReferencedSeriesSequence
            assert str(ref.SeriesInstanceUID) == source_series
            refs = {str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence}
            assert refs == source_sops
            derivation = ds.SharedFunctionalGroupsSequence[0].get("DerivationImageSequence")
            per_frame = [
                str(s.ReferencedSOPInstanceUID)
                for fg in ds.PerFrameFunctionalGroupsSequence
                for d in (fg.get("DerivationImageSequence") or derivation or [])
                for s in d.SourceImageSequence
            ]
            assert per_frame and set(per_frame) <= source_sops
        assert dciodvfy_errors(path) == [], (ds.SeriesDescription, path)
    assert frames == {first_frame}, (frames, first_frame)
    assert modalities == {"CT": 4, "SEG": 3, "SR": 3, "M3D": 2}, modalities
    assert sop_classes == {
        "CT Image Storage": 4,
        "Segmentation Storage": 3,
        "Comprehensive 3D SR Storage": 3,
        "Encapsulated STL Storage": 2,
    }, sop_classes
    print(
        f"e2e quirks: {len(files)} slices -> {len(outputs)} series {dict(modalities)} "
        f"{dict(sop_classes)} in {elapsed:.1f}s"
    )
