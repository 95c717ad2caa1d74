"""PHI canary: a real CT whose patient carries unique strings, through ``sprim run``, the
listener and the platform; the strings may appear only in DICOM objects.

Greps every log, stdout/stderr, every non-DICOM file sprim wrote (the SQLite store included),
a dump of every job-store table and every API response.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, select

from tests.conftest import SHARED_DATA
from tests.harness.orthanc import send
from tests.platform_kit import VENV_BIN

#: Patient identity and the accession: PHI. InstitutionName is routing context and is kept.
CANARY = {
    "PatientName": "CANARYPNQ7",  # one component: highdicom warns about it, with the value
    "PatientID": "CANARYID4411",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CANARYACC58",
}
RULES = """
rules:
  - name: canary
    trigger: {quiet_period: 0.5s}
    match: {Modality: {in: [CT]}}
    select_series: {where: {ImageType: {contains_all: [ORIGINAL, PRIMARY]}}, prefer: thinnest}
    run:
      - {use: segment.body}
"""


@pytest.fixture(scope="module")
def canary_ct(tmp_path_factory) -> Path:
    """24 slices of the TCIA abdomen CT with the canary patient."""
    out = tmp_path_factory.mktemp("canary") / "ct"
    out.mkdir()
    for k, p in enumerate(sorted((SHARED_DATA / "ct-abdomen-tcia" / "series").iterdir())[:24]):
        ds = pydicom.dcmread(p)
        for kw, v in CANARY.items():
            setattr(ds, kw, v)
        ds.InstitutionName = "SITE A"  # whose token sees the study in the API
        ds.save_as(out / f"{k:03d}.dcm")
    return out


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def leaks(where: str, text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{kw} in {where}" for kw, v in CANARY.items() if v.encode() in data]


def file_leaks(*roots: Path) -> tuple[list[str], int]:
    """Canary hits in every non-DICOM file under ``roots``; and how many DICOM files carry one."""
    found, dicom_hits = [], 0
    for root in roots:
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            if _is_dicom(p):
                dicom_hits += bool(leaks(str(p), p.read_bytes()))
            else:
                found += leaks(str(p), p.read_bytes())
    return found, dicom_hits


def store_dump(url: str) -> str:
    """Every row of every job-store table, as text."""
    from workers.platform.jobstore import JobStore

    st = JobStore(url)
    meta = MetaData()
    meta.reflect(st.engine)
    with st.engine.connect() as c:
        text = "\n".join(
            repr(row) for t in meta.sorted_tables for row in c.execute(select(t)).all()
        )
    st.dispose()
    assert "SeriesInstanceUID" in text  # the dump did read the studies table
    return text


def api_leaks(url: str, study_uid: str) -> list[str]:
    """Every API answer a token of the study's institution (and the "*" token) can get."""
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import open_store

    client = TestClient(create_app(open_store(url)))
    found = []
    for tok in ("tok-a", "tok-admin"):
        h = {"Authorization": f"Bearer {tok}"}
        jobs = client.get("/jobs?limit=1000", headers=h)
        assert jobs.status_code == 200 and jobs.json()
        answers = [jobs, client.get(f"/studies/{study_uid}/jobs", headers=h)]
        for j in jobs.json():
            answers += [client.get(f"/jobs/{j['id']}", headers=h),
                        client.get(f"/jobs/{j['id']}/audit", headers=h)]  # fmt: skip
        for r in answers:
            assert r.status_code == 200, r.text
            found += leaks(f"GET {r.request.url.path}", r.text)
    found += leaks("/openapi.json", client.get("/openapi.json").text)
    return found


def _env(home: Path, rules: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "SPRIM_HOME": str(home),
        "SPRIM_RULES_FILE": str(rules),
        "SPRIM_JOB_STORE_URL": f"sqlite:///{home / 'jobs.db'}",
        "SPRIM_API_TOKENS": '{"tok-a": "SITE A", "tok-admin": "*"}',
        "PYTHONWARNINGS": "always",  # a warning that would print patient data must be filtered
    }
    env.pop("SPRIM_BROKER_URL", None)
    return env


def test_sprim_run_keeps_the_canary_in_dicom_outputs(canary_ct, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    out = tmp_path / "out"
    p = subprocess.run(
        [str(VENV_BIN / "sprim"), "run", str(canary_ct), "--out", str(out), "--rules", str(rules)],
        env=_env(tmp_path / "home", rules), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    found = leaks("stdout", p.stdout) + leaks("stderr", p.stderr)
    files, dicom_hits = file_leaks(out, tmp_path / "home")
    assert found + files == []
    assert dicom_hits >= 2  # SEG and SR keep the patient: the canary did go through


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listener_store_and_api_keep_no_canary(canary_ct, tmp_path, dcmtk, monkeypatch):
    from workers.core.config import settings
    from workers.platform.jobstore import JobStore

    home, rules = tmp_path / "home", tmp_path / "rules.yaml"
    rules.write_text(RULES)
    home.mkdir()
    env = _env(home, rules)
    monkeypatch.setenv("SPRIM_API_TOKENS", env["SPRIM_API_TOKENS"])
    settings.cache_clear()
    port = _free_port()
    log = tmp_path / "listen.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(VENV_BIN / "sprim"), "listen", "--port", str(port), "--allow", "MODALITY",
             "--quiet", "0.5", "-v"],
            env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        send(canary_ct, "127.0.0.1", port, called="SPRIM", calling="MODALITY")
        url = env["SPRIM_JOB_STORE_URL"]
        deadline = time.monotonic() + 300
        jobs = []
        while time.monotonic() < deadline:
            if (home / "jobs.db").exists():
                st = JobStore(url)
                jobs = [j for j in st.list() if j.rule == "canary"]
                st.dispose()
                if jobs and all(j.state in ("done", "partial", "failed") for j in jobs):
                    break
            time.sleep(1)
        assert jobs and jobs[0].state == "done", (jobs, log.read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    study = pydicom.dcmread(next(canary_ct.iterdir()), stop_before_pixels=True).StudyInstanceUID
    found = leaks(str(log), log.read_text()) + leaks("store", store_dump(url))
    files, dicom_hits = file_leaks(home)
    found += files + api_leaks(url, study)
    assert found == []
    assert dicom_hits >= 24 + 2  # received images and the SEG/SR outputs


def test_platform_store_and_api_keep_no_canary(canary_ct, sprim_env, store_url, caplog, recwarn):
    """In-process job store + dispatcher + folder archive: the platform path of a worker."""
    from workers.archives.folder import FolderArchive
    from workers.core.phi import STORED_SERIES_KEYWORDS, quiet_phi_warnings
    from workers.platform import submission

    quiet_phi_warnings()  # what every sprim process does at start-up
    (sprim_env / "rules.yaml").write_text(RULES)
    shutil.copytree(canary_ct, sprim_env / "archive" / "in")
    archive = FolderArchive(sprim_env / "archive", name="local")
    study = pydicom.dcmread(next(canary_ct.iterdir()), stop_before_pixels=True).StudyInstanceUID
    caplog.set_level("DEBUG")
    [job] = submission.submit_study(study, archive, {})
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    assert store.get(job.id).state == "done", store.get(job.id)
    row = store.study(study)
    assert row.series and set(row.series[0]) <= set(STORED_SERIES_KEYWORDS)
    assert "AccessionNumber" not in row.series[0] and "Rows" in row.series[0]
    found = leaks("store", store_dump(store_url)) + api_leaks(store_url, study)
    found += leaks("log records", "\n".join(r.getMessage() for r in caplog.records))
    found += leaks("warnings", "\n".join(str(w.message) for w in recwarn.list))
    files, dicom_hits = file_leaks(sprim_env / "home")
    assert found + files == []
    assert dicom_hits == 0  # outputs went to the archive, nothing DICOM stays under SPRIM_HOME
    assert any(leaks(str(p), p.read_bytes()) for p in (sprim_env / "archive").rglob("*.dcm"))


def test_every_routing_keyword_is_stored_or_declared_phi():
    """A new routing keyword needs a decision: stored, or named as not stored."""
    from workers.core.phi import NOT_STORED_ROUTING_KEYWORDS, STORED_SERIES_KEYWORDS

    attributes = pytest.importorskip("pipelines.rules.attributes")
    routing = set(attributes.ROUTING_KEYWORDS)
    assert routing - set(STORED_SERIES_KEYWORDS) == set(NOT_STORED_ROUTING_KEYWORDS)
    assert set(STORED_SERIES_KEYWORDS) <= routing
    assert not set(STORED_SERIES_KEYWORDS) & set(CANARY)
