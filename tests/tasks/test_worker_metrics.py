"""Metrics of a real ``celery -A tasks worker`` (prefork pool, multiprocess mode) after real jobs."""

from __future__ import annotations

import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.orthanc import free_port
from tests.platform_kit import write_study

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    r = requests.get(url, timeout=10)
    r.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def test_worker_serves_the_sum_of_its_pool_processes(platform, tmp_path):
    from workers.platform.jobstore import open_store
    from workers.platform.submission import archive_for, submit_study

    port, folder = free_port(), tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left by an earlier run")  # unreadable if kept
    extra = {"SPRIM_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    platform.env.update(extra)
    try:
        worker = platform.start_worker("metrics", concurrency=2)
    finally:
        for k in extra:
            platform.env.pop(k)
    url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(url)
    assert not (folder / "counter_1.db").exists()

    # two 1.5 s jobs at once (window 2, two pool processes), one per institution
    archive = archive_for(str(platform.archive))
    jobs = []
    for site in ("SITE A", "SITE B"):
        st, _ = write_study(platform.archive / "metrics" / site, institution=site,
                            series_description="CHAOS", n_slices=2, size=4)  # fmt: skip
        jobs += submit_study(st, archive, {})
    assert len(jobs) == 2
    deadline = time.monotonic() + 60
    while {open_store().get(j.id).state for j in jobs} != {"done"}:
        assert time.monotonic() < deadline, [open_store().get(j.id) for j in jobs]
        time.sleep(0.1)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # a job's state is committed a moment before its worker observes the last series
    while True:
        after = scrape(url)
        if delta("sprim_stable_to_stored_seconds_count", rule="touch-chaos") >= 2:
            break
        assert time.monotonic() < deadline, "stable -> stored never observed twice"
        time.sleep(0.1)

    for site in ("SITE A", "SITE B"):
        lab = {"rule": "touch-chaos", "institution": site}
        assert delta("sprim_jobs_total", state="running", **lab) == 1
        assert delta("sprim_jobs_total", state="done", **lab) == 1
        # created by the submitting process (here, the test), not by the worker
        assert delta("sprim_jobs_total", state="queued", **lab) == 0
    assert delta("sprim_step_duration_seconds_count", step="test.touch") == 2
    assert delta("sprim_step_duration_seconds_sum", step="test.touch") >= 3.0  # 2 x 1.5 s
    assert delta("sprim_job_duration_seconds_count", rule="touch-chaos", state="done") == 2
    assert delta("sprim_stable_to_stored_seconds_count", rule="touch-chaos") == 2
    assert delta("sprim_job_store_query_duration_seconds_count", operation="update") >= 4

    # the two jobs ran at once, in two pool processes, each writing its own file
    pids = {int(m.group(1)) for f in folder.glob("histogram_*.db")
            if (m := re.search(r"_(\d+)\.db$", f.name))}  # fmt: skip
    children = pids - {worker.pid}
    assert len(children) >= 2, sorted(pids)
