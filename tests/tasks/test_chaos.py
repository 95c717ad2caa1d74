"""Chaos: the platform keeps its promises through the faults of a real site.

Each test runs real ``celery -A tasks worker`` processes on a batch of studies, injects one
fault mid-run and asserts, after recovery: 0 lost (every job ``done``), 0 stuck (nothing
``queued``/``running`` left), 0 duplicate outputs (each derived SOP instance stored once),
no ``work/job-*`` folder left, and a drain within a stated time after recovery.

- job store outage: a TCP proxy in front of PostgreSQL is cut for 15 s;
- broker outage: a private RabbitMQ node (own name, ports, data) stopped and started again;
- worker SIGKILL: the worker running jobs is killed three times;
- archive outage: Orthanc stopped and started while another site's jobs keep running.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pydicom
import pytest

from tests.platform_kit import (
    RabbitNode,
    TcpProxy,
    drop_pg_db,
    drop_vhost,
    make_pg_db,
    make_vhost,
    rabbit_ready,
    rabbit_server_available,
    write_study,
)
from tests.tasks.conftest import Platform, open_platform

pytestmark = pytest.mark.integration

#: after a fault ends, every study must be done within this time (the issue asks 2 min)
DRAIN_S = 120.0
FAST = {  # short lease and store-retry budget: the slow paths (lapse, retry message) run too
    "SPRIM_LEASE_S": "8",
    "SPRIM_STORE_RETRY_S": "5",
    "SPRIM_RETRY_BACKOFF_S": "1",
    "SPRIM_RELEASE_INTERVAL_S": "1",
}


def _wait(pred, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timeout ({timeout:.0f} s) waiting for {what}"
        time.sleep(step)


def _store():
    from workers.platform.jobstore import open_store

    return open_store()


def _batch(plat, n: int, institution: str = "SITE CHAOS", archive=None) -> list[int]:
    from workers.platform.submission import archive_for, submit_study

    archive = archive or archive_for(str(plat.archive))
    ids = []
    for _ in range(n):
        st, _se = write_study(plat.archive / "in" / institution, institution=institution,
                              series_description="CHAOS", n_slices=2, size=4)  # fmt: skip
        ids += [j.id for j in submit_study(st, archive, {})]
    assert len(ids) == n
    return ids


def _drained(ids: list[int]):
    jobs = [_store().get(i) for i in ids]
    return (
        jobs if all(j.state in ("done", "partial", "failed", "cancelled") for j in jobs) else None
    )


def _assert_promises(plat, ids: list[int], t_recovered: float) -> float:
    jobs = _wait(lambda: _drained(ids), DRAIN_S, "every job final after recovery", 0.5)
    drain = time.monotonic() - t_recovered
    assert [(j.id, j.state, j.error) for j in jobs if j.state != "done"] == []  # 0 lost
    assert not [j for j in _store().list(state=("queued", "running"), limit=5000) if j.id in ids]
    c: Counter = Counter()
    for p in plat.archive.rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if "DERIVED" in list(ds.ImageType) and ds.SeriesDescription.startswith("CHAOS"):
            c[ds.SOPInstanceUID] += 1
    want = {u for j in jobs for o in j.outputs for u in o["instances"]}
    assert set(c) >= want and all(c[u] == 1 for u in want)  # 0 duplicates
    assert not list((plat.tmp / "home" / "work").glob("job-*"))  # no patient data left behind
    print(f"drained {len(ids)} jobs {drain:.1f} s after recovery; attempts "
          f"{sorted(Counter(j.attempts for j in jobs).items())}")  # fmt: skip
    return drain


@pytest.fixture
def chaos_platform(tmp_path):
    """A platform of its own (vhost, PostgreSQL database); the test starts its workers."""
    if not rabbit_ready():
        pytest.skip("RabbitMQ not running on 127.0.0.1:5672 (make services)")
    vhost, pg = make_vhost(), make_pg_db()
    if pg is None:
        drop_vhost(vhost)
        pytest.skip("PostgreSQL not running on 127.0.0.1:5432 (make services)")
    plat = Platform(tmp_path, vhost, pg)
    plat.env.update(FAST)
    try:
        yield plat
    finally:
        plat.stop_all()
        drop_pg_db(pg)
        drop_vhost(vhost)


def test_job_store_outage_of_15s_mid_run_drains_without_anyone(chaos_platform):
    plat = chaos_platform
    direct = plat.env["SPRIM_JOB_STORE_URL"]
    proxy = TcpProxy(5432)
    try:
        # the workers reach PostgreSQL through the proxy; the test process directly
        plat.env["SPRIM_JOB_STORE_URL"] = direct.replace(":5432/", f":{proxy.port}/")
        with open_platform(plat):
            import os

            os.environ["SPRIM_JOB_STORE_URL"] = direct
            from workers.core.config import settings

            settings.cache_clear()
            plat.start_worker("w1", concurrency=2)
            ids = _batch(plat, 8)
            _wait(lambda: sum(_store().get(i).state == "done" for i in ids) >= 1, 60, "a job done")
            _wait(lambda: any(_store().get(i).state == "running" for i in ids), 30, "a job running")
            proxy.cut()
            time.sleep(15)
            proxy.restore()
            t_back = time.monotonic()
            drain = _assert_promises(plat, ids, t_back)
            assert drain < DRAIN_S
            log = (plat.tmp / "w1.log").read_text()
            assert "event=store_unreachable" in log  # the outage was seen, and lived through
    finally:
        proxy.close()


@pytest.mark.skipif(not rabbit_server_available(), reason="rabbitmq-server not installed")
def test_broker_stopped_and_started_mid_run_loses_nothing(chaos_platform, tmp_path):
    plat = chaos_platform
    node = RabbitNode(tmp_path / "rabbit").start()
    try:
        plat.env["SPRIM_BROKER_URL"] = node.url
        with open_platform(plat):
            plat.start_worker("w1", concurrency=2)
            ids = _batch(plat, 8)
            _wait(lambda: sum(_store().get(i).state == "done" for i in ids) >= 1, 60, "a job done")
            node.stop()
            time.sleep(5)
            node.start()
            t_back = time.monotonic()
            _assert_promises(plat, ids, t_back)
    finally:
        node.close()


def test_worker_sigkilled_three_times_mid_run(chaos_platform):
    plat = chaos_platform
    with open_platform(plat):
        w = plat.start_worker("w1", concurrency=2)
        ids = _batch(plat, 8)
        killed: set[str] = set()
        for k in range(3):
            # a job in its step on the worker alive now (not one lost with the previous worker)
            def in_step(gone=frozenset(killed)):
                return [j for i in ids if (j := _store().get(i)).state == "running"
                        and j.last_step == "test.touch" and j.lease_owner not in gone]  # fmt: skip

            victim = _wait(in_step, 60, "a job in its step")
            killed |= {j.lease_owner for j in victim}
            plat.kill(w)
            w = plat.start_worker(f"w{k + 2}", concurrency=2)
        t_back = time.monotonic()
        _assert_promises(plat, ids, t_back)
        store = _store()
        causes = [a.detail for i in ids for a in store.audit_trail(job_id=i, event_="state")
                  if a.to_state == "queued"]  # fmt: skip
        assert len(causes) >= 3 and all(
            c.startswith(("worker lost", "lease expired")) for c in causes
        )


@pytest.fixture
def orthanc(tmp_path):
    from tests.harness.orthanc import OrthancServer, orthanc_available

    if not orthanc_available() or not shutil.which("storescu"):
        pytest.skip("Orthanc/DICOMweb plugin/dcmtk not installed (make sysdeps)")
    server = OrthancServer(tmp_path / "orthanc", stable_age=1).start()
    try:
        yield server
    finally:
        server.close()


def test_archive_outage_backing_off_jobs_give_their_slots_to_other_sites(chaos_platform, orthanc):
    from workers.platform.submission import archive_for, submit_study

    plat = chaos_platform
    plat.env["SPRIM_MAX_ATTEMPTS"] = "12"  # 1, 2, 4 … s: the 20 s outage is survived
    with open_platform(plat):
        plat.start_worker("w1", concurrency=2)
        studies = [write_study(plat.tmp / "pacs" / f"s{k}", institution="SITE PACS",
                               series_description="CHAOS", n_slices=2, size=4)[0]
                   for k in range(4)]  # fmt: skip
        orthanc.storescu(sorted((plat.tmp / "pacs").rglob("*.dcm")))
        pacs = archive_for(orthanc.dicomweb_url)
        attrs = {st: pacs.series_of_study(st) for st in studies}
        orthanc.stop()  # SITE PACS's jobs meet an archive outage
        t_down = time.monotonic()
        pacs_ids = [j.id for st in studies for j in submit_study(st, pacs, {}, series=attrs[st])]
        _wait(lambda: all(_store().get(i).attempts >= 1 for i in pacs_ids), 30, "first attempts")
        # the window (2) is not held by jobs waiting for their retry time: another site runs
        local = _batch(plat, 4, "SITE LOCAL")
        _wait(lambda: all(_store().get(i).state == "done" for i in local), 60, "other site done")
        # ... while SITE PACS's jobs wait for the archive (down for at least 20 s)
        while True:
            assert not [i for i in pacs_ids if _store().get(i).state in ("done", "failed")]
            if time.monotonic() - t_down >= 20:
                break
            time.sleep(0.5)
        orthanc.start()
        t_back = time.monotonic()
        jobs = _wait(lambda: _drained(pacs_ids), DRAIN_S, "SITE PACS drained", 0.5)
        drain = time.monotonic() - t_back
        assert [(j.id, j.state, j.error) for j in jobs if j.state != "done"] == []
        for j in jobs:
            derived = {
                s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
                for s in orthanc.series_of_study(j.study_uid)
                if s["MainDicomTags"].get("Manufacturer") == "sprim"
            }
            assert derived == {o["series_uid"]: len(o["instances"]) for o in j.outputs}
            trail = [a.detail for a in _store().audit_trail(job_id=j.id, event_="state")]
            assert any(d.startswith("archive transient error") for d in trail), trail
        assert not list((plat.tmp / "home" / "work").glob("job-*"))
        # the longest wait after the archive is back: one backoff step (<= 16 s here) + release
        print(f"SITE PACS drained {drain:.1f} s after the archive came back")
        assert drain < 40


def test_job_over_its_memory_limit_fails_with_its_reason_and_celery_says_failure(chaos_platform):
    """SPRIM_JOB_MEMORY_MB (RLIMIT_AS of pool processes): a job asking for more fails at the
    allocation, before the host feels it; the task ends in FAILURE with the job's reason."""
    from workers.platform.submission import archive_for, archive_spec, release

    plat = chaos_platform
    plat.env["SPRIM_JOB_MEMORY_MB"] = "3000"  # a pool process maps ~1 GB before any job
    with open_platform(plat):
        w = plat.start_worker("w1", concurrency=1)
        spec = archive_spec(archive_for(str(plat.archive)))
        ids = {}
        for mb in (4000, 200):
            st, se = write_study(plat.archive / "in" / f"mem{mb}", n_slices=2, size=4)
            ids[mb] = _store().create_job(
                rule="mem", study_uid=st, series_uid=se, institution="SITE MEM", archive=spec,
                steps=[{"use": "test.touch", "with": {"alloc_mb": mb, "label": f"MEM{mb}"}}],
            ).id  # fmt: skip
        release()
        jobs = _wait(lambda: _drained(list(ids.values())), 60, "memory jobs final")
        big, small = (_store().get(ids[mb]) for mb in (4000, 200))
        assert big.state == "failed"
        assert big.error == "test.touch: memory limit of 3000 MB exceeded (SPRIM_JOB_MEMORY_MB)"
        assert big.peak_rss_mb < 1500  # refused at the allocation, never resident
        assert small.state == "done", small.error
        assert w.poll() is None  # the worker lives on
        log = (plat.tmp / "w1.log").read_text()
        assert f"Task sprim.run_job[job-{big.id}-" in log
        assert f"JobFailed('job {big.id} failed: test.touch: memory limit" in log
        assert len(jobs) == 2


EMBEDDED_RULES = """
rules:
  - name: touch-embedded
    match: {Modality: {in: [CT]}}
    run:
      - {use: test.touch, with: {sleep_s: 3, label: "EMBEDDED"}}
"""


def test_embedded_listen_killed_mid_job_drains_after_restart(tmp_path):
    """`sprim listen` without a broker (jobs in-process), SIGKILLed while a job runs and two
    more wait in its in-process queue: restarted, it finishes all three by itself."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.harness.orthanc import free_port, send
    from tests.platform_kit import ROOT
    from workers.platform.jobstore import JobStore

    if not shutil.which("storescu"):
        pytest.skip("dcmtk not installed (make sysdeps)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(EMBEDDED_RULES)
    home, port = tmp_path / "home", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPRIM_HOME": str(home),
           "SPRIM_RULES_FILE": str(rules), "SPRIM_PLUGINS": "tests.platform_kit",
           "SPRIM_RETRY_BACKOFF_S": "0.2", "SPRIM_RELEASE_INTERVAL_S": "1"}  # fmt: skip
    for k in ("SPRIM_BROKER_URL", "SPRIM_JOB_STORE_URL", "SPRIM_ARCHIVE_URL"):
        env.pop(k, None)
    exe = str(Path(sys.executable).parent / "sprim")
    args = [exe, "listen", "--port", str(port), "--host", "127.0.0.1", "--quiet", "0.5"]

    def start(n: int) -> subprocess.Popen:
        log = tmp_path / f"listen{n}.log"
        p = subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                             start_new_session=True)  # fmt: skip
        _wait(lambda: b"event=listen_started" in log.read_bytes(), 60, "listener up")
        return p

    def jobs():
        try:
            return JobStore(f"sqlite:///{home / 'jobs.db'}").list(limit=100)
        except Exception:  # noqa: BLE001  (schema being created)
            return []

    p = start(1)
    try:
        for k in range(3):
            write_study(tmp_path / "in" / f"s{k}", n_slices=2, size=4)
        send(sorted((tmp_path / "in").rglob("*.dcm")), "127.0.0.1", port, called="SPRIM")
        _wait(lambda: len(jobs()) == 3 and any(j.last_step == "test.touch" for j in jobs()), 60,
              "3 jobs, one in its step")  # fmt: skip
        assert list((home / "work").glob("job-*"))  # the running attempt's source data
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        assert {j.state for j in jobs()} == {"running", "queued"}
        p = start(2)
        t_back = time.monotonic()
        done = _wait(lambda: (js := jobs()) and all(j.state == "done" for j in js) and js, 60,
                     "queue drained after restart")  # fmt: skip
        print(f"embedded queue drained {time.monotonic() - t_back:.1f} s after restart")
        assert sorted(j.attempts for j in done) == [1, 1, 2]
        [again] = [j for j in done if j.attempts == 2]
        causes = [a.detail for a in JobStore(f"sqlite:///{home / 'jobs.db'}").audit_trail(
            job_id=again.id, event_="state") if a.to_state == "queued"]  # fmt: skip
        assert causes and causes[0].startswith("worker lost")
        assert not list((home / "work").glob("job-*"))
        outs = Counter(u for j in done for o in j.outputs for u in o["instances"])
        assert len(outs) == 6 and set(outs.values()) == {1}
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
