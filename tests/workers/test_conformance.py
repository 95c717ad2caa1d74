"""Real-world conformance: every series of the shared data, and rewritten copies carrying the
defects found in the field, through the default rules in-process (``sprim run``'s code).

Each series is processed (every output: 0 dciodvfy errors on its first, middle and last
instance), refused with a specific reason (never an internal error), or not selected by the
rules (with the rules' reason). The quirk copies (per-slice FrameOfReferenceUIDs, ``***`` and
impossible dates, an empty ProcedureCodeSequence, over-long, lowercase and badly encoded
strings, non-ASCII text without SpecificCharacterSet) must give every output of the default
rules.

``.venv/bin/python -m tests.workers.test_conformance`` regenerates the table of
``docs/dicom.md`` (section "Real-world conformance") from the same run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom import DataElement
from pydicom.uid import generate_uid

from workers.run import RunSummary, plan_rules, run
from workers.series import SeriesFiles

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CT = DATA / "ct-abdomen-tcia" / "series"
MR = DATA / "mr-brain-oblique-ge"
DOC = Path(__file__).resolve().parents[2] / "docs" / "dicom.md"
DCIODVFY = shutil.which("dciodvfy")
pytestmark = [
    pytest.mark.skipif(not CT.is_dir() or not MR.is_dir(), reason="shared data absent"),
    pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed"),
]
START, END = "<!-- conformance-table:start -->", "<!-- conformance-table:end -->"


# --- quirk copies -------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy every DICOM file of ``src`` (recursively) into ``dst``, ``change(ds)`` applied."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(p for p in src.rglob("*") if p.is_file())):
        try:
            ds = pydicom.dcmread(f)
        except pydicom.errors.InvalidDicomError:
            continue
        change(ds)
        ds.save_as(dst / f"{i:04d}.dcm")
    return dst


def _ct_quirks(ds: pydicom.Dataset) -> None:
    """Per-slice frames of reference (an anonymizer artifact) and invalid copied values."""
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "for"])
    ds.StudyDate = ds.PatientBirthDate = "***"
    ds.ProcedureCodeSequence = []
    ds.StudyDescription = "ABDOMEN " * 10  # LO over 64 characters (type 3)
    ds.AccessionNumber = "ACC" * 7  # SH over 16 characters (type 2)
    ds.InstitutionName = "Hospital " * 8  # LO over 64, in the Acquisition Equipment item
    ds.PatientSex = "m"  # CS lowercase
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds[0x00080090] = DataElement(0x00080090, "PN", b"M\xfcller^Hans")  # latin-1, not UTF-8


def _mr_quirks(ds: pydicom.Dataset) -> None:
    ds.StudyDate = "***"
    ds.PatientBirthDate = "20231301"  # no 13th month
    ds.StudyTime = "25:61"
    ds.ProcedureCodeSequence = []
    ds.StudyID = "STUDY-ID-TOO-LONG-FOR-SH"
    ds.PatientAge = "45Y"  # repaired to 045Y
    ds.PatientWeight = "70.1234567890123456"  # DS over 16 characters: rounded
    ds.pop("SpecificCharacterSet", None)  # and non-ASCII text: declared ISO_IR 100
    ds[0x00080090] = DataElement(0x00080090, "PN", b"M\xfcller^Hans")


# --- the run ------------------------------------------------------------------------------------


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (res.stdout + res.stderr).splitlines()
    return [f"{path.parent.name}/{path.name}: {x}" for x in lines if x.startswith("Error")]


def _vendor(series: SeriesFiles) -> str:
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True, specific_tags=["Manufacturer"])
    return str(ds.get("Manufacturer") or "").strip() or "(none)"


def conformance(inputs: list[Path], out: Path) -> tuple[RunSummary, list[dict]]:
    """Run the default rules on ``inputs``; one row per series found, dciodvfy on each output."""
    found: list[SeriesFiles] = []
    plan = plan_rules(None)

    def recording_plan(series: list[SeriesFiles]):
        found.extend(series)
        return plan(series)

    summary = run(inputs, out, plan_fn=recording_plan)
    by_uid: dict[str, list] = {}
    for job in summary.jobs:
        by_uid.setdefault(job.series_uid, []).append(job)
    picked = {j.series_uid for j in summary.jobs}
    rest = [s for s in found if s.attributes.get("SeriesInstanceUID") not in picked]
    assert len(rest) == len(summary.unmatched), "unmatched series do not line up"
    reasons = dict(zip(map(id, rest), summary.unmatched, strict=True))
    rows = []
    for s in found:
        uid = s.attributes.get("SeriesInstanceUID")
        row = {
            "folder": _folder(s),
            "series": s.name,
            "vendor": _vendor(s),
            "jobs": by_uid.get(uid, []),
            "unmatched": reasons.get(id(s), {}).get("reason", ""),
            "outputs": Counter(),
            "errors": [],
        }
        for job in row["jobs"]:
            for step in job.steps:
                for o in step["outputs"]:
                    row["outputs"][(o["kind"], o["series_number"], o["series_description"])] += 1
        rows.append(row)
    checks = []
    for row in rows:
        for job in row["jobs"]:
            for step in job.steps:
                series: dict[int, list[Path]] = {}
                for o in step["outputs"]:
                    series.setdefault(o["series_number"], []).append(Path(o["path"]))
                for paths in series.values():
                    paths = sorted(paths)
                    for p in dict.fromkeys([paths[0], paths[len(paths) // 2], paths[-1]]):
                        checks.append((row, p))
    with ThreadPoolExecutor(2) as pool:
        errors = pool.map(lambda c: _dciodvfy_errors(c[1]), checks)
        for (row, _), errs in zip(checks, errors, strict=True):
            row["errors"] += errs
    return summary, rows


def _folder(s: SeriesFiles) -> str:
    parent = s.files[0].parent
    try:
        return str(parent.relative_to(DATA))
    except ValueError:
        return parent.name


def _outcome(row: dict) -> str:
    if not row["jobs"]:
        return "not selected"
    states = {j.state for j in row["jobs"]}
    return "processed" if states == {"done"} else "refused" if states == {"failed"} else "partial"


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return conformance([DATA], tmp_path_factory.mktemp("conformance"))[1]


@pytest.fixture(scope="module")
def quirks(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSummary, list[dict], Path]:
    base = tmp_path_factory.mktemp("quirks")
    _rewrite(CT, base / "in" / "ct", _ct_quirks)
    _rewrite(MR, base / "in" / "mr", _mr_quirks)
    summary, rows = conformance([base / "in"], base / "out")
    return summary, rows, base / "in" / "ct"


def _assert_conformant(rows: list[dict]) -> None:
    for row in rows:
        assert row["errors"] == [], row["series"]
        for job in row["jobs"]:
            assert "internal error" not in job.error, (row["series"], job.error)
            if job.state != "done":
                assert job.error.strip(), row["series"]
        if not row["jobs"]:
            assert row["unmatched"].strip(), row["series"]


def test_every_shared_series_is_processed_validly_or_refused_with_a_reason(shared) -> None:
    _assert_conformant(shared)
    processed = {r["folder"] for r in shared if _outcome(r) == "processed"}
    assert {"ct-abdomen-tcia/series", "ct-head-tilted-ge"} <= processed, processed
    assert any(f.startswith("mr-brain-oblique-ge") for f in processed), processed
    assert sum(sum(r["outputs"].values()) for r in shared) > 1000


def test_quirk_copies_get_every_default_output_without_dciodvfy_error(quirks) -> None:
    summary, rows, ct_dir = quirks
    _assert_conformant(rows)
    ct_row = next(r for r in rows if r["folder"] == "ct")
    assert _outcome(ct_row) == "processed"
    kinds = Counter(kind for kind, _, _ in ct_row["outputs"])
    # MPR x3 + rotating MIP; SEG lungs, body, bone with their SR; STL lungs and bone.
    assert kinds == {"series": 4, "seg": 3, "sr": 3, "stl": 2}, kinds
    mr_row = next(r for r in rows if r["folder"] == "mr")
    assert _outcome(mr_row) == "processed" and len(mr_row["outputs"]) == 3
    ct_notes = " | ".join(n for j in ct_row["jobs"] for n in j.notes)
    for expected in (
        "StudyDate '***' is not a date",
        "PatientBirthDate '***' is not a date",
        "ProcedureCodeSequence left out",
        "StudyDescription",
        "AccessionNumber",
        "PatientSex 'm' is not a code string",
        "ReferringPhysicianName",
        "not valid in the source's character set",
        "InstitutionName",
    ):
        assert expected in ct_notes, expected
    mr_notes = " | ".join(n for j in mr_row["jobs"] for n in j.notes)
    for expected in (
        "'20231301' is not a real date",
        "StudyTime '25:61'",
        "045Y",
        "StudyID",
        "ISO_IR 100 (Latin-1, as it was read) declared",
    ):
        assert expected in mr_notes, expected


def test_per_slice_frames_of_reference_give_one_frame_and_seg_references(quirks) -> None:
    summary, rows, ct_dir = quirks
    ct_row = next(r for r in rows if r["folder"] == "ct")
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(ct_dir.iterdir())]
    source_uids = {str(h.SOPInstanceUID) for h in heads}
    source_frames = {str(h.FrameOfReferenceUID) for h in heads}
    assert len(source_frames) == 134
    paths = [Path(o["path"]) for j in ct_row["jobs"] for s in j.steps for o in s["outputs"]]
    frames = set()
    for p in paths[::25] + [p for p in paths if p.name.startswith(("SEG", "STL"))]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        frames.add(str(ds.FrameOfReferenceUID))
        assert ds.StudyDate == "" and ds.PatientBirthDate == ""
        assert "ProcedureCodeSequence" not in ds and ds.AccessionNumber == ""
        if p.name.startswith("SEG"):
            refs = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
            assert {str(r.ReferencedSOPInstanceUID) for r in refs} == source_uids
            statement = ds.ContributingEquipmentSequence[-1].ContributionDescription
            assert "134 different FrameOfReferenceUIDs" in statement
        if p.name.startswith("IM_"):
            assert "134 different FrameOfReferenceUIDs" in ds.DerivationDescription
    assert len(frames) == 1 and frames <= source_frames  # one of the source's, for every output


# --- the documentation table ----------------------------------------------------------------------


def _cell(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "/").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(rows: list[dict]) -> str:
    lines = [
        "| folder | series | vendor | outcome | outputs | notes / reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["folder"], r["series"])):
        outputs = Counter(kind for kind, _, _ in r["outputs"])
        out_text = ", ".join(f"{n} {k}" for k, n in sorted(outputs.items())) or "—"
        if r["jobs"]:
            notes = [n for j in r["jobs"] for n in j.notes]
            notes += [j.error for j in r["jobs"] if j.error]
            why = "; ".join(dict.fromkeys(notes)) or "—"
        else:  # the reasons of the rules for this modality, not "Modality 'MR' not in ['CT']"
            parts = [p for p in r["unmatched"].split("; ") if "match: Modality:" not in p]
            why = "; ".join(parts) or "no default rule for this modality"
        if r["errors"]:
            why = f"{len(r['errors'])} dciodvfy errors: {why}"
        name = re.sub(r" \(.*\)$", "", r["series"])  # the UID makes the table unreadable
        lines.append(
            f"| {_cell(r['folder'], 60)} | {_cell(name, 50)} | {_cell(r['vendor'], 30)} "
            f"| {_outcome(r)} | {out_text} | {_cell(why)} |"
        )
    return "\n".join(lines)


def write_doc_table() -> None:
    with tempfile.TemporaryDirectory(prefix="sprim-conformance-") as tmp:
        rows = conformance([DATA], Path(tmp))[1]
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table(rows)}\n{END}{tail}")
    print(f"{len(rows)} series written to {DOC}", file=sys.stderr)


if __name__ == "__main__":
    write_doc_table()
