"""``sprim listen``: allow-list, durable store before success, malformed data, concurrency, quiet period.

Peers are the real dcmtk ``storescu`` and a real pynetdicom SCU; the listener is the real SCP.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config

from tests.harness.orthanc import send
from workers.archives.folder import FolderArchive
from workers.ingest.listener import PENDING_MARK, Listener, ListenerStore, routable_series

pytestmark = pytest.mark.integration
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


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
    caplog.set_level(logging.INFO, logger="workers.ingest.listener")
    r = send(
        ct_files[:2], "127.0.0.1", listener.port, called="SPRIM", calling="INTRUDER", check=False
    )
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr
    assert _stored(listener.store.root) == []
    assert any("association_rejected" in m and "INTRUDER" in m for m in caplog.messages)


# -- what the listener acknowledges ------------------------------------------------------------
UID_ROOT = "1.2.826.0.1.3680043.8.498.7"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SEG_FILE = Path(__file__).resolve().parents[3] / "shared/data/pet-seg-qin/SEG/3DSlicer"
TS_FILES = Path(__file__).resolve().parents[3] / "shared/data/edge-cases/transfer-syntaxes/In"


def _cut_at_pixel_data(raw: bytes, keep: int = 0) -> bytes:
    """The file's bytes up to its PixelData element (+ ``keep`` bytes of it)."""
    at = raw.rindex(b"\xe0\x7f\x10\x00")
    return raw[: at + keep]


def _mutate(ds, **values):
    for k, v in values.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)


def _half_pixels(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _bits_8(ds):
    _mutate(ds, BitsAllocated=8, BitsStored=8, HighBit=7)


def _sr(ds):
    sr = pydicom.Dataset()
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        setattr(sr, kw, ds.get(kw, ""))
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = ds.SOPInstanceUID
    sr.SeriesInstanceUID = f"{UID_ROOT}.90"
    sr.Modality = "SR"
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    return sr


def _secondary_capture(ds):
    """The slice as a greyscale Secondary Capture (e.g. a dose screen): no patient geometry."""
    ds.SOPClassUID = SC_STORAGE
    ds.SeriesInstanceUID = f"{UID_ROOT}.91"
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, kw)


def _sc_short(ds):
    _secondary_capture(ds)
    _half_pixels(ds)


# (case, how the CT slice is changed, expected status, reason (substring of the log line))
CASES = [
    ("valid CT slice", lambda ds: None, 0x0000, ""),
    ("header only", "cut:0", 0xA900, "no pixel data"),
    ("no PixelData", lambda ds: _mutate(ds, PixelData=None), 0xA900, "no pixel data"),
    ("pixel data cut in transit", "cut:5000", 0xC000, "pixel data announces"),
    ("Rows 65535", lambda ds: _mutate(ds, Rows=65535), 0xA900, "Rows 65535"),
    ("Rows 0", lambda ds: _mutate(ds, Rows=0), 0xA900, "Rows 0"),
    ("Rows halved", lambda ds: _mutate(ds, Rows=256), 0xA900, "PixelData holds"),
    ("PixelSpacing NaN", lambda ds: _mutate(ds, PixelSpacing=[math.nan] * 2), 0xA900, "PixelSpacing"),
    ("PixelSpacing 0", lambda ds: _mutate(ds, PixelSpacing=[0, 0]), 0xA900, "PixelSpacing"),
    ("PixelSpacing negative", lambda ds: _mutate(ds, PixelSpacing=[-0.7, -0.7]), 0xA900, "PixelSpacing"),
    ("PixelSpacing missing", lambda ds: _mutate(ds, PixelSpacing=None), 0xA900, "PixelSpacing"),
    ("truncated PixelData", _half_pixels, 0xA900, "PixelData holds"),
    ("BitsAllocated 8 on 16-bit data", _bits_8, 0xA900, "PixelData holds"),
    ("no SOPInstanceUID", lambda ds: _mutate(ds, SOPInstanceUID=None), 0xA900, "no SOPInstanceUID"),
    ("no StudyInstanceUID", lambda ds: _mutate(ds, StudyInstanceUID=None), 0xA900, "no StudyInstanceUID"),
    ("no SeriesInstanceUID", lambda ds: _mutate(ds, SeriesInstanceUID=None), 0xA900, "no SeriesInstanceUID"),
    ("StudyInstanceUID not a UID", lambda ds: _mutate(ds, StudyInstanceUID="1.2.abc"), 0xA900, "not a valid UID"),
    ("SOP instance differs from request", "request:other", 0xA900, "differs from the C-STORE request"),
    ("SOP class differs from request", lambda ds: _mutate(ds, SOPClassUID=MR_STORAGE), 0xA900, "SOPClassUID differs"),
    ("orientation 11 degrees off", lambda ds: _mutate(ds, ImageOrientationPatient=[1, 0, 0, 0.190809, 0.981627, 0]), 0xA900, "not perpendicular"),
    ("orientation zero vectors", lambda ds: _mutate(ds, ImageOrientationPatient=[0] * 6), 0xA900, "ImageOrientationPatient"),
    ("RescaleSlope NaN", lambda ds: _mutate(ds, RescaleSlope=math.nan), 0xA900, "RescaleSlope"),
    ("RescaleIntercept 1e12", lambda ds: _mutate(ds, RescaleIntercept=1e12), 0xA900, "RescaleIntercept"),
    ("garbage after the header", "garbage", 0xC000, "not a data set"),
    ("valid SR (non-image, archive only)", _sr, 0x0000, ""),
    ("greyscale Secondary Capture without geometry", _secondary_capture, 0x0000, ""),
    ("Secondary Capture with short pixel data", _sc_short, 0xA900, "PixelData holds"),
]  # fmt: skip


def _case_file(tmp: Path, i: int, src: Path, how) -> tuple[Path, str]:
    """Write case ``i`` (Explicit VR LE, File Meta naming the C-STORE request's UIDs)."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = f"{UID_ROOT}.1.{i}"
    request_sop = ds.SOPInstanceUID
    sop_class = str(ds.SOPClassUID)
    if callable(how):
        ds = how(ds) or ds
        sop_class = str(ds.get("SOPClassUID", sop_class))
        if sop_class == MR_STORAGE:  # the request still says CT
            sop_class = CT_STORAGE
    elif how == "request:other":
        request_sop = f"{UID_ROOT}.2.{i}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = request_sop
    meta.TransferSyntaxUID = EXPLICIT_LE
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, ds)
    raw = body.getvalue()
    if isinstance(how, str) and how.startswith("cut:"):
        raw = _cut_at_pixel_data(raw, int(how[4:]))
    elif how == "garbage":
        raw = _cut_at_pixel_data(raw) + b"\xde\xad\xbe\xef" * 64
    path = tmp / f"case{i:02d}.dcm"
    path.write_bytes(buf.getvalue() + raw)
    return path, request_sop


def _send_raw(port: int, files: list[Path], calling: str = "PACS") -> list[int]:
    """pynetdicom SCU sending each file's bytes as they are (no decode, no re-encode)."""
    ae = AE(calling)
    for cx in (CT_STORAGE, MR_STORAGE, SC_STORAGE, BASIC_TEXT_SR, SEG_STORAGE):
        ae.add_requested_context(cx, [EXPLICIT_LE])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SPRIM")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return statuses


def test_malformed_datasets_get_failure_statuses_and_nothing_unusable_is_stored(
    listener, ct_files, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="workers.ingest.listener")
    cases = [_case_file(tmp_path, i, ct_files[60], c[1]) for i, c in enumerate(CASES)]
    files, sops = [c[0] for c in cases], [c[1] for c in cases]
    statuses = _send_raw(listener.port, files)
    got = {case[0]: f"0x{s:04X}" for case, s in zip(CASES, statuses, strict=True)}
    assert got == {case[0]: f"0x{case[2]:04X}" for case in CASES}
    # one log line per refusal, naming the calling AE, the SOP instance and the defect
    refusals = [m for m in caplog.messages if "event=instance_refused" in m]
    refused = [(c, sop) for c, sop in zip(CASES, sops, strict=True) if c[2]]
    assert len(refusals) == len(refused) == listener.store.refused
    for (name, _, status, why), sop in refused:
        [line] = [m for m in refusals if f"sop={sop} " in m]
        assert f"status=0x{status:04X}" in line and "calling_aet=PACS" in line, line
        assert why in line, (name, line)
        assert "Pancreas" not in line  # no patient data in the log
    # only what was acknowledged is in the store; the SR is kept but is no routing input
    ok = {sop for c, sop in zip(CASES, sops, strict=True) if c[2] == 0}
    assert {p.stem for p in _stored(listener.store.root)} == ok
    study = pydicom.dcmread(ct_files[60], stop_before_pixels=True).StudyInstanceUID
    series = FolderArchive(listener.store.root).series_of_study(study)
    assert {s["SOPClassUID"] for s in series} == {CT_STORAGE, BASIC_TEXT_SR, SC_STORAGE}
    assert {s["SOPClassUID"] for s in routable_series(series)} == {CT_STORAGE, SC_STORAGE}


def test_failure_status_carries_an_error_comment(listener, ct_files, tmp_path):
    path, _ = _case_file(tmp_path, 0, ct_files[0], lambda ds: _mutate(ds, Rows=65535))
    ae = AE("PACS")
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="SPRIM")
    rsp = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    assert rsp.Status == 0xA900
    assert rsp.ErrorComment.startswith("Rows 65535") and len(rsp.ErrorComment) <= 64


def test_real_pet_slice_and_seg_are_stored_and_only_the_pet_is_routable(listener):
    pet = SEG_FILE.parents[1] / "PET" / "000000.dcm"
    [seg] = SEG_FILE.glob("*.dcm")
    ae = AE("PACS")
    ae.add_requested_context(PET_STORAGE, [IMPLICIT_LE])
    ae.add_requested_context(SEG_STORAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="SPRIM")
    statuses = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in (pet, seg)]
    assoc.release()
    assert statuses == [0, 0]
    study = pydicom.dcmread(seg, stop_before_pixels=True).StudyInstanceUID
    series = FolderArchive(listener.store.root).series_of_study(study)
    assert sorted(s["SOPClassUID"] for s in series) == sorted([PET_STORAGE, SEG_STORAGE])
    assert [s["SOPClassUID"] for s in routable_series(series)] == [PET_STORAGE]


def test_every_transfer_syntax_is_judged_without_decoding_pixels(listener, tmp_path):
    """Native (implicit, explicit, big endian) and encapsulated (RLE, JPEG, JPEG-LS, J2K)
    images are stored; encapsulated pixel data cut short is refused as not understood."""
    files = sorted(TS_FILES.glob("*.dcm"), key=lambda p: int(p.stem))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE("PACS")
    for ts in sorted({str(h.file_meta.TransferSyntaxUID) for h in headers}):
        ae.add_requested_context(MR_STORAGE, [ts])
    rle = next(
        f
        for f, h in zip(files, headers, strict=True)
        if h.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    )
    cut = tmp_path / "rle-cut.dcm"
    raw = rle.read_bytes()
    cut.write_bytes(raw[: len(raw) - 4000])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="SPRIM")
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        truncated = int(assoc.send_c_store(cut).Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    names = [h.file_meta.TransferSyntaxUID.name for h in headers]
    assert dict(zip(names, statuses, strict=True)) == dict.fromkeys(names, 0)
    assert truncated == 0xC000
    assert len(_stored(listener.store.root)) == len({h.SOPInstanceUID for h in headers})


def test_storescu_reports_the_failure_status(listener, ct_files, tmp_path, dcmtk):
    bad = tmp_path / "nan-spacing.dcm"
    ds = pydicom.dcmread(ct_files[5])
    ds.PixelSpacing = [math.nan, math.nan]
    ds.save_as(bad)
    from tests.harness.orthanc import dcmtk_env

    r = subprocess.run(
        ["storescu", "-v", "-nh", "-aet", "MODALITY", "-aec", "SPRIM", "127.0.0.1", str(listener.port),
         str(bad), str(ct_files[6])],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in out, out
    assert "Received Store Response (Success)" in out, out  # -nh: goes on
    assert [p.stem for p in _stored(listener.store.root)] == [
        pydicom.dcmread(ct_files[6], stop_before_pixels=True).SOPInstanceUID
    ]


def test_write_failure_answers_out_of_resources_and_leaves_no_partial_file(
    listener, ct_files, tmp_path, caplog
):
    """A real write failure: the process may not write files over 64 kB (EFBIG), as a full
    disk would refuse the write. The partial file is removed; the next instance is stored."""
    caplog.set_level(logging.ERROR, logger="workers.ingest.listener")
    ae = AE("PACS")
    ae.add_requested_context(CT_STORAGE, [IMPLICIT_LE])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="SPRIM")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        failed = int(assoc.send_c_store(pydicom.dcmread(ct_files[0])).Status)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    ok = int(assoc.send_c_store(pydicom.dcmread(ct_files[1])).Status)
    assoc.release()
    assert (failed, ok) == (0xA700, 0x0000)
    left = sorted(p.name for p in listener.store.root.rglob("*") if p.is_file())
    sop = pydicom.dcmread(ct_files[1], stop_before_pixels=True).SOPInstanceUID
    assert left == [PENDING_MARK, f"{sop}.dcm"]
    assert any("status=0xA700" in m and "could not be stored" in m for m in caplog.messages)


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
  - name: listen-sr
    match:
      Modality: {in: [SR]}
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
    from workers.platform.jobstore import JobStore

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
        # beside the 40 slices: an SR of the study (stored, never a job input) and a slice with
        # NaN PixelSpacing (refused, never stored)
        sr = _sr(pydicom.dcmread(ct_files[40], stop_before_pixels=True))
        sr.SOPInstanceUID = f"{UID_ROOT}.3.1"
        sr.save_as(tmp_path / "sr.dcm", implicit_vr=True, little_endian=True)
        bad = pydicom.dcmread(ct_files[41])
        bad.PixelSpacing = [math.nan, math.nan]
        bad.save_as(tmp_path / "bad.dcm")
        files = [*ct_files[:40], tmp_path / "sr.dcm", tmp_path / "bad.dcm"]
        r = send(files, "127.0.0.1", port, called="SPRIM", calling="MODALITY", check=False)
        assert r.returncode == 0, r.stderr

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
        # one job: the SR matched no job although a rule asks for SR series
        assert [j.id for j in JobStore(f"sqlite:///{home / 'jobs.db'}").list()] == [job.id]
        assert b"event=instance_refused status=0xA900" in log.read_bytes()
        assert job.context.get("calling_ae") == "MODALITY"
        store = FolderArchive(home / "incoming")
        series = store.series_of_study(job.study_uid)
        assert {s["SOPClassUID"]: s["NumberOfSeriesRelatedInstances"] for s in series}[
            BASIC_TEXT_SR
        ] == 1
        source = {job.series_uid: 40, sr.SeriesInstanceUID: 1}
        assert {s["SeriesInstanceUID"]: s["NumberOfSeriesRelatedInstances"] for s in series
                if s["SeriesInstanceUID"] in source} == source  # fmt: skip
        derived = {
            s["SeriesInstanceUID"]: s["NumberOfSeriesRelatedInstances"]
            for s in series
            if s["SeriesInstanceUID"] not in source
        }
        assert derived == {o["series_uid"]: len(o["instances"]) for o in job.outputs}
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    assert b"event=listen_stopped" in log.read_bytes()
