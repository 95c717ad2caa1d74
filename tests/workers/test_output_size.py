"""run_steps sizes each step's output before running it: absurd params fail alone, in words."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import get_step
from workers.core.config import settings
from workers.processing.runner import StepCall, run_steps
from workers.reading.series import read_series, scan

CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-abdomen-tcia" / "series"
pytestmark = pytest.mark.skipif(not CT.is_dir(), reason="shared data absent")


def test_an_output_over_the_limit_is_refused_before_it_runs(tmp_path: Path) -> None:
    source = read_series(scan([CT])[0])
    st = get_step("reformat.mpr")
    huge = st.validate({"spacing_mm": 0.1})  # valid alone; 4000 axial slices of 512² on 402 mm
    fine = st.validate({"planes": ["axial"], "thickness_mm": 10.0})
    report = run_steps(source, [StepCall(st, huge), StepCall(st, fine)], "test", tmp_path)
    (failure,) = report.failures
    assert failure.step == "reformat.mpr" and failure.output == ""
    limit = settings().max_volume_mb
    assert re.match(
        r"the (axial|coronal) reformat of \d+x\d+x\d+ pixels \(spacing_mm=0\.1, "
        r"pixel_spacing_mm=1\.07422\) would need 3\.9\d GB",
        failure.reason,
    ), failure.reason
    assert f"above the {limit} MB limit (SPRIM_MAX_VOLUME_MB)" in failure.reason
    # The refused step wrote nothing; the next one ran.
    assert report.written
    assert all(w.series_description.startswith("AX 10mm AVG") for w in report.written)
