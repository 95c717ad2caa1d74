"""The archive loop end to end, every component real:

dcmtk ``storescu`` -> Orthanc -> ``sprim watch`` (change feed) -> routing -> RabbitMQ -> a
``celery -A tasks worker`` process -> WADO-RS fetch -> MPR -> STOW-RS -> derived series in the same
study in Orthanc (QIDO-RS), valid for ``dciodvfy``; sending the study again duplicates nothing;
Orthanc down during a job: the job retries and completes after it returns, never ``done`` before
its outputs are in Orthanc.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.harness.orthanc import OrthancServer, orthanc_available
from tests.harness.studies import copy_as_new_study
from tests.platform_kit import ROOT, VENV_BIN, drop_vhost, make_vhost, rabbit_ready
from workers.archives.dicomweb import DicomWebArchive
from workers.processing.testing import dciodvfy_errors

pytestmark = pytest.mark.integration
#: Orthanc outage during a job: 30 s, as the acceptance asks (SPRIM_TEST_OUTAGE_S to change).
OUTAGE_S = float(os.environ.get("SPRIM_TEST_OUTAGE_S", "30"))

MPR_RULES = """\
rules:
  - name: e2e-ct-mpr
    match:
      Modality: {in: [CT]}
    select_series:
      where:
        ImageType: {contains_all: [ORIGINAL, PRIMARY]}
        NumberOfSeriesRelatedInstances: {gte: 20}
      prefer: thinnest
    run:
      - {use: reformat.mpr}
"""
SLOW_RULES = """\
rules:
  - name: e2e-slow
    match:
      Modality: {in: [CT]}
    run:
      - {use: test.touch, with: {sleep_s: 3, label: "E2E SLOW"}}
"""


class Loop:
    """Orthanc + a Celery worker on a private RabbitMQ vhost + ``sprim watch`` processes."""

    def __init__(self, tmp: Path, orthanc: OrthancServer, vhost: str) -> None:
        self.tmp, self.orthanc = tmp, orthanc
        self.store_url = f"sqlite:///{tmp / 'jobs.db'}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TCP_NODELAY": "1",
            "SPRIM_HOME": str(tmp / "home"),
            "SPRIM_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            "SPRIM_JOB_STORE_URL": self.store_url,
            "SPRIM_ARCHIVE_URL": orthanc.dicomweb_url,
            "SPRIM_PLUGINS": "tests.platform_kit",
            "SPRIM_RETRY_BACKOFF_S": "1",
            "SPRIM_MAX_ATTEMPTS": "12",
            "SPRIM_RELEASE_INTERVAL_S": "2",
        }
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str], ready: bytes, env: dict) -> subprocess.Popen:
        logf = self.tmp / f"{name}.log"
        p = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=open(logf, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(p)
        deadline = time.monotonic() + 60
        while ready not in logf.read_bytes():
            assert p.poll() is None, logf.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.1)
        return p

    def start_worker(self) -> subprocess.Popen:
        args = [str(VENV_BIN / "celery"), "-A", "tasks", "worker", "-l", "info", "-c", "1",
                "-n", "e2e@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        return self._start("worker", args, b"ready.", self.env)

    def start_watch(self, rules: str, name: str) -> subprocess.Popen:
        f = self.tmp / f"{name}.yaml"
        f.write_text(rules)
        env = {**self.env, "SPRIM_RULES_FILE": str(f)}
        args = [str(VENV_BIN / "sprim"), "watch", "--url", self.orthanc.url, "--interval", "0.2"]
        return self._start(name, args, b"event=watch_started", env)

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def jobs(self, study_uid: str):
        from workers.platform.jobstore import JobStore

        store = JobStore(self.store_url)
        try:
            return store.list(study_uid=study_uid)
        except Exception:  # noqa: BLE001  (schema not created yet)
            return []
        finally:
            store.dispose()


def _until(pred, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    if not orthanc_available() or not shutil.which("storescu"):
        pytest.skip("Orthanc/DICOMweb plugin/dcmtk not installed (make sysdeps)")
    if not rabbit_ready():
        pytest.skip("RabbitMQ not running on 127.0.0.1:5672 (make services)")
    tmp = tmp_path_factory.mktemp("e2e")
    orthanc = OrthancServer(tmp / "orthanc", stable_age=1).start()
    vhost = make_vhost()
    lp = Loop(tmp, orthanc, vhost)
    try:
        lp.start_worker()
        yield lp
    finally:
        for p in lp.procs:
            lp.stop(p)
        orthanc.close()
        drop_vhost(vhost)


def _derived_series(orthanc: OrthancServer, study_uid: str) -> dict[str, int]:
    """SeriesInstanceUID -> instances of sprim's series in the study (Orthanc REST)."""
    return {
        s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
        for s in orthanc.series_of_study(study_uid)
        if s["MainDicomTags"].get("Manufacturer") == "sprim"
    }


def test_storescu_to_orthanc_to_derived_series_back_in_the_same_study(loop, ct_files, tmp_path):
    orthanc = loop.orthanc
    watch = loop.start_watch(MPR_RULES, "watch-mpr")
    try:
        t0 = time.monotonic()
        orthanc.storescu(ct_files)
        study_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)
        done = _until(
            lambda: [j for j in loop.jobs(study_uid) if j.state in ("done", "failed")], 240
        )
        assert done, (loop.tmp / "worker.log").read_text()[-3000:]
        [job] = done
        assert job.state == "done", job.error
        elapsed = time.monotonic() - t0
        # every output the job recorded is in Orthanc, in the source study
        derived = _derived_series(orthanc, study_uid)
        want = {o["series_uid"]: len(o["instances"]) for o in job.outputs}
        assert want and derived == want, (derived, want)
        # QIDO-RS sees them in the same study; WADO-RS download passes dciodvfy
        archive = DicomWebArchive(orthanc.dicomweb_url)
        rows = {s["SeriesInstanceUID"]: s for s in archive.series_of_study(study_uid)}
        assert set(want) <= set(rows)
        for uid in want:
            assert "DERIVED" in rows[uid]["ImageType"]
            files = sorted(archive.fetch_series(study_uid, uid, tmp_path / uid))
            for f in {files[0], files[len(files) // 2], files[-1]}:
                assert dciodvfy_errors(f) == [], f
        # the same study again: no new job, no duplicate series
        n_series = len(orthanc.series_of_study(study_uid))
        orthanc.storescu(ct_files)
        time.sleep(4)  # StableAge 1 s + feed poll + routing
        assert len(orthanc.series_of_study(study_uid)) == n_series
        assert len(loop.jobs(study_uid)) == 1
        assert _derived_series(orthanc, study_uid) == want
        print(f"e2e: {len(ct_files)} slices sent -> {sum(want.values())} derived in {elapsed:.1f}s")
    finally:
        loop.stop(watch)


def test_orthanc_down_during_a_job_retries_and_completes_after_it_returns(loop, ct_files, tmp_path):
    orthanc = loop.orthanc
    study_uid, files = copy_as_new_study(ct_files[:30], tmp_path / "src", "e2e-outage")
    watch = loop.start_watch(SLOW_RULES, "watch-slow")
    try:
        orthanc.storescu(files)
        running = _until(lambda: [j for j in loop.jobs(study_uid) if j.state == "running"], 120)
        assert running, loop.jobs(study_uid)
        orthanc.stop()  # while the job runs its 3 s step: its store must fail
        t_down = time.monotonic()
        try:
            while time.monotonic() - t_down < OUTAGE_S:
                states = {j.state for j in loop.jobs(study_uid)}
                assert "done" not in states, "job done while its archive was down"
                assert "failed" not in states, [j.error for j in loop.jobs(study_uid)]
                time.sleep(0.5)
        finally:
            orthanc.start()
        done = _until(
            lambda: [j for j in loop.jobs(study_uid) if j.state in ("done", "failed")],
            OUTAGE_S + 120,
        )
        assert done, loop.jobs(study_uid)
        [job] = done
        assert job.state == "done", job.error
        assert job.attempts >= 2
        want = {o["series_uid"]: len(o["instances"]) for o in job.outputs}
        assert _derived_series(orthanc, study_uid) == want
    finally:
        loop.stop(watch)
