"""Preview files and report.html of `sprim run`: every output's picture in one self-contained
page, decoded by a real browser; hostile DICOM strings stay text."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from pipelines import Labelmap
from pipelines.previews import Preview
from workers.processing import previews as wp

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo" / "ct-abdomen"
FAILING = ROOT.parent / "shared" / "data" / "edge-cases" / "series" / "failing"
SPRIM = str(Path(sys.executable).parent / "sprim")
HOSTILE_DESC = "<img src=x onerror=__pwned=1><script>__pwned=2</script>CHEST"
HOSTILE_PATIENT = "<b onmouseover=alert(3)>EVIL^</b>"


def sprim_run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SPRIM, "run", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """`sprim run` of the demo CT on the default rules (what `make demo` runs)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    r = sprim_run(DEMO, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "report.html" in r.stdout
    return out


def test_every_output_series_has_a_small_preview_beside_the_dicom(demo_run: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    for job in summary["jobs"]:
        shown = {p["series_uid"]: p for p in job["previews"]}
        series = {o["series_uid"]: o for s in job["steps"] for o in s["outputs"]}
        # Every derived series, SEG and mesh has its picture; a SEG's volume SR is shown by it.
        assert set(shown) == {u for u, o in series.items() if o["kind"] != "sr"}, job["rule"]
        for p in job["previews"]:
            f = demo_run / p["path"]
            assert f.parent == demo_run / "previews"
            assert f.stat().st_size == p["bytes"] <= wp.MAX_BYTES
            assert p["caption"] and p["seconds"] >= 0
            assert f.name.startswith(f"{p['series_number']}_")
    # The archive is given the written DICOM objects only: none of them is in previews/.
    written = {Path(o["path"]) for j in summary["jobs"] for s in j["steps"] for o in s["outputs"]}
    assert written and all(w.suffix == ".dcm" or w.suffix == ".stl" for w in written), written
    assert not any("previews" in w.parts for w in written)
    assert not list((demo_run / "previews").glob("*.dcm"))


def test_rotating_mip_preview_is_an_animation_of_its_views(demo_run: Path) -> None:
    (mip,) = [
        p
        for j in json.loads((demo_run / "summary.json").read_text())["jobs"]
        for p in j["previews"]
        if p["series_description"].startswith("MIP")
    ]
    with Image.open(demo_run / mip["path"]) as im:
        assert im.format == "WEBP" and im.is_animated
        assert im.n_frames == mip["frames"] == 36  # the default rule's 36 views
        im.load()
        assert im.info["duration"] == 100  # 10 views/s


def test_report_shows_every_preview_in_a_real_browser(demo_run: Path, browser) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    n_previews = sum(len(j["previews"]) for j in summary["jobs"])
    html = (demo_run / "report.html").read_text()
    # Self-contained: pictures inline, nothing to fetch, no script.
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", html)
    assert "<script" not in html.lower()
    browser.open(demo_run / "report.html")
    images = browser.images()
    assert len(images) == n_previews >= 9
    assert all(i["naturalWidth"] > 0 and i["naturalHeight"] > 0 for i in images), images
    assert browser.fetched() == []
    text = browser.text()
    for job in summary["jobs"]:
        assert job["rule"] in text
        for s in job["steps"]:
            assert s["step"] in text
    assert "not a DICOM file" in text  # the skipped files and why
    shot = browser.screenshot("report-demo")
    with Image.open(shot) as im:
        assert im.height > 1000


def test_hostile_dicom_strings_stay_text_in_the_report(tmp_path: Path, browser) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    for f in sorted(DEMO.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = HOSTILE_DESC
        ds.PatientName = HOSTILE_PATIENT
        ds.save_as(inp / f.name)
    (inp / "<svg onload=__pwned=3>.txt").write_text("not DICOM")
    out = tmp_path / "out"
    r = sprim_run(inp, "--out", out, "--step", "reformat.mpr", "--set", "planes=[coronal]")
    assert r.returncode == 0, r.stdout + r.stderr
    html = (out / "report.html").read_text()
    assert "<script>__pwned" not in html and "<img src=x" not in html
    assert "&lt;img src=x" in html
    browser.open(out / "report.html")
    assert browser.driver.execute_script("return window.__pwned === undefined")
    assert browser.driver.execute_script("return document.scripts.length") == 0
    (img,) = browser.images()  # the coronal preview only: no injected <img>
    assert img["naturalWidth"] > 0
    text = browser.text()
    assert HOSTILE_DESC in text
    assert "<svg onload=__pwned=3>.txt" in text
    browser.screenshot("report-hostile")


def test_report_says_why_each_series_failed(tmp_path: Path, browser) -> None:
    out = tmp_path / "out"
    r = sprim_run(FAILING, "--out", out, "--step", "reformat.mpr", "--set", "planes=[coronal]")
    assert r.returncode == 1, r.stdout + r.stderr  # some series refused
    summary = json.loads((out / "summary.json").read_text())
    failed = [j for j in summary["jobs"] if j["state"] == "failed"]
    assert failed and any(j["state"] == "done" for j in summary["jobs"])
    browser.open(out / "report.html")
    text = browser.text()
    for j in failed:
        assert j["error"] and j["error"][:120] in text
    assert text.count("failed") >= len(failed)
    assert all(i["naturalWidth"] > 0 for i in browser.images())
    browser.screenshot("report-failing")


def test_still_is_a_jpeg_within_budget_greyscale_when_it_has_no_colour() -> None:
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (300, 600, 1), dtype=np.uint8), 3, axis=2)
    data, ext = wp.encode(Preview("noise", [grey]))
    assert ext == "jpg" and len(data) <= wp.MAX_BYTES
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "L"
        # Noise does not fit at full size and quality: halved until it does.
        assert im.size in {(600, 300), (300, 150), (150, 75)}
    colour = grey.copy()
    colour[:10, :10] = (255, 0, 0)
    data, _ = wp.encode(Preview("tinted", [colour]))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"


def test_animation_keeps_its_frames_and_timing() -> None:
    frames = [np.full((40, 60, 3), 10 * k, np.uint8) for k in range(12)]
    data, ext = wp.encode(Preview("cine", frames, 0.125))
    assert ext == "webp"
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.n_frames == 12 and im.info["duration"] == 125 and im.info["loop"] == 0
        im.seek(11)
        assert abs(int(np.asarray(im.convert("L")).mean()) - 110) <= 3


def test_a_preview_that_cannot_be_drawn_is_left_out_and_logged(tmp_path: Path, caplog) -> None:
    from pipelines.testing import chest_ct
    from workers.writers import WrittenObject

    vol = chest_ct(n_slices=8, size=32).volume
    wrong = sitk.Image(5, 5, 5, sitk.sitkUInt8)  # not the source grid
    lm = Labelmap("Lungs", wrong, ())
    obj = WrittenObject(tmp_path / "x.dcm", "seg", "1.2", "1.2.3", "1.2.3.4", 201101, "SEG Lungs")

    class Source:  # what write_previews reads of a SourceSeries
        volume = vol
        first = pydicom.Dataset()

    with caplog.at_level(logging.WARNING):
        assert wp.write_previews([(lm, [obj])], Source(), tmp_path) == []  # type: ignore[arg-type]
    assert "preview of Lungs not made" in caplog.text
    assert not (tmp_path / "previews").exists() or not any((tmp_path / "previews").iterdir())


def test_platform_job_keeps_its_previews_with_its_record_not_in_the_archive(sprim_env, store_url):
    from tests.platform_kit import write_study
    from workers.archives.folder import FolderArchive
    from workers.platform import submission
    from workers.platform.jobstore import open_store
    from workers.processing.previews import job_previews_dir

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, _ = write_study(sprim_env / "archive" / "in", institution="SITE A")
    [j] = submission.submit_study(st, archive, {})
    done = open_store(store_url).get(j.id)
    assert done.state == "done", done.error
    (out,) = done.outputs
    (p,) = out["previews"]
    assert p["series_uid"] == out["series_uid"] and p["frames"] == 1
    kept = job_previews_dir(j.id) / p["path"]  # the work folder is gone; the preview is kept
    assert kept.is_file() and kept.stat().st_size == p["bytes"]
    with Image.open(kept) as im:
        assert im.format == "JPEG"
    stored = [f for f in (sprim_env / "archive" / st).rglob("*") if f.is_file()]
    assert stored and all(f.suffix == ".dcm" for f in stored)  # the archive got DICOM only
