"""The job platform on real RabbitMQ with real ``celery -A tasks worker`` processes.

Load, fairness across institutions, priorities, SIGKILL mid-job. Jobs run the real path
(fetch from a folder archive -> read_series -> run_steps -> store) on tiny synthetic CTs with the
``test.touch`` step (tests/platform_kit.py).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from tests.platform_kit import write_study

pytestmark = pytest.mark.integration


def _wait(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timeout waiting for {what}"
        time.sleep(step)


def _archive(platform):
    from workers.platform.submission import archive_for

    return archive_for(str(platform.archive))


def _submit(platform, study_uid: str, **ctx):
    from workers.platform.submission import submit_study

    return submit_study(study_uid, _archive(platform), ctx)


def _store():
    from workers.platform.jobstore import open_store

    return open_store()


def _studies(platform, n: int, institution: str, desc: str = "AXIAL 1mm") -> list[str]:
    out = []
    for _ in range(n):
        st, _se = write_study(platform.archive / "in" / institution, institution=institution,
                              series_description=desc, n_slices=2, size=4)  # fmt: skip
        out.append(st)
    return out


def _output_files(platform) -> Counter:
    """SOPInstanceUID -> number of files holding it, over the archive's derived objects."""
    c: Counter = Counter()
    for p in platform.archive.rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if "DERIVED" in list(ds.ImageType):
            c[ds.SOPInstanceUID] += 1
    return c


@pytest.fixture(scope="module")
def worker(platform):
    return platform.start_worker("w1", concurrency=2)


def test_fifty_studies_three_institutions_two_priorities_all_complete(platform, worker):
    sites = ["SITE A", "SITE B", "SITE C"]
    studies = []
    for i in range(50):
        desc = "URGENT CT" if i % 5 == 0 else "AXIAL 1mm"
        studies += _studies(platform, 1, sites[i % 3], desc)
    t0 = time.monotonic()
    jobs = [j for st in studies for j in _submit(platform, st)]
    assert len(jobs) == 50
    assert Counter(j.priority for j in jobs) == {1: 40, 2: 10}
    ids = {j.id for j in jobs}
    store = _store()
    done = _wait(lambda: (d := [j for j in store.list(state="done", limit=1000) if j.id in ids])
                 and len(d) == 50 and d, 180, "50 jobs done", 0.2)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert {j.institution for j in done} == set(sites)
    for j in done:
        assert j.attempts == 1 and j.error is None
        assert j.outputs and len(j.outputs[0]["instances"]) == 2
        assert {"fetch", "read", "test.touch", "store"} <= set(j.timings)
    files = _output_files(platform)
    assert len(files) == 100 and set(files.values()) == {1}
    print(f"50 jobs in {elapsed:.1f}s")


def _started_between(store, t_from: float, t_to: float, among: set[int]) -> list:
    """Jobs of ``among`` (this test's backlog) that started in (t_from, t_to)."""
    return [j for j in store.list(limit=5000) if j.id in among and j.started_at
            and t_from < j.started_at < t_to]  # fmt: skip


def _cancel_rest(store, ids) -> None:
    from workers.platform.reprocess import BadRequest, cancel

    for j in store.list(state="queued", limit=5000):
        if j.id in ids:
            try:
                cancel(store, j.id, actor="test")
            except BadRequest:  # finished meanwhile
                pass
    _wait(
        lambda: not [j for j in store.list(state="running", limit=5000) if j.id in ids], 30, "drain"
    )


def test_burst_of_300_does_not_delay_another_site_by_more_than_one_job_per_slot(platform, worker):
    store = _store()
    burst = _studies(platform, 300, "SITE BURST")
    t0 = time.monotonic()
    ids = {j.id for st in burst for j in _submit(platform, st)}
    print(f"300 studies routed and queued in {time.monotonic() - t0:.1f}s")
    assert len(ids) == 300
    # the window is full of the burst's jobs and they run
    _wait(
        lambda: len([j for j in store.list(state="running") if j.id in ids]) >= 2,
        30,
        "burst running",
    )
    [other] = _submit(platform, _studies(platform, 1, "SITE SMALL")[0])
    t_submit = time.time()
    job = _wait(lambda: (j := store.get(other.id)).started_at and j, 30, "other site's job start")
    ahead = _started_between(store, t_submit, job.started_at, ids)
    print(f"burst jobs started after the other site's submission and before it: {len(ahead)}")
    # 2 worker slots: at most one burst job per slot may start first (those already in the broker)
    assert len(ahead) <= 2
    _cancel_rest(store, ids)
    assert store.get(other.id).state in ("running", "done")


def test_urgent_study_behind_backlog_of_100_starts_within_one_job_per_slot(platform, worker):
    store = _store()
    backlog = _studies(platform, 50, "SITE A") + _studies(platform, 50, "SITE B")
    ids = {j.id for st in backlog for j in _submit(platform, st)}
    _wait(
        lambda: len([j for j in store.list(state="running") if j.id in ids]) >= 1,
        30,
        "backlog running",
    )
    [urgent] = _submit(platform, _studies(platform, 1, "SITE A", desc="URGENT CT")[0])
    assert urgent.priority == 2
    t_submit = time.time()
    job = _wait(lambda: (j := store.get(urgent.id)).started_at and j, 30, "urgent job start")
    ahead = _started_between(store, t_submit, job.started_at, ids)
    print(f"normal jobs started after the urgent submission and before it: {len(ahead)}")
    assert len(ahead) <= 2
    _cancel_rest(store, ids)


def test_worker_killed_mid_job_loses_nothing_and_duplicates_nothing(platform, worker):
    store = _store()
    [st] = _studies(platform, 1, "SITE KILL", desc="SLOW")
    [job] = _submit(platform, st)
    _wait(lambda: store.get(job.id).last_step == "test.touch", 30, "slow job in its step")
    platform.kill(worker)  # SIGKILL the whole worker (main process and pool children)
    assert store.get(job.id).state == "running"
    platform.start_worker("w2", concurrency=2)
    done = _wait(
        lambda: (j := store.get(job.id)).state in ("done", "failed") and j, 60, "redelivered job"
    )
    assert done.state == "done", done.error
    assert done.attempts == 2
    series_uid = done.outputs[0]["series_uid"]
    # run it a third time (a repeated job): the same UIDs replace, never duplicate
    from workers.platform.reprocess import reprocess

    again = reprocess(store, st, ["test.touch"], requester="test")
    again = _wait(
        lambda: (j := store.get(again.id)).state in ("done", "failed") and j, 60, "repeat"
    )
    assert again.state == "done" and again.outputs[0]["series_uid"] == series_uid
    files = [p for p in Path(platform.archive, st, series_uid).glob("*.dcm")]
    assert len(files) == 2
    assert set(_output_files(platform).values()) == {1}
    trail = [(a.to_state, a.detail) for a in store.audit_trail(job_id=job.id) if a.event == "state"]
    assert [t for t, _ in trail] == ["running", "queued", "running", "done"]
    assert trail[1][1].startswith("worker lost (worker ")  # the cause of attempt 2, with backoff
    assert re.search(r"last step test.touch, peak RSS \d+ MB\); retry in", trail[1][1]), trail[1][1]
    assert trail[2][1].startswith("attempt 2 after: worker lost")
    assert not list((platform.tmp / "home" / "work").glob(f"job-{job.id}-*"))  # swept


def test_pool_child_killed_mid_job_is_redelivered(platform):
    """SIGKILL of the pool process only: the main process rejects the task (reject_on_worker_lost)."""
    import os
    import signal

    import psutil

    store = _store()
    live = [p for p in platform.workers if p.poll() is None]
    main = live[-1] if live else platform.start_worker("w3", concurrency=2)
    [st] = _studies(platform, 1, "SITE CHILD", desc="SLOW")
    [job] = _submit(platform, st)
    _wait(lambda: store.get(job.id).state == "running", 30, "slow job running")
    time.sleep(0.5)
    for child in psutil.Process(main.pid).children():
        os.kill(child.pid, signal.SIGKILL)
    done = _wait(
        lambda: (j := store.get(job.id)).state in ("done", "failed") and j, 60, "redelivered job"
    )
    assert done.state == "done", done.error
    assert done.attempts == 2
    assert main.poll() is None  # the worker itself survived and replaced its pool processes


def test_quiet_period_and_late_series_through_rabbitmq(platform, worker):
    """Routing waits for the rule's quiet period (a Celery countdown); a late series supersedes."""
    from workers.platform.submission import notify_study

    store = _store()
    folder = platform.archive / "in" / "QUIET"
    st, first = write_study(folder, institution="SITE Q", series_description="QUIET 2mm",
                            slice_thickness=2.0, n_slices=2, size=4)  # fmt: skip
    t0 = time.time()
    notify_study(st, _archive(platform), {})
    time.sleep(0.3)
    assert store.list(study_uid=st) == []  # quiet period not over
    write_study(folder, study_uid=st, institution="SITE Q", series_description="QUIET 1mm",
                slice_thickness=1.0, n_slices=2, size=4)  # fmt: skip
    notify_study(st, _archive(platform), {})
    job = _wait(lambda: (js := store.list(study_uid=st, state="done")) and js[0], 30, "routed job")
    time.sleep(1.5)  # the superseded routing must not add anything
    jobs = store.list(study_uid=st)
    assert len(jobs) == 1 and jobs[0].series_uid != first and jobs[0].rule == "touch-quiet"
    assert job.created_at - t0 >= 1.3  # 1 s after the *last* change (0.3 s after the first)
