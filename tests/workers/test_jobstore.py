"""Job store on SQLite and PostgreSQL: migrations, state machine, audit, fair release, routing."""

from __future__ import annotations

import json
import threading
import time

from tests.platform_kit import write_study


def _job(store, inst="A", prio=1, **kw):
    return store.create_job(study_uid=kw.pop("study_uid", "1.2"), institution=inst, priority=prio,
                            steps=[], **kw)  # fmt: skip


def test_migrations_are_idempotent_and_reach_head(store):
    store.migrate()
    with store.engine.connect() as c:
        from sqlalchemy import text

        assert c.execute(text("select version_num from alembic_version")).scalar() == "0001"


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
    from workers import jobs
    from workers.archive.folder import FolderArchive
    from workers.jobstore import open_store

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, _ = write_study(sprim_env / "archive" / "in", modality="MR", institution="SITE A")
    [rec] = jobs.submit_study(st, archive, {"calling_ae": "MRI1"})
    assert rec.state == "no_match" and rec.error is None and rec.steps == []
    assert "Modality: 'MR' not in ['CT']" in rec.context["why"]
    assert jobs.submit_study(st, archive, {}) == []  # recorded once
    store = open_store(store_url)
    assert store.list(state="failed", study_uid=st) == []


def test_job_runs_real_path_in_process_and_repeat_replaces(sprim_env, store_url):
    from workers import jobs
    from workers.archive.folder import FolderArchive
    from workers.jobstore import open_store
    from workers.reprocess import reprocess

    archive = FolderArchive(sprim_env / "archive", name="local")
    st, se = write_study(sprim_env / "archive" / "in", institution="SITE A")
    [j] = jobs.submit_study(st, archive, {})
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
    from workers.archive.folder import FolderArchive
    from workers.jobs import archive_spec, execute_job
    from workers.jobstore import open_store

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
    from workers import jobs
    from workers.archive import ArchiveError
    from workers.config import settings
    from workers.jobstore import open_store

    class Down:
        name = "down"

        def fetch_series(self, *a):
            raise ArchiveError("connection refused", transient=True)

    monkeypatch.setitem(jobs._ARCHIVES, "down://", Down())
    monkeypatch.setenv("SPRIM_MAX_ATTEMPTS", "5")
    settings.cache_clear()
    store = open_store(store_url)
    j = store.create_job(rule="t", study_uid="1", series_uid="2", institution="A", archive="down://",
                         steps=[{"use": "test.touch"}])  # fmt: skip
    delays = []
    for _ in range(4):
        try:
            jobs.execute_job(j.id, store)
        except jobs.RetryLater as e:
            delays.append(e.delay_s)
    assert delays == [2.0, 4.0, 8.0, 16.0]
    assert store.get(j.id).state == "queued"
    out = jobs.execute_job(j.id, store)
    assert out.state == "failed" and "after 5 attempts" in out.error


def test_late_series_retriggers_after_quiet_period(sprim_env, store_url):
    from workers import jobs
    from workers.archive.folder import FolderArchive
    from workers.jobstore import open_store

    disp = jobs.InProcessDispatcher(background=True)
    archive = FolderArchive(sprim_env / "archive", name="local")
    st, first = write_study(sprim_env / "archive" / "in", slice_thickness=2.0)
    store = open_store(store_url)
    seq1 = jobs.notify_study(st, archive, {}, disp=disp)
    write_study(sprim_env / "archive" / "late", study_uid=st, slice_thickness=1.0)  # late, thinner
    seq2 = jobs.notify_study(st, archive, {}, disp=disp)
    assert seq2 == seq1 + 1
    deadline = time.monotonic() + 20
    while not [j for j in store.list(study_uid=st) if j.state == "done"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the superseded routing (seq1) must not have created anything
    jobs_ = store.list(study_uid=st)
    assert len(jobs_) == 1 and jobs_[0].series_uid != first  # the thinner late series won
    assert any(a.detail for a in store.audit_trail(job_id=jobs_[0].id))


def test_rules_simulate_over_known_studies(sprim_env, store_url):
    from typer.testing import CliRunner

    from tasks.cli import app
    from workers import jobs
    from workers.archive.folder import FolderArchive

    archive = FolderArchive(sprim_env / "archive", name="local")
    ct, _ = write_study(sprim_env / "archive" / "ct", institution="SITE A")
    mr, _ = write_study(sprim_env / "archive" / "mr", modality="MR", institution="SITE B")
    jobs.submit_study(ct, archive, {})
    jobs.submit_study(mr, archive, {})
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
    from workers import jobs
    from workers.archive.folder import FolderArchive
    from workers.config import settings
    from workers.jobstore import open_store

    regional = sprim_env / "regional"
    monkeypatch.setenv("SPRIM_DESTINATIONS", json.dumps({"SITE B": str(regional)}))
    settings.cache_clear()
    archive = FolderArchive(sprim_env / "archive", name="local")
    st, _ = write_study(sprim_env / "archive" / "in", institution="SITE B")
    [j] = jobs.submit_study(st, archive, {})
    done = open_store(store_url).get(j.id)
    assert done.state == "done", done.error
    out_uid = done.outputs[0]["series_uid"]
    assert len(list((regional / st / out_uid).glob("*.dcm"))) == 3
    assert not (sprim_env / "archive" / st / out_uid).exists()
