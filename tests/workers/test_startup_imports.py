"""Start-up (issue 13 item 3): heavy libraries are imported where used, not by the CLI.

Each check is a fresh interpreter running the ``sprim`` entry point (``tasks.main:main``) and
reporting ``sys.modules`` at the moment that matters: after ``sprim --help`` printed, and when
``sprim run`` opens its first input file. Behaviour only; the times are in ``bench.bench_startup``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("celery", "kombu", "vtkmodules", "scipy", "highdicom", "SimpleITK", "sqlalchemy",
         "fastapi", "uvicorn", "jinja2", "prometheus_client", "pynetdicom")  # fmt: skip

#: Runs the entry point; prints the heavy modules loaded at exit, or at the first open of a
#: file under argv[1] (then stops: what comes after the first read is not start-up).
PROBE = r"""
import json, os, sys
heavy, root, argv = json.loads(sys.argv[1])
def loaded():
    return sorted(h for h in heavy if h in sys.modules)
def hook(event, args):
    if root and event == "open" and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        # realpath: the data folder may be reached through a link (../shared in a CI clone)
        if path.endswith(".dcm") and os.path.realpath(path).startswith(root):
            print("FIRST_READ " + json.dumps(loaded()), flush=True)
            os._exit(0)
sys.addaudithook(hook)
sys.argv = ["sprim", *argv]
from tasks.main import main
try:
    main()
except SystemExit:
    pass
print("EXIT " + json.dumps(loaded()), flush=True)
"""


def _probe(argv: list[str], root: Path | None = None) -> tuple[str, list[str]]:
    env = {**os.environ, "SPRIM_PLUGINS": "", "SPRIM_BROKER_URL": ""}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([HEAVY, str(root or ""), argv])],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FIRST_READ ", "EXIT "))]
    assert marks, f"no probe output (exit {proc.returncode}): {proc.stderr[-2000:]}"
    where, _, mods = marks[-1].partition(" ")
    return where, json.loads(mods)


def test_help_imports_no_heavy_library():
    where, mods = _probe(["--help"])
    assert where == "EXIT"
    assert mods == [], f"`sprim --help` imported {mods}"


def test_every_command_is_still_registered():
    """The lazy imports must not lose sub-commands (they register at import of the CLI)."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "sprim"), "--help"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for cmd in ("run", "steps", "listen", "watch", "jobs", "rules", "reprocess", "serve",
                "config", "worker"):  # fmt: skip
        assert f" {cmd} " in out.stdout, f"{cmd} missing from sprim --help"


def test_run_reads_before_importing_heavy_libraries(ct_files, tmp_path):
    """`sprim run --step reformat.mpr` opens its first DICOM file without Celery, the job store,
    VTK, scipy, highdicom, the report's templates or the API stack."""
    folder = Path(ct_files[0]).parent
    where, mods = _probe(
        ["run", str(folder), "--out", str(tmp_path / "out"), "--step", "reformat.mpr"],
        root=folder.resolve(),
    )
    assert where == "FIRST_READ"
    assert set(mods) <= {"SimpleITK"}, f"imported before the first read: {mods}"


@pytest.mark.parametrize("attr", ["app", "celery"])
def test_celery_finds_the_app_in_tasks(attr):
    """``celery -A tasks`` still finds the app (``tasks`` imports Celery on first access)."""
    code = (
        "import tasks, celery, sys\n"
        f"a = getattr(tasks, {attr!r})\n"
        "assert isinstance(a, celery.Celery), type(a)\n"
        "assert isinstance(tasks.app, celery.Celery)\n"
        "from celery.app.utils import find_app\n"
        "assert find_app('tasks') is a\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_celery_finds_the_app_after_a_submodule_import():
    """Importing ``tasks.app`` first binds the submodule to ``tasks.app``: still found."""
    code = (
        "import tasks.celery_dispatcher, celery\n"
        "from celery.app.utils import find_app\n"
        "assert isinstance(find_app('tasks'), celery.Celery)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_reformat_run_never_imports_what_it_does_not_use(ct_files, tmp_path):
    """A whole `sprim run --step reformat.mpr` (read, MPR, DICOM write, previews, report):
    no highdicom (SEG/SR writers), VTK (meshes), scipy, Celery or job store."""
    import shutil as sh

    folder = tmp_path / "in"
    folder.mkdir()
    for f in ct_files[:30]:
        sh.copy(f, folder / Path(f).name)
    where, mods = _probe(["run", str(folder), "--out", str(tmp_path / "out"), "--step",
                          "reformat.mpr", "--set", "planes=[axial]"])  # fmt: skip
    assert where == "EXIT"
    assert (tmp_path / "out" / "summary.json").is_file()
    used = {"SimpleITK", "jinja2"}  # the volume; the report
    assert set(mods) <= used | {"prometheus_client"}, f"imported: {sorted(set(mods) - used)}"
