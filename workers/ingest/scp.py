"""A small DICOM upper-layer acceptor for C-STORE and C-ECHO (PS3.7, PS3.8), for ``sprim listen``.

Why not pynetdicom here: its reactor hands every PDU from a socket thread to an association
thread through polled queues (1 ms sleeps) and reassembles each P-DATA in Python objects. On a
400 x 512² CT that costs ~5 ms per instance where dcmtk ``storescp`` takes ~0.9 ms, i.e. 5-7x
whatever sprim does with the data (bench_archive). This module reads each PDU straight into one
buffer on the association's own thread and answers from the same thread: the receive path is
a ``recv_into`` per PDU, the header check and the durable write. pynetdicom is still sprim's
C-STORE SCU (``workers.archives.dimse``) and the tests' peer.

Scope, as an acceptor only: A-ASSOCIATE-RQ/AC/RJ (calling AE allow-list, presentation contexts
of every storage SOP class and Verification in any transfer syntax pydicom knows, the first
one proposed wins), P-DATA-TF (command and data set fragments), C-STORE-RQ/RSP, C-ECHO-RQ/RSP,
A-RELEASE-RQ/RP, A-ABORT, one operation at a time (no asynchronous operations window; none is
negotiated), optional TLS on the accepted socket. Anything else aborts the association
(A-ABORT, source service-provider, with the PS3.8 9.3.8 reason) and is logged in one line.

Bad input is bounded (PS3.8 9.1.5 ARTIM and the read timeout): the A-ASSOCIATE-RQ (and the TLS
handshake) must arrive within ``artim_timeout`` of the connection; each later PDU must start
within ``timeout`` and arrive at ``MIN_RATE`` at least; no PDU body is read before its length is
checked; a command set or a data set past its cap aborts. After an A-ABORT or A-ASSOCIATE-RJ the
connection lingers (Sta13, bounded) so the peer reads it instead of a TCP reset.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("workers.ingest.listener")

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Implementation Class UID / Version Name sent in A-ASSOCIATE-AC and written in file meta
#: (the file meta's are those of the receiving implementation, as storescp does).
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1.13"
IMPLEMENTATION_VERSION = "SPRIM_SCP_1"
#: Largest P-DATA-TF PDU we accept; announced in A-ASSOCIATE-AC (0 would mean unlimited).
MAX_PDU = 4 * 1024 * 1024
#: Largest other PDU (an A-ASSOCIATE-RQ of 128 contexts with many transfer syntaxes is < 64 KiB).
MAX_OTHER_PDU = 1 << 20
#: Command sets are a few hundred bytes; more is not a command.
MAX_COMMAND = 64 * 1024
#: Slowest PDU body accepted (bytes/s) once the first byte arrived: a trickle (slowloris) ends.
MIN_RATE = 16 * 1024
#: How long an aborted/rejected connection waits for the peer to close (PS3.8 Sta13).
LINGER = 2.0
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
# A-ABORT reasons (PS3.8 9.3.8, source 2 = service-provider)
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0, 1, 2, 6
# C-STORE failure statuses of the request itself (PS3.7 9.1.1.1.9, Annex C)
STATUS_INVALID_INSTANCE, STATUS_CLASS_NOT_SUPPORTED = 0x0117, 0x0122
_PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
              5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}  # fmt: skip


def _storage_sop_classes() -> frozenset[str]:
    """Every storage SOP class pydicom knows (image, SR, SEG, RT, waveforms, documents...)."""
    from pydicom._uid_dict import UID_dictionary

    return frozenset(
        uid for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name
    )  # fmt: skip


def _transfer_syntaxes() -> frozenset[str]:
    from pydicom.uid import AllTransferSyntaxes

    return frozenset(str(u) for u in AllTransferSyntaxes)


@dataclass
class Request:
    """One C-STORE request, as the handler sees it."""

    calling_aet: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    #: the data set as received (no file meta), in fragments (memoryviews into PDU buffers)
    parts: list[memoryview]
    size: int


@dataclass
class Response:
    status: int
    error_comment: str = ""


StoreHandler = Callable[[Request], Response]


class AssociationError(Exception):
    """The peer broke the protocol: the association is aborted (A-ABORT source, reason)."""

    def __init__(self, message: str, reason: int = INVALID_PARAMETER, source: int = 2) -> None:
        super().__init__(message)
        self.reason, self.source = reason, source


class _Rejected(Exception):
    """The A-ASSOCIATE-RQ is refused: A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4."""

    def __init__(self, why: str, result: int, source: int, reason: int) -> None:
        super().__init__(why)
        self.rj = bytes((0, result, source, reason))


@dataclass
class _Context:
    abstract: str
    transfer: str


@dataclass
class _Message:
    """A DIMSE message being received on one presentation context."""

    context: int
    command: bytearray = field(default_factory=bytearray)
    command_done: bool = False
    elements: dict[int, bytes] = field(default_factory=dict)
    parts: list[memoryview] = field(default_factory=list)
    size: int = 0


def _pad_uid(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def _pad_text(s: str) -> bytes:
    b = s.encode("ascii", "replace")
    return b + b" " if len(b) % 2 else b


def _printable(s: str) -> str:
    """Peer text as it may appear in a log line or a file meta value: one line, no backslash."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in s)


def _ae(raw: bytes) -> str:
    return _printable(raw.decode("ascii", "replace").strip(" \0"))


def _element(group_elem: int, value: bytes) -> bytes:
    """An implicit VR little endian element of the command group."""
    return struct.pack("<HHI", 0x0000, group_elem, len(value)) + value


def encode_command(elements: dict[int, bytes]) -> bytes:
    """A command set (implicit VR LE, ascending tags) with its group length."""
    body = b"".join(_element(t, elements[t]) for t in sorted(elements))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def decode_command(raw: bytes | bytearray) -> dict[int, bytes]:
    """The command set's elements: element number -> value bytes (group 0000 only)."""
    out: dict[int, bytes] = {}
    pos, n = 0, len(raw)
    while pos + 8 <= n:
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > n:
            raise AssociationError("malformed command set")
        out[elem] = bytes(raw[pos : pos + length])
        pos += length
    return out


def _us(v: bytes | None) -> int:
    return struct.unpack("<H", v)[0] if v and len(v) >= 2 else 0


def _uid(v: bytes | None) -> str:
    return _printable((v or b"").decode("ascii", "replace").strip(" \0"))


def _valid_uid(uid: str) -> bool:
    """PS3.5 9.1: at most 64 characters, digit components without leading zeros."""
    parts = uid.split(".")
    return 0 < len(uid) <= 64 and all(p.isdigit() and (p == "0" or p[0] != "0") for p in parts)


def _items(buf: bytearray, start: int, end: int, what: str) -> Iterable[tuple[int, int, int]]:
    """(type, value start, value end) of the items or sub-items in ``buf[start:end]``; an item
    that runs past its parent's end is an invalid PDU (PS3.8 9.3.2)."""
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise AssociationError(f"{what}: {end - pos} stray bytes after the last item")
        kind, length = buf[pos], struct.unpack_from(">H", buf, pos + 2)[0]
        if pos + 4 + length > end:
            raise AssociationError(
                f"{what}: item 0x{kind:02X} of {length} bytes runs past its end ({end - pos - 4} left)"
            )
        yield kind, pos + 4, pos + 4 + length
        pos += 4 + length


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (explicit VR LE) of a received instance."""

    def el(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB",):
            return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    body = b"".join(
        (
            el(0x0001, b"OB", b"\x00\x01"),
            el(0x0002, b"UI", _pad_uid(sop_class)),
            el(0x0003, b"UI", _pad_uid(sop_instance)),
            el(0x0010, b"UI", _pad_uid(transfer_syntax)),
            el(0x0012, b"UI", _pad_uid(IMPLEMENTATION_UID)),
            el(0x0013, b"SH", _pad_text(IMPLEMENTATION_VERSION)),
            el(0x0016, b"AE", _pad_text(source_aet)) if source_aet else b"",
        )
    )
    return b"\0" * 128 + b"DICM" + el(0x0000, b"UL", struct.pack("<I", len(body))) + body


class Association:
    """One accepted connection, served on its own thread until release, abort or error."""

    def __init__(
        self, server: Scp, sock: socket.socket, address: tuple, artim_deadline: float
    ) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        self.calling_aet = ""
        self.contexts: dict[int, _Context] = {}
        self.peer_max_pdu = 0
        self.artim_deadline = artim_deadline
        self.established = False
        self.has_slot = False

    # -- socket ---------------------------------------------------------------------------
    def _recv_exact(self, n: int, deadline: float) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {n} bytes in time")
            self.sock.settimeout(left)
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise ConnectionError(f"peer closed the connection ({got} of {n} bytes read)")
            got += k
        return buf

    def _read_header(self, deadline: float) -> tuple[int, int]:
        head = self._recv_exact(6, deadline)
        return head[0], struct.unpack_from(">I", head, 2)[0]

    def _read_body(self, kind: int, length: int, deadline: float) -> bytearray:
        # the length is checked before anything is allocated (a 4 GB claim reads nothing)
        if length > (MAX_PDU + 6 if kind == 0x04 else MAX_OTHER_PDU):
            raise AssociationError(f"{_pdu_name(kind)} of {length} bytes exceeds the maximum")
        return self._recv_exact(length, deadline)

    def _read_pdu(self) -> tuple[int, bytearray]:
        """One PDU of the established association: idle ``timeout``, then ``MIN_RATE``."""
        kind, length = self._read_header(time.monotonic() + self.server.timeout)
        if kind not in (0x04, 0x05, 0x07):
            raise AssociationError(
                f"unexpected PDU type 0x{kind:02X} on an established association",
                UNEXPECTED_PDU if kind in _PDU_NAMES else UNRECOGNIZED_PDU,
            )
        deadline = time.monotonic() + self.server.timeout + length / MIN_RATE
        return kind, self._read_body(kind, length, deadline)

    def _send_pdu(self, kind: int, body: bytes) -> None:
        self.sock.sendall(struct.pack(">BBI", kind, 0, len(body)) + body)

    def _linger(self) -> None:
        """Sta13: let the peer read our last PDU and close (bounded), not reset it away."""
        try:
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + LINGER, 0
            while drained < MAX_OTHER_PDU:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.sock.settimeout(left)
                k = len(self.sock.recv(65536))
                if not k:
                    return
                drained += k
        except (OSError, ValueError):
            pass

    def _abort(self, source: int = 2, reason: int = 0) -> None:
        try:
            self._send_pdu(0x07, bytes((0, 0, source, reason)))
        except OSError:
            return
        self._linger()

    # -- association ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._associate()
        except _Rejected as e:
            self._reject(e)
        except AssociationError as e:
            log.warning("event=association_aborted calling_aet=%s address=%s abort_reason=%d "
                        "reason=%r", self._log_aet(), self.address[0], e.reason, str(e))  # fmt: skip
            self._abort(e.source, e.reason)
        except OSError as e:  # a timeout, the peer gone, a socket or TLS error
            self._log_lost(e)
        except Exception as e:  # noqa: BLE001  (a bug here must not cost the listener a thread's traceback)
            log.error("event=association_failed calling_aet=%s address=%s error=%r",
                      self._log_aet(), self.address[0], f"{type(e).__name__}: {e}")  # fmt: skip
            log.debug("association failure", exc_info=True)
            self._abort(2, REASON_NOT_SPECIFIED)
        finally:
            if self.has_slot:
                self.server._slots.release()
            try:
                self.sock.close()
            except OSError:
                pass

    def _log_aet(self) -> str:
        return self.calling_aet or "-"

    def _associate(self) -> None:
        """Sta2: the A-ASSOCIATE-RQ within ARTIM, then the established association."""
        kind, length = self._read_header(self.artim_deadline)
        if kind == 0x07:  # Sta2 + A-ABORT: close, answer nothing (AA-2)
            log.info("event=association_aborted_by_peer calling_aet=- phase=request")
            return
        if kind != 0x01:
            raise AssociationError(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}",
                UNEXPECTED_PDU if kind in _PDU_NAMES else UNRECOGNIZED_PDU,
            )
        if not self._negotiate(self._read_body(kind, length, self.artim_deadline)):
            return
        self._serve()

    def _reject(self, e: _Rejected) -> None:
        log.warning("event=association_rejected calling_aet=%s address=%s reason=%r",
                    self._log_aet(), self.address[0], str(e))  # fmt: skip
        try:
            self._send_pdu(0x03, e.rj)
            self._linger()
        except OSError:
            pass

    def _log_lost(self, e: OSError) -> None:
        """The association ended on the socket: nothing is sent."""
        if isinstance(e, TimeoutError):
            phase = "established" if self.established else "request (ARTIM)"
            log.warning("event=association_timeout calling_aet=%s address=%s phase=%s reason=%r",
                        self._log_aet(), self.address[0], phase, str(e) or "timeout")  # fmt: skip
        elif isinstance(e, ConnectionError):
            log.info("event=association_dropped calling_aet=%s address=%s reason=%r",
                     self._log_aet(), self.address[0], str(e) or type(e).__name__)  # fmt: skip
        else:
            log.warning("event=association_dropped calling_aet=%s address=%s reason=%r",
                        self._log_aet(), self.address[0], str(e))  # fmt: skip

    def _negotiate(self, rq: bytearray) -> bool:
        """Answer the A-ASSOCIATE-RQ: True once accepted (A-ASSOCIATE-AC sent), False once
        refused here (A-ASSOCIATE-RJ sent); :class:`_Rejected` for the other refusals."""
        if len(rq) < 68:
            raise AssociationError(f"A-ASSOCIATE-RQ of {len(rq)} bytes, its fixed fields are 68")
        called, calling = bytes(rq[4:20]), bytes(rq[20:36])
        self.calling_aet = _ae(calling)
        app_contexts, proposed = self._read_rq_items(rq)
        _check_acse(rq, app_contexts, self.calling_aet)
        srv = self.server
        if srv.allowed and self.calling_aet not in srv.allowed:
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            self._send_pdu(0x03, bytes((0, 1, 1, 3)))
            srv.on_rejected(self.calling_aet, self.address)
            self._linger()
            return False
        if not proposed:
            raise _Rejected("no presentation context proposed", 1, 1, 1)
        if not self._take_slot():
            return False
        self._send_pdu(0x02, self._associate_ac(called, calling, proposed))
        self.established = True
        srv.on_accepted(self.calling_aet, self.address)
        return True

    def _read_rq_items(self, rq: bytearray) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
        """The application contexts and presentation contexts proposed (id, abstract syntax,
        transfer syntaxes) of an A-ASSOCIATE-RQ; notes the peer's maximum PDU length."""
        proposed: list[tuple[int, str, list[str]]] = []
        app_contexts: list[str] = []
        for item, start, end in _items(rq, 68, len(rq), "A-ASSOCIATE-RQ"):
            if item == 0x10:
                app_contexts.append(_uid(bytes(rq[start:end])))
            elif item == 0x20:
                proposed.append(self._proposed_context(rq, start, end, proposed))
            elif item == 0x50:
                self._read_user_information(rq, start, end)
        return app_contexts, proposed

    def _read_user_information(self, rq: bytearray, start: int, end: int) -> None:
        for sub, s0, s1 in _items(rq, start, end, "user information item"):
            if sub == 0x51:
                if s1 - s0 != 4:
                    raise AssociationError(f"maximum length sub-item of {s1 - s0} bytes")
                self.peer_max_pdu = struct.unpack_from(">I", rq, s0)[0]

    def _take_slot(self) -> bool:
        """An association slot, or A-ASSOCIATE-RJ sent (False): a slot only for a complete,
        allowed request, so silent or refused peers take none."""
        if not self.server._slots.acquire(blocking=False):
            log.warning("event=association_rejected reason=too_many address=%s calling_aet=%s",
                        self.address[0], self.calling_aet)  # fmt: skip
            # rejected-transient, service-provider (presentation), local-limit-exceeded
            self._send_pdu(0x03, bytes((0, 2, 3, 2)))
            self._linger()
            return False
        self.has_slot = True
        return True

    def _associate_ac(
        self, called: bytes, calling: bytes, proposed: list[tuple[int, str, list[str]]]
    ) -> bytes:
        """The A-ASSOCIATE-AC body; the contexts accepted are noted in :attr:`contexts`."""
        items = [b"\x10\x00" + struct.pack(">H", len(APPLICATION_CONTEXT)) +
                 APPLICATION_CONTEXT.encode()]  # fmt: skip
        items += [self._context_result(pc_id, abstract, transfers)
                  for pc_id, abstract, transfers in proposed]  # fmt: skip
        impl = IMPLEMENTATION_UID.encode()
        ver = IMPLEMENTATION_VERSION.encode()
        user = (
            b"\x51\x00\x00\x04" + struct.pack(">I", MAX_PDU)
            + b"\x52\x00" + struct.pack(">H", len(impl)) + impl
            + b"\x55\x00" + struct.pack(">H", len(ver)) + ver
        )  # fmt: skip
        items.append(b"\x50\x00" + struct.pack(">H", len(user)) + user)
        return b"\x00\x01\x00\x00" + called + calling + bytes(32) + b"".join(items)

    def _context_result(self, pc_id: int, abstract: str, transfers: list[str]) -> bytes:
        """The presentation context item answering one proposed (the first transfer syntax
        we know wins); an accepted one is noted in :attr:`contexts`."""
        chosen = next((t for t in transfers if t in self.server.transfer_syntaxes), "")
        if abstract not in self.server.abstract_syntaxes:
            result = 3  # abstract-syntax-not-supported
        elif not chosen:
            result = 4  # transfer-syntaxes-not-supported
        else:
            result = 0
            self.contexts[pc_id] = _Context(abstract, chosen)
        ts = _pad_uid(chosen or "1.2.840.10008.1.2")  # not significant when rejected
        ts_item = b"\x40\x00" + struct.pack(">H", len(ts)) + ts
        return (b"\x21\x00" + struct.pack(">H", 4 + len(ts_item)) +
                bytes((pc_id, 0, result, 0)) + ts_item)  # fmt: skip

    @staticmethod
    def _proposed_context(
        rq: bytearray, start: int, end: int, proposed: list[tuple[int, str, list[str]]]
    ) -> tuple[int, str, list[str]]:
        if end - start < 4:
            raise AssociationError(f"presentation context item of {end - start} bytes")
        pc_id = rq[start]
        # PS3.8 9.3.2.2: odd integers 1-255, unique within the association
        if not pc_id % 2 or any(p[0] == pc_id for p in proposed):
            why = "even" if not pc_id % 2 else "proposed twice"
            raise AssociationError(f"presentation context ID {pc_id} is {why}")
        abstract, transfers = "", []
        for sub, s0, s1 in _items(rq, start + 4, end, f"presentation context {pc_id}"):
            if sub == 0x30:
                abstract = _uid(bytes(rq[s0:s1]))
            elif sub == 0x40:
                transfers.append(_uid(bytes(rq[s0:s1])))
        return pc_id, abstract, transfers

    def _serve(self) -> None:
        msg: _Message | None = None
        while True:
            kind, body = self._read_pdu()
            if kind == 0x05:  # A-RELEASE-RQ
                self._send_pdu(0x06, bytes(4))
                return
            if kind == 0x07:  # A-ABORT
                log.info("event=association_aborted_by_peer calling_aet=%s", self.calling_aet)
                return
            for pc_id, header, data in self._pdv_items(body):
                if msg is None:
                    msg = _Message(pc_id)
                elif msg.context != pc_id:
                    raise AssociationError("fragments of two messages interleaved")
                if self._fragment(msg, header, data):
                    msg = None

    def _pdv_items(self, body: bytearray) -> Iterator[tuple[int, int, memoryview]]:
        """(context id, message control header, fragment) of each presentation data value
        item of a P-DATA-TF, each checked as it is reached."""
        view = memoryview(body)
        pos, n = 0, len(body)
        if not n:
            raise AssociationError("P-DATA-TF without a presentation data value item")
        while pos < n:
            if pos + 6 > n:
                raise AssociationError(f"{n - pos} stray bytes after the last PDV item")
            length = struct.unpack_from(">I", body, pos)[0]
            if length < 2 or pos + 4 + length > n:
                raise AssociationError(
                    f"presentation data value item of {length} bytes, {n - pos - 4} left"
                )
            pc_id, header = body[pos + 4], body[pos + 5]
            data = view[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if pc_id not in self.contexts:
                raise AssociationError(f"data on presentation context {pc_id}, not accepted")
            yield pc_id, header, data

    def _fragment(self, msg: _Message, header: int, data: memoryview) -> bool:
        """Add one PDV fragment to ``msg``; True once the message was answered."""
        if header & 0x01:  # command fragment
            if msg.command_done:
                raise AssociationError("command fragment after the command's last")
            if len(msg.command) + len(data) > MAX_COMMAND:
                raise AssociationError(f"command set over {MAX_COMMAND} bytes")
            msg.command += data
            if header & 0x02:
                msg.command_done = True
                msg.elements = decode_command(msg.command)
                _check_command(msg.elements)
                if _us(msg.elements.get(0x0800)) == NO_DATA_SET:
                    self._dispatch(msg)
                    return True
            return False
        if not msg.command_done:
            raise AssociationError("data set fragment before its command")
        if msg.size + len(data) > self.server.max_instance_bytes:
            # our own limit, not the peer's error: service-user source (PS3.8 9.3.8)
            raise AssociationError(
                f"data set over {self.server.max_instance_bytes} bytes", REASON_NOT_SPECIFIED, 0
            )
        msg.parts.append(data)
        msg.size += len(data)
        if header & 0x02:
            self._dispatch(msg)
            return True
        return False

    def _dispatch(self, msg: _Message) -> None:
        cmd = msg.elements
        field_ = _us(cmd.get(0x0100))
        message_id = cmd[0x0110]
        ctx = self.contexts[msg.context]
        if field_ == C_ECHO_RQ:
            self._respond(msg.context, C_ECHO_RSP, message_id, VERIFICATION, "", Response(0))
            return
        if field_ != C_STORE_RQ:
            raise AssociationError(f"unsupported DIMSE command 0x{field_:04X}", 0)
        sop_class, sop_instance = _uid(cmd.get(0x0002)), _uid(cmd.get(0x1000))
        rsp = _request_defect(sop_class, sop_instance, ctx)
        if rsp is not None:
            log.warning("event=instance_refused status=0x%04X calling_aet=%s sop=%s defect=%r",
                        rsp.status, self.calling_aet, sop_instance or "-",
                        rsp.error_comment)  # fmt: skip
        else:
            req = Request(self.calling_aet, sop_class, sop_instance, ctx.transfer, msg.parts,
                          msg.size)  # fmt: skip
            try:
                rsp = self.server.handler(req)
            except Exception:  # noqa: BLE001  (never kill the association over one instance)
                log.exception("event=store_handler_failed sop=%s", sop_instance)
                rsp = Response(0xA700, "internal error")
        self._respond(msg.context, C_STORE_RSP, message_id, sop_class, sop_instance, rsp)

    def _respond(
        self, pc_id: int, field_: int, message_id: bytes, sop_class: str, sop_instance: str,
        rsp: Response,
    ) -> None:  # fmt: skip
        els = {
            0x0002: _pad_uid(sop_class),
            0x0100: struct.pack("<H", field_),
            0x0120: message_id,
            0x0800: struct.pack("<H", NO_DATA_SET),
            0x0900: struct.pack("<H", rsp.status),
        }
        if sop_instance:
            els[0x1000] = _pad_uid(sop_instance)
        if rsp.error_comment:
            els[0x0902] = _pad_text(rsp.error_comment[:64])
        command = encode_command(els)
        # the peer's maximum length (PS3.8 D.1; 0 = unlimited) bounds each P-DATA-TF we send
        step = max(1, self.peer_max_pdu - 6) if self.peer_max_pdu else len(command)
        for at in range(0, len(command), step):
            chunk = command[at : at + step]
            last = 0x02 if at + step >= len(command) else 0
            self._send_pdu(0x04, struct.pack(">IBB", len(chunk) + 2, pc_id, 0x01 | last) + chunk)


def _pdu_name(kind: int) -> str:
    return _PDU_NAMES.get(kind, f"PDU type 0x{kind:02X}")


def _check_acse(rq: bytearray, app_contexts: list[str], calling_aet: str) -> None:
    """:class:`_Rejected` for an A-ASSOCIATE-RQ of another protocol version or application
    context, or a blank calling AE title."""
    if not struct.unpack_from(">H", rq, 0)[0] & 1:
        # rejected-permanent, service-provider (ACSE), protocol-version-not-supported
        raise _Rejected("protocol version 1 not offered", 1, 2, 2)
    if app_contexts != [APPLICATION_CONTEXT]:
        # rejected-permanent, service-user, application-context-name-not-supported
        raise _Rejected(f"application context {app_contexts or 'missing'}", 1, 1, 2)
    if not calling_aet:  # PS3.8 9.3.2: an AE title is not all spaces
        raise _Rejected("calling AE title is blank", 1, 1, 3)


def _check_command(cmd: dict[int, bytes]) -> None:
    """The elements every request needs before it can be answered (PS3.7 9.3, 10.3)."""
    for tag, name in ((0x0100, "CommandField"), (0x0110, "MessageID"),
                      (0x0800, "CommandDataSetType")):  # fmt: skip
        if len(cmd.get(tag, b"")) != 2:
            raise AssociationError(f"command set without a 2-byte {name} (0000,{tag:04X})", 0)


def _request_defect(sop_class: str, sop_instance: str, ctx: _Context) -> Response | None:
    """A C-STORE-RQ that cannot be stored whatever its data set (PS3.7 9.1.1.1.9 statuses)."""
    if not _valid_uid(sop_instance):
        return Response(STATUS_INVALID_INSTANCE, "Affected SOP Instance UID missing or invalid")
    if sop_class != ctx.abstract:
        return Response(STATUS_CLASS_NOT_SUPPORTED, "Affected SOP Class UID is not the context's")
    return None


class Scp:
    """A threaded C-STORE/C-ECHO acceptor.

    ``handler`` runs on the association's thread for each C-STORE and returns the status;
    the response is sent after it returns (so after the instance is on disk, when the handler
    makes it durable).
    """

    def __init__(
        self,
        handler: StoreHandler,
        *,
        host: str,
        port: int,
        allowed_aets: Iterable[str] = (),
        max_associations: int = 16,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
        artim_timeout: float = 30.0,
        max_instance_bytes: int = 2 << 30,
        on_accepted: Callable[[str, tuple], None] = lambda aet, addr: None,
        on_rejected: Callable[[str, tuple], None] = lambda aet, addr: None,
    ) -> None:
        self.handler = handler
        self.allowed = frozenset(allowed_aets)
        self.max_associations = max_associations
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.artim_timeout = artim_timeout
        self.max_instance_bytes = max_instance_bytes
        #: connections being served, refused or in their handshake: each is a thread
        self.max_connections = 2 * max_associations + 16
        #: of which from one address (one host cannot take every thread)
        self.max_per_address = max_associations + 4
        self._per_address: dict[str, int] = {}
        self.on_accepted = on_accepted
        self.on_rejected = on_rejected
        self.abstract_syntaxes = _storage_sop_classes() | {VERIFICATION}
        self.transfer_syntaxes = _transfer_syntaxes()
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.server_address = self._sock.getsockname()
        self._slots = threading.BoundedSemaphore(max_associations)
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dropped: dict[str, tuple[int, float]] = {}  # key -> (not logged, last logged)
        self._acceptor = threading.Thread(target=self._accept, name="sprim-scp-accept", daemon=True)

    def start(self) -> Scp:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                # out of descriptors/memory, or a connection reset before accept: keep serving
                self._note_dropped("accept_failed", f"error={str(e)!r}")
                time.sleep(0.1)
                continue
            if self._stopping.is_set():
                conn.close()
                return
            self._spawn(conn, addr)

    def _spawn(self, conn: socket.socket, addr: tuple) -> None:
        with self._lock:
            full = len(self._threads) >= self.max_connections
            mine = self._per_address.get(addr[0], 0)
        if mine >= self.max_per_address:
            conn.close()
            self._note_dropped("connection_dropped", f"reason=too_many_from address={addr[0]}")
            return
        if not full:
            t = threading.Thread(
                target=self._serve, args=(conn, addr), name=f"sprim-scp-{addr[1]}", daemon=True
            )
            with self._lock:
                self._threads.add(t)
                self._conns.add(conn)
                self._per_address[addr[0]] = mine + 1
            try:
                t.start()
                return
            except RuntimeError:  # can't start new thread
                with self._lock:
                    self._threads.discard(t)
                    self._conns.discard(conn)
                    self._release_address(addr[0])
        conn.close()
        self._note_dropped("connection_dropped", f"reason=too_many_connections address={addr[0]}")

    def _note_dropped(self, event: str, detail: str) -> None:
        """A flood: one line a second per event and reason, with the count (acceptor thread)."""
        key = f"{event} {detail.split(' address=')[0]}"
        count, logged = self._dropped.get(key, (0, 0.0))
        now = time.monotonic()
        if now - logged >= 1.0:
            log.warning("event=%s %s dropped=%d", event, detail, count + 1)
            self._dropped[key] = (0, now)
        else:
            self._dropped[key] = (count + 1, logged)

    def _serve(self, conn: socket.socket, addr: tuple) -> None:
        raw = conn
        deadline = time.monotonic() + self.artim_timeout
        try:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.ssl_context is not None:
                try:
                    # one deadline for the whole handshake (CPython's do_handshake keeps it)
                    conn.settimeout(self.artim_timeout)
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    reason = getattr(e, "reason", None) or type(e).__name__
                    log.warning("event=tls_handshake_failed reason=%s address=%s",
                                reason, addr[0])  # fmt: skip
                    conn.close()
                    return
                with self._lock:
                    self._conns.discard(raw)
                    self._conns.add(conn)
            Association(self, conn, addr, deadline).run()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._conns.discard(conn)
                self._conns.discard(raw)
                self._release_address(addr[0])

    def _release_address(self, address: str) -> None:
        """One connection less from ``address`` (under ``_lock``)."""
        left = self._per_address.get(address, 1) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; wait for the associations in progress (each ends on its own)."""
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._acceptor.join(timeout)
        with self._lock:
            threads = list(self._threads)
            conns = list(self._conns)
        for c in conns:  # an idle association ends now; one mid-store is not acknowledged
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
