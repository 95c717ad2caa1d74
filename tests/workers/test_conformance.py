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
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom import DataElement
from pydicom.uid import generate_uid

from pipelines import get_step
from pipelines.rules import RuleSet, explain
from workers.processing.offline import PlannedJob, load_ruleset, plan_rules, run
from workers.processing.runner import StepCall
from workers.processing.summary import JobResult
from workers.processing.testing import dciodvfy, dciodvfy_errors
from workers.reading.series import SeriesFiles, read_series
from workers.reading.source import SeriesError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CT = DATA / "ct-abdomen-tcia" / "series"
MR = DATA / "mr-brain-oblique-ge"
DOC = Path(__file__).resolve().parents[2] / "docs" / "dicom.md"
DCIODVFY = dciodvfy()
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

#: CT series up to this many images get the 3D steps of the default CT rules in the forced pass
#: (segment, mesh, rotating MIP): the cost of the test is there. Every shared CT is below it.
FORCED_3D_MAX_IMAGES = 150
#: SeriesError codes (workers.reading.source).
CODES = {
    "pixel-format",
    "geometry",
    "identity",
    "size",
    "values",
    "unreadable",
    "not-image",
    "series",
}


def _dciodvfy_errors(path: Path) -> list[str]:
    return [f"{path.parent.name}/{path.name}: {x}" for x in dciodvfy_errors(path)]


def _vendor(series: SeriesFiles) -> str:
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True, specific_tags=["Manufacturer"])
    return str(ds.get("Manufacturer") or "").strip() or "(none)"


def forced_plan(ruleset: RuleSet):
    """Every image series through the steps a default rule gives its modality, whatever the
    rule's other conditions (series kind, size, body part): can sprim handle the series?

    One job per rule whose ``Modality`` condition holds, with the rule's own step calls; a
    modality no rule names (PET...) gets ``reformat.mpr`` with its defaults. CT series over
    :data:`FORCED_3D_MAX_IMAGES` images get the reformats only.
    """
    mpr = get_step("reformat.mpr")
    default_mpr = [StepCall(mpr, mpr.validate({}))]

    def plan(found: list[SeriesFiles]):
        jobs, unmatched = [], []
        for s in found:
            a = s.attributes
            if not a.get("Rows"):
                unmatched.append({"series": s.name, "reason": "not an image series"})
                continue
            big = (a.get("NumberOfImages") or 0) > FORCED_3D_MAX_IMAGES
            for i, rule in enumerate(ruleset.rules):
                if not all(c.test(a) for c in rule.match if c.key == "Modality"):
                    continue
                if big and any(not rs.use.startswith("reformat.") for rs in rule.run):
                    continue
                calls = [StepCall(rs.step, rs.params) for rs in rule.run]
                jobs.append(PlannedJob(rule.name, s, calls, i))
            if not any(j.series is s for j in jobs):
                jobs.append(PlannedJob("forced reformat.mpr", s, default_mpr))
        return jobs, unmatched

    return plan


def conformance(inputs: list[Path], out: Path, *, forced: bool = True) -> list[dict]:
    """One row per series found in ``inputs``: pass ``a`` (the default rules) and, if
    ``forced``, pass ``b`` (:func:`forced_plan`), dciodvfy on every output series.

    A job both passes plan (same series, same rule) runs once and counts in both.
    """
    ruleset = load_ruleset(None)
    by_rules, by_force = plan_rules(None), forced_plan(ruleset)
    found: list[SeriesFiles] = []
    planned: dict[str, list[PlannedJob]] = {}
    run_jobs: list[PlannedJob] = []

    def plan(series: list[SeriesFiles]):
        found.extend(series)
        planned["a"] = by_rules(series)[0]
        planned["b"] = by_force(series)[0] if forced else []
        seen: dict[tuple, PlannedJob] = {}
        for job in planned["a"] + planned["b"]:
            seen.setdefault((id(job.series), job.rule), job)
        run_jobs.extend(seen.values())
        return run_jobs, []

    summary = run(inputs, out, plan_fn=plan)
    assert not summary.error, summary.error
    result = {(id(p.series), p.rule): r for p, r in zip(run_jobs, summary.jobs, strict=True)}
    errors = _check_outputs(summary.jobs)
    why_not = _why_not_selected(ruleset, found)
    rows = []
    for s in found:
        row = {
            "folder": _folder(s),
            "series": s.name,
            "vendor": _vendor(s),
            "modality": str(s.attributes.get("Modality") or ""),
            "image": bool(s.attributes.get("Rows")),
            "code": "",
        }
        for name in ("a", "b") if forced else ("a",):
            done = [result[(id(s), j.rule)] for j in planned[name] if j.series is s]
            row[name] = {
                "jobs": done,
                "outputs": Counter(
                    (o["kind"], o["series_number"], o["series_description"])
                    for j in done
                    for step in j.steps
                    for o in step["outputs"]
                ),
                "errors": [e for j in done for e in errors[id(j)]],
            }
        row["a"]["unmatched"] = why_not[id(s)] if not row["a"]["jobs"] else ""
        if forced and _outcome(row["b"]) == "refused":
            row["code"] = _refusal_code(s, row["b"]["jobs"])
        rows.append(row)
    return rows


def _why_not_selected(ruleset: RuleSet, found: list[SeriesFiles]) -> dict[int, str]:
    """Per series (by id): the first failed condition of each default rule, study by study."""
    by_study: dict[str, list[SeriesFiles]] = {}
    for s in found:
        by_study.setdefault(str(s.attributes.get("StudyInstanceUID", "")), []).append(s)
    why: dict[int, list[str]] = {id(s): [] for s in found}
    for series in by_study.values():
        for verdict in explain(ruleset, [s.attributes for s in series]):
            for s, sv in zip(series, verdict.series, strict=True):
                why[id(s)].append(f"{verdict.rule}: {sv.reason}")
    return {k: "; ".join(v) for k, v in why.items()}


def _check_outputs(jobs: list[JobResult]) -> dict[int, list[str]]:
    """dciodvfy errors of each job's outputs (first, middle and last instance of each series)."""
    checks = []
    for job in jobs:
        for step in job.steps:
            series: dict[int, list[Path]] = {}
            for o in step["outputs"]:
                series.setdefault(o["series_number"], []).append(Path(o["path"]))
            for paths in series.values():
                paths = sorted(paths)
                for p in dict.fromkeys([paths[0], paths[len(paths) // 2], paths[-1]]):
                    checks.append((job, p))
    errors: dict[int, list[str]] = {id(j): [] for j in jobs}
    with ThreadPoolExecutor(2) as pool:
        found = pool.map(lambda c: _dciodvfy_errors(c[1]), checks)
        for (job, _), errs in zip(checks, found, strict=True):
            errors[id(job)] += errs
    return errors


def _refusal_code(s: SeriesFiles, jobs: list[JobResult]) -> str:
    """The SeriesError code of a series refused as a whole (the job summary keeps the words)."""
    if any(j.failures for j in jobs):
        return "step"  # read, then refused by its steps (StepError)
    try:
        read_series(s)
    except SeriesError as e:
        return e.code
    return "step"


def _folder(s: SeriesFiles) -> str:
    parent = s.files[0].parent
    try:
        return str(parent.relative_to(DATA))
    except ValueError:
        return parent.name


def _outcome(p: dict) -> str:
    if not p["jobs"]:
        return "not selected"
    states = {j.state for j in p["jobs"]}
    return "processed" if states == {"done"} else "refused" if states == {"failed"} else "partial"


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return conformance([DATA], tmp_path_factory.mktemp("conformance"))


@pytest.fixture(scope="module")
def quirks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    base = tmp_path_factory.mktemp("quirks")
    _rewrite(CT, base / "in" / "ct", _ct_quirks)
    _rewrite(MR, base / "in" / "mr", _mr_quirks)
    return conformance([base / "in"], base / "out", forced=False), base / "in" / "ct"


def _assert_conformant(rows: list[dict], name: str) -> None:
    """Pass ``name``: 0 dciodvfy errors; every failure says why, never "internal error"."""
    for row in rows:
        p = row[name]
        assert p["errors"] == [], (row["series"], p["errors"])
        for job in p["jobs"]:
            assert "internal error" not in job.error, (row["series"], job.error)
            if job.state != "done":
                assert job.error.strip(), row["series"]
            for f in job.failures:
                assert f["reason"].strip() and "internal error" not in f["reason"], f


def test_every_shared_series_is_processed_validly_or_not_selected_with_a_reason(shared) -> None:
    _assert_conformant(shared, "a")
    for row in shared:
        if not row["a"]["jobs"]:
            assert row["a"]["unmatched"].strip(), row["series"]
    processed = {r["folder"] for r in shared if _outcome(r["a"]) == "processed"}
    assert {"ct-abdomen-tcia/series", "ct-head-tilted-ge"} <= processed, processed
    assert any(f.startswith("mr-brain-oblique-ge") for f in processed), processed
    assert sum(sum(r["a"]["outputs"].values()) for r in shared) > 1000


def test_every_shared_image_series_forced_through_its_steps_is_processed_or_refused(
    shared,
) -> None:
    """Whatever the rules select: each image series gets every output of its modality's
    steps with 0 dciodvfy errors, or a refusal naming the series and the defect."""
    _assert_conformant(shared, "b")
    for row in shared:
        b = row["b"]
        if not row["image"]:  # refused by the plan: "not an image series"
            assert not b["jobs"], row["series"]
            continue
        assert _outcome(b) in ("processed", "refused", "partial"), row["series"]
        if _outcome(b) == "refused" and row["code"] != "step":
            assert row["code"] in CODES, (row["series"], row["code"])
            for job in b["jobs"]:  # the SeriesError's sentence, naming the series
                assert job.error.startswith(f"{row['series']}: "), job.error
    by_folder = {r["folder"]: r for r in shared}
    for folder in (
        "ct-abdomen-tcia/series",
        "mr-brain-oblique-ge/In/05_3D_Ax_T1_MP_RAGE_R22",
        "pet-seg-qin/PET",
        "edge-cases/series/philips_enhanced/anatomical/001",
        "edge-cases/series/siemens_multiframe/anatomical/001",
        "edge-cases/series/generic/compressed/001",
    ):
        assert _outcome(by_folder[folder]["b"]) == "processed", folder
    for folder, code in (
        ("edge-cases/series/failing/sliceorientation/001", "geometry"),
        ("edge-cases/series/failing/notavolume/001", "series"),
        ("edge-cases/series/generic/rgb/001", "pixel-format"),
        ("pet-seg-qin/SEG/3DSlicer", "not-image"),
    ):
        assert (_outcome(by_folder[folder]["b"]), by_folder[folder]["code"]) == ("refused", code)
    # A head CT: every output of the CT rules but the lungs (and their mesh), said so.
    head = by_folder["ct-head-tilted-ge"]["b"]
    failed = {(f["step"], f["reason"].split(":")[0]) for j in head["jobs"] for f in j.failures}
    assert failed == {
        ("segment.lungs", "no lungs found"),
        ("mesh.surface", "needs the output of segment.lungs, which failed"),
    }, failed
    assert Counter(k for k, _, _ in head["outputs"]) == {"series": 4, "seg": 2, "sr": 2, "stl": 1}


def test_quirk_copies_get_every_default_output_without_dciodvfy_error(quirks) -> None:
    rows, ct_dir = quirks
    _assert_conformant(rows, "a")
    ct_row = next(r for r in rows if r["folder"] == "ct")
    assert _outcome(ct_row["a"]) == "processed"
    kinds = Counter(kind for kind, _, _ in ct_row["a"]["outputs"])
    # MPR x3 + rotating MIP; SEG lungs, body, bone with their SR; STL lungs and bone.
    assert kinds == {"series": 4, "seg": 3, "sr": 3, "stl": 2}, kinds
    mr_row = next(r for r in rows if r["folder"] == "mr")
    assert _outcome(mr_row["a"]) == "processed" and len(mr_row["a"]["outputs"]) == 3
    ct_notes = " | ".join(n for j in ct_row["a"]["jobs"] for n in j.notes)
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
    mr_notes = " | ".join(n for j in mr_row["a"]["jobs"] for n in j.notes)
    for expected in (
        "'20231301' is not a real date",
        "StudyTime '25:61'",
        "045Y",
        "StudyID",
        "ISO_IR 100 (Latin-1, as it was read) declared",
    ):
        assert expected in mr_notes, expected


def test_per_slice_frames_of_reference_give_one_frame_and_seg_references(quirks) -> None:
    rows, ct_dir = quirks
    ct_row = next(r for r in rows if r["folder"] == "ct")
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(ct_dir.iterdir())]
    source_uids = {str(h.SOPInstanceUID) for h in heads}
    source_frames = {str(h.FrameOfReferenceUID) for h in heads}
    assert len(source_frames) == 134
    paths = [Path(o["path"]) for j in ct_row["a"]["jobs"] for s in j.steps for o in s["outputs"]]
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


def _not_selected_why(reason: str) -> str:
    """The rules' first failed conditions, without rule names, repeats, the wanted lists, nor
    "Modality 'MR' not in ['CT']"."""
    parts = []
    for p in reason.split("; "):
        if "match: Modality:" in p:
            continue
        p = re.sub(r"^[\w.-]+: (select_series\.where|match): ", "", p)
        parts.append(re.sub(r" \(want .*\)$| not in \[.*\]$", "", p))
    return "; ".join(dict.fromkeys(parts)) or "no default rule for this modality"


def _short(text: str) -> str:
    """Without the series' UIDs, and long UIDs or hashes cut (the table must stay readable)."""
    text = re.sub(r" \([0-9a-f.]{8,}\)", "", text)
    return re.sub(r"\b([0-9a-f.]{10})[0-9a-f.]{15,}", r"\1…", text)


def _outputs_text(p: dict) -> str:
    kinds = Counter(kind for kind, _, _ in p["outputs"])
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "—"


def _notes(row: dict) -> str:
    """Pass (b)'s refusal, failed outputs and notes; why pass (a) did not select the series."""
    b, name = row["b"], row["series"]
    if not row["image"]:
        why = "not an image series"
    elif _outcome(b) == "refused":
        errors = dict.fromkeys(j.error.removeprefix(f"{name}: ") for j in b["jobs"])
        why = f"[{row['code']}] " + "; ".join(errors)
    else:
        failed = [f"{f['step']}: {f['reason']}" for j in b["jobs"] for f in j.failures]
        why = "; ".join(dict.fromkeys(failed + [n for j in b["jobs"] for n in j.notes])) or "—"
    if b["errors"]:
        why = f"{len(b['errors'])} dciodvfy errors: {why}"
    if not row["a"]["jobs"]:
        why = f"(a) {_not_selected_why(row['a']['unmatched'])}. (b) {why}"
    return _short(why)


def table(rows: list[dict]) -> str:
    lines = [
        "| folder | series | vendor | modality | (a) default rules | (b) forced | outputs (b) "
        "| notes / reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["folder"], r["series"])):
        a, b = r["a"], r["b"]
        out_a = sum(1 for _ in a["outputs"])
        a_text = f"{_outcome(a)} ({out_a} outputs)" if a["jobs"] else "not selected"
        b_text = _outcome(b) if r["image"] else "refused"
        name = _short(r["series"])
        lines.append(
            f"| {_cell(r['folder'], 60)} | {_cell(name, 40)} | {_cell(r['vendor'], 24)} "
            f"| {r['modality']} | {a_text} | {b_text} | {_outputs_text(b)} "
            f"| {_cell(_notes(r), 220)} |"
        )
    return "\n".join(lines)


def totals(rows: list[dict]) -> str:
    a = Counter(_outcome(r["a"]) for r in rows)
    b = Counter(_outcome(r["b"]) if r["image"] else "refused" for r in rows)
    outputs = sum(sum(1 for _ in r["b"]["outputs"]) for r in rows)
    errors = sum(len(r["b"]["errors"]) for r in rows)

    def words(c: Counter) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(c.items()))

    return (
        f"{len(rows)} series. (a) default rules: {words(a)}. (b) forced: {words(b)}; "
        f"{outputs} output series, {errors} dciodvfy errors."
    )


def write_doc_table() -> None:
    with tempfile.TemporaryDirectory(prefix="sprim-conformance-") as tmp:
        rows = conformance([DATA], Path(tmp))
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{totals(rows)}\n\n{table(rows)}\n{END}{tail}")
    print(totals(rows), file=sys.stderr)


if __name__ == "__main__":
    write_doc_table()
