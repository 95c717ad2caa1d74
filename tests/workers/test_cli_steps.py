"""`sprim steps` and the step-author errors of the CLI: docstrings shown as written (no rich
markup), Literal params with their choices, SPRIM_PLUGINS hinted and its errors in one line,
every refused param of a rule's ``with:`` shown.

The CLI runs as a subprocess (`sprim`): SPRIM_PLUGINS is read once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import get_step
from pipelines.rules import RulesError, load_rules
from workers.interfaces.cli import type_text

SPRIM = str(Path(sys.executable).parent / "sprim")

PLUGIN = '''
from typing import Literal

from pydantic import BaseModel, Field
from pipelines import Measurement, Measurements, step
from pipelines.types import HOUNSFIELD_UNIT, Code


class Params(BaseModel):
    statistic: Literal["mean", "median"] = "mean"
    lower_hu: float = Field(-100.0, ge=-1024, le=3071, description="Voxels in [lower_hu, upper_hu] count.")
    upper_hu: float = Field(100.0, ge=-1024, le=3071)


@step("site.density", version="1.0.0", params=Params, produces="measurements")
def density(volume, params):
    """Mean HU of the voxels in [lower_hu, upper_hu] ([bold]not markup[/bold])."""
    return Measurements("density", [Measurement(Code("112031", "DCM", "Attenuation Coefficient"), 1.0, HOUNSFIELD_UNIT)])
'''


def sprim(
    *args: str, plugins: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPRIM_PLUGINS": plugins, "COLUMNS": "250", "NO_COLOR": "1"}
    if cwd is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    return subprocess.run(
        [SPRIM, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    (tmp_path / "site_steps.py").write_text(textwrap.dedent(PLUGIN))
    return tmp_path


def test_steps_shows_docstrings_and_descriptions_as_written(plugin_dir):
    r = sprim("steps", plugins="site_steps", cwd=plugin_dir)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert (
        "site.density 1.0.0 — Mean HU of the voxels in [lower_hu, upper_hu] ([bold]not markup[/bold])."
        in out
    )
    assert "Voxels in [lower_hu, upper_hu] count." in out


def test_steps_shows_literal_choices(plugin_dir):
    r = sprim("steps", plugins="site_steps", cwd=plugin_dir)
    assert "one of: mean, median" in r.stdout
    # built-ins too: the slab mode and the planes
    assert "one of: AVG, MIP, MinIP" in r.stdout
    assert "tuple of: axial, coronal, sagittal" in r.stdout


def test_type_text():
    from typing import Literal

    assert type_text(float) == "float"
    assert type_text(Literal["a", "b"]) == "one of: a, b"
    assert type_text(list[Literal["x", "y"]]) == "list of: x, y"
    assert type_text(float | None) == "float | None"


def test_a_typo_in_sprim_plugins_is_one_line_and_a_non_zero_exit(tmp_path):
    r = sprim("steps", plugins="site_stpes", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: SPRIM_PLUGINS='site_stpes': cannot import 'site_stpes'")


def test_a_plugin_that_fails_at_import_is_one_line_naming_it(plugin_dir):
    (plugin_dir / "broken_steps.py").write_text(
        "import site_steps\nraise RuntimeError('no GPU here')\n"
    )
    r = sprim("steps", plugins="site_steps, broken_steps", cwd=plugin_dir)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: SPRIM_PLUGINS: importing 'broken_steps' failed: RuntimeError: no GPU here"
    )


def test_unknown_step_mentions_sprim_plugins(tmp_path):
    with pytest.raises(KeyError) as e:
        get_step("site.density_typo")
    assert "SPRIM_PLUGINS" in e.value.args[0]
    r = sprim("run", str(tmp_path), "--out", str(tmp_path / "out"), "--step", "site.densty")
    assert r.returncode != 0
    out = " ".join((r.stdout + r.stderr).split())
    assert "unknown step 'site.densty'" in out and "SPRIM_PLUGINS" in out
    assert "Traceback" not in out


RULES = textwrap.dedent("""\
    rules:
      - name: ct-chest
        match: {Modality: CT}
        run:
          - use: reformat.mpr
            with:
              thickness_mm: -3
              mode: SUM
              spacing_mm: 0
    """)


def test_every_refused_param_of_with_is_shown_with_its_line():
    with pytest.raises(RulesError) as e:
        load_rules(RULES, name="r.yaml")
    msg = str(e.value)
    assert "more)" not in msg
    assert msg.startswith("r.yaml:7: rule ct-chest: step reformat.mpr param thickness_mm: ")
    assert "; param mode (line 8): Input should be 'AVG', 'MIP' or 'MinIP'" in msg
    assert "; param spacing_mm (line 9): Input should be greater than or equal to 0.1" in msg


def test_rules_check_cli_shows_every_refused_param(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(RULES)
    r = sprim("rules", "check", str(f))
    assert r.returncode == 2
    out = " ".join((r.stdout + r.stderr).split())
    assert "param thickness_mm" in out and "param mode (line 8)" in out
    assert "param spacing_mm (line 9)" in out
