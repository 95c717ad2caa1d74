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
(A-ABORT, source service-provider) and is logged in one line.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterable
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
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101


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
    """The peer broke the protocol: the association is aborted."""


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


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \0")


def _element(group_elem: int, value: bytes) -> bytes:
    """An implicit VR little endian element of the command group."""
    return struct.pack("<HHI", 0x0000, group_elem, len(value)) + value


def encode_command(elements: dict[int, bytes]) -> bytes:
    """A command set (implicit VR LE, ascending tags) with its group length."""
    body = b"".join(_element(t, elements[t]) for t in sorted(elements))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def decode_command(raw: bytes) -> dict[int, bytes]:
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
    return (v or b"").decode("ascii", "replace").strip(" \0")


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

    def __init__(self, server: Scp, sock: socket.socket, address: tuple) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        self.calling_aet = ""
        self.contexts: dict[int, _Context] = {}
        self.peer_max_pdu = 0

    # -- socket ---------------------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise ConnectionError("peer closed the connection")
            got += k
        return buf

    def _read_pdu(self) -> tuple[int, bytearray]:
        head = self._recv_exact(6)
        kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if kind == 0x04 and length > MAX_PDU + 6:
            raise AssociationError(f"P-DATA-TF of {length} bytes exceeds the announced maximum")
        if kind != 0x04 and length > 1 << 20:
            raise AssociationError(f"PDU type 0x{kind:02X} of {length} bytes")
        return kind, self._recv_exact(length)

    def _send_pdu(self, kind: int, body: bytes) -> None:
        self.sock.sendall(struct.pack(">BBI", kind, 0, len(body)) + body)

    def _abort(self, source: int = 2, reason: int = 0) -> None:
        try:
            self._send_pdu(0x07, bytes((0, 0, source, reason)))
        except OSError:
            pass

    # -- association ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            kind, body = self._read_pdu()
            if kind != 0x01:
                raise AssociationError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
            if not self._negotiate(body):
                return
            self._serve()
        except AssociationError as e:
            log.warning("event=association_aborted calling_aet=%s reason=%r",
                        self.calling_aet or "-", str(e))  # fmt: skip
            self._abort()
        except (ConnectionError, TimeoutError) as e:
            log.info("event=association_dropped calling_aet=%s reason=%r",
                     self.calling_aet or "-", str(e) or type(e).__name__)  # fmt: skip
        except OSError as e:
            log.warning("event=association_dropped calling_aet=%s reason=%r",
                        self.calling_aet or "-", str(e))  # fmt: skip
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def _negotiate(self, rq: bytearray) -> bool:
        if len(rq) < 68:
            raise AssociationError("A-ASSOCIATE-RQ too short")
        called, calling = bytes(rq[4:20]), bytes(rq[20:36])
        self.calling_aet = _ae(calling)
        proposed: list[tuple[int, str, list[str]]] = []
        pos = 68
        while pos + 4 <= len(rq):
            item, length = rq[pos], struct.unpack_from(">H", rq, pos + 2)[0]
            value = rq[pos + 4 : pos + 4 + length]
            pos += 4 + length
            if item == 0x20:
                pc_id, abstract, transfers = value[0], "", []
                sub = 4
                while sub + 4 <= len(value):
                    st, sl = value[sub], struct.unpack_from(">H", value, sub + 2)[0]
                    uid = _uid(bytes(value[sub + 4 : sub + 4 + sl]))
                    if st == 0x30:
                        abstract = uid
                    elif st == 0x40:
                        transfers.append(uid)
                    sub += 4 + sl
                proposed.append((pc_id, abstract, transfers))
            elif item == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    st, sl = value[sub], struct.unpack_from(">H", value, sub + 2)[0]
                    if st == 0x51 and sl == 4:
                        self.peer_max_pdu = struct.unpack_from(">I", value, sub + 4)[0]
                    sub += 4 + sl
        srv = self.server
        if srv.allowed and self.calling_aet not in srv.allowed:
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            self._send_pdu(0x03, bytes((0, 1, 1, 3)))
            srv.on_rejected(self.calling_aet, self.address)
            return False
        items = [b"\x10\x00" + struct.pack(">H", len(APPLICATION_CONTEXT)) +
                 APPLICATION_CONTEXT.encode()]  # fmt: skip
        for pc_id, abstract, transfers in proposed:
            chosen = next((t for t in transfers if t in srv.transfer_syntaxes), "")
            if abstract not in srv.abstract_syntaxes:
                result = 3  # abstract-syntax-not-supported
            elif not chosen:
                result = 4  # transfer-syntaxes-not-supported
            else:
                result = 0
                self.contexts[pc_id] = _Context(abstract, chosen)
            ts = _pad_uid(chosen or (transfers[0] if transfers else "1.2.840.10008.1.2"))
            sub = b"\x40\x00" + struct.pack(">H", len(ts)) + ts
            items.append(b"\x21\x00" + struct.pack(">H", 4 + len(sub)) +
                         bytes((pc_id, 0, result, 0)) + sub)  # fmt: skip
        impl = IMPLEMENTATION_UID.encode()
        ver = IMPLEMENTATION_VERSION.encode()
        user = (
            b"\x51\x00\x00\x04" + struct.pack(">I", MAX_PDU)
            + b"\x52\x00" + struct.pack(">H", len(impl)) + impl
            + b"\x55\x00" + struct.pack(">H", len(ver)) + ver
        )  # fmt: skip
        items.append(b"\x50\x00" + struct.pack(">H", len(user)) + user)
        self._send_pdu(0x02, b"\x00\x01\x00\x00" + called + calling + bytes(32) + b"".join(items))
        srv.on_accepted(self.calling_aet, self.address)
        return True

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
            if kind != 0x04:
                raise AssociationError(f"unexpected PDU type 0x{kind:02X}")
            view = memoryview(body)
            pos, n = 0, len(body)
            while pos + 6 <= n:
                length = struct.unpack_from(">I", body, pos)[0]
                if length < 2 or pos + 4 + length > n:
                    raise AssociationError("malformed presentation data value item")
                pc_id, header = body[pos + 4], body[pos + 5]
                data = view[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if pc_id not in self.contexts:
                    raise AssociationError(f"data on presentation context {pc_id}, not accepted")
                if msg is None:
                    msg = _Message(pc_id)
                elif msg.context != pc_id:
                    raise AssociationError("fragments of two messages interleaved")
                if header & 0x01:  # command fragment
                    if msg.command_done:
                        raise AssociationError("command fragment after the command's last")
                    msg.command += data
                    if header & 0x02:
                        msg.command_done = True
                        msg.elements = decode_command(msg.command)
                        if _us(msg.elements.get(0x0800)) == NO_DATA_SET:
                            self._dispatch(msg)
                            msg = None
                else:
                    if not msg.command_done:
                        raise AssociationError("data set fragment before its command")
                    msg.parts.append(data)
                    msg.size += len(data)
                    if header & 0x02:
                        self._dispatch(msg)
                        msg = None

    def _dispatch(self, msg: _Message) -> None:
        cmd = msg.elements
        field_ = _us(cmd.get(0x0100))
        message_id = cmd.get(0x0110, b"\0\0")
        ctx = self.contexts[msg.context]
        if field_ == C_ECHO_RQ:
            self._respond(msg.context, C_ECHO_RSP, message_id, VERIFICATION, "", Response(0))
            return
        if field_ != C_STORE_RQ:
            raise AssociationError(f"unsupported DIMSE command 0x{field_:04X}")
        sop_class, sop_instance = _uid(cmd.get(0x0002)), _uid(cmd.get(0x1000))
        req = Request(self.calling_aet, sop_class, sop_instance, ctx.transfer, msg.parts, msg.size)
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
        pdv = struct.pack(">IBB", len(command) + 2, pc_id, 0x03) + command
        self._send_pdu(0x04, pdv)


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
        on_accepted: Callable[[str, tuple], None] = lambda aet, addr: None,
        on_rejected: Callable[[str, tuple], None] = lambda aet, addr: None,
    ) -> None:
        self.handler = handler
        self.allowed = frozenset(allowed_aets)
        self.max_associations = max_associations
        self.ssl_context = ssl_context
        self.timeout = timeout
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
        self._acceptor = threading.Thread(target=self._accept, name="sprim-scp-accept", daemon=True)

    def start(self) -> Scp:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            if self._stopping.is_set():
                conn.close()
                return
            t = threading.Thread(
                target=self._serve, args=(conn, addr), name=f"sprim-scp-{addr[1]}", daemon=True
            )
            with self._lock:
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket, addr: tuple) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.timeout)
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    reason = getattr(e, "reason", None) or type(e).__name__
                    log.warning("event=tls_handshake_failed reason=%s address=%s",
                                reason, addr[0])  # fmt: skip
                    conn.close()
                    return
            if not self._slots.acquire(blocking=False):
                # rejected-transient, service-provider (presentation), local-limit-exceeded
                try:
                    conn.recv(6)
                    conn.sendall(struct.pack(">BBI", 0x03, 0, 4) + bytes((0, 2, 3, 2)))
                except OSError:
                    pass
                log.warning("event=association_rejected reason=too_many address=%s", addr[0])
                conn.close()
                return
            with self._lock:
                self._conns.add(conn)
            try:
                Association(self, conn, addr).run()
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._conns.discard(conn)

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
        for t in threads:
            t.join(timeout)
