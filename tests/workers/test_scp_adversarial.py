"""``sprim listen`` against hostile or broken peers: raw bytes on a socket to the real listener.

Each case: the listener answers as PS3.8 (A-ABORT with its reason, A-ASSOCIATE-RJ with its
result/source/reason) or PS3.7 (C-STORE failure status) says, logs one line, leaves no file of
the bad association, keeps its thread and process, and a normal dcmtk ``storescu`` association
right after succeeds. Then a seeded fuzz of 300 mutated association byte streams.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from tests.harness.orthanc import send
from tests.workers.test_archive_security import _storescu_tls, pki  # noqa: F401  (fixture)
from workers.ingest import scp
from workers.ingest.listener import Listener, ListenerStore

pytestmark = [
    pytest.mark.integration,
    # a traceback in an association thread fails the test
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TIMEOUT, ARTIM = 2.0, 1.0
#: how long a refused/aborted connection may take to be closed by the listener
CLOSE_WITHIN = ARTIM + scp.LINGER + 2.0


# -- PDU building ------------------------------------------------------------------------------
def item(kind: int, value: bytes) -> bytes:
    return bytes((kind, 0)) + struct.pack(">H", len(value)) + value


def pc_item(pc_id: int, abstract: str, transfers=(IMPLICIT_LE,)) -> bytes:
    subs = item(0x30, abstract.encode()) + b"".join(item(0x40, t.encode()) for t in transfers)
    return item(0x20, bytes((pc_id, 0, 0, 0)) + subs)


def user_item(max_pdu: int = 16384) -> bytes:
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9"))


APP_CONTEXT = item(0x10, b"1.2.840.10008.3.1.1.1")
CONTEXTS = pc_item(1, CT) + pc_item(3, VERIFICATION) + pc_item(5, SR)


def rq(*items: bytes, calling: bytes = b"PACS", version: int = 1) -> bytes:
    if not items:
        items = (APP_CONTEXT, CONTEXTS, user_item())
    fixed = struct.pack(">HH", version, 0) + b"SPRIM".ljust(16) + calling.ljust(16) + bytes(32)
    return pdu(0x01, fixed + b"".join(items))


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body) if length is None else length) + body


def pdv(pc_id: int, header: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, pc_id, header) + data


def pdata(*pdvs: bytes) -> bytes:
    return pdu(0x04, b"".join(pdvs))


def us(v: int) -> bytes:
    return struct.pack("<H", v)


def uid(u: str) -> bytes:
    b = u.encode()
    return b + b"\0" if len(b) % 2 else b


def store_command(sop_class: str, sop: str | None, message_id: int | None = 1) -> bytes:
    els = {0x0002: uid(sop_class), 0x0100: us(0x0001), 0x0700: us(0), 0x0800: us(0)}
    if message_id is not None:
        els[0x0110] = us(message_id)
    if sop is not None:
        els[0x1000] = uid(sop)
    return scp.encode_command(els)


ECHO_COMMAND = scp.encode_command(
    {0x0002: uid(VERIFICATION), 0x0100: us(0x0030), 0x0110: us(7), 0x0800: us(0x0101)}
)


def sr_data_set(sop: str, series: str = "1.2.826.0.1.3680043.8.498.77.2") -> bytes:
    """A small Basic Text SR (non-image: stored as received), implicit VR LE."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SR, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77.1", series
    ds.PatientID, ds.Modality, ds.ValueType = "ADV", "SR", "CONTAINER"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


# -- a raw peer --------------------------------------------------------------------------------
class Peer:
    def __init__(self, port: int, timeout: float = 10.0, source: str = "127.0.0.1") -> None:
        self.s = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def recv_exact(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            try:
                chunk = self.s.recv(n - len(out))
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            out += chunk
        return out

    def recv_pdu(self) -> tuple[int, bytes] | None:
        head = self.recv_exact(6)
        if head is None:
            return None
        body = self.recv_exact(struct.unpack_from(">I", head, 2)[0])
        return None if body is None else (head[0], body)

    def associate(self, request: bytes | None = None) -> bytes:
        self.send(request or rq())
        got = self.recv_pdu()
        assert got is not None and got[0] == 0x02, got
        return got[1]

    def closed_within(self, seconds: float) -> bool:
        """The listener closes the connection (EOF or reset) within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.s.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def reset(self) -> None:
        """Abrupt close: RST, not FIN."""
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.s.close()

    def close(self) -> None:
        self.s.close()


def store_status(peer: Peer) -> tuple[int, dict[int, bytes]]:
    """The C-STORE/C-ECHO response's status and command elements."""
    command = b""
    while True:
        got = peer.recv_pdu()
        assert got is not None and got[0] == 0x04, got
        body, pos = got[1], 0
        while pos < len(body):
            length = struct.unpack_from(">I", body, pos)[0]
            header = body[pos + 5]
            command += body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if header & 0x02:
                els = scp.decode_command(command)
                return struct.unpack("<H", els[0x0900])[0], els


# -- fixtures ----------------------------------------------------------------------------------
def _listener(tmp_path: Path, **kw) -> Listener:
    store = ListenerStore(tmp_path / "store", quiet_period=3600)
    kw = {"max_associations": 4, "timeout": TIMEOUT, "artim_timeout": ARTIM, **kw}
    return Listener(store, port=0, allowed_aets=["MODALITY", "PACS"], **kw)


@pytest.fixture
def listener(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="workers.ingest.listener")
    threads = threading.active_count()
    lst = _listener(tmp_path).start()
    yield lst
    # every association thread ends (nothing hangs)
    assert _wait(lambda: threading.active_count() <= threads + 2, CLOSE_WITHIN + TIMEOUT)
    lst.stop()
    assert threading.active_count() <= threads
    # no traceback, every listener line is one line
    for r in caplog.records:
        assert not r.exc_info, r.getMessage()
        assert "\n" not in r.getMessage(), r.getMessage()


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _stored(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".pending")


def _good_association_works(lst: Listener, ct_file: Path) -> None:
    """A normal dcmtk storescu association right after: its instance is acknowledged and
    on disk (and nothing else is)."""
    before = lst.store.received
    send([ct_file], "127.0.0.1", lst.port, called="SPRIM", calling="MODALITY")
    ds = pydicom.dcmread(ct_file, stop_before_pixels=True)
    path = lst.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.is_file()
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID
    assert lst.store.received == before + 1


def _served_before_any_timeout(caplog) -> None:
    """storescu's association was accepted while the slow/silent peers were still open."""
    msgs = caplog.messages
    served = next(i for i, m in enumerate(msgs) if "accepted calling_aet=MODALITY" in m)
    timeouts = [i for i, m in enumerate(msgs) if "event=association_timeout" in m]
    assert served < min(timeouts, default=len(msgs)), msgs


def _line(caplog, *needles: str) -> str:
    lines = [m for m in caplog.messages if all(n in m for n in needles)]
    assert len(lines) == 1, (needles, caplog.messages)
    return lines[0]


# -- before the association ----------------------------------------------------------------------
def _bad_rq(*items: bytes, **kw) -> bytes:
    return rq(*items, **kw)


PRE_ASSOCIATION = [
    # (case, bytes sent, expected answer, log line needles)
    ("truncated PDU header", b"\x01\x00\x00", None, ["association_dropped", "3 of 6 bytes"]),
    ("A-ASSOCIATE-RQ claiming 4 GB", pdu(0x01, b"", 0xFFFFFFFF), ("abort", 6), ["exceeds the maximum"]),
    ("P-DATA-TF claiming 4 GB", pdu(0x04, b"", 0xFFFFFFFF), ("abort", 2), ["expected A-ASSOCIATE-RQ"]),
    ("P-DATA-TF before association", pdata(pdv(1, 3, ECHO_COMMAND)), ("abort", 2), ["got PDU type 0x04"]),
    ("A-RELEASE-RQ before association", pdu(0x05, bytes(4)), ("abort", 2), ["got PDU type 0x05"]),
    ("unknown PDU type 0x09", pdu(0x09, b"abcd"), ("abort", 1), ["got PDU type 0x09"]),
    ("unknown PDU type 0xFF claiming 4 GB", pdu(0xFF, b"", 0xFFFFFFFF), ("abort", 1), ["got PDU type 0xFF"]),
    ("A-ABORT before association", pdu(0x07, bytes(4)), None, ["association_aborted_by_peer"]),
    ("A-ASSOCIATE-RQ shorter than its fixed fields", pdu(0x01, bytes(40)), ("abort", 6), ["fixed fields are 68"]),
    ("item length past the end", _bad_rq(APP_CONTEXT, CONTEXTS, b"\x50\x00\x01\x00abc"), ("abort", 6), ["runs past"]),
    ("presentation context item of 0 bytes", _bad_rq(APP_CONTEXT, item(0x20, b""), user_item()), ("abort", 6), ["presentation context item of 0 bytes"]),
    ("abstract syntax sub-item overruns its item", _bad_rq(APP_CONTEXT, item(0x20, bytes((1, 0, 0, 0)) + b"\x30\x00\x00\x40" + CT.encode()), user_item()), ("abort", 6), ["presentation context 1", "runs past"]),
    ("user information sub-item overruns", _bad_rq(APP_CONTEXT, CONTEXTS, item(0x50, b"\x51\x00\x00\x04\x00")), ("abort", 6), ["user information item", "runs past"]),
    ("maximum length sub-item of 2 bytes", _bad_rq(APP_CONTEXT, CONTEXTS, item(0x50, item(0x51, b"\x40\x00"))), ("abort", 6), ["maximum length sub-item of 2 bytes"]),
    ("stray bytes after the last item", _bad_rq(APP_CONTEXT, CONTEXTS, user_item(), b"\x20\x00"), ("abort", 6), ["2 stray bytes"]),
    ("200 presentation contexts", _bad_rq(APP_CONTEXT, *[pc_item((2 * i + 1) % 256, CT) for i in range(200)], user_item()), ("abort", 6), ["presentation context ID 1 is proposed twice"]),
    ("even presentation context ID", _bad_rq(APP_CONTEXT, pc_item(2, CT), user_item()), ("abort", 6), ["presentation context ID 2 is even"]),
    ("missing application context", _bad_rq(CONTEXTS, user_item()), ("reject", 1, 1, 2), ["application context missing"]),
    ("foreign application context", _bad_rq(item(0x10, b"1.2.3.4"), CONTEXTS, user_item()), ("reject", 1, 1, 2), ["application context ['1.2.3.4']"]),
    ("protocol version 2 only", _bad_rq(version=2), ("reject", 1, 2, 2), ["protocol version"]),
    ("no presentation context", _bad_rq(APP_CONTEXT, user_item()), ("reject", 1, 1, 1), ["no presentation context"]),
    ("blank calling AE title", _bad_rq(calling=b"    "), ("reject", 1, 1, 3), ["calling AE title is blank"]),
    ("calling AE with a line break", _bad_rq(calling=b"EVIL\nevent=x"), ("reject", 1, 1, 3), ["association_rejected", "EVIL?event=x"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "answer", "needles"),
    [c[1:] for c in PRE_ASSOCIATION],
    ids=[c[0] for c in PRE_ASSOCIATION],
)
def test_bad_bytes_before_association(listener, ct_files, caplog, data, answer, needles):
    peer = Peer(listener.port)
    t0 = time.monotonic()
    peer.send(data)
    if answer is None:
        try:
            peer.s.shutdown(socket.SHUT_WR)
        except OSError:  # already closed by the listener
            pass
        assert peer.recv_pdu() is None  # closed, nothing sent back
    else:
        got = peer.recv_pdu()
        assert got is not None, "connection closed without an answer"
        kind, body = got
        if answer[0] == "abort":  # A-ABORT, source service-provider, reason (PS3.8 9.3.8)
            assert (kind, body[2], body[3]) == (0x07, 2, answer[1])
        else:  # A-ASSOCIATE-RJ result, source, reason (PS3.8 9.3.4)
            assert (kind, body[1], body[2], body[3]) == (0x03, *answer[1:])
        assert peer.closed_within(CLOSE_WITHIN)
    # nothing was waited for: no 4 GB read, no ARTIM expiry
    assert time.monotonic() - t0 < scp.LINGER + 1.0
    assert _wait(lambda: any(all(n in m for n in needles) for m in caplog.messages), 5), (
        caplog.messages
    )
    _line(caplog, *needles)
    assert _stored(listener.store.root) == []
    _good_association_works(listener, ct_files[0])


# -- on an established association ---------------------------------------------------------------
ESTABLISHED = [
    ("P-DATA-TF beyond the maximum length", pdu(0x04, b"", scp.MAX_PDU + 7), 6, ["P-DATA-TF of 4194311 bytes exceeds"]),
    ("P-DATA-TF claiming 4 GB", pdu(0x04, b"", 0xFFFFFFFF), 6, ["P-DATA-TF of 4294967295 bytes"]),
    ("unknown PDU type", pdu(0x09, b"abcd"), 1, ["unexpected PDU type 0x09"]),
    ("second A-ASSOCIATE-RQ", rq(), 2, ["unexpected PDU type 0x01"]),
    ("A-ASSOCIATE-AC from the requestor", pdu(0x02, bytes(68)), 2, ["unexpected PDU type 0x02"]),
    ("PDV on a context never proposed", pdata(pdv(9, 3, ECHO_COMMAND)), 6, ["presentation context 9, not accepted"]),
    ("PDV on a rejected context", pdata(pdv(7, 3, ECHO_COMMAND)), 6, ["presentation context 7, not accepted"]),
    ("data set before its command", pdata(pdv(5, 2, sr_data_set("1.2.3"))), 6, ["data set fragment before its command"]),
    ("PDV item longer than its PDU", pdu(0x04, struct.pack(">IBB", 500, 1, 3) + ECHO_COMMAND), 6, ["presentation data value item of 500 bytes"]),
    ("PDV item of 1 byte", pdu(0x04, struct.pack(">IBB", 1, 1, 3)), 6, ["presentation data value item of 1 bytes"]),
    ("empty P-DATA-TF", pdu(0x04, b""), 6, ["without a presentation data value item"]),
    ("stray bytes after the last PDV", pdu(0x04, pdv(3, 1, ECHO_COMMAND[:10]) + b"\x00\x00"), 6, ["2 stray bytes after the last PDV"]),
    ("command set not group 0000", pdata(pdv(3, 3, b"\x08\x00\x16\x00\x02\x00\x00\x001\x00")), 6, ["malformed command set"]),
    ("command without MessageID", pdata(pdv(5, 3, store_command(SR, "1.2.3", message_id=None))), 0, ["MessageID (0000,0110)"]),
    ("command fragments past 64 KiB", pdata(*[pdv(3, 1, bytes(16000)) for _ in range(5)]), 6, ["command set over 65536 bytes"]),
    ("unsupported DIMSE command (C-FIND-RQ)", pdata(pdv(3, 3, scp.encode_command({0x0100: us(0x0020), 0x0110: us(1), 0x0800: us(0x0101)}))), 0, ["unsupported DIMSE command 0x0020"]),
    ("fragments of two contexts interleaved", pdata(pdv(5, 1, store_command(SR, "1.2.3")[:20]), pdv(3, 3, ECHO_COMMAND)), 6, ["interleaved"]),
    ("command fragment after the command's last", pdata(pdv(5, 3, store_command(SR, "1.2.3")), pdv(5, 1, b"x")), 6, ["after the command's last"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "reason", "needles"), [c[1:] for c in ESTABLISHED], ids=[c[0] for c in ESTABLISHED]
)
def test_protocol_errors_on_an_established_association(
    listener, ct_files, caplog, data, reason, needles
):
    peer = Peer(listener.port)
    ac = peer.associate(rq(APP_CONTEXT, CONTEXTS, pc_item(7, FIND), user_item()))
    assert b"\x21\x00\x00\x1a\x07\x00\x03\x00" in ac  # FIND: abstract-syntax-not-supported
    t0 = time.monotonic()
    peer.send(data)
    got = peer.recv_pdu()
    assert got is not None, "closed without an A-ABORT"
    kind, body = got
    source = 0 if "over" in needles[0] and "command" not in needles[0] else 2
    assert (kind, body[2], body[3]) == (0x07, source, reason)
    assert peer.closed_within(CLOSE_WITHIN)
    assert time.monotonic() - t0 < scp.LINGER + 1.0
    assert _wait(lambda: any(all(n in m for n in needles) for m in caplog.messages), 5)
    line = _line(caplog, "event=association_aborted", *needles)
    assert f"abort_reason={reason}" in line and "calling_aet=PACS" in line
    assert _stored(listener.store.root) == []
    _good_association_works(listener, ct_files[1])


def test_c_store_request_defects_get_failure_statuses_and_the_association_goes_on(
    listener, ct_files, caplog
):
    peer = Peer(listener.port)
    peer.associate()
    cases = [
        # (command, data set, expected status, log needle)
        (store_command(SR, None), sr_data_set("1.2.826.0.1.3680043.8.498.77.3.1"), 0x0117, "Instance UID missing"),
        (store_command(SR, "1.2.abc"), sr_data_set("1.2.826.0.1.3680043.8.498.77.3.2"), 0x0117, "sop=1.2.abc "),
        (store_command(MR, "1.2.826.0.1.3680043.8.498.77.3.3"), sr_data_set("1.2.826.0.1.3680043.8.498.77.3.3"), 0x0122, "not the context's"),
        (store_command(SR, "1.2.826.0.1.3680043.8.498.77.3.4"), sr_data_set("1.2.826.0.1.3680043.8.498.77.3.5"), 0xA900, "SOPInstanceUID differs"),
        (store_command(SR, "1.2.826.0.1.3680043.8.498.77.3.6"), sr_data_set("1.2.826.0.1.3680043.8.498.77.3.6", "1.2.3\nevent=study_complete"), 0xA900, "event=instance_refused status=0xA900 calling_aet=PACS sop=1.2.826.0.1.3680043.8.498.77.3.6 series=1.2.3?event"),
    ]  # fmt: skip
    for command, data, status, needle in cases:
        # the data set in three fragments, the command in two
        third = len(data) // 3
        peer.send(pdata(pdv(5, 1, command[:10]), pdv(5, 3, command[10:])))
        peer.send(pdata(pdv(5, 0, data[:third]), pdv(5, 0, data[third : 2 * third])))
        peer.send(pdata(pdv(5, 2, data[2 * third :])))
        got, els = store_status(peer)
        assert got == status, (needle, hex(got))
        assert struct.unpack("<H", els[0x0120])[0] == 1  # MessageIDBeingRespondedTo
        assert _wait(lambda n=needle: any(n in m for m in caplog.messages), 5), caplog.messages
        _line(caplog, "event=instance_refused", needle)
    # the association goes on: a valid C-STORE and a C-ECHO, then release
    good = "1.2.826.0.1.3680043.8.498.77.3.9"
    peer.send(pdata(pdv(5, 3, store_command(SR, good))) + pdata(pdv(5, 2, sr_data_set(good))))
    assert store_status(peer)[0] == 0
    peer.send(pdata(pdv(3, 3, ECHO_COMMAND)))
    assert store_status(peer)[0] == 0
    peer.send(pdu(0x05, bytes(4)))
    assert peer.recv_pdu() == (0x06, bytes(4))
    assert [p.stem for p in _stored(listener.store.root)] == [good]
    assert listener.store.refused == 2  # the two the listener judged; the others never reached it
    _good_association_works(listener, ct_files[2])


def test_deflate_bomb_is_refused_without_inflating_it(listener, monkeypatch, caplog):
    """A Deflated Explicit VR LE data set of a few hundred kB that inflates to 200 MB is
    refused as not understood once it passes the inflation cap; a normal one is stored."""
    import zlib

    from workers.ingest import listener as listener_mod

    monkeypatch.setattr(listener_mod, "MAX_INFLATED_BYTES", 8 << 20)

    def deflated(sop: str, zeros_mb: int) -> bytes:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SR, sop
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77.1"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77.6"
        ds.Modality, ds.ValueType = "SR", "CONTAINER"
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = z.compress(buf.getvalue())
        chunk = bytes(1 << 20)
        out += b"".join(z.compress(chunk) for _ in range(zeros_mb))
        return out + z.flush()

    bomb_sop, good_sop = "1.2.826.0.1.3680043.8.498.77.6.1", "1.2.826.0.1.3680043.8.498.77.6.2"
    bomb = deflated(bomb_sop, 200)
    assert len(bomb) < 1 << 20
    peer = Peer(listener.port)
    peer.associate(rq(APP_CONTEXT, pc_item(9, SR, ["1.2.840.10008.1.2.1.99"]), user_item()))
    for sop, data, want in ((bomb_sop, bomb, 0xC000), (good_sop, deflated(good_sop, 0), 0)):
        peer.send(pdata(pdv(9, 3, store_command(SR, sop))) + pdata(pdv(9, 2, data)))
        assert store_status(peer)[0] == want
    peer.send(pdu(0x05, bytes(4)))
    assert peer.recv_pdu() == (0x06, bytes(4))
    _line(caplog, "status=0xC000", f"sop={bomb_sop}", "inflates past 8388608 bytes")
    assert [p.stem for p in _stored(listener.store.root)] == [good_sop]


def test_peer_maximum_length_fragments_the_response(listener):
    """A requestor that takes P-DATA-TF of 32 bytes at most gets the C-ECHO-RSP in fragments."""
    peer = Peer(listener.port)
    peer.associate(rq(APP_CONTEXT, CONTEXTS, user_item(max_pdu=32)))
    peer.send(pdata(pdv(3, 3, ECHO_COMMAND)))
    command, sizes = b"", []
    while True:
        kind, body = peer.recv_pdu()
        assert kind == 0x04
        sizes.append(len(body))
        command += body[6:]
        if body[5] & 0x02:
            break
        assert body[5] == 0x01
    assert max(sizes) <= 32 and len(sizes) > 1
    els = scp.decode_command(command)
    assert struct.unpack("<H", els[0x0900])[0] == 0 and els[0x0120] == us(7)
    peer.send(pdu(0x05, bytes(4)))
    assert peer.recv_pdu() == (0x06, bytes(4))


# -- nothing half received is kept ---------------------------------------------------------------
@pytest.mark.parametrize("ending", ["reset", "close", "release", "half PDU header then reset"])
def test_unfinished_instance_is_neither_stored_nor_acknowledged(listener, ct_files, caplog, ending):
    peer = Peer(listener.port)
    peer.associate()
    sop = "1.2.826.0.1.3680043.8.498.77.4.1"
    data = sr_data_set(sop)
    peer.send(pdata(pdv(5, 3, store_command(SR, sop))))
    peer.send(pdata(pdv(5, 0, data[:40])) + pdata(pdv(5, 0, data[40:80])))  # no last fragment
    if ending == "release":
        peer.send(pdu(0x05, bytes(4)))
        assert peer.recv_pdu() == (0x06, bytes(4))  # released: no C-STORE-RSP before it
        peer.close()
    elif ending == "close":
        peer.close()
    else:
        if ending.startswith("half"):
            peer.send(b"\x04\x00\x00")
        peer.reset()
    if ending != "release":
        assert _wait(lambda: any("association_dropped" in m for m in caplog.messages), 5)
    time.sleep(0.2)
    assert _stored(listener.store.root) == []  # no file, no temporary file
    assert listener.store.received == 0
    _good_association_works(listener, ct_files[3])


def test_data_set_past_the_instance_cap_aborts_without_storing(tmp_path, ct_files, caplog):
    caplog.set_level(logging.INFO, logger="workers.ingest.listener")
    with _listener(tmp_path, max_instance_bytes=1_000_000) as lst:
        peer = Peer(lst.port)
        peer.associate()
        peer.send(pdata(pdv(5, 3, store_command(SR, "1.2.3"))))
        for _ in range(3):
            peer.send(pdata(pdv(5, 0, bytes(400_000))))
        kind, body = peer.recv_pdu()
        assert (kind, body[2], body[3]) == (0x07, 0, 0)  # service-user (our limit)
        assert peer.closed_within(CLOSE_WITHIN)
        _line(caplog, "event=association_aborted", "data set over 1000000 bytes")
        assert _stored(lst.store.root) == []
        _good_association_works(lst, ct_files[0])


# -- slow and many peers --------------------------------------------------------------------------
def test_slowloris_is_closed_by_artim_and_the_read_timeout_while_others_are_served(
    listener, ct_files, caplog
):
    silent = Peer(listener.port)
    trickle = Peer(listener.port)
    established = Peer(listener.port)
    established.associate()

    def dribble(peer: Peer, data: bytes) -> None:
        for b in data:
            try:
                peer.send(bytes([b]))
            except OSError:
                return
            time.sleep(0.2)

    threads = [
        threading.Thread(target=dribble, args=(trickle, rq()), daemon=True),
        # a P-DATA-TF of 2000 bytes, byte by byte: TIMEOUT + 2000 / MIN_RATE at most
        threading.Thread(target=dribble, args=(established, pdu(0x04, b"", 2000) + bytes(2000)), daemon=True),
    ]  # fmt: skip
    for t in threads:
        t.start()
    # meanwhile a normal association is served at once
    _good_association_works(listener, ct_files[4])
    _served_before_any_timeout(caplog)
    for peer in (silent, trickle):
        assert peer.closed_within(ARTIM + 1.0)
    assert established.closed_within(TIMEOUT + 2000 / scp.MIN_RATE + 1.0)
    for t in threads:
        t.join(5)
    timeouts = [m for m in caplog.messages if "event=association_timeout" in m]
    assert sum("phase=request (ARTIM)" in m for m in timeouts) == 2, timeouts
    assert sum("phase=established" in m and "calling_aet=PACS" in m for m in timeouts) == 1
    _good_association_works(listener, ct_files[5])


def test_idle_association_is_closed_after_the_timeout(listener, caplog):
    peer = Peer(listener.port)
    peer.associate()
    t0 = time.monotonic()
    assert peer.closed_within(TIMEOUT + 1.5)
    assert time.monotonic() - t0 >= TIMEOUT - 0.1
    assert _wait(lambda: any("phase=established" in m for m in caplog.messages), 2)


def test_many_connections_beyond_max_associations(listener, ct_files, caplog):
    """4 associations held, 10 more requested: each rejected-transient, local-limit-exceeded.
    Silent connections take no association slot; one host cannot take every connection
    thread; a flood from many hosts is capped and closed; normal associations go on."""
    held = [Peer(listener.port) for _ in range(4)]
    for p in held:
        p.associate()
    for _ in range(10):
        p = Peer(listener.port)
        p.send(rq())
        kind, body = p.recv_pdu()
        assert (kind, body[1], body[2], body[3]) == (0x03, 2, 3, 2)
        assert p.closed_within(CLOSE_WITHIN)
    for p in held:
        p.send(pdu(0x05, bytes(4)))
        assert p.recv_pdu() == (0x06, bytes(4))
        p.close()
    assert sum("reason=too_many address" in m for m in caplog.messages) == 10
    # as many silent connections as association slots: a real association is served at once
    silent = [Peer(listener.port) for _ in range(4)]
    _good_association_works(listener, ct_files[6])
    _served_before_any_timeout(caplog)
    # one host opening 20: max_associations + 4 get a thread, the others are closed at once
    baseline = threading.active_count()
    one_host = [Peer(listener.port, source="127.0.0.2") for _ in range(20)]
    assert _wait(lambda: sum(p.closed_within(0.01) for p in one_host) >= 12, 2)
    assert any("reason=too_many_from address=127.0.0.2" in m for m in caplog.messages)
    _good_association_works(listener, ct_files[7])
    # many hosts: at most 2 * max_associations + 16 connection threads
    flood = [Peer(listener.port, source=f"127.0.1.{i % 40 + 1}") for i in range(80)]
    time.sleep(0.3)
    assert threading.active_count() - baseline <= 2 * 4 + 16
    assert any("event=connection_dropped reason=too_many_connections" in m for m in caplog.messages)
    for p in flood + one_host + silent:
        assert p.closed_within(ARTIM + 2.0)
    _good_association_works(listener, ct_files[8])


def test_accept_survives_running_out_of_file_descriptors(listener, ct_files, caplog):
    """accept() failing with EMFILE (a connection flood past the descriptor limit) must not end
    the acceptor: once descriptors are free again, associations are served."""
    clients = [socket.socket() for _ in range(5)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # the limit is on descriptor numbers: the lowest free one makes every new one fail
    used = {int(fd) for fd in os.listdir("/proc/self/fd")}
    lowest_free = next(fd for fd in range(len(used) + 2) if fd not in used)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        for c in clients:
            c.connect(("127.0.0.1", listener.port))  # completed by the kernel, not accepted
        assert _wait(lambda: any("event=accept_failed" in m for m in caplog.messages), 5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for c in clients:
        c.close()
    _good_association_works(listener, ct_files[7])


# -- DICOM TLS --------------------------------------------------------------------------------------
@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl needed (make sysdeps)")
def test_tls_handshake_garbage_and_stall(pki, tmp_path, ct_files, caplog):  # noqa: F811
    from workers.core.tls import server_context

    caplog.set_level(logging.INFO, logger="workers.ingest.listener")
    ctx = server_context(pki["server"], pki["server.key"])
    with _listener(tmp_path, ssl_context=ctx) as lst:
        garbage = Peer(lst.port)
        garbage.send(b"\x16\x03\x01\x00\x05hello" + os.urandom(300))
        assert garbage.closed_within(CLOSE_WITHIN)
        stalled = Peer(lst.port)  # TCP open, no ClientHello: ARTIM covers the handshake
        half = Peer(lst.port)
        half.send(b"\x16\x03\x01\x02\x00")  # a record header announcing 512 bytes, then nothing
        t0 = time.monotonic()
        assert stalled.closed_within(ARTIM + 1.5) and half.closed_within(ARTIM + 1.5)
        assert time.monotonic() - t0 < ARTIM + 1.5
        r = _storescu_tls(lst.port, [ct_files[0]], "+tla", "+cf", str(pki["ca"]))
        assert r.returncode == 0, r.stdout + r.stderr
        assert lst.store.received == 1
    assert sum("event=tls_handshake_failed" in m for m in caplog.messages) == 3


# -- fuzz ------------------------------------------------------------------------------------------
def _valid_stream(i: int) -> bytes:
    sop = f"1.2.826.0.1.3680043.8.498.77.5.{i}"
    data = sr_data_set(sop)
    return b"".join((
        rq(),
        pdata(pdv(3, 3, ECHO_COMMAND)),
        pdata(pdv(5, 1, store_command(SR, sop, i % 65536)[:30]), pdv(5, 3, store_command(SR, sop, i % 65536)[30:])),
        pdata(pdv(5, 0, data[:100])),
        pdata(pdv(5, 2, data[100:])),
        pdu(0x05, bytes(4)),
    ))  # fmt: skip


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    how = rng.randrange(5)
    if how == 0:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif how == 2:  # insert random bytes
        at = rng.randrange(len(b))
        b[at:at] = rng.randbytes(rng.randint(1, 8))
    elif how == 3:  # a length field (PDU, item or PDV) set to an extreme
        at = rng.randrange(len(b) - 4)
        b[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\xff\xff"])
    else:  # remove a chunk
        at = rng.randrange(len(b))
        del b[at : at + rng.randint(1, 16)]
    return bytes(b)


def _fuzz_one(port: int, stream: bytes, acks: list[str], errors: list[str]) -> None:
    peer = Peer(port, timeout=TIMEOUT + CLOSE_WITHIN + 5)
    try:
        try:
            peer.send(stream)
            peer.s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        t0, received = time.monotonic(), b""
        while True:
            try:
                chunk = peer.s.recv(65536)
            except TimeoutError:
                errors.append(f"no close after {time.monotonic() - t0:.1f} s")
                return
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        # every C-STORE success the listener sent names an instance on disk
        pos = 0
        while pos + 6 <= len(received):
            kind, length = received[pos], struct.unpack_from(">I", received, pos + 2)[0]
            body = received[pos + 6 : pos + 6 + length]
            pos += 6 + length
            if kind == 0x04 and len(body) > 6:
                els = scp.decode_command(body[6:])
                if els.get(0x0100) == us(0x8001) and els.get(0x0900) == us(0):
                    acks.append(els[0x1000].rstrip(b"\0").decode())
    finally:
        peer.close()


def test_fuzz_mutated_associations(listener, ct_files):
    rng = random.Random(20261201)
    streams = [_mutate(rng, _valid_stream(i)) for i in range(300)]
    acks: list[str] = []
    errors: list[str] = []
    for start in range(0, len(streams), 4):  # 4 at a time: within max_associations
        batch = [
            threading.Thread(target=_fuzz_one, args=(listener.port, s, acks, errors))
            for s in streams[start : start + 4]
        ]
        for t in batch:
            t.start()
        for t in batch:
            t.join(TIMEOUT + CLOSE_WITHIN + 10)
    assert errors == []
    # every acknowledged instance is on disk, complete and the one acknowledged
    stored = {p.stem: p for p in _stored(listener.store.root)}
    # and nothing else: what was not acknowledged was not stored (so never routed)
    assert set(acks) == set(stored), set(acks) ^ set(stored)
    assert len(acks) >= 20, len(acks)  # the fuzz did reach the store
    for sop in acks:
        ds = pydicom.dcmread(stored[sop])
        assert ds.SOPInstanceUID == sop and ds.file_meta.MediaStorageSOPInstanceUID == sop
    assert not [p for p in stored if p.startswith(".")]
    _good_association_works(listener, ct_files[8])
