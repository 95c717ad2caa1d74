"""Outputs fail one by one: a failing step or writer never discards the other outputs of a job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import SimpleITK as sitk
from pydantic import BaseModel
from typer.testing import CliRunner

from pipelines import ImageSeries, Volume, get_step, step
from tests.series_kit import read
from workers.processing.runner import OutputFailure, StepCall, run_steps

# One real enhanced MR (8 frames, 256x256): small enough for a quick job.
MR = Path("/work/shared/data/edge-cases/series/philips_enhanced/anatomical/001")


class _NoParams(BaseModel, frozen=True, extra="forbid"):
    pass


@step("test.one_unwritable", version="1.0.0", params=_NoParams, produces="series")
def one_unwritable(volume: Volume, params: _NoParams) -> list[ImageSeries]:
    """Two derived series; the second is a 2D image, which no series writer can write."""
    flat = sitk.Extract(volume.image, [*volume.image.GetSize()[:2], 0], [0, 0, 0])
    return [
        ImageSeries(description="GOOD COPY", image=sitk.Image(volume.image), plane="axial"),
        ImageSeries(description="FLAT", image=flat, plane="axial"),
    ]


def _calls(*specs: tuple[str, dict]) -> list[StepCall]:
    return [StepCall(get_step(n), get_step(n).validate(p)) for n, p in specs]


def test_failed_step_and_output_are_reported_and_the_rest_is_written(tmp_path, caplog):
    src = read(MR)
    calls = _calls(
        ("segment.lungs", {}),  # refuses an MR
        ("mesh.surface", {"segment": "lungs"}),  # needs it
        ("test.one_unwritable", {}),  # one output cannot be written
        ("reformat.mpr", {"planes": ["coronal"]}),  # after all that, still runs
    )
    report = run_steps(src, calls, "t", tmp_path)
    assert not report.complete
    assert report.failures[0] == OutputFailure(
        "segment.lungs", "", "segment.lungs needs a CT series (Hounsfield units); this series is MR"
    )
    assert report.failures[1] == OutputFailure(
        "mesh.surface", "", "needs the output of segment.lungs, which failed"
    )
    flat = report.failures[2]
    assert (flat.step, flat.output) == ("test.one_unwritable", "FLAT")
    assert flat.reason.startswith("internal error (") and "Traceback" not in flat.reason
    assert "internal error in test.one_unwritable FLAT" in caplog.text  # traceback in the log
    assert len(report.failures) == 3
    by_step = {s.name: s for s in report.steps}
    assert {w.series_description for w in by_step["test.one_unwritable"].outputs} == {"GOOD COPY"}
    good = len(by_step["test.one_unwritable"].outputs)
    assert good == src.volume.image.GetSize()[2]
    assert by_step["reformat.mpr"].outputs
    # what is on disk is exactly what was reported written, and a preview of each output
    # written: no half-written FLAT left behind, no preview of it
    on_disk = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk == {w.path for w in report.written} | {p.path for p in report.previews}
    assert {p.series_description for p in report.previews} == {"GOOD COPY", "COR 3mm AVG"}


def test_sprim_run_shows_partial_jobs_and_each_failed_output(tmp_path):
    from workers.interfaces.cli import app

    shutil.copytree(MR, tmp_path / "in")
    r = CliRunner().invoke(
        app,
        ["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
         "--step", "test.one_unwritable", "--step", "segment.lungs"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "partial" in r.output
    assert "failed: test.one_unwritable (FLAT): internal error" in r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [job] = summary["jobs"]
    assert job["state"] == "partial"
    assert [(f["step"], f["output"]) for f in job["failures"]] == [
        ("test.one_unwritable", "FLAT"),
        ("segment.lungs", ""),
    ]
    assert "this series is MR" in job["failures"][1]["reason"]
    assert [o["series_description"] for s in job["steps"] for o in s["outputs"]][0] == "GOOD COPY"


def test_a_job_where_nothing_could_be_made_is_failed_not_partial(tmp_path):
    from workers.processing.offline import plan_steps, run

    summary = run([MR], tmp_path, plan_fn=plan_steps(_calls(("segment.lungs", {}))))
    [job] = summary.jobs
    assert job.state == "failed"
    assert (
        job.error
        == "segment.lungs: segment.lungs needs a CT series (Hounsfield units); this series is MR"
    )


@step("test.times_out", version="1.0.0", params=_NoParams, produces="series")
def times_out(volume: Volume, params: _NoParams) -> ImageSeries:
    """What Celery raises inside a job when its soft time limit is reached."""
    from billiard.exceptions import SoftTimeLimitExceeded

    raise SoftTimeLimitExceeded()


def test_time_limit_keeps_what_was_made_and_runs_nothing_more(tmp_path):
    calls = _calls(
        ("reformat.mpr", {"planes": ["coronal"]}),
        ("test.times_out", {}),
        ("reformat.mpr", {"planes": ["sagittal"]}),
    )
    report = run_steps(read(MR), calls, "t", tmp_path)
    assert [s.name for s in report.steps] == ["reformat.mpr"] and report.written
    assert report.failures == [
        OutputFailure("test.times_out", "", "internal error (SoftTimeLimitExceeded)"),
        OutputFailure("reformat.mpr", "", "not made: the job's time limit was reached"),
    ]
