"""The docs run as printed: the step example of docs/adding-a-step.md works end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
SPRIM = str(Path(sys.executable).parent / "sprim")


def test_adding_a_step_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "adding-a-step.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "my_site_steps.py").write_text(code)
    env = {**os.environ, "SPRIM_PLUGINS": "my_site_steps", "PYTHONPATH": str(tmp_path)}

    listed = subprocess.run([SPRIM, "steps"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "filter.smooth" in listed.stdout and "sigma_mm" in listed.stdout

    out = tmp_path / "out"
    r = subprocess.run(
        [SPRIM, "run", str(ROOT / "demo" / "ct-abdomen"), "--out", str(out)]
        + ["--step", "filter.smooth", "--set", "sigma_mm=2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 40
    ds = pydicom.dcmread(files[0])
    assert ds.SeriesDescription.startswith("AX SMOOTH 2mm")
    assert "filter.smooth" in str(ds.get("DerivationDescription", "")) + str(
        ds.get("ContributingEquipmentSequence", "")
    )


def test_configuration_doc_lists_every_setting() -> None:
    from workers.core.config import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [n for n in Settings.model_fields if f"`SPRIM_{n.upper()}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"
