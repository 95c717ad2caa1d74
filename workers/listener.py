"""``sprim listen``: a DICOM C-STORE SCP for any PACS that forwards copies.

- AE-title allow-list: associations from other calling AEs are refused at association.
- Each instance is written durably (temp file, fsync, rename, directory fsync) *before* the
  success status is returned; the bytes received are written as they are (no re-encoding).
- A malformed data set (undecodable, or without the UIDs of its own C-STORE request) gets a
  failure status (0xC210 / 0xA900) and one log line; the association and the server go on.
- Completeness by quiet period: a study is handed on once no instance of it arrived for
  ``quiet_period`` seconds; instances arriving later re-arm it (a late series re-triggers).
- Concurrent associations are served on their own threads (pynetdicom).

The store is a folder ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
readable as an archive (:class:`workers.archive.folder`-style) for fetching.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_OUT_OF_RESOURCES = 0xA700
PENDING_MARK = ".pending"


@dataclass
class StudyArrival:
    """What the listener knows of a study when its quiet period ends."""

    study_uid: str
    folder: Path
    calling_aets: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    instances: int = 0
    first: float = 0.0
    last: float = 0.0


OnComplete = Callable[[StudyArrival], None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_uid(value: object) -> str:
    uid = str(value or "").strip().rstrip("\x00")
    if not uid or not UID(uid).is_valid:
        raise ValueError(f"invalid UID {uid!r}")
    return uid


class ListenerStore:
    """The listener's durable folder store and per-study completeness tracking.

    Parameters
    ----------
    root : Path
        Store folder (created).
    quiet_period : float
        Seconds without a new instance after which a study is complete.
    on_complete : callable
        Called with a :class:`StudyArrival` once per quiet study (from the tracker thread); an
        exception is logged and the study is tried again after another quiet period.
    fsync : bool
        Flush every instance to disk before success (off only for throwaway benchmarks).
    """

    def __init__(
        self,
        root: Path,
        *,
        quiet_period: float = 30.0,
        on_complete: OnComplete | None = None,
        fsync: bool = True,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quiet_period = quiet_period
        self.on_complete = on_complete
        self.fsync = fsync
        self._lock = threading.Lock()
        self._open: dict[str, StudyArrival] = {}
        self._known_dirs: set[Path] = set()
        self.received = 0
        self.refused = 0
        self._resume()

    def _resume(self) -> None:
        """Studies received but not handed on before a restart are re-armed."""
        now = time.time()
        for mark in self.root.glob(f"*/{PENDING_MARK}"):
            study = mark.parent.name
            a = StudyArrival(study, mark.parent, first=now, last=now)
            a.calling_aets.update(mark.read_text().split())
            self._open[study] = a
            log.info("event=study_resumed study=%s", study)

    def write(self, study: str, series: str, sop: str, data: bytes, calling_aet: str) -> Path:
        """Write one instance durably and note its arrival; return its path."""
        series_dir = self.root / study / series
        if series_dir not in self._known_dirs:
            series_dir.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                _fsync_dir(series_dir.parent)
                _fsync_dir(self.root)
            self._known_dirs.add(series_dir)
        path = series_dir / f"{sop}.dcm"
        tmp = series_dir / f".{sop}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(series_dir)
        self._arrived(study, series, calling_aet)
        return path

    def _arrived(self, study: str, series: str, calling_aet: str) -> None:
        now = time.time()
        with self._lock:
            self.received += 1
            a = self._open.get(study)
            new = a is None
            if new:
                a = self._open[study] = StudyArrival(study, self.root / study, first=now)
            a.calling_aets.add(calling_aet)
            a.series.add(series)
            a.instances += 1
            a.last = now
        if new:
            mark = self.root / study / PENDING_MARK
            mark.write_text(" ".join(sorted(a.calling_aets)))
            log.info("event=study_opened study=%s calling_aet=%s", study, calling_aet)

    def due(self, now: float | None = None) -> list[StudyArrival]:
        """Studies whose quiet period has ended (removed from the open set)."""
        now = time.time() if now is None else now
        with self._lock:
            done = [a for a in self._open.values() if now - a.last >= self.quiet_period]
            for a in done:
                del self._open[a.study_uid]
        return done

    def poll(self, now: float | None = None) -> int:
        """Hand on every quiet study; return how many were handed on."""
        n = 0
        for a in self.due(now):
            try:
                if self.on_complete:
                    self.on_complete(a)
            except Exception as e:  # noqa: BLE001  (logged; retried after another quiet period)
                log.error("event=study_submit_failed study=%s error=%r", a.study_uid, str(e))
                with self._lock:
                    a.last = time.time()
                    self._open.setdefault(a.study_uid, a)
                continue
            (a.folder / PENDING_MARK).unlink(missing_ok=True)
            log.info(
                "event=study_complete study=%s series=%d instances=%d calling_aets=%s seconds=%.2f",
                a.study_uid, len(a.series), a.instances, ",".join(sorted(a.calling_aets)),
                a.last - a.first,
            )  # fmt: skip
            n += 1
        return n

    @property
    def open_studies(self) -> list[str]:
        with self._lock:
            return sorted(self._open)


class Listener:
    """The C-STORE SCP around a :class:`ListenerStore`.

    Parameters
    ----------
    store : ListenerStore
    aet : str
        Our AE title.
    host, port : str, int
        Address to bind (port 0: a free port, see :attr:`port` after :meth:`start`).
    allowed_aets : Iterable[str]
        Calling AE titles accepted; empty accepts any.
    """

    def __init__(
        self,
        store: ListenerStore,
        *,
        aet: str = "SPRIM",
        host: str = "127.0.0.1",
        port: int = 11112,
        allowed_aets: Iterable[str] = (),
        max_associations: int = 16,
    ) -> None:
        self.store = store
        self.aet = aet
        self.host = host
        self.port = port
        self.allowed = [a.strip() for a in allowed_aets if a.strip()]
        self.ae = AE(ae_title=aet)
        self.ae.maximum_associations = max_associations
        # Peers may send PDUs as large as they like: with pynetdicom's default (16 kB) a 512²
        # slice arrives in 32 PDUs, each reassembled in Python — 5x slower receive (measured).
        self.ae.maximum_pdu_size = 0
        self.ae.require_calling_aet = self.allowed
        for cx in StoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server = None
        self._stop = threading.Event()
        self._tracker: threading.Thread | None = None

    # -- handlers --------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        req = event.request
        try:
            ds = event.dataset
            study = _safe_uid(ds.StudyInstanceUID)
            series = _safe_uid(ds.SeriesInstanceUID)
            sop = _safe_uid(ds.SOPInstanceUID)
        except Exception as e:  # noqa: BLE001
            self.store.refused += 1
            code = STATUS_DOES_NOT_MATCH if isinstance(e, AttributeError | ValueError) else None
            code = code or STATUS_CANNOT_UNDERSTAND
            log.warning(
                "event=instance_refused calling_aet=%s sop=%s status=0x%04X error=%r",
                calling, req.AffectedSOPInstanceUID, code, str(e)[:200],
            )  # fmt: skip
            return code
        sop_class = str(ds.get("SOPClassUID", req.AffectedSOPClassUID))
        if sop != str(req.AffectedSOPInstanceUID) or sop_class != str(req.AffectedSOPClassUID):
            self.store.refused += 1
            log.warning(
                "event=instance_refused calling_aet=%s sop=%s status=0x%04X error=%r",
                calling, req.AffectedSOPInstanceUID, STATUS_DOES_NOT_MATCH,
                "SOP class/instance UID differs from the C-STORE request",
            )  # fmt: skip
            return STATUS_DOES_NOT_MATCH
        try:
            self.store.write(study, series, sop, event.encoded_dataset(), calling)
        except OSError as e:
            log.error("event=instance_write_failed sop=%s error=%r", sop, str(e))
            return STATUS_OUT_OF_RESOURCES
        log.debug("event=instance_stored study=%s series=%s sop=%s", study, series, sop)
        return STATUS_SUCCESS

    @staticmethod
    def _on_open(event) -> None:
        import socket

        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _on_rejected(event) -> None:
        log.warning(
            "event=association_rejected calling_aet=%s address=%s",
            event.assoc.requestor.ae_title, event.assoc.requestor.address,
        )  # fmt: skip

    @staticmethod
    def _on_accepted(event) -> None:
        log.info(
            "event=association_accepted calling_aet=%s address=%s",
            event.assoc.requestor.ae_title, event.assoc.requestor.address,
        )  # fmt: skip

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> Listener:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self._server = self.ae.start_server(
            (self.host, self.port), block=False, evt_handlers=handlers
        )
        self.port = self._server.server_address[1]
        self._stop.clear()
        self._tracker = threading.Thread(
            target=self._track, name="sprim-listen-tracker", daemon=True
        )
        self._tracker.start()
        log.info(
            "event=listen_started aet=%s host=%s port=%d allowed=%s quiet_period=%.1f root=%s",
            self.aet, self.host, self.port, ",".join(self.allowed) or "*",
            self.store.quiet_period, self.store.root,
        )  # fmt: skip
        return self

    def _track(self) -> None:
        tick = min(1.0, max(0.05, self.store.quiet_period / 10))
        while not self._stop.wait(tick):
            self.store.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._tracker is not None:
            self._tracker.join(5)
            self._tracker = None
        log.info(
            "event=listen_stopped received=%d refused=%d", self.store.received, self.store.refused
        )

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM."""
        import signal

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
