"""``sprim listen``: allow-list, durable store before success, malformed data, concurrency, quiet period.

Peers are the real dcmtk ``storescu`` and a real pynetdicom SCU; the listener is the real SCP.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config

from tests.harness.orthanc import send
from workers.archive.folder import FolderArchive
from workers.listener import PENDING_MARK, Listener, ListenerStore

pytestmark = pytest.mark.integration
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture
def listener(tmp_path):
    arrivals = []
    store = ListenerStore(tmp_path / "store", quiet_period=0.5, on_complete=arrivals.append)
    lst = Listener(store, port=0, allowed_aets=["MODALITY", "PACS"]).start()
    lst.arrivals = arrivals
    yield lst
    lst.stop()


def _stored(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if not p.name.startswith("."))


def test_allowed_ae_stores_every_instance_before_success(listener, ct_files, dcmtk):
    files = ct_files[:20]
    send(files, "127.0.0.1", listener.port, called="SPRIM", calling="MODALITY")
    # storescu returned: every C-STORE got success, so every file must already be on disk
    stored = _stored(listener.store.root)
    assert len(stored) == 20
    got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in stored}
    want = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert got == want
    # the bytes are the sender's (no re-encoding): pixel data identical
    a = pydicom.dcmread(files[0])
    b = pydicom.dcmread(
        listener.store.root / a.StudyInstanceUID / a.SeriesInstanceUID / f"{a.SOPInstanceUID}.dcm"
    )
    assert a.PixelData == b.PixelData


def test_unknown_ae_is_refused_at_association(listener, ct_files, dcmtk, caplog):
    caplog.set_level(logging.INFO, logger="workers.listener")
    r = send(
        ct_files[:2], "127.0.0.1", listener.port, called="SPRIM", calling="INTRUDER", check=False
    )
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr
    assert _stored(listener.store.root) == []
    assert any("association_rejected" in m and "INTRUDER" in m for m in caplog.messages)


def _malformed_files(tmp: Path) -> list[Path]:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    meta.TransferSyntaxUID = EXPLICIT_LE
    out = []
    for name, body in {
        # an element claiming 65520 bytes in a 5-byte data set
        "truncated.dcm": struct.pack("<HH", 0x0008, 0x0016)
        + b"UI"
        + struct.pack("<H", 0xFFF0)
        + b"1.2.3",
        "garbage.dcm": b"\xde\xad\xbe\xef" * 64,
    }.items():
        buf = BytesIO()
        buf.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)
        buf.write(body)
        (tmp / name).write_bytes(buf.getvalue())
        out.append(tmp / name)
    return out


def test_malformed_dataset_gets_failure_status_and_listener_keeps_serving(
    listener, ct_files, tmp_path, caplog, dcmtk
):
    caplog.set_level(logging.WARNING, logger="workers.listener")
    good = pydicom.dcmread(ct_files[0])
    good.file_meta.TransferSyntaxUID = EXPLICIT_LE
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    ae = AE("PACS")
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, undecoded
    try:
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="SPRIM")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in _malformed_files(tmp_path)]
        # same association goes on: a good instance afterwards is stored
        ok = int(assoc.send_c_store(tmp_path / "good.dcm").Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert all(s in (0xA900, 0xC210) for s in statuses), [hex(s) for s in statuses]
    assert ok == 0x0000
    assert sum("instance_refused" in m for m in caplog.messages) == 2
    # and a new association from dcmtk is served too
    send(ct_files[1:3], "127.0.0.1", listener.port, called="SPRIM", calling="MODALITY")
    assert len(_stored(listener.store.root)) == 3


def test_concurrent_associations(listener, ct_files, dcmtk):
    chunks = [ct_files[i::3][:12] for i in range(3)]
    from tests.harness.orthanc import dcmtk_env

    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "MODALITY", "-aec", "SPRIM", "127.0.0.1", str(listener.port)]
            + [str(f) for f in chunk],
            env=dcmtk_env(),
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert len(_stored(listener.store.root)) == 36
    assert listener.store.received == 36


def test_quiet_period_hands_on_each_study_once_and_a_late_series_again(
    listener, ct_files, tmp_path, dcmtk
):
    send(ct_files[:10], "127.0.0.1", listener.port, called="SPRIM", calling="MODALITY")
    assert _wait(lambda: len(listener.arrivals) == 1, 10)
    first = listener.arrivals[0]
    assert first.instances == 10 and first.calling_aets == {"MODALITY"} and len(first.series) == 1
    assert not (first.folder / PENDING_MARK).exists()
    time.sleep(1.0)  # quiet: nothing is handed on twice
    assert len(listener.arrivals) == 1
    # a late series of the same study re-arms it
    late = []
    for i, f in enumerate(ct_files[:3]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4242"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.4242.{i + 1}"
        ds.save_as(tmp_path / f"late{i}.dcm")
        late.append(tmp_path / f"late{i}.dcm")
    send(late, "127.0.0.1", listener.port, called="SPRIM", calling="PACS")
    assert _wait(lambda: len(listener.arrivals) == 2, 10)
    assert listener.arrivals[1].study_uid == first.study_uid
    assert listener.arrivals[1].calling_aets == {"PACS"}
    # the store reads as a folder archive: both series, right counts
    series = FolderArchive(listener.store.root).series_of_study(first.study_uid)
    assert sorted(s["NumberOfSeriesRelatedInstances"] for s in series) == [3, 10]


def test_restart_resumes_studies_not_yet_handed_on(tmp_path, ct_files, dcmtk):
    root = tmp_path / "store"
    store = ListenerStore(root, quiet_period=60, on_complete=lambda a: None)
    with Listener(store, port=0) as lst:
        send(ct_files[:3], "127.0.0.1", lst.port, called="SPRIM", calling="MODALITY")
    assert len(list(root.glob(f"*/{PENDING_MARK}"))) == 1  # stopped before its quiet period ended
    arrivals = []
    store2 = ListenerStore(root, quiet_period=0.2, on_complete=arrivals.append)
    assert len(store2.open_studies) == 1
    with Listener(store2, port=0):
        assert _wait(lambda: len(arrivals) == 1, 10)
    assert arrivals[0].calling_aets == {"MODALITY"}
    assert list(root.glob(f"*/{PENDING_MARK}")) == []


MPR_RULES = """\
rules:
  - name: listen-ct-mpr
    match:
      Modality: {in: [CT]}
    select_series:
      where: {NumberOfSeriesRelatedInstances: {gte: 20}}
    run:
      - {use: reformat.mpr}
"""


def test_sprim_listen_routes_a_quiet_study_and_writes_back_into_its_store(
    tmp_path, ct_files, dcmtk
):
    """`sprim listen` as a process (embedded: job store, in-process jobs): C-STORE in, quiet
    period, routing, MPR, outputs stored into the listener's store (the study's archive)."""
    import os
    import signal
    import sys

    from tests.harness.orthanc import free_port
    from workers.jobstore import JobStore

    rules = tmp_path / "rules.yaml"
    rules.write_text(MPR_RULES)
    port = free_port()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "SPRIM_HOME": str(home),
        "SPRIM_RULES_FILE": str(rules),
        "TCP_NODELAY": "1",
    }
    for k in ("SPRIM_BROKER_URL", "SPRIM_JOB_STORE_URL", "SPRIM_ARCHIVE_URL"):
        env.pop(k, None)
    log = tmp_path / "listen.log"
    exe = str(Path(sys.executable).parent / "sprim")
    args = [
        exe,
        "listen",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--allow",
        "MODALITY",
        "--quiet",
        "1",
    ]
    p = subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        assert _wait(lambda: b"event=listen_started" in log.read_bytes(), 60), log.read_text()
        send(ct_files[:40], "127.0.0.1", port, called="SPRIM", calling="MODALITY")

        def finished():
            if not (home / "jobs.db").exists():
                return []
            try:
                return [
                    j
                    for j in JobStore(f"sqlite:///{home / 'jobs.db'}").list()
                    if j.state in ("done", "failed")
                ]
            except Exception:  # noqa: BLE001  (schema being created)
                return []

        assert _wait(finished, 180), log.read_text()[-3000:]
        [job] = finished()
        assert job.state == "done", job.error
        assert job.context.get("calling_ae") == "MODALITY"
        store = FolderArchive(home / "incoming")
        series = store.series_of_study(job.study_uid)
        derived = {
            s["SeriesInstanceUID"]: s["NumberOfSeriesRelatedInstances"]
            for s in series
            if s["SeriesInstanceUID"] != job.series_uid
        }
        assert derived == {o["series_uid"]: len(o["instances"]) for o in job.outputs}
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    assert b"event=listen_stopped" in log.read_bytes()
