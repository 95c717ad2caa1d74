"""``sprim watch``: Orthanc change feed -> routing; own outputs ignored; killed and restarted
while studies arrive, it loses none and duplicates none.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from tests.harness.studies import copy_as_new_study
from workers.archives.dicomweb import DicomWebArchive
from workers.ingest.watch import Watcher, WatchState, state_path

SPRIM = str(Path(sys.executable).parent / "sprim")

NO_MATCH_RULES = """\
rules:
  - name: mr-only
    match:
      Modality: {in: [MR]}
    select_series:
      where: {NumberOfSeriesRelatedInstances: {gte: 1}}
    run:
      - {use: reformat.mpr}
"""


def _until(pred, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.mark.integration
def test_feed_submits_stable_studies_skips_own_outputs_and_resumes(orthanc, ct_files, tmp_path):
    subs: list[tuple[str, dict]] = []
    state = tmp_path / "state.json"
    w = Watcher(orthanc.url, state, lambda s, c: subs.append((s, c)))
    study, files = copy_as_new_study(ct_files[:4], tmp_path / "a", "watch-a")
    orthanc.storescu(files)
    assert _until(lambda: (w.poll_once(), len(subs) == 1)[1], 20)
    assert subs[0][0] == study and subs[0][1]["source_series"] == 1

    # sprim's own outputs stored back into the study: stable again, but not re-submitted
    _, own = copy_as_new_study(
        ct_files[:2],
        tmp_path / "own",
        "watch-a-own",
        edit=lambda ds: setattr(ds, "Manufacturer", "sprim"),
    )
    for p in own:  # same study as the source
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(p)
    DicomWebArchive(orthanc.dicomweb_url).store(own)
    skipped = w.skipped_count
    assert _until(lambda: (w.poll_once(), w.skipped_count > skipped)[1], 20)
    assert len(subs) == 1

    # a late source series re-triggers the study
    _, late = copy_as_new_study(ct_files[4:6], tmp_path / "late", "watch-a-late")
    for p in late:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(p)
    orthanc.storescu(late)
    assert _until(lambda: (w.poll_once(), len(subs) == 2)[1], 20)
    assert subs[1][0] == study and subs[1][1]["source_series"] == 2

    # a new watcher on the same state resumes after the last change: nothing again
    saved = WatchState.load(state)
    assert saved.since > 0 and saved.pending == {}
    w2 = Watcher(orthanc.url, state, lambda s, c: subs.append((s, c)))
    w2.poll_once()
    assert len(subs) == 2


def _jobs_by_study(home: Path) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    db = home / "jobs.db"
    if not db.exists():
        return {}
    eng = create_engine(f"sqlite:///{db}")
    try:
        with eng.connect() as c:
            rows = c.execute(text("select study_uid, count(*) from jobs group by study_uid")).all()
    except Exception:  # noqa: BLE001  (schema not created yet)
        return {}
    finally:
        eng.dispose()
    return dict(rows)


@pytest.mark.integration
def test_watch_killed_and_restarted_while_studies_arrive_loses_none_duplicates_none(
    orthanc, ct_files, tmp_path
):
    n = 10
    studies = [
        copy_as_new_study(ct_files[i * 2 : i * 2 + 2], tmp_path / f"s{i}", f"watch-kill-{i}")
        for i in range(n)
    ]
    home = tmp_path / "home"
    rules = tmp_path / "rules.yaml"
    rules.write_text(NO_MATCH_RULES)
    env = {
        **os.environ,
        "SPRIM_HOME": str(home),
        "SPRIM_RULES_FILE": str(rules),
        "SPRIM_ARCHIVE_URL": orthanc.dicomweb_url,
        "TCP_NODELAY": "1",
    }
    env.pop("SPRIM_BROKER_URL", None)
    env.pop("SPRIM_JOB_STORE_URL", None)
    logs = []

    def start() -> subprocess.Popen:
        log = open(tmp_path / f"watch-{len(logs)}.log", "w")  # noqa: SIM115
        logs.append(Path(log.name))
        return subprocess.Popen(
            [SPRIM, "watch", "--url", orthanc.url, "--interval", "0.2", "--from-start"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def sender() -> None:
        for _, files in studies:
            orthanc.storescu(files)
            time.sleep(0.4)

    proc = start()
    t = threading.Thread(target=sender)
    t.start()
    # kill it (no clean shutdown) as soon as it handed on a first study, while others arrive
    assert _until(lambda: "event=watch_submit" in logs[0].read_text(), 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(1.5)  # studies keep arriving and become stable while it is down
    proc = start()
    t.join(60)
    try:
        want = {s for s, _ in studies}
        assert _until(lambda: set(_jobs_by_study(home)) >= want, 60), _jobs_by_study(home)
        time.sleep(1.5)  # a late duplicate would show up here
        counts = _jobs_by_study(home)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert {s: counts.get(s) for s in want} == dict.fromkeys(want, 1)
    text = "".join(p.read_text() for p in logs)
    submitted = re.findall(r"event=watch_submit seq=\d+ study=(\S+)", text)
    resubmitted = re.findall(r"event=watch_resubmitted study=(\S+)", text)
    # every study handed on exactly once (a crash between write-ahead and hand-on resolves
    # through the job store, not by a second hand-on)
    assert sorted(submitted + resubmitted) == sorted(want)
    assert state_path(home, orthanc.url).exists()


@pytest.mark.parametrize("in_store", [True, False])
def test_pending_submission_after_a_crash_is_resolved_against_the_store(tmp_path, in_store):
    """Killed between write-ahead and hand-on: resubmitted only if routing has no trace of it."""
    state = tmp_path / "state.json"
    WatchState(since=41, pending={"1.2.3": "1.2.3:abcd"}).save(state)
    subs = []
    w = Watcher(
        "http://127.0.0.1:9",  # never contacted by recover()
        state,
        lambda s, c: subs.append((s, c)),
        already_submitted=lambda study, key: in_store and key == "1.2.3:abcd",
    )
    w.recover()
    assert subs == ([] if in_store else [("1.2.3", {"watch_key": "1.2.3:abcd", "recovered": True})])
    saved = WatchState.load(state)
    assert saved.pending == {} and saved.submitted == {"1.2.3": "abcd"} and saved.since == 41
