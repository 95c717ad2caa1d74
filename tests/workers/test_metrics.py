"""Prometheus metrics on the API: a real scrape of ``/metrics`` before and after real jobs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.platform_kit import write_study

ADMIN = {"Authorization": "Bearer tok-admin"}
A = {"Authorization": "Bearer tok-a"}


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape: (sample name, labels) -> value."""
    r = client.get("/metrics", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def client(sprim_env, store_url):
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import open_store

    return TestClient(create_app(open_store(store_url)))


def test_metrics_need_an_all_institutions_token(client):
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers=A)
    assert r.status_code == 403 and "'*' token" in r.text


def jobs_of_every_kind(client, sprim_env, store_url) -> tuple[dict, dict]:
    """Real jobs that move every series: done, refused (gate, step), archive error; the scrapes
    before and after them."""
    from workers.archives.folder import FolderArchive
    from workers.platform import submission
    from workers.platform.jobstore import open_store

    before = scrape(client)
    archive = FolderArchive(sprim_env / "archive", name="local")

    # 1. a study processed: queued -> running -> done, its phases timed, stable -> stored
    st, series_dir = write_study(sprim_env / "archive" / "good", institution="SITE A")
    [job] = submission.submit_study(st, archive, {})
    assert open_store(store_url).get(job.id).state == "done"

    # 2. a series refused by the input gate (no orientation): defect code "geometry"
    bad_dir = sprim_env / "archive" / "bad"
    st_bad, _ = write_study(bad_dir, institution="SITE B")
    for f in bad_dir.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.ImageOrientationPatient
        ds.save_as(f)
    [bad] = submission.submit_study(st_bad, archive, {})
    assert open_store(store_url).get(bad.id).state == "failed"

    # 3. a step's own refusal ("step"), through the API
    r = client.post(f"/studies/{st}/reprocess", headers=A,
                    json={"steps": [{"use": "test.touch", "with": {"fail": True}}]})  # fmt: skip
    assert client.get(f"/jobs/{r.json()['id']}", headers=A).json()["state"] == "failed"

    # 4. the series gone from the archive: a permanent archive error on fetch
    for f in (sprim_env / "archive" / "good").glob("*.dcm"):
        f.unlink()
    r = client.post(f"/studies/{st}/reprocess", headers=A,
                    json={"steps": [{"use": "test.touch", "with": {"label": "GONE"}}]})  # fmt: skip
    gone = client.get(f"/jobs/{r.json()['id']}", headers=A).json()
    assert gone["state"] == "failed" and "not found" in gone["error"]

    return before, scrape(client)


def test_scrape_after_real_jobs(client, sprim_env, store_url):
    t_start = time.time()
    before, after = jobs_of_every_kind(client, sprim_env, store_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # SITE A: the routed job and two reprocess jobs (which keep the rule that made the series)
    a = {"rule": "touch", "institution": "SITE A"}
    assert delta("sprim_jobs_total", state="queued", **a) == 3
    assert delta("sprim_jobs_total", state="running", **a) == 3
    assert delta("sprim_jobs_total", state="done", **a) == 1
    assert delta("sprim_jobs_total", state="failed", **a) == 2
    assert delta("sprim_jobs_total", state="failed", rule="touch", institution="SITE B") == 1

    # the job store's census at scrape time (the store is emptied for each test)
    assert value(after, "sprim_jobs_in_state", state="done", **a) == 1
    assert value(after, "sprim_jobs_in_state", state="failed", **a) == 2
    assert value(after, "sprim_jobs_in_state", state="failed", rule="touch", institution="SITE B")
    assert value(after, "sprim_job_store_up") == 1
    assert value(after, "sprim_dispatch_window") == 2
    assert value(after, "sprim_dispatch_in_flight") == 0
    assert value(after, "sprim_queue_depth", where="broker", priority="all") == 0

    # durations: every phase of the done job, the attempts by outcome
    for phase in ("fetch", "read", "test.touch", "store"):
        assert delta("sprim_step_duration_seconds_count", step=phase) >= 1, phase
    assert delta("sprim_job_duration_seconds_count", rule="touch", state="done") == 1
    assert delta("sprim_job_duration_seconds_count", rule="touch", state="failed") == 3
    elapsed = time.time() - t_start
    assert delta("sprim_stable_to_stored_seconds_count", rule="touch") == 1
    assert 0 < delta("sprim_stable_to_stored_seconds_sum", rule="touch") < elapsed

    # refusals by defect code, archive errors by kind
    assert delta("sprim_refusals_total", code="geometry") == 1
    assert delta("sprim_refusals_total", code="step") == 1
    assert delta("sprim_archive_errors_total", operation="fetch", kind="permanent") == 1
    assert delta("sprim_archive_errors_total", operation="fetch", kind="transient") == 0

    # job-store latency and releases
    assert delta("sprim_job_store_query_duration_seconds_count", operation="select") > 10
    assert delta("sprim_job_store_query_duration_seconds_count", operation="update") >= 4
    assert delta("sprim_jobs_released_total", priority="1") >= 2


def test_queue_depth_and_window_use_from_the_store(client, store):
    """Jobs waiting in the store and handed to the dispatcher, counted at scrape time."""
    for prio in (0, 1, 1, 2):
        store.create_job(study_uid="1.2.3", institution="SITE A", rule="touch", steps=[],
                         priority=prio)  # fmt: skip
    sent = []
    assert len(store.release(1, sent.append)) == 1  # the urgent one takes the only slot
    m = scrape(client)
    assert value(m, "sprim_queue_depth", where="store", priority="0") == 1
    assert value(m, "sprim_queue_depth", where="store", priority="1") == 2
    assert value(m, "sprim_queue_depth", where="store", priority="2") == 0
    assert value(m, "sprim_queue_depth", where="broker", priority="all") == 1
    assert value(m, "sprim_dispatch_in_flight") == 1
    assert value(m, "sprim_jobs_in_state", state="queued", rule="touch", institution="SITE A") == 4


def test_unreachable_store_is_a_value_not_a_failed_scrape(sprim_env):
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import JobStore

    down = JobStore("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    m = scrape(TestClient(create_app(down)))
    assert value(m, "sprim_job_store_up") == 0
    assert any(name == "process_cpu_seconds_total" for name, _ in m)  # the rest still answers


DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "sprim.json"


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panels' targets and variables."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))  # rows

    walk(dash["panels"])
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_every_metric_the_dashboard_queries_is_exported(client, sprim_env, store_url):
    exprs = dashboard_queries()
    assert len(exprs) >= 15
    queried = {name for e in exprs for name in re.findall(r"\b(sprim_[A-Za-z0-9_:]+)", e)}
    assert all(re.search(r"\bsprim_", e) for e in exprs), "a query without a sprim metric"
    _, after = jobs_of_every_kind(client, sprim_env, store_url)
    exported = {name for name, _labels in after}
    assert queried - exported == set(), f"queried, never exported: {sorted(queried - exported)}"
    # and the dashboard shows every family sprim defines (none forgotten)
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported
                if n.startswith("sprim_")}  # fmt: skip
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in queried}
    assert families - shown == set(), f"exported, not on the dashboard: {families - shown}"
