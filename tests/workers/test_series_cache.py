"""One fetch and one read per series, storing while computing (issue 13), on a real Orthanc.

Fetches are counted by Orthanc itself (its verbose log names every WADO-RS request), stores by
what QIDO-RS finds afterwards; jobs run the real path: fetch -> read_series -> run_steps -> store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

from tests.harness.orthanc import OrthancServer
from tests.harness.studies import copy_as_new_study
from tests.platform_kit import ROOT

N_SLICES = 24


@pytest.fixture
def env(tmp_path, orthanc, monkeypatch):
    """SQLite job store, the test step, SPRIM_HOME in tmp; Orthanc logging every request."""
    from workers.core.config import settings
    from workers.platform import dispatcher, inprocess, submission
    from workers.platform.seriescache import MEMO

    values = {
        "SPRIM_HOME": str(tmp_path / "home"),
        "SPRIM_JOB_STORE_URL": f"sqlite:///{tmp_path / 'jobs.db'}",
        "SPRIM_PLUGINS": "tests.platform_kit",
        "SPRIM_ARCHIVE_URL": orthanc.dicomweb_url,
        "SPRIM_MAX_ATTEMPTS": "3",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SPRIM_BROKER_URL", raising=False)
    settings.cache_clear()
    dispatcher.set_dispatcher(inprocess.InProcessDispatcher())
    submission._ARCHIVES.clear()
    MEMO.clear()
    requests.put(orthanc.url + "/tools/log-level", data="verbose", timeout=10).raise_for_status()
    yield values
    requests.put(orthanc.url + "/tools/log-level", data="default", timeout=10)
    MEMO.clear()
    settings.cache_clear()


def _send(orthanc, ct_files, tmp_path, tag: str) -> tuple[str, str, list]:
    study, files = copy_as_new_study(ct_files[:N_SLICES], tmp_path / tag, tag)
    orthanc.storescu(files)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return study, series, files


def _wado_series_gets(orthanc, series_uid: str) -> int:
    """WADO-RS retrievals of the whole series, as Orthanc logged them."""
    pat = re.compile(rf"\(http\) GET /dicom-web/studies/[\d.]+/series/{re.escape(series_uid)}$")
    return sum(bool(pat.search(ln)) for ln in orthanc.log_path.read_text().splitlines())


def _job(store, orthanc, study, series, steps, rule="r"):
    return store.create_job(rule=rule, study_uid=study, series_uid=series, institution="A",
                            archive=orthanc.dicomweb_url, steps=steps)  # fmt: skip


def _touch(label: str, **kw) -> dict:
    return {"use": "test.touch", "with": {"label": label, **kw}}


def _in_orthanc(orthanc, study: str, outputs: list[dict]) -> dict[str, set[str]]:
    """SOPInstanceUIDs Orthanc holds for each output series (its REST API)."""
    found = {}
    for o in outputs:
        hit = requests.post(orthanc.url + "/tools/lookup", data=o["series_uid"], timeout=10).json()
        ids = [h["ID"] for h in hit if h["Type"] == "Series"]
        tags = orthanc.get(f"/series/{ids[0]}/instances").json() if ids else []
        found[o["series_uid"]] = {t["MainDicomTags"]["SOPInstanceUID"] for t in tags}
    return found


RUN_JOBS = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from workers.platform.executor import execute_job
for job_id in map(int, sys.argv[1:]):
    j = execute_job(job_id)
    print(json.dumps({"id": j.id, "state": j.state, "error": j.error}))
"""


def test_rules_of_one_series_share_one_fetch_across_processes(env, orthanc, ct_files, tmp_path):
    """Three rules' jobs on one series in two worker processes: Orthanc serves the series once;
    each job keeps its own outputs (UIDs per rule), all stored."""
    from workers.platform.jobstore import open_store

    study, series, _ = _send(orthanc, ct_files, tmp_path, "cache-share")
    store = open_store()
    jobs = [_job(store, orthanc, study, series, [_touch(f"R{k}")], rule=f"rule-{k}")
            for k in range(3)]  # fmt: skip
    penv = {**os.environ, "PYTHONPATH": str(ROOT), "TCP_NODELAY": "1"}
    cmd = [sys.executable, "-c", RUN_JOBS]
    a = subprocess.Popen([*cmd, str(jobs[0].id), str(jobs[2].id)], env=penv, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    b = subprocess.Popen([*cmd, str(jobs[1].id)], env=penv, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == b.returncode == 0, err_a[-2000:] + err_b[-2000:]
    results = [json.loads(ln) for ln in (out_a + out_b).splitlines()]
    assert [r["state"] for r in results] == ["done"] * 3, err_a[-3000:]
    assert _wado_series_gets(orthanc, series) == 1
    how = re.findall(r"event=series_loaded series=\S+ how=(\w+)", err_a + err_b)
    memo = re.findall(r"event=series_memo_hit", err_a)
    # one process fetched, the other read the shared copy; the third job reused its own read
    assert sorted(how) == ["cache", "fetch"] and len(memo) == 1, (how, memo)
    done = [store.get(j.id) for j in jobs]
    uids = [d.outputs[0]["series_uid"] for d in done]
    assert len(set(uids)) == 3  # per-rule provenance and UIDs
    for d in done:
        assert d.outputs[0]["series_description"].startswith(f"R{d.rule[-1]} [")
        stored = _in_orthanc(orthanc, study, d.outputs)
        assert stored == {o["series_uid"]: set(o["instances"]) for o in d.outputs}
        assert all(len(v) == N_SLICES for v in stored.values())


def test_a_series_changed_since_is_fetched_again(env, orthanc, ct_files, tmp_path):
    """An instance added after a job read the series: the next job fetches and reads the new
    content (new key), never the cached or remembered copy."""
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store

    study, files = copy_as_new_study(ct_files[: N_SLICES + 1], tmp_path / "src", "cache-change")
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    orthanc.storescu(files[:N_SLICES])
    store = open_store()
    first = execute_job(_job(store, orthanc, study, series, [_touch("A")]).id, store)
    again = execute_job(_job(store, orthanc, study, series, [_touch("B")]).id, store)
    assert first.state == again.state == "done"
    assert _wado_series_gets(orthanc, series) == 1  # same content: served from the memo
    orthanc.storescu(files[N_SLICES:])  # the late slice
    later = execute_job(_job(store, orthanc, study, series, [_touch("C")]).id, store)
    assert later.state == "done", later.error
    assert _wado_series_gets(orthanc, series) == 2
    assert [len(j.outputs[0]["instances"]) for j in (first, again, later)] == [
        N_SLICES, N_SLICES, N_SLICES + 1,
    ]  # fmt: skip
    entries = sorted(p.name for p in (Path(env["SPRIM_HOME"]) / "cache" / "series").iterdir()
                     if p.is_dir())  # fmt: skip
    assert len(entries) == 2 and all(e.startswith(series) for e in entries)


def test_a_cached_series_is_fetched_again_after_its_time(env, orthanc, ct_files, tmp_path,
                                                        monkeypatch):  # fmt: skip
    """Past SPRIM_SERIES_CACHE_S an entry is not used (an archive may overwrite instances in
    place, same count): the series is fetched again."""
    from workers.core.config import settings
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store
    from workers.platform.seriescache import MEMO

    monkeypatch.setenv("SPRIM_SERIES_CACHE_S", "1")
    settings.cache_clear()
    study, series, _ = _send(orthanc, ct_files, tmp_path, "cache-age")
    store = open_store()
    assert execute_job(_job(store, orthanc, study, series, [_touch("A")]).id, store).state == "done"
    MEMO.clear()  # another process
    time.sleep(1.2)
    assert execute_job(_job(store, orthanc, study, series, [_touch("B")]).id, store).state == "done"
    assert _wado_series_gets(orthanc, series) == 2


def test_a_series_evicted_between_fetch_and_read_is_fetched_again(env, orthanc, ct_files, tmp_path):
    """Another process evicts the entry after this one fetched it and before it reads: the job
    fetches once more (without waiting on its own cache lock) and reads the whole series."""
    import shutil

    from workers.archives import open_archive
    from workers.platform.seriescache import cache_root, load_series

    study, series, _ = _send(orthanc, ct_files, tmp_path, "cache-evicted")
    evictions = []

    def evict_once():  # on_read: called between fetch and read
        if not evictions:
            for p in cache_root().iterdir():  # as _evict does: the entry, then its lock file
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                evictions.append(p.name)

    got = {}
    archive = open_archive(orthanc.dicomweb_url)

    def load():
        got["loaded"] = load_series(archive, study, series, tmp_path / "job", evict_once)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "load_series waits on its own cache lock"
    loaded = got["loaded"]
    assert sorted(e.endswith(".lock") for e in evictions) == [False, True]
    assert loaded.how == "fetch" and loaded.source.series_uid == series
    assert loaded.source.volume.image.GetSize()[2] == N_SLICES
    assert _wado_series_gets(orthanc, series) == 2
    assert (cache_root() / f"{series}-{loaded.key}" / ".complete").exists()


def test_outputs_are_stored_while_later_steps_compute(env, orthanc, ct_files, tmp_path, caplog):
    """The first output is confirmed in Orthanc before the slow second step ends; the job is
    done only with both in Orthanc; no store thread outlives the job."""
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store

    study, series, _ = _send(orthanc, ct_files, tmp_path, "store-overlap")
    store = open_store()
    job = _job(store, orthanc, study, series, [_touch("FIRST"), _touch("SLOW", sleep_s=3.0)])
    with caplog.at_level(logging.INFO, logger="sprim.jobs"):
        done = execute_job(job.id, store)
    assert done.state == "done", done.error
    ends = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"event=output_stored step=test.touch output='(\w+)' instances=\d+ started=[\d.]+ "
        r"ended=([\d.]+)", caplog.text)}  # fmt: skip
    assert set(ends) == {"FIRST", "SLOW"}
    slow_s = done.timings["test.touch"]
    assert slow_s >= 3.0
    # FIRST was stored during SLOW's 3 s sleep: well before the job finished
    assert ends["FIRST"] < done.finished_at - 2.0, (ends, done.finished_at)
    assert ends["SLOW"] <= done.finished_at
    m = re.search(r"event=stores outputs=2 during_steps_s=([\d.]+)", caplog.text)
    assert m and float(m.group(1)) > 0
    stored = _in_orthanc(orthanc, study, done.outputs)
    assert stored == {o["series_uid"]: set(o["instances"]) for o in done.outputs}
    assert [t.name for t in threading.enumerate() if t.name.startswith("store-job")] == []
    assert done.last_step == "store"  # the lease followed the steps, then the stores' wait


def test_an_output_the_archive_refuses_fails_alone(env, ct_files, tmp_path):
    """An Orthanc filter drops one output: that output fails with the archive's reason, the
    other is stored and recorded (partial), as for any other output failure."""
    from workers.platform.executor import execute_job
    from workers.platform.jobstore import open_store

    lua = tmp_path / "filter.lua"
    lua.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        "  return string.find(dicom.SeriesDescription or '', '^REFUSE ') == nil\nend\n"
    )
    with OrthancServer(tmp_path / "picky", extra={"LuaScripts": [str(lua)]}) as picky:
        study, series, _ = _send(picky, ct_files, tmp_path, "store-refused")
        store = open_store()
        steps = [_touch("REFUSE"), _touch("KEPT", sleep_s=0.5)]
        out = execute_job(_job(store, picky, study, series, steps).id, store)
        assert out.state == "partial", out.error
        assert [o["series_description"].split(" [")[0] for o in out.outputs] == ["KEPT"]
        assert out.error.startswith("test.touch (REFUSE): archive: instance ")
        assert "absent after STOW-RS success (dropped by an archive filter?)" in out.error
        stored = _in_orthanc(picky, study, out.outputs)
        assert stored == {o["series_uid"]: set(o["instances"]) for o in out.outputs}


def test_archive_down_mid_job_requeues_then_completes(env, orthanc, ct_files, tmp_path):
    """Orthanc stops after the first output is stored, during the second step: the attempt
    ends transient and the job waits for a retry (never done); the retry stores everything."""
    from workers.platform.executor import execute_job
    from workers.platform.jobmodels import JobRow
    from workers.platform.jobstore import open_store

    study, series, _ = _send(orthanc, ct_files, tmp_path, "store-outage")
    store = open_store()
    job = _job(store, orthanc, study, series, [_touch("UP"), _touch("DOWN", sleep_s=3.0)])
    stopped = threading.Event()

    def stop_when_first_is_stored() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(s["MainDicomTags"].get("SeriesDescription", "").startswith("UP ")
                   for s in orthanc.series_of_study(study)):  # fmt: skip
                orthanc.stop()
                stopped.set()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=stop_when_first_is_stored)
    watcher.start()
    try:
        out = execute_job(job.id, store)
    finally:
        watcher.join()
        orthanc.start()
    assert stopped.is_set()
    assert out.state == "queued" and out.error.startswith("archive transient error:"), out.error
    assert out.outputs == []
    with store.Session.begin() as s:  # its retry time comes
        s.get(JobRow, job.id).not_before = time.time() - 1
    done = execute_job(job.id, store)
    assert done.state == "done" and done.attempts == 2, done.error
    assert [o["series_description"].split(" [")[0] for o in done.outputs] == ["UP", "DOWN"]
    stored = _in_orthanc(orthanc, study, done.outputs)
    assert stored == {o["series_uid"]: set(o["instances"]) for o in done.outputs}


TWO_RULES = """
rules:
  - name: first
    match: {Modality: {in: [CT]}}
    run: [{use: test.touch, with: {label: ONE}}]
  - name: second
    match: {Modality: {in: [CT]}}
    run: [{use: test.touch, with: {label: TWO}}]
"""


def test_sprim_run_reads_a_series_once_for_all_its_rules(ct_files, tmp_path, monkeypatch):
    """Offline too: two rules on one series, one read (counted at the reader, which still
    reads), each rule its own outputs."""
    import tests.platform_kit  # noqa: F401  (registers test.touch)
    from workers.processing import offline

    _, files = copy_as_new_study(ct_files[:N_SLICES], tmp_path / "in", "offline-once")
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_RULES)
    reads = []
    real = offline.read_series
    monkeypatch.setattr(offline, "read_series", lambda s: reads.append(s) or real(s))
    summary = offline.run([tmp_path / "in"], tmp_path / "out", plan_fn=offline.plan_rules(rules))
    assert [(j.rule, j.state) for j in summary.jobs] == [("first", "done"), ("second", "done")]
    assert len(reads) == 1
    series = {o["series_uid"] for j in summary.jobs for s in j.steps for o in s["outputs"]}
    assert len(series) == 2
