"""`sprim run`: the main job on embedded defaults, through the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo" / "ct-abdomen"
FAILING = ROOT.parent / "shared" / "data" / "edge-cases" / "series" / "failing"
SPRIM = str(Path(sys.executable).parent / "sprim")


def sprim_run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SPRIM, "run", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def uids(out: Path) -> dict[str, set[str]]:
    """SeriesInstanceUID -> its SOPInstanceUIDs, read back from the written files."""
    found: dict[str, set[str]] = {}
    for f in out.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        found.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
    return found


def test_default_rules_on_demo_ct_write_mpr_set_and_summary(tmp_path: Path) -> None:
    r = sprim_run(DEMO, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["series_found"] == 1
    (job,) = [j for j in summary["jobs"] if j["rule"] == "ct-volume-mpr"]
    assert job["state"] == "done"
    descriptions = {o["series_description"] for s in job["steps"] for o in s["outputs"]}
    assert any(d.startswith("COR 3mm") for d in descriptions), descriptions
    assert any(d.startswith("SAG 3mm") for d in descriptions), descriptions
    src = pydicom.dcmread(next(DEMO.glob("*.dcm")), stop_before_pixels=True)
    for f in (tmp_path / "a").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        if ds.Modality != "SR":  # SR references the SEG, it has no frame of reference
            assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID

    # Deterministic: the same run again gives the same UIDs, instance for instance.
    assert sprim_run(DEMO, "--out", tmp_path / "b").returncode == 0
    assert uids(tmp_path / "a") == uids(tmp_path / "b")


def test_changed_param_changes_uids(tmp_path: Path) -> None:
    base = ["--step", "reformat.mpr", "--set", "planes=[coronal]"]
    assert sprim_run(DEMO, "--out", tmp_path / "a", *base).returncode == 0
    r = sprim_run(DEMO, "--out", tmp_path / "b", *base, "--set", "thickness_mm=5")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = uids(tmp_path / "a"), uids(tmp_path / "b")
    assert len(a) == len(b) == 1
    assert not set(a) & set(b)
    assert not set().union(*a.values()) & set().union(*b.values())


def test_bad_series_fail_alone_with_specific_messages(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    shutil.copytree(DEMO, inp / "ct")
    shutil.copytree(FAILING, inp / "failing")
    r = sprim_run(inp, "--out", tmp_path / "out", "--step", "reformat.mpr")
    assert r.returncode == 1, r.stdout + r.stderr  # something failed ...
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    states = {j["series_uid"]: j for j in summary["jobs"]}
    ct_uid = pydicom.dcmread(next(DEMO.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    assert states[ct_uid]["state"] == "done"  # ... but the good CT was still processed
    failed = [j for j in summary["jobs"] if j["state"] == "failed"]
    assert failed
    for j in failed:
        assert "internal error" not in j["error"], j
        defects = ("missing slices", "orientations", "same slice position", "exceeds")
        assert any(d in j["error"] for d in defects), j["error"]


def test_usage_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    r = sprim_run(DEMO, "--out", tmp_path, "--step", "reformat.nope")
    assert r.returncode == 2 and "unknown step" in r.stdout
    r = sprim_run(DEMO, "--out", tmp_path, "--step", "reformat.mpr", "--set", "thickness_mm=-1")
    assert r.returncode == 2 and "thickness_mm" in r.stdout


def test_default_rules_give_each_output_its_own_series_number(tmp_path: Path) -> None:
    assert sprim_run(DEMO, "--out", tmp_path).returncode == 0
    numbers: dict[int, set[str]] = {}
    for f in tmp_path.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        numbers.setdefault(int(ds.SeriesNumber), set()).add(ds.SeriesInstanceUID)
    assert len(numbers) >= 10  # MPR x3, lungs/body SEG+SR, lung STL, bone SEG+SR+STL, MIP
    assert all(len(uids) == 1 for uids in numbers.values()), numbers
    assert all(n // 1000 == 201 for n in numbers)  # sorted right after source series 201


# -- issue 9: bad input never costs the others, never a traceback on the terminal --------------

BUGGY_STEP = '''
from pydantic import BaseModel
from pipelines import ImageSeries, Volume, step


class Params(BaseModel, frozen=True, extra="forbid"):
    pass


@step("test.buggy", version="1.0.0", params=Params, produces="series")
def buggy(volume: Volume, params: Params) -> ImageSeries:
    """A step with a bug."""
    return {}["missing key"]
'''


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_input_without_series_exits_1_naming_each_skipped_file(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "notes.txt").write_text("hello")
    (inp / "empty.dcm").write_bytes(b"")
    (inp / "cut.dcm").write_bytes(next(DEMO.glob("*.dcm")).read_bytes()[:300])
    (inp / "study.zip").write_bytes(b"PK\x03\x04 truncated")
    r = sprim_run(inp, "--out", tmp_path / "out")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    summary = _summary(tmp_path / "out")
    assert summary["series_found"] == 0
    assert summary["error"].startswith("no DICOM series found")
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["empty.dcm"] == "empty file"
    assert "cut short" in reasons["cut.dcm"]
    assert reasons["study.zip"].startswith("not a readable zip archive")
    for name in reasons:
        assert name in r.stdout


def test_hostile_series_description_is_printed_escaped(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    for f in DEMO.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = "[/]\x1b[2J[bold]X\x07"
        ds.save_as(inp / f.name)
    out = tmp_path / "out"
    r = sprim_run(inp, "--out", out, "--step", "reformat.mpr", "--set", "planes=[coronal]")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "[/]\\x1b[2J[bold]X\\x07" in r.stdout.replace("\n", "").replace("│", "").replace(" ", "")
    assert _summary(out)["jobs"][0]["state"] == "done"


def test_internal_error_goes_to_the_log_not_the_terminal(tmp_path: Path) -> None:
    (tmp_path / "buggy_steps.py").write_text(BUGGY_STEP)
    env = {**os.environ, "SPRIM_PLUGINS": "buggy_steps", "PYTHONPATH": str(tmp_path)}
    out = tmp_path / "out"
    r = subprocess.run(
        [SPRIM, "run", str(DEMO), "--out", str(out), "--step", "test.buggy"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert "internal error" in r.stdout
    (job,) = _summary(out)["jobs"]
    assert "internal error" in job["error"] and "KeyError" in job["error"]
    log = (out / "sprim-run.log").read_text()
    assert "Traceback" in log and "missing key" in log


def test_unreadable_slice_is_named_and_the_other_series_goes_on(tmp_path: Path) -> None:
    mr = ROOT.parent / "shared" / "data" / "mr-brain-oblique-ge" / "In"
    inp = tmp_path / "in"
    shutil.copytree(DEMO, inp / "ct")
    shutil.copytree(mr, inp / "mr")
    victim = sorted((inp / "ct").glob("*.dcm"))[20]
    data = victim.read_bytes()
    victim.write_bytes(data[: data.find(b"\xe0\x7f\x10\x00") - 100])  # header cut short
    r = sprim_run(
        inp, "--out", tmp_path / "out", "--step", "reformat.mpr", "--set", "planes=[axial]"
    )
    assert r.returncode == 1, r.stdout + r.stderr
    summary = _summary(tmp_path / "out")
    jobs = {j["modality"]: j for j in summary["jobs"]}
    assert jobs["MR"]["state"] == "done"
    assert jobs["CT"]["state"] == "failed"
    assert victim.name in jobs["CT"]["error"], jobs["CT"]["error"]


def test_series_left_out_by_the_rules_for_a_defect_is_named_with_the_gate_sentence(
    tmp_path: Path,
) -> None:
    # NaN positions: the default rules no longer see one stack (IsVolume false) and take nothing;
    # the summary must still say what is wrong with the series, in the gate's words.
    inp = tmp_path / "in"
    inp.mkdir()
    for f in sorted(DEMO.glob("*.dcm"))[:24]:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = ["nan", "nan", "nan"]
        ds.save_as(inp / f.name)
    out = tmp_path / "out"
    r = sprim_run(inp, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(out.rglob("*.dcm"))
    (entry,) = _summary(out)["unmatched"]
    assert "IsVolume" in entry["reason"]
    assert "PANCREAS" in entry["defect"] and "ImagePositionPatient" in entry["defect"], entry


# -- zip inputs (workers.reading.inputs): limits counted while extracting, hostile members refused ----


@pytest.fixture
def zip_env(monkeypatch):
    from workers.core.config import settings

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        settings.cache_clear()

    yield set_env
    monkeypatch.undo()
    settings.cache_clear()


def _slices(n: int = 3) -> list:
    from tests.mutations.zips import Member

    return [Member(f"ct/{f.name}", f.read_bytes()) for f in sorted(DEMO.glob("*.dcm"))[:n]]


def _scan(path: Path):
    from workers.reading.series import scan

    skipped: list = []
    found = scan(path, skipped)
    return found, {s.path: s.reason for s in skipped}


def test_zip_bomb_and_oversized_archives_are_refused_whole(
    tmp_path: Path, zip_env, monkeypatch
) -> None:
    from tests.mutations.zips import write_zip, zeros_bomb

    bomb = write_zip(tmp_path / "bomb.zip", [*_slices(), zeros_bomb("ct/zz.dcm", 300)])
    found, skipped = _scan(bomb)
    assert found == []
    assert "zip bomb" in skipped[str(bomb)] and "SPRIM_ZIP_MAX_RATIO=200" in skipped[str(bomb)]

    lying = _slices()
    lying[0].declared_size = 0xF0000000
    lying[1].declared_size = 0xF0000000
    found, skipped = _scan(write_zip(tmp_path / "declared.zip", lying))
    assert found == [] and "SPRIM_ZIP_MAX_MB=4096" in skipped[str(tmp_path / "declared.zip")]

    zip_env(SPRIM_ZIP_MAX_MB="1")  # 3 slices of 0.5 MB
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    found, skipped = _scan(write_zip(tmp_path / "big.zip", _slices()))
    assert found == [] and "SPRIM_ZIP_MAX_MB=1" in skipped[str(tmp_path / "big.zip")]
    assert list(tmp.iterdir()) == []  # what was extracted before the limit is gone


def test_zip_members_with_hostile_names_are_skipped_the_rest_is_read(tmp_path: Path) -> None:
    from tests.mutations.zips import Member, write_zip

    evil = _slices(1)[0].data
    z = write_zip(
        tmp_path / "t.zip",
        [
            *_slices(),
            Member("../../escape.dcm", evil),
            Member("/tmp/absolute.dcm", evil),
            Member("ct/link.dcm", b"/etc/passwd", symlink=True),
        ],
    )
    found, skipped = _scan(z)
    assert [s.attributes["NumberOfSeriesRelatedInstances"] for s in found] == [3]
    assert "path traversal" in skipped[f"{z}:../../escape.dcm"]
    assert "absolute path" in skipped[f"{z}:/tmp/absolute.dcm"]
    assert "link" in skipped[f"{z}:ct/link.dcm"]
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_nested_zips_open_one_level_deep(tmp_path: Path) -> None:
    from tests.mutations.zips import Member, write_zip

    inner = write_zip(tmp_path / "inner.zip", _slices())
    one = write_zip(tmp_path / "one.zip", [Member("inner.zip", inner.read_bytes())])
    two = write_zip(tmp_path / "two.zip", [Member("one.zip", one.read_bytes())])
    found, _ = _scan(one)
    assert [s.attributes["NumberOfSeriesRelatedInstances"] for s in found] == [3]
    found, skipped = _scan(two)
    assert found == []
    assert "SPRIM_ZIP_MAX_DEPTH=1" in skipped[f"{two}:one.zip:inner.zip"]


def test_corrupt_member_is_named_and_the_other_members_go_on(tmp_path: Path) -> None:
    import zipfile

    from tests.mutations.zips import write_zip

    z = write_zip(tmp_path / "c.zip", _slices(4))
    data = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        m = zf.infolist()[1]
    start = m.header_offset + 30 + len(m.filename)
    data[start + 300 : start + 340] = bytes(40)
    z.write_bytes(bytes(data))
    found, skipped = _scan(z)
    assert [s.attributes["NumberOfSeriesRelatedInstances"] for s in found] == [3]
    assert skipped[f"{z}:{m.filename}"].startswith("corrupt zip member")
    truncated = tmp_path / "t.zip"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    found, skipped = _scan(truncated)
    assert found == [] and skipped[str(truncated)].startswith("not a readable zip archive")
