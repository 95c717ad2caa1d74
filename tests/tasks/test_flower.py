"""Flower (``celery -A tasks flower``) watches the sprim workers: its API lists them and tells
each job task's true outcome (a failed job is a FAILURE task)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from tests.harness.orthanc import free_port
from tests.platform_kit import ROOT, VENV_BIN, write_study

pytestmark = pytest.mark.integration
AUTH = ("sprim", "flower-test-password")


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"timeout waiting for {what}"
        time.sleep(0.25)
    return v


@pytest.fixture
def flower(platform, tmp_path):
    port = free_port()
    log = open(tmp_path / "flower.log", "ab")  # noqa: SIM115
    p = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-A", "tasks", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"],
        cwd=ROOT, env=platform.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up():
        assert p.poll() is None, (tmp_path / "flower.log").read_text()[-3000:]
        try:
            return requests.get(url + "/healthcheck", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        _wait(up, 60, "flower to answer")
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=20)


def test_flower_lists_workers_and_true_task_states(platform, flower):
    from workers.platform.jobstore import open_store
    from workers.platform.reprocess import reprocess
    from workers.platform.submission import archive_for, submit_study

    platform.start_worker("flowerw", concurrency=1)
    assert requests.get(flower + "/api/workers", timeout=10).status_code == 401  # auth on

    def listed():
        r = requests.get(flower + "/api/workers", params={"refresh": "1"}, auth=AUTH, timeout=30)
        r.raise_for_status()
        return [w for w in r.json() if w.startswith("flowerw@")]

    [name] = _wait(listed, 60, "the worker in flower's API")

    st, _ = write_study(platform.archive / "flower", institution="SITE A", n_slices=2, size=4)
    [ok] = submit_study(st, archive_for(str(platform.archive)), {})
    bad = reprocess(open_store(), st, [{"use": "test.touch", "with": {"fail": True}}],
                    requester="test", institution="SITE A")  # fmt: skip

    def outcomes():
        r = requests.get(flower + "/api/tasks", auth=AUTH, timeout=10)
        r.raise_for_status()
        by_job = {
            t["args"]: (t["state"], t.get("worker"), t.get("exception") or "")
            for t in r.json().values()
            if t.get("name") == "sprim.run_job"
        }
        want = (f"[{ok.id}]", f"[{bad.id}]")
        done = all(by_job.get(k, ("",))[0] in ("SUCCESS", "FAILURE") for k in want)
        return done and by_job

    by_job = _wait(outcomes, 60, "both job tasks to finish in flower")
    assert by_job[f"[{ok.id}]"][:2] == ("SUCCESS", name)
    state, worker, exc = by_job[f"[{bad.id}]"]
    assert (state, worker) == ("FAILURE", name)
    assert "refused on purpose" in exc and f"job {bad.id} failed" in exc
    assert open_store().get(bad.id).state == "failed"
