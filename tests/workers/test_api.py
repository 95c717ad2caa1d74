"""REST API: tokens bound to institutions, jobs, reprocessing (same params replace, others add)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.platform_kit import write_study


@pytest.fixture
def client(sprim_env, store_url):
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import open_store

    return TestClient(create_app(open_store(store_url)))


@pytest.fixture
def study(sprim_env):
    from workers.archives.folder import FolderArchive
    from workers.platform import submission

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, _ = write_study(sprim_env / "archive" / "in", institution="SITE A")
    [j] = submission.submit_study(st, archive, {})
    return st, j.id


A = {"Authorization": "Bearer tok-a"}
B = {"Authorization": "Bearer tok-b"}
ADMIN = {"Authorization": "Bearer tok-admin"}


def test_401_without_or_with_a_wrong_token(client, study):
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert (
        client.post(
            f"/studies/{study[0]}/reprocess", json={"steps": [{"use": "test.touch"}]}
        ).status_code
        == 401
    )


def test_tokens_see_only_their_institution(client, study):
    st, job_id = study
    assert [j["id"] for j in client.get("/jobs", headers=A).json()] == [job_id]
    assert client.get("/jobs", headers=B).json() == []
    assert client.get(f"/jobs/{job_id}", headers=A).json()["state"] == "done"
    assert client.get(f"/jobs/{job_id}", headers=B).status_code in (403, 404)
    assert client.get(f"/studies/{st}/jobs", headers=B).status_code in (403, 404)
    r = client.post(f"/studies/{st}/reprocess", headers=B, json={"steps": [{"use": "test.touch"}]})
    assert r.status_code in (403, 404)
    assert client.post(f"/jobs/{job_id}/retry", headers=B).status_code in (403, 404)
    assert len(client.get("/jobs", headers=ADMIN).json()) == 1


def test_reprocess_same_params_replace_other_params_add(client, study):
    st, job_id = study
    first = client.get(f"/jobs/{job_id}", headers=A).json()["outputs"][0]
    r = client.post(f"/studies/{st}/reprocess", headers=A, json={"steps": [{"use": "test.touch"}]})
    assert r.status_code == 202, r.text
    same = client.get(f"/jobs/{r.json()['id']}", headers=A).json()
    assert same["state"] == "done" and same["outputs"][0]["series_uid"] == first["series_uid"]
    assert same["requester"] == "api@SITE A" and same["priority"] == 2
    r = client.post(f"/studies/{st}/reprocess", headers=A,
                    json={"steps": [{"use": "test.touch", "with": {"label": "THICK"}}]})  # fmt: skip
    other = client.get(f"/jobs/{r.json()['id']}", headers=A).json()
    assert other["outputs"][0]["series_uid"] != first["series_uid"]
    assert other["description_suffix"] == "[label=THICK]"
    assert "THICK [label=THICK]" in other["outputs"][0]["series_description"]
    bad = client.post(f"/studies/{st}/reprocess", headers=A, json={"steps": [{"use": "no.such"}]})
    assert bad.status_code == 422 and "unknown step" in bad.text
    bad = client.post(f"/studies/{st}/reprocess", headers=A,
                      json={"steps": [{"use": "test.touch", "with": {"sleep_s": -1}}]})  # fmt: skip
    assert bad.status_code == 422 and "sleep_s" in bad.text


def test_failed_jobs_visible_and_retry(client, study, sprim_env):
    st, job_id = study
    r = client.post(f"/studies/{st}/reprocess", headers=A,
                    json={"steps": [{"use": "test.touch", "with": {"fail": True}}]})  # fmt: skip
    failed = client.get(f"/jobs/{r.json()['id']}", headers=A).json()
    assert failed["state"] == "failed" and "refused on purpose" in failed["error"]
    assert [j["id"] for j in client.get("/jobs?state=failed", headers=A).json()] == [failed["id"]]
    assert client.post(f"/jobs/{job_id}/cancel", headers=A).status_code == 409  # done already
    again = client.post(f"/jobs/{failed['id']}/retry", headers=A)
    assert again.status_code == 200
    assert client.get(f"/jobs/{failed['id']}", headers=A).json()["attempts"] == 1
    assert "/jobs/{job_id}" in client.get("/openapi.json").json()["paths"]


def test_jobs_cli_lists_failed(sprim_env, study):
    from typer.testing import CliRunner

    from tasks.main import app

    r = CliRunner().invoke(app, ["jobs", "list", "--state", "done", "--json"])
    assert r.exit_code == 0, r.output
    assert str(study[1]) in r.output
    r = CliRunner().invoke(app, ["jobs", "show", str(study[1])])
    assert r.exit_code == 0 and "running->done" in r.output
