"""`sprim listen` durability and its own DICOM upper layer (issue 13 item 4).

- every instance acknowledged to dcmtk ``storescu`` is on disk, with the sender's bytes, when
  the listener process is killed with SIGKILL right after ``storescu`` returned;
- the directory fsyncs are group-committed: every write returns only after an fsync of its
  folder that *started after its rename*, and concurrent writes into one series share fsyncs;
- C-ECHO, an unknown presentation context, more associations than allowed.

Behaviour only; the receive time vs ``storescp`` is in ``bench.bench_archive``.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.harness.orthanc import dcmtk_env, free_port
from workers.ingest import listener as listener_mod
from workers.ingest.listener import Listener, ListenerStore

pytestmark = pytest.mark.integration
IMPLICIT_LE = "1.2.840.10008.1.2"


def _data_set_bytes(path: Path) -> bytes:
    """A Part 10 file's data set bytes (after preamble, DICM and the file meta group)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR LE: tag 4 + VR 2 + length 2, then the 4-byte value
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return raw[132 + 12 + group_length :]


def _wait(pred, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _storescu(port: int, files: list[Path], called: str) -> subprocess.CompletedProcess:
    # -xi: propose Implicit VR LE only, the files' own syntax (no conversion by storescu)
    return subprocess.run(
        [shutil.which("storescu") or "storescu", "-xi", "-aet", "MODALITY", "-aec", called,
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=300,
    )  # fmt: skip


def _sent_by_storescu(files: list[Path], tmp: Path) -> dict[str, bytes]:
    """What storescu puts on the wire for each file (it re-encodes some values): as dcmtk
    ``storescp --bit-preserving`` records it. SOP Instance UID -> data set bytes."""
    port, out = free_port(), tmp / "storescp"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "+B", "-od", str(out), str(port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        r = _storescu(port, files, "STORESCP")
        assert r.returncode == 0, r.stderr
    finally:
        scp.terminate()
        scp.wait(20)
    return {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: _data_set_bytes(f)
        for f in out.iterdir()
    }


def test_every_acknowledged_instance_survives_kill_9(tmp_path, ct_files, dcmtk):
    """SIGKILL the `sprim listen` process as soon as storescu reports success for every
    instance: each acknowledged instance is at its place with the bytes the sender sent."""
    files = ct_files[:60]
    sent = _sent_by_storescu(files, tmp_path)
    assert len(sent) == len(files)
    port, store = free_port(), tmp_path / "incoming"
    log = tmp_path / "listen.log"
    env = {**os.environ, "SPRIM_HOME": str(tmp_path / "home")}
    for k in ("SPRIM_BROKER_URL", "SPRIM_JOB_STORE_URL", "SPRIM_ARCHIVE_URL"):
        env.pop(k, None)
    exe = str(Path(sys.executable).parent / "sprim")
    p = subprocess.Popen(
        [exe, "listen", "--port", str(port), "--host", "127.0.0.1", "--allow", "MODALITY",
         "--store", str(store), "--quiet", "3600"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    try:
        assert _wait(lambda: b"event=listen_started" in log.read_bytes()), log.read_text()
        r = _storescu(port, files, "SPRIM")
        p.send_signal(signal.SIGKILL)
        assert r.returncode == 0, r.stderr
    finally:
        p.kill()
        p.wait(20)
    assert p.returncode == -signal.SIGKILL
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        stored = store / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert stored.is_file(), f"acknowledged {f.name} is not on disk"
        assert _data_set_bytes(stored) == sent[ds.SOPInstanceUID], f"{f.name}: bytes differ"
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == IMPLICIT_LE
        assert meta.SourceApplicationEntityTitle == "MODALITY"
    leftovers = [q.name for q in store.rglob(".*.tmp")]
    assert leftovers == []


def test_directory_fsyncs_are_group_committed_before_each_answer(tmp_path, monkeypatch):
    """Concurrent writes into one series folder: each returns after an fsync of the folder
    that began after its own rename; together they need fewer fsyncs than instances."""
    events: list[tuple[str, float, float, Path]] = []
    lock = threading.Lock()
    real_fsync_dir, real_replace = listener_mod._fsync_dir, os.replace

    def fsync_dir(path: Path) -> None:
        t0 = time.perf_counter()
        time.sleep(0.01)  # a slow disk: others rename meanwhile
        real_fsync_dir(path)
        with lock:
            events.append(("fsync", t0, time.perf_counter(), Path(path)))

    def replace(src, dst):
        real_replace(src, dst)
        with lock:
            events.append(("rename", time.perf_counter(), 0.0, Path(dst)))

    monkeypatch.setattr(listener_mod, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(listener_mod.os, "replace", replace)
    store = ListenerStore(tmp_path / "store", quiet_period=3600)
    store.write("1.2.3", "1.2.3.4", "1.2.3.4.0", b"x" * 100, "PACS")  # folder exists
    returned: dict[str, float] = {}

    def one(i: int) -> None:
        sop = f"1.2.3.4.{i + 1}"
        store.write("1.2.3", "1.2.3.4", sop, b"y" * 1000, "PACS")
        returned[sop] = time.perf_counter()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    series_dir = tmp_path / "store" / "1.2.3" / "1.2.3.4"
    fsyncs = [(s, e) for kind, s, e, p in events if kind == "fsync" and p == series_dir]
    for sop, done in returned.items():
        [renamed] = [s for kind, s, _, p in events if kind == "rename" and p.stem == sop]
        assert any(s >= renamed and e <= done for s, e in fsyncs), f"{sop} answered unsynced"
        assert (series_dir / f"{sop}.dcm").read_bytes() == b"y" * 1000
    assert len(fsyncs) < 24 + 1, f"{len(fsyncs)} folder fsyncs for 25 instances"


def test_c_echo_and_an_unsupported_context(tmp_path):
    store = ListenerStore(tmp_path / "store", quiet_period=3600, fsync=False)
    with Listener(store, port=0) as lst:
        r = subprocess.run(["echoscu", "-aec", "SPRIM", "127.0.0.1", str(lst.port)],
                           capture_output=True, text=True, env=dcmtk_env(), timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        ae = AE("PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.1.1")  # Patient Root Q/R FIND
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", lst.port, ae_title="SPRIM")
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {"1.2.840.10008.1.1"}
        assert assoc.send_c_echo().Status == 0
        assoc.release()


def test_more_associations_than_allowed_are_refused_transiently(tmp_path):
    store = ListenerStore(tmp_path / "store", quiet_period=3600, fsync=False)
    with Listener(store, port=0, max_associations=1) as lst:
        ae = AE("PACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        first = ae.associate("127.0.0.1", lst.port, ae_title="SPRIM")
        assert first.is_established
        second = ae.associate("127.0.0.1", lst.port, ae_title="SPRIM")
        assert second.is_rejected
        first.release()
        time.sleep(0.5)  # the first association's thread gives its slot back
        third = ae.associate("127.0.0.1", lst.port, ae_title="SPRIM")
        assert third.is_established
        third.release()
