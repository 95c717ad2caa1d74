"""The docs run as printed: every code block of docs/adding-a-step.md is run or checked.

Python blocks start with their file name (``# my_site_steps.py``; ``(continued)`` appends to the
file) and are written to a scratch folder; shell blocks run there with bash, as printed, with
``demo/`` linked in; the YAML and TOML blocks are checked against the registry and the loader.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pydicom
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPRIM = str(BIN / "sprim")
STEP_DOC = ROOT / "docs" / "adding-a-step.md"
_FILE = re.compile(r"# (\w+\.py)( \(continued\))?$")


def blocks(doc: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order (indented fences included)."""
    text = doc.read_text()
    found = re.findall(r"^( *)```(\w+)\n(.*?)^\1```", text, re.S | re.M)
    return [(lang, re.sub(rf"(?m)^{indent}", "", body)) for indent, lang, body in found]


@pytest.fixture(scope="module")
def step_doc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """The doc's Python files written to a scratch folder (with ``demo/``), and its other
    blocks by language."""
    work = tmp_path_factory.mktemp("adding-a-step")
    (work / "demo").symlink_to(ROOT / "demo")
    files: dict[str, str] = {}
    others: dict[str, list[str]] = {}
    for lang, body in blocks(STEP_DOC):
        if lang != "python":
            others.setdefault(lang, []).append(body)
            continue
        head = _FILE.match(body.splitlines()[0])
        assert head, f"a python block must start with its file name: {body.splitlines()[0]!r}"
        name, continued = head.groups()
        assert bool(continued) == (name in files), f"{name}: first block, then (continued)"
        files[name] = files.get(name, "") + body
    for name, code in files.items():
        (work / name).write_text(code)
    assert sorted(files) == ["my_lung_steps.py", "my_site_steps.py", "test_my_lung_steps.py"]
    assert sorted(others) == ["sh", "toml", "yaml"], sorted(others)
    return work, others


def sh(work: Path, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a shell block as printed, in ``work``, with the venv's commands first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("SPRIM_PLUGINS", None)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_series_step_lists_and_runs_on_the_demo_ct(step_doc) -> None:
    work, others = step_doc
    r = sh(work, others["sh"][0])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "filter.smooth" in r.stdout and "sigma_mm" in r.stdout
    files = sorted((work / "out").rglob("*.dcm"))
    assert len(files) == 40
    ds = pydicom.dcmread(files[0])
    assert ds.SeriesDescription.startswith("AX SMOOTH 2mm")
    assert "filter.smooth" in str(ds.get("DerivationDescription", "")) + str(
        ds.get("ContributingEquipmentSequence", "")
    )


def test_code_lookup_prints_the_lung_code(step_doc) -> None:
    work, others = step_doc
    r = sh(work, others["sh"][1])
    assert r.returncode == 0, r.stderr
    assert "39607008" in r.stdout and "LobeOfLung" in r.stdout


def test_the_rule_steps_exist_and_validate(step_doc) -> None:
    """The routing-rule fragment names registered steps with params their models accept."""
    work, others = step_doc
    (rule,) = others["yaml"]
    check = (
        "import sys, yaml, my_lung_steps; from pipelines import get_step\n"
        "for item in yaml.safe_load(sys.stdin)['run']:\n"
        "    get_step(item['use']).validate(item.get('with'))\n"
        "print('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", check],
        input=rule,
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(work)},
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "ok", r.stderr
    assert [i["use"] for i in yaml.safe_load(rule)["run"]][:2] == [
        "site.aerated_lung",
        "site.lung_density",
    ]


def test_entry_point_group_is_the_one_sprim_loads(step_doc) -> None:
    _, others = step_doc
    (toml,) = others["toml"]
    (group,) = tomllib.loads(toml)["project"]["entry-points"]
    assert f'group="{group}"' in (ROOT / "pipelines" / "catalog.py").read_text()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_plugin_tested_with_the_kit_writes_valid_seg_sr_and_stl(step_doc) -> None:
    """The doc's plugin (labelmap + measurement step) and its tests, run by pytest as printed:
    SEG + SR of volumes + SR of the measurement + STL, each with 0 dciodvfy errors."""
    work, others = step_doc
    r = sh(work, others["sh"][2].rstrip() + " -p no:cacheprovider -rs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b3 passed\b", r.stdout) and "skipped" not in r.stdout, r.stdout


def test_configuration_doc_lists_every_setting() -> None:
    from workers.core.config import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [n for n in Settings.model_fields if f"`SPRIM_{n.upper()}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"
