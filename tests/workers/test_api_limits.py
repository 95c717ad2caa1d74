"""API authorization matrix, request limits, malformed requests, and an unreachable job store.

Two institutions' tokens against every endpoint (own / other / no token / bad token /
malformed ids): no gap, no 500. The CLI and the API answer an unreachable job store in one line.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess

import pytest
from fastapi.testclient import TestClient

from tests.platform_kit import VENV_BIN, write_study

A = {"Authorization": "Bearer tok-a"}
B = {"Authorization": "Bearer tok-b"}
ADMIN = {"Authorization": "Bearer tok-admin"}
BAD = {"Authorization": "Bearer tok-c"}
NONE: dict[str, str] = {}
TOUCH = {"steps": [{"use": "test.touch"}]}


@pytest.fixture
def app(sprim_env, store_url):
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import open_store

    return create_app(open_store(store_url))


@pytest.fixture
def client(app):
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def sites(sprim_env):
    """One processed study per institution: {"A": (study, series, job id), "B": (...)}."""
    from workers.archives.folder import FolderArchive
    from workers.platform import submission

    archive = FolderArchive(sprim_env / "archive", name="local")
    out = {}
    for site in ("A", "B"):
        st, se = write_study(sprim_env / "archive" / f"in-{site}", institution=f"SITE {site}")
        [j] = submission.submit_study(st, archive, {})
        assert j.state in ("queued", "done")
        out[site] = (st, se, j.id)
    return out


def _routes(app) -> set[tuple[str, str]]:
    # "/" only redirects to the console (its pages: tests/workers/test_console.py)
    open_ = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/health", "/"}
    return {
        (m, r.path)
        for r in app.routes
        if getattr(r, "methods", None) and r.path not in open_
        for m in r.methods - {"HEAD", "OPTIONS"}
    }


def _call(client, method, path, headers, body=None):
    return client.request(method, path, headers=headers, json=body)


def test_authz_matrix_has_no_gap(app, client, sites):
    """Every protected endpoint x (own, other, no token, bad token, malformed id)."""
    st_a, se_a, job_a = sites["A"]
    st_b, se_b, job_b = sites["B"]
    # endpoint -> (own call expectation, fill for A's ids, fill for B's ids)
    matrix = {
        ("GET", "/jobs"): ({200}, "/jobs", "/jobs"),
        ("GET", "/metrics"): ({403}, "/metrics", "/metrics"),  # every institution's: "*" only
        ("GET", "/jobs/{job_id}"): ({200}, f"/jobs/{job_a}", f"/jobs/{job_b}"),
        ("GET", "/jobs/{job_id}/audit"): ({200}, f"/jobs/{job_a}/audit", f"/jobs/{job_b}/audit"),
        ("POST", "/jobs/{job_id}/cancel"): (
            {409}, f"/jobs/{job_a}/cancel", f"/jobs/{job_b}/cancel"),
        ("POST", "/jobs/{job_id}/retry"): ({409}, f"/jobs/{job_a}/retry", f"/jobs/{job_b}/retry"),
        ("POST", "/studies/{study_uid}/reprocess"): (
            {202}, f"/studies/{st_a}/reprocess", f"/studies/{st_b}/reprocess"),
        ("GET", "/studies/{study_uid}/jobs"): (
            {200}, f"/studies/{st_a}/jobs", f"/studies/{st_b}/jobs"),
    }  # fmt: skip
    assert _routes(app) == set(matrix), "an endpoint is missing from the authz matrix"
    malformed = {
        "/jobs/{job_id}": ["99999999999999999999999", "-1", "0", "abc", "1.5", "9" * 400],
        "/studies/{study_uid}": ["1.2.abc", "1." * 40 + "1", "1.2'--", "1..2", "%00"],
    }
    for (method, template), (own_ok, path_a, path_b) in matrix.items():
        body = TOUCH if method == "POST" else None
        r = _call(client, method, path_a, A, body)
        assert r.status_code in own_ok, (template, r.status_code, r.text)
        for who in (NONE, BAD):
            r = _call(client, method, path_a, who, body)
            assert r.status_code == 401, (template, who, r.status_code)
            assert st_a not in r.text
        if template not in ("/jobs", "/metrics"):  # another's job or study does not exist for A
            r = _call(client, method, path_b, A, body)
            assert r.status_code == 404, (template, r.status_code, r.text)
            assert se_b not in r.text and "SITE B" not in r.text
            # the same answer as for something that does not exist: existence is not revealed
            missing = path_b.replace(st_b, "1.2.3.999").replace(str(job_b), str(2**31 - 1))
            m = _call(client, method, missing, A, body)
            ids = re.compile(r"[0-9.]+")
            assert (m.status_code, ids.sub("#", m.text)) == (r.status_code, ids.sub("#", r.text))
        for prefix, bad_ids in malformed.items():
            if not template.startswith(prefix):
                continue
            for bad in bad_ids:
                path = template.replace(prefix.split("/")[-1], bad, 1)
                for who in (A, NONE):
                    r = _call(client, method, path, who, body)
                    assert 400 <= r.status_code < 500, (path, who, r.status_code, r.text)
    # lists: A sees A's jobs only, B B's, the "*" token both
    ids_a = {j["id"] for j in client.get("/jobs", headers=A).json()}
    ids_b = {j["id"] for j in client.get("/jobs", headers=B).json()}
    assert job_a in ids_a and job_b in ids_b and not ids_a & ids_b
    assert {j["institution"] for j in client.get("/jobs", headers=A).json()} == {"SITE A"}
    assert client.get(f"/jobs?study_uid={st_b}", headers=A).json() == []
    all_ids = {j["id"] for j in client.get("/jobs?limit=1000", headers=ADMIN).json()}
    assert ids_a | ids_b <= all_ids


def test_reprocess_names_only_series_of_its_own_study(client, sites, sprim_env):
    """B's series under A's study: 404, for A and for the "*" token; later defaults stay in A."""
    from workers.platform.jobstore import open_store

    st_a, se_a, _ = sites["A"]
    st_b, se_b, _ = sites["B"]
    for who in (A, ADMIN):
        r = client.post(
            f"/studies/{st_a}/reprocess", headers=who, json={**TOUCH, "series_uid": se_b}
        )
        assert r.status_code == 404, r.text
        assert "has no series" in r.json()["detail"]
    r = client.post(f"/studies/{st_b}/reprocess", headers=A, json={**TOUCH, "series_uid": se_b})
    assert r.status_code == 404 and "not found" in r.text
    # a job that names a foreign series (as an earlier version let through) is never a default
    store = open_store(os.environ["SPRIM_JOB_STORE_URL"])
    store.create_job(
        rule="reprocess", requester="api@SITE A", study_uid=st_a, series_uid=se_b,
        institution="SITE A", source="local", archive="x", state="failed", steps=[],
    )  # fmt: skip
    r = client.post(f"/studies/{st_a}/reprocess", headers=A, json=TOUCH)
    assert r.status_code == 202, r.text
    assert r.json()["series_uid"] == se_a
    # a job of B's on A's study does not make B an owner: the study's recorded institution does
    store.create_job(
        rule="touch", study_uid=st_a, series_uid=se_a, institution="SITE B", source="local",
        archive="x", state="done", steps=[],
    )  # fmt: skip
    r = client.post(f"/studies/{st_a}/reprocess", headers=B, json=TOUCH)
    assert r.status_code == 404, r.text
    r = client.post(f"/studies/{st_a}/reprocess", headers=A, json={**TOUCH, "series_uid": se_a})
    assert r.status_code == 202 and r.json()["series_uid"] == se_a


def test_request_size_is_bounded(client, sites, sprim_env):
    from workers.platform.jobstore import open_store

    st_a = sites["A"][0]
    store = open_store(os.environ["SPRIM_JOB_STORE_URL"])
    before = len(store.list(limit=1000))
    url = f"/studies/{st_a}/reprocess"
    r = client.post(url, headers=A, json={"steps": [{"use": "test.touch"}] * 17})
    assert r.status_code == 422 and "16" in r.text
    many = {f"p{i}": i for i in range(33)}
    r = client.post(url, headers=A, json={"steps": [{"use": "test.touch", "with": many}]})
    assert r.status_code == 422 and "32" in r.text
    r = client.post(url, headers=A, json={"steps": [{"use": "x" * 65}]})
    assert r.status_code == 422
    r = client.post(url, headers=A, json={**TOUCH, "requester": "me\nINJECTED"})
    assert r.status_code == 422
    big = json.dumps({**TOUCH, "requester": "a", "pad": "x" * 70_000}).encode()
    r = client.post(url, headers={**A, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413 and "64 kB" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"steps": [{"use": "test.touch"}], "pad": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = client.post(url, headers={**A, "Content-Type": "application/json"}, content=chunks())
    assert r.status_code == 413
    r = client.post(url, headers={**A, "Content-Length": "99999999999999999999"}, content=b"{}")
    assert r.status_code in (400, 413)
    assert len(store.list(limit=1000)) == before, "a refused request created a job"
    r = client.post(url, headers=A, json={"steps": [{"use": "test.touch"}] * 16})
    assert r.status_code == 202


def test_output_size_is_checked_before_a_job_exists(client, sprim_env):
    """A series recorded as 512x512x2000 at 0.5 mm: a 0.1 mm reformat would need far too much."""
    from pipelines import get_step
    from workers.platform.jobstore import open_store

    if not hasattr(get_step("reformat.mpr"), "check_output_size"):
        pytest.skip("Step.check_output_size not available yet")
    store = open_store(os.environ["SPRIM_JOB_STORE_URL"])
    st, se = "1.2.826.0.1.99.1", "1.2.826.0.1.99.2"
    series = {
        "StudyInstanceUID": st, "SeriesInstanceUID": se, "Modality": "CT", "Rows": 512,
        "Columns": 512, "PixelSpacing": [0.5, 0.5], "SliceThickness": 0.5,
        "NumberOfSeriesRelatedInstances": 2000,
    }  # fmt: skip
    store.note_study(st, series=[series], institution="SITE A", source="local", archive="x")
    before = len(store.list(limit=1000))
    url = f"/studies/{st}/reprocess"
    for spacing in (1e-6, 0.1):
        body = {
            "series_uid": se,
            "steps": [{"use": "reformat.mpr", "with": {"spacing_mm": spacing}}],
        }
        r = client.post(url, headers=A, json=body)
        assert r.status_code == 422, (spacing, r.text)
    assert len(store.list(limit=1000)) == before


def test_malformed_requests_never_500(client, sites):
    """A fixed list of odd requests plus a seeded random walk: every answer is < 500."""
    st_a, se_a, job_a = sites["A"]
    odd_paths = [
        "/jobs/99999999999999999999999", "/jobs/-1", "/jobs/1e3", "/jobs/%00", "/jobs/ 1",
        "/jobs?limit=-1", "/jobs?limit=99999999999999999999", "/jobs?state=bogus",
        "/jobs?study_uid=abc'--", "/jobs?study_uid=" + "1" * 100, "/studies/1.2.3/jobs",
        "/studies/%2e%2e/jobs", "/studies//jobs", f"/jobs/{job_a}/audit?x=" + "y" * 2000,
        "/studies/" + "9" * 64 + "/jobs", "/jobs/" + "١٢",
    ]  # fmt: skip
    odd_bodies: list = [
        None, [], 1, "x", {}, {"steps": []}, {"steps": "x"}, {"steps": [{}]},
        {"steps": [{"use": None}]}, {"steps": [{"use": "test.touch", "with": []}]},
        {"steps": [{"use": "test.touch", "with": {"label": {"deep": [1, 2]}}}]},
        {**TOUCH, "priority": "asap"}, {**TOUCH, "series_uid": "1.2.x"},
        {**TOUCH, "series_uid": "1." * 40}, {**TOUCH, "series_uid": 12},
        {**TOUCH, "requester": "é" * 10}, {"steps": [{"use": "\x00"}]},
        {"steps": [{"use": "test.touch", "with": {"sleep_s": "NaN"}}]},
        {"steps": [{"use": "test.touch", "with": {"label": 10**400}}]},
    ]  # fmt: skip
    raw_bodies = [b"{", b"[" * 20_000 + b"]" * 20_000, b"\xff\xfe", b'{"steps": [' + b"{}," * 9000]
    seen = set()
    for p in odd_paths:
        for who in (A, NONE, {"Authorization": "Bearer " + "x" * 5000}, {"Authorization": "Basic"}):
            r = client.get(p, headers=who)
            assert r.status_code < 500, (p, r.status_code, r.text[:200])
            seen.add(r.status_code)
    url = f"/studies/{st_a}/reprocess"
    for b in odd_bodies:
        r = client.post(url, headers=A, json=b)
        assert r.status_code < 500, (b, r.status_code, r.text[:200])
    for raw in raw_bodies:
        r = client.post(url, headers={**A, "Content-Type": "application/json"}, content=raw)
        assert r.status_code < 500, (raw[:20], r.status_code, r.text[:200])
    rng = random.Random(11)
    alphabet = "0123456789.-/%?&=abcxyz~'\"\\ "
    for _ in range(150):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        method = rng.choice(["GET", "POST"])
        path = rng.choice(["/jobs/", "/studies/", f"/studies/{st_a}/", f"/jobs/{job_a}/"]) + junk
        body = rng.choice([None, TOUCH, {"steps": [{"use": junk}]}, {"series_uid": junk}])
        r = client.request(method, path, headers=rng.choice([A, NONE]), json=body)
        assert r.status_code < 500, (method, path, body, r.status_code, r.text[:200])
        seen.add(r.status_code)
    assert {401, 404, 422} <= seen


def test_docs_are_open_and_carry_no_data(client, sites):
    st_a, se_a, job_a = sites["A"]
    for path in ("/openapi.json", "/docs", "/health"):
        r = client.get(path)
        assert r.status_code == 200, path
        for secret in (st_a, se_a, "SITE A", "tok-a", "tok-admin"):
            assert secret not in r.text, (path, secret)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_answers_503_when_the_store_is_unreachable(sprim_env, monkeypatch):
    from workers.core.config import settings
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import JobStore

    url = f"postgresql+psycopg://root:s3cret@127.0.0.1:{_closed_port()}/sprim"
    for app in (create_app(JobStore(url)), None):
        if app is None:  # the process-wide store, opened on the first request
            monkeypatch.setenv("SPRIM_JOB_STORE_URL", url)
            settings.cache_clear()
            app = create_app()
        client = TestClient(app, raise_server_exceptions=False)
        for method, path, body in (("GET", "/jobs", None), ("GET", "/jobs/1", None),
                                   ("POST", "/studies/1.2.3/reprocess", TOUCH)):  # fmt: skip
            r = client.request(method, path, headers=A, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            detail = r.json()["detail"]
            assert detail.startswith("job store unreachable at postgresql+psycopg://root:***@")
            assert "Connection refused" in detail and "s3cret" not in r.text
        assert client.get("/jobs").status_code == 401  # no token: refused before the store


def test_cli_says_one_line_when_the_store_is_unreachable(tmp_path):
    url = f"postgresql+psycopg://root:s3cret@127.0.0.1:{_closed_port()}/sprim"
    env = {**os.environ, "SPRIM_HOME": str(tmp_path), "SPRIM_JOB_STORE_URL": url}
    env.pop("SPRIM_BROKER_URL", None)
    for args in (["jobs", "list"], ["jobs", "retry", "7"], ["reprocess", "1.2.3", "--step", "x"],
                 ["serve", "--port", str(_closed_port())],
                 ["watch", "--once", "--url", "http://127.0.0.1:9"]):  # fmt: skip
        p = subprocess.run([str(VENV_BIN / "sprim"), *args], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert p.returncode == 3, (args, p.returncode, p.stderr[-2000:])
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines == [lines[0]] and lines[0].startswith(
            "error: job store unreachable at postgresql+psycopg://root:***@127.0.0.1:"
        ), (args, p.stderr[-2000:])
        assert "s3cret" not in p.stdout + p.stderr and "Traceback" not in p.stderr


def test_cli_refuses_malformed_job_ids(sprim_env):
    from typer.testing import CliRunner

    from workers.interfaces.cli import app

    for cmd in ("show", "cancel", "retry"):
        for bad in ("99999999999999999999999", "-1", "0", "abc"):
            r = CliRunner().invoke(app, ["jobs", cmd, "--", bad])
            assert r.exit_code == 2, (cmd, bad, r.output)  # a usage error, not a lookup


def test_cli_names_a_sqlite_store_in_a_missing_folder(tmp_path):
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'jobs.db'}"
    env = {**os.environ, "SPRIM_HOME": str(tmp_path), "SPRIM_JOB_STORE_URL": url}
    p = subprocess.run([str(VENV_BIN / "sprim"), "jobs", "list"], env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert (
        p.stderr.strip() == f"error: job store unreachable at {url}: unable to open database file"
    )
