"""Job store on SQLite and PostgreSQL: migrations, state machine, audit, fair release, routing."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from tests.platform_kit import write_study
from workers.platform.jobmodels import JobRow
from workers.platform.leases import _HOST


def _job(store, inst="A", prio=1, **kw):
    return store.create_job(study_uid=kw.pop("study_uid", "1.2"), institution=inst, priority=prio,
                            steps=[], **kw)  # fmt: skip


def test_migrations_are_idempotent_and_reach_head(store):
    store.migrate()
    with store.engine.connect() as c:
        from sqlalchemy import text

        assert c.execute(text("select version_num from alembic_version")).scalar() == "0002"


def test_state_machine_and_audit_trail(store):
    j = _job(store, rule="r1")
    assert j.state == "queued" and j.attempts == 0
    assert store.transition(j.id, "running", expect=("queued",), attempts=1) is not None
    assert store.transition(j.id, "running", expect=("queued",)) is None  # conditional
    done = store.transition(j.id, "done", expect=("running",), outputs=[{"series_uid": "9"}],
                            timings={"fetch": 0.1})  # fmt: skip
    assert done.state == "done" and done.outputs == [{"series_uid": "9"}]
    assert store.transition(j.id, "cancelled", expect=("queued", "running")) is None
    trail = store.audit_trail(job_id=j.id)
    assert [(a.event, a.from_state, a.to_state) for a in trail] == [
        ("created", None, "queued"), ("state", "queued", "running"), ("state", "running", "done"),
    ]  # fmt: skip
    assert [x.id for x in store.list(state="done")] == [j.id]
    assert store.counts() == {"done": 1}


def test_release_is_fair_across_institutions_and_urgent_first(store):
    burst = [_job(store, "BURST") for _ in range(30)]
    small = [_job(store, "SMALL"), _job(store, "SMALL")]
    other = _job(store, "OTHER")
    urgent = _job(store, "BURST", prio=2)
    sent = []
    got = store.release(5, sent.append)
    assert [j.id for j in got] == [j.id for j in sent]
    # urgent first, then one job per institution, oldest first; then the second round
    assert [j.id for j in got] == [urgent.id, burst[0].id, small[0].id, other.id, burst[1].id]
    assert store.release(5, sent.append) == []  # window full
    # a slot frees: the least recently served institution goes next, not the burst
    store.transition(burst[0].id, "running", expect=("queued",))
    store.transition(burst[0].id, "done", expect=("running",))
    [nxt] = store.release(5, sent.append)
    assert nxt.id == small[1].id
    store.transition(small[0].id, "done")
    [nxt] = store.release(5, sent.append)
    assert nxt.institution == "BURST"


def test_concurrent_releases_never_exceed_the_window(store):
    for i in range(40):
        _job(store, f"I{i % 4}")
    sent, lock = [], threading.Lock()

    def send(j):
        with lock:
            sent.append(j.id)

    threads = [threading.Thread(target=store.release, args=(7, send)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == len(set(sent)) == 7


def test_failed_send_puts_the_job_back(store):
    j = _job(store)

    def boom(_):
        raise ConnectionError("broker down")

    try:
        store.release(2, boom)
    except ConnectionError:
        pass
    assert store.get(j.id).dispatched_at is None
    assert [x.id for x in store.release(2, lambda _: None)] == [j.id]


def test_study_matching_no_rule_is_recorded_not_an_error(sprim_env, store_url):
    from workers.archives.folder import FolderArchive
    from workers.platform import submission
    from workers.platform.jobstore import open_store

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, _ = write_study(sprim_env / "archive" / "in", modality="MR", institution="SITE A")
    [rec] = submission.submit_study(st, archive, {"calling_ae": "MRI1"})
    assert rec.state == "no_match" and rec.error is None and rec.steps == []
    assert "Modality: 'MR' not in ['CT']" in rec.context["why"]
    assert submission.submit_study(st, archive, {}) == []  # recorded once
    store = open_store(store_url)
    assert store.list(state="failed", study_uid=st) == []


def test_job_runs_real_path_in_process_and_repeat_replaces(sprim_env, store_url):
    from workers.archives.folder import FolderArchive
    from workers.platform import submission
    from workers.platform.jobstore import open_store
    from workers.platform.reprocess import reprocess

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, se = write_study(sprim_env / "archive" / "in", institution="SITE A")
    [j] = submission.submit_study(st, archive, {})
    store = open_store(store_url)
    done = store.get(j.id)
    assert done.state == "done", done.error
    assert done.series_uid == se and done.institution == "SITE A"
    out_uid = done.outputs[0]["series_uid"]
    assert len(list((sprim_env / "archive" / st / out_uid).glob("*.dcm"))) == 3
    # same params -> same UIDs -> replaced; other params -> a new series saying what changed
    same = store.get(reprocess(store, st, ["test.touch"], requester="dr.x").id)
    assert same.state == "done" and same.outputs[0]["series_uid"] == out_uid
    assert same.rule == "touch" and same.description_suffix == ""
    other = reprocess(store, st, [{"use": "test.touch", "with": {"label": "B"}}], requester="dr.x")
    other = store.get(other.id)
    assert other.state == "done" and other.outputs[0]["series_uid"] != out_uid
    assert "B [label=B]" in other.outputs[0]["series_description"]
    assert len(list((sprim_env / "archive" / st / out_uid).glob("*.dcm"))) == 3


def test_step_error_fails_without_retry(sprim_env, store_url):
    from workers.archives.folder import FolderArchive
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store
    from workers.platform.submission import archive_spec

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, se = write_study(sprim_env / "archive" / "in")
    store = open_store(store_url)
    j = store.create_job(rule="t", study_uid=st, series_uid=se, institution="A", archive=archive_spec(archive),
                         steps=[{"use": "test.touch", "with": {"fail": True}}])  # fmt: skip
    out = execute_job(j.id, store)
    assert out.state == "failed" and out.attempts == 1
    assert out.error == "test.touch: refused on purpose (test)"
    missing = store.create_job(rule="t", study_uid=st, series_uid="9.9.9", institution="A",
                               archive=archive_spec(archive), steps=[{"use": "test.touch"}])  # fmt: skip
    out = execute_job(missing.id, store)
    assert out.state == "failed" and "not found" in out.error


def test_transient_archive_errors_retry_with_backoff_then_fail(sprim_env, store_url, monkeypatch):
    from workers.archives import ArchiveError
    from workers.core.config import settings
    from workers.platform import executor, submission
    from workers.platform.jobstore import JobRow, open_store

    class Down:
        name = "down"

        def fetch_series(self, *a):
            raise ArchiveError("connection refused", transient=True)

    monkeypatch.setitem(submission._ARCHIVES, "down://", Down())
    monkeypatch.setenv("SPRIM_MAX_ATTEMPTS", "5")
    settings.cache_clear()
    store = open_store(store_url)
    j = store.create_job(rule="t", study_uid="1", series_uid="2", institution="A", archive="down://",
                         steps=[{"use": "test.touch"}])  # fmt: skip
    delays = []
    for _ in range(4):
        out = executor.execute_job(j.id, store)
        assert out.state == "queued" and out.dispatched_at is None  # its slot is given back
        assert out.error.startswith("archive transient error: connection refused")
        delays.append(round(out.not_before - out.updated_at))
        assert executor.execute_job(j.id, store).attempts == out.attempts  # not before its time
        with store.Session.begin() as s:  # its retry time comes
            s.get(JobRow, j.id).not_before = time.time() - 1
    assert delays == [2, 4, 8, 16]
    out = executor.execute_job(j.id, store)
    assert out.state == "failed" and "after 5 attempts" in out.error
    trail = [a.detail for a in store.audit_trail(job_id=j.id) if a.to_state == "running"]
    assert trail[1].startswith("attempt 2 after: archive transient error: connection refused")


def test_late_series_retriggers_after_quiet_period(sprim_env, store_url):
    from workers.archives.folder import FolderArchive
    from workers.platform import inprocess, submission
    from workers.platform.jobstore import open_store

    disp = inprocess.InProcessDispatcher(background=True)
    archive = FolderArchive(sprim_env / "archive", name="local")
    st, first = write_study(sprim_env / "archive" / "in", slice_thickness=2.0)
    store = open_store(store_url)
    seq1 = submission.notify_study(st, archive, {}, disp=disp)
    write_study(sprim_env / "archive" / "late", study_uid=st, slice_thickness=1.0)  # late, thinner
    seq2 = submission.notify_study(st, archive, {}, disp=disp)
    assert seq2 == seq1 + 1
    deadline = time.monotonic() + 20
    while not [j for j in store.list(study_uid=st) if j.state == "done"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the superseded routing (seq1) must not have created anything
    disp.stop()
    jobs_ = store.list(study_uid=st)
    assert len(jobs_) == 1 and jobs_[0].series_uid != first  # the thinner late series won
    assert any(a.detail for a in store.audit_trail(job_id=jobs_[0].id))


def test_rules_simulate_over_known_studies(sprim_env, store_url):
    from typer.testing import CliRunner

    from tasks.main import app
    from workers.archives.folder import FolderArchive
    from workers.platform import submission

    archive = FolderArchive(sprim_env / "archive", name="local")
    ct, _ = write_study(sprim_env / "archive" / "ct", institution="SITE A")
    mr, _ = write_study(sprim_env / "archive" / "mr", modality="MR", institution="SITE B")
    submission.submit_study(ct, archive, {})
    submission.submit_study(mr, archive, {})
    new = sprim_env / "new.yaml"
    new.write_text("rules:\n  - name: mr-new\n    match: {Modality: MR}\n    run: [test.touch]\n")
    r = CliRunner().invoke(app, ["rules", "simulate", str(new)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "2 studies: 1 jobs would be triggered, 1 studies match no rule" in " ".join(
        r.output.split()
    )
    assert "mr-new" in r.output and "new" in r.output


def test_destinations_send_outputs_of_an_institution_to_its_archive(
    sprim_env, store_url, monkeypatch
):
    from workers.archives.folder import FolderArchive
    from workers.core.config import settings
    from workers.platform import submission
    from workers.platform.jobstore import open_store

    regional = sprim_env / "regional"
    monkeypatch.setenv("SPRIM_DESTINATIONS", json.dumps({"SITE B": str(regional)}))
    settings.cache_clear()
    archive = FolderArchive(sprim_env / "archive", name="local")
    st, _ = write_study(sprim_env / "archive" / "in", institution="SITE B")
    [j] = submission.submit_study(st, archive, {})
    done = open_store(store_url).get(j.id)
    assert done.state == "done", done.error
    out_uid = done.outputs[0]["series_uid"]
    assert len(list((regional / st / out_uid).glob("*.dcm"))) == 3
    assert not (sprim_env / "archive" / st / out_uid).exists()


# -- leases, retry times, poison jobs, work folders (issue 11) -------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _running(store, job, owner: str, lease_in: float, **kw):
    return store.transition(job.id, "running", expect=("queued",), attempts=job.attempts + 1,
                            lease_owner=owner, lease_expires_at=time.time() + lease_in, **kw)  # fmt: skip


def test_lapsed_lease_requeues_with_backoff_then_fails_as_poison(sprim_env, store_url):
    from workers.platform import leases
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    j = _job(store, rule="r")
    for n in (1, 2):
        _running(store, store.get(j.id), "w:elsewhere:1:1:abc", -1, last_step="segment.bone",
                 peak_rss_mb=1234.4)  # fmt: skip
        assert leases.recover(store, _NoDisp()) == 1
        q = store.get(j.id)
        assert q.state == "queued" and q.worker_losses == n and q.dispatched_at is None
        assert round(q.not_before - q.updated_at) == 2 * n  # backoff 2, 4 s
        assert (
            q.error
            == "lease expired (worker elsewhere:1:1:abc, last step segment.bone, peak RSS 1234 MB)"
        )
        assert store.release(2, lambda _: None) == []  # waiting for its retry time: no slot
        with store.Session.begin() as s:
            s.get(JobRow, j.id).not_before = time.time() - 1
    _running(store, store.get(j.id), f"w:{_HOST}:{_dead_pid()}:3:abc", 60,
             last_step="mesh", peak_rss_mb=2048.0)  # fmt: skip
    assert (
        leases.recover(store, _NoDisp()) == 1
    )  # a dead local owner is known at once, lease or not
    out = store.get(j.id)
    assert out.state == "failed"
    assert out.error == "worker lost 3 times (last step mesh, peak RSS 2048 MB)"
    details = [
        a.detail for a in store.audit_trail(job_id=j.id, event_="state") if a.to_state != "running"
    ]
    assert [d.split(" (")[0] for d in details] == [
        "lease expired",
        "lease expired",
        "worker lost; worker lost 3 times",
    ]


def test_window_is_not_held_by_lapsed_or_backing_off_jobs(sprim_env, store_url):
    from workers.platform import submission
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    stuck = [_job(store, "A"), _job(store, "A")]
    for s_ in stuck:
        store.transition(s_.id, "running", dispatched_at=time.time(), lease_owner="w:x:1:1:a",
                         lease_expires_at=time.time() - 1)  # fmt: skip
    waiting = _job(store, "B")
    store.transition(waiting.id, "queued", not_before=time.time() + 60)
    fresh = _job(store, "C")
    sent = []

    class Disp:
        ident = None

        def send_job(self, job):
            sent.append(job.id)

        def send_retry(self, job, delay_s):
            pass

    submission.release(store, Disp())
    assert sent == [
        fresh.id
    ]  # the lapsed jobs went back to waiting (their retry time), not the window
    assert {store.get(s_.id).state for s_ in stuck} == {"queued"}


def test_retry_works_on_a_running_job_whose_lease_expired(sprim_env, store_url):
    from workers.platform.jobstore import open_store
    from workers.platform.reprocess import BadRequest, retry

    store = open_store(store_url)
    j = _job(store)
    _running(store, j, "w:x:1:1:a", 30)
    try:
        retry(store, j.id, actor="admin", disp=_NoDisp())
        raise AssertionError("a live lease must not be retried")
    except BadRequest as e:
        assert "lease-expired" in str(e)
    store.transition(j.id, "running", lease_expires_at=time.time() - 1)
    out = retry(store, j.id, actor="admin", disp=_NoDisp())
    assert out.state == "queued" and out.attempts == 0 and out.lease_owner is None
    assert store.audit_trail(job_id=j.id)[-1].detail == "manual retry (lease expired)"


class _NoDisp:
    ident = None

    def send_job(self, job):
        pass

    def send_retry(self, job, delay_s):
        pass


def _touch_job(store, sprim_env, steps):
    from workers.archives.folder import FolderArchive
    from workers.platform.submission import archive_spec

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, se = write_study(sprim_env / "archive" / "in")
    return store.create_job(rule="t", study_uid=st, series_uid=se, institution="A",
                            archive=archive_spec(archive), steps=steps)  # fmt: skip


def test_partial_job_stores_what_it_could_and_lists_each_failure(sprim_env, store_url, caplog):
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store
    from workers.platform.reprocess import retry

    store = open_store(store_url)
    j = _touch_job(store, sprim_env, [
        {"use": "test.touch", "with": {"label": "GOOD"}},
        {"use": "test.touch", "with": {"label": "BAD", "fail": True}},
        {"use": "test.touch", "with": {"label": "BUG", "crash": True}},
    ])  # fmt: skip
    out = execute_job(j.id, store)
    assert out.state == "partial"
    assert [o["series_description"].split(" [")[0] for o in out.outputs] == ["GOOD"]
    assert out.error == ("test.touch: refused on purpose (test); "
                         "test.touch: internal error (KeyError) — see worker log")  # fmt: skip
    assert "not-a-parameter" in caplog.text  # the traceback went to the log, not to the job
    again = retry(store, j.id, actor="admin", disp=_NoDisp())
    assert again.state == "queued"
    assert execute_job(j.id, store).state == "partial"


def test_bad_params_and_bugs_are_classified(sprim_env, store_url):
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    bad = _touch_job(store, sprim_env, [{"use": "test.touch", "with": {"sleep_s": -1}}])
    out = execute_job(bad.id, store)
    assert out.state == "failed" and out.error.startswith(
        "bad job parameters: test.touch: 1 validation"
    )
    unknown = _touch_job(store, sprim_env, [{"use": "no.such.step"}])
    assert execute_job(unknown.id, store).error == "bad job parameters: unknown step 'no.such.step'"
    bug = _touch_job(store, sprim_env, [{"use": "test.touch", "with": {"crash": True}}])
    out = execute_job(bug.id, store)
    assert (
        out.state == "failed"
        and out.error == "test.touch: internal error (KeyError) — see worker log"
    )


def test_work_folders_of_dead_attempts_are_swept(sprim_env, store_url):
    from workers.core.config import settings
    from workers.platform import leases
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    live, dead_, done = _job(store), _job(store), _job(store)
    _running(store, live, f"w:{_HOST}:{os.getpid()}:1:a", 60)
    _running(store, dead_, f"w:{_HOST}:{_dead_pid()}:1:a", 60)
    _running(store, done, "w:x:1:1:a", 60)
    store.transition(done.id, "done")
    root = settings().work_dir
    names = [f"job-{live.id}-a1-0a0a", f"job-{live.id}-a0-0b0b", f"job-{dead_.id}-a1-0c0c",
             f"job-{done.id}-a1-0d0d", "job-999999-0e0e", "unrelated"]  # fmt: skip
    for n in names:
        (root / n / "in").mkdir(parents=True)
        (root / n / "in" / "x.dcm").write_bytes(b"PHI")
    assert leases.sweep_work(store) == 4
    assert sorted(p.name for p in root.iterdir()) == sorted([names[0], "unrelated"])


def test_embedded_queue_recovers_after_its_process_died(sprim_env, store_url):
    """A killed embedded `sprim listen` left a job running and one handed to its dead queue."""
    from workers.platform import inprocess
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    gone = _dead_pid()
    a = _touch_job(store, sprim_env, [{"use": "test.touch"}])
    _running(store, a, f"w:{_HOST}:{gone}:1:a", 60)  # lease still "valid"
    b = _touch_job(store, sprim_env, [{"use": "test.touch"}])
    store.transition(b.id, "queued", dispatched_at=time.time(), dispatched_to=f"p:{_HOST}:{gone}")
    c = _touch_job(store, sprim_env, [{"use": "test.touch"}])  # waiting behind a full window
    with _settings(SPRIM_RETRY_BACKOFF_S="0.1", SPRIM_RELEASE_INTERVAL_S="1"):
        disp = inprocess.InProcessDispatcher(store, background=True)
        disp.start()
        try:
            deadline = time.monotonic() + 30
            while {store.get(x.id).state for x in (a, b, c)} != {"done"}:
                assert time.monotonic() < deadline, [store.get(x.id) for x in (a, b, c)]
                time.sleep(0.1)
        finally:
            disp.stop()
    assert store.get(a.id).attempts == 2 and store.get(b.id).attempts == 1


@contextlib.contextmanager
def _settings(**env):
    from workers.core.config import settings

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    settings.cache_clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        settings.cache_clear()


def test_a_final_state_kept_through_a_store_outage_is_recorded_once(sprim_env, store_url):
    """CompletionPending.final (carried by a Celery retry message) records the job later;
    dropped when another attempt started since (that attempt records its own)."""
    from workers.platform import executor
    from workers.platform.jobstore import open_store

    store = open_store(store_url)
    j = _job(store)
    _running(store, j, "w:x:1:1:a", 60)
    final = {"state": "done", "attempt": 1, "detail": "2 objects stored",
             "values": {"outputs": [{"series_uid": "9", "instances": ["9.1", "9.2"]}],
                        "timings": {}, "error": None, "finished_at": time.time()}}  # fmt: skip
    out = executor.record_final(j.id, final, store, _NoDisp())
    assert out.state == "done" and out.outputs[0]["instances"] == ["9.1", "9.2"]
    assert out.lease_owner is None
    assert executor.record_final(j.id, final, store, _NoDisp()).state == "done"  # idempotent
    assert [a.to_state for a in store.audit_trail(job_id=j.id, event_="state")] == [
        "running",
        "done",
    ]
    k = _job(store)  # its lease lapsed meanwhile and attempt 2 runs: attempt 1's result is dropped
    _running(store, k, "w:x:1:1:a", 60)
    store.transition(k.id, "running", attempts=2, lease_owner="w:y:2:2:b")
    assert executor.record_final(k.id, final, store, _NoDisp()).state == "running"
