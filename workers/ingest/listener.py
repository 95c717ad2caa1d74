"""``sprim listen``: a DICOM C-STORE SCP for any PACS that forwards copies.

- AE-title allow-list: associations from other calling AEs are refused at association.
- Each instance is judged before it is stored (:func:`judge`): its header is parsed up to the
  pixel data (pixels are never decoded), its UIDs must be those of its C-STORE request, a CT,
  MR or PET image must pass the input gate's per-instance check
  (:func:`workers.reading.validate.check_instance`) and any other image must read as an image. A defect
  gets a failure status (see ``STATUS_*``) and one log line; the association and the server go
  on. Non-image SOP classes (SR, SEG, PR, KOS, RT, encapsulated documents...) are stored as
  received and never routed (:func:`routable_series`).
- An accepted instance is written durably (temp file, fdatasync, length read back, rename,
  directory fsync) *before* the success status; the bytes received are written as they are
  (no re-encoding). A failed write answers 0xA700 and leaves no partial file. The directory
  fsyncs of instances renamed into the same series folder meanwhile (concurrent associations)
  are one fsync: group commit, each response still after the fsync covering its rename.
- Completeness by quiet period: a study is handed on once no instance of it arrived for
  ``quiet_period`` seconds; instances arriving later re-arm it (a late series re-triggers).
- Concurrent associations are served on their own threads by :mod:`workers.ingest.scp`
  (not pynetdicom: its reactor cost 5-7x storescp per instance; see that module).
- Optional DICOM TLS (``ssl_context``, :func:`workers.core.tls.server_context`): every
  association is then TLS; the handshake runs in the association's thread.

The store is a folder ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
readable as an archive (:class:`workers.archives.folder`-style) for fetching.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pydicom.uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from workers.ingest import scp
from workers.reading.pixels import is_image_sop_class
from workers.reading.validate import check_instance

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 Annex B, Storage Service Class; docs/archive-loop.md).
STATUS_SUCCESS = 0x0000
#: Refused: Out of Resources — the instance could not be written (disk full, I/O error).
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: Data Set Does Not Match SOP Class — UIDs missing/invalid or not those of the request,
#: or an image instance sprim could not use (no pixel data, pixel format, geometry, values).
STATUS_DOES_NOT_MATCH = 0xA900
#: Error: Cannot Understand — the data set does not parse in the negotiated transfer syntax.
STATUS_CANNOT_UNDERSTAND = 0xC000
PENDING_MARK = ".pending"
#: A deflated data set is inflated to be judged: at most this much (a deflate bomb of a few MB
#: would otherwise inflate to GBs in memory).
MAX_INFLATED_BYTES = 512 << 20
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float-, DoubleFloatPixelData
#: Image SOP classes sprim builds volumes from: the full input-gate check applies to each
#: instance. Other image classes (SC, DX, US...) are stored once they read as an image.
VOLUME_SOP_CLASSES = frozenset(
    str(getattr(pydicom.uid, name))
    for name in (
        "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
        "MRImageStorage", "EnhancedMRImageStorage", "LegacyConvertedEnhancedMRImageStorage",
        "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
        "LegacyConvertedEnhancedPETImageStorage",
    )
)  # fmt: skip


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


class _DirSync:
    """Group commit of one folder's fsyncs: a caller returns once an fsync that *started after
    its rename* has completed; callers arriving while one runs share the next one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cond = threading.Condition()
        self.renamed = 0  # renames announced
        self.synced = 0  # renames covered by a completed fsync
        self.running = False
        self.fsyncs = 0

    def sync(self) -> None:
        with self.cond:
            self.renamed += 1
            mine = self.renamed
            while self.synced < mine:
                if self.running:
                    self.cond.wait()
                    continue
                self.running, target = True, self.renamed
                self.cond.release()
                try:
                    _fsync_dir(self.path)
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.cond.notify_all()
                self.synced, self.fsyncs = max(self.synced, target), self.fsyncs + 1


@dataclass
class Verdict:
    """What the listener makes of one received data set (status 0 = store it)."""

    status: int
    defect: str = ""
    study: str = ""
    series: str = ""
    sop: str = ""
    #: False for non-image SOP classes: stored as received, never routed.
    image: bool = True


class _Unparseable(ValueError):
    """The data set does not parse in its transfer syntax (0xC000)."""


def read_header(fp: BinaryIO, transfer_syntax: str) -> tuple[Dataset, bool, int | None]:
    """Parse a received data set up to its pixel data, never reading the pixel values.

    Returns ``(header, has_pixel_data, pixel_bytes)``: ``pixel_bytes`` is the length of the
    native pixel data value, None when encapsulated (its items are walked instead: present,
    complete, one fragment per frame at least). Raises :class:`_Unparseable` for bytes that
    are not a data set of this transfer syntax, or that end before an element they announce.
    """
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        fp = _inflated(fp)
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    fp.seek(0)
    ds, pixel_length = _read_up_to_pixels(fp, ts, size)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    if pixel_length is None:
        if fp.tell() < size:
            raise _Unparseable(f"data set stops parsing at byte {fp.tell()} of {size}")
        return ds, False, None
    header = 8 if ts.is_implicit_VR else 12  # tag + (VR + reserved) + length
    start = fp.tell() + header
    if pixel_length == 0xFFFFFFFF:
        end = _encapsulated_end(fp, ds, start, size)
        pixel_bytes = None
    else:
        end = start + pixel_length
        if end > size:
            raise _Unparseable(
                f"pixel data announces {pixel_length} bytes, {size - start} received"
            )
        pixel_bytes = pixel_length
    if end < size:  # elements after the pixel data (padding, signatures) must parse too
        _check_after_pixels(fp, end, ts)
    return ds, True, pixel_bytes


def _inflated(fp: BinaryIO) -> BinaryIO:
    """A deflated data set inflated in memory, at most :data:`MAX_INFLATED_BYTES`."""
    fp.seek(0)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(fp.read(), MAX_INFLATED_BYTES)
    except zlib.error as e:
        raise _Unparseable(f"deflated data set does not inflate ({e})") from e
    if inflater.unconsumed_tail or len(inflated) >= MAX_INFLATED_BYTES:
        raise _Unparseable(f"deflated data set inflates past {MAX_INFLATED_BYTES} bytes")
    return BytesIO(inflated)


def _read_up_to_pixels(fp: BinaryIO, ts: UID, size: int) -> tuple[Dataset, int | None]:
    """The elements before the pixel data, and the pixel data's value length (None: no pixel
    data); ``fp`` is left at the pixel data element. An element announcing more bytes than
    were received is :class:`_Unparseable` (pydicom would read it short, silently)."""
    found: list[int] = []
    short: list[int] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag >> 16 == 0x7FE0 and tag in _PIXEL_TAGS:  # shift: int speed, not BaseTag.__eq__
            found.append(length)
            return True
        if length != 0xFFFFFFFF and fp.tell() + length > size:
            short.append(tag)
            return True
        return False

    try:
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=at_pixels)
    except Exception as e:  # noqa: BLE001  (any parser error means: cannot understand)
        raise _Unparseable(f"not a data set in {ts.name} ({type(e).__name__})") from e
    if short:
        raise _Unparseable(f"not a data set in {ts.name}: element {short[0]} ends past the data")
    return ds, (found[0] if found else None)


def _encapsulated_end(fp: BinaryIO, ds: Dataset, start: int, size: int) -> int:
    """End offset of encapsulated pixel data whose items start at ``start``: complete, and
    one fragment per frame at least."""
    fragments, end = _walk_items(fp, start, size)
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as e:
        raise _Unparseable("NumberOfFrames is not a number") from e
    if fragments < frames:
        raise _Unparseable(f"encapsulated pixel data: {fragments} fragments for {frames} frames")
    return end


def _check_after_pixels(fp: BinaryIO, end: int, ts: UID) -> None:
    """The elements after the pixel data (padding, signatures) parse too."""
    fp.seek(end)
    try:
        read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian)
    except Exception as e:  # noqa: BLE001
        raise _Unparseable(f"bytes after the pixel data do not parse ({type(e).__name__})") from e


def _walk_items(fp: BinaryIO, pos: int, size: int) -> tuple[int, int]:
    """Fragments of encapsulated pixel data (after the offset table) and the end offset."""
    items = 0
    while pos + 8 <= size:
        fp.seek(pos)
        group, elem, length = struct.unpack("<HHL", fp.read(8))
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return max(0, items - 1), pos
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF or pos + length > size:
            raise _Unparseable("encapsulated pixel data is truncated or malformed")
        pos += length
        items += 1
    raise _Unparseable("encapsulated pixel data has no sequence delimiter (truncated)")


def _uid(ds: Dataset, keyword: str) -> str:
    uid = str(ds.get(keyword) or "").strip().rstrip("\x00")
    if not uid:
        raise LookupError(f"no {keyword}")
    if not UID(uid).is_valid:
        raise LookupError(f"{keyword} is not a valid UID")
    return uid


def judge(fp: BinaryIO, transfer_syntax: str, sop_class: str, sop_instance: str) -> Verdict:
    """Decide what to answer to one C-STORE before anything is written.

    ``fp`` holds the data set as received (no file meta); ``sop_class`` / ``sop_instance``
    are the request's Affected SOP Class / Instance UIDs.
    """
    try:
        ds, has_pixels, pixel_bytes = read_header(fp, transfer_syntax)
    except _Unparseable as e:
        return Verdict(STATUS_CANNOT_UNDERSTAND, str(e))
    except Exception as e:  # noqa: BLE001  (never an exception out of the C-STORE handler)
        return Verdict(STATUS_CANNOT_UNDERSTAND, f"unreadable data set ({type(e).__name__})")
    ids = _instance_uids(ds)
    if isinstance(ids, Verdict):
        return ids
    v = Verdict(
        STATUS_SUCCESS, study=ids["StudyInstanceUID"], series=ids["SeriesInstanceUID"],
        sop=ids["SOPInstanceUID"], image=is_image_sop_class(ids["SOPClassUID"]),
    )  # fmt: skip
    v.defect = _request_mismatch(ids, sop_class, sop_instance) or (
        _image_refusal(ds, ids["SOPClassUID"], has_pixels, pixel_bytes) if v.image else ""
    )
    if v.defect:
        v.status = STATUS_DOES_NOT_MATCH
    return v


def _instance_uids(ds: Dataset) -> dict[str, str] | Verdict:
    """The data set's SOP Class, SOP Instance, Study and Series Instance UIDs, or the verdict
    refusing it (naming its series when that much is readable)."""
    try:
        hint = scp._printable(str(ds.get("SeriesInstanceUID") or "")[:64])  # for refusals
    except Exception:  # noqa: BLE001
        hint = ""
    try:
        return {k: _uid(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                         "SeriesInstanceUID")}  # fmt: skip
    except LookupError as e:
        return Verdict(STATUS_DOES_NOT_MATCH, str(e), series=hint)
    except Exception as e:  # noqa: BLE001  (a value pydicom cannot convert)
        return Verdict(
            STATUS_CANNOT_UNDERSTAND, f"unreadable UID ({type(e).__name__})", series=hint
        )


def _request_mismatch(ids: dict[str, str], sop_class: str, sop_instance: str) -> str:
    """The data set is not the one its C-STORE request announces ("" when it is)."""
    if ids["SOPInstanceUID"] != str(sop_instance).strip().rstrip("\x00"):
        return "SOPInstanceUID differs from the C-STORE request"
    if ids["SOPClassUID"] != str(sop_class).strip().rstrip("\x00"):
        return "SOPClassUID differs from the C-STORE request"
    return ""


def _image_refusal(ds: Dataset, sop_class: str, has_pixels: bool, pixel_bytes: int | None) -> str:
    """Why an image instance is of no use to sprim ("" when it is): the input gate's check for
    a volume SOP class, a readable pixel matrix for any other image."""
    if not has_pixels:
        return "no pixel data (header only)"
    try:
        if sop_class in VOLUME_SOP_CLASSES:
            defects = check_instance(ds, pixel_bytes)
        else:
            defects = _image_defects(ds, pixel_bytes)
    except Exception as e:  # noqa: BLE001  (a value pydicom cannot convert)
        log.debug("instance check failed", exc_info=True)
        defects = [f"unreadable header value ({type(e).__name__})"]
    return "; ".join(defects)


def _image_defects(ds: Dataset, pixel_bytes: int | None) -> list[str]:
    """An image of a class sprim does not build volumes from (SC, DX, US...): it must only be
    a readable image — a pixel matrix whose size agrees with its pixel data."""
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    bits = int(ds.get("BitsAllocated") or 0)
    if not (rows and cols and bits):
        return [f"Rows {rows}, Columns {cols}, BitsAllocated {bits}: no pixel matrix"]
    if pixel_bytes is not None:
        frames = int(ds.get("NumberOfFrames") or 1)
        want = (rows * cols * frames * int(ds.get("SamplesPerPixel") or 1) * bits + 7) // 8
        if pixel_bytes not in (want, want + want % 2):
            return [f"PixelData holds {pixel_bytes} bytes but the header describes {want}"]
    return []


def _write_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """``writev`` of every part (one system call for the usual header + one-fragment body)."""
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        n = os.writev(fd, views[:1024])
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def routable_series(series: Sequence[dict]) -> list[dict]:
    """The series of a study rules may pick: non-image SOP classes are kept for the archive only."""
    return [s for s in series if is_image_sop_class(str(s.get("SOPClassUID") or ""))]


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
        self._known_dirs: dict[Path, _DirSync] = {}
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

    def write(
        self,
        study: str,
        series: str,
        sop: str,
        data: bytes | Sequence[bytes | memoryview],
        calling_aet: str,
    ) -> Path:
        """Write one instance durably and note its arrival; return its path.

        ``data`` is the file's bytes, or its parts in order (written without joining them).
        Raises OSError when the file could not be written, or is not on disk at its full
        length after the write; no partial file is left behind.
        """
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        size = sum(memoryview(p).nbytes for p in parts)
        series_dir = self.root / study / series
        dir_sync = self._known_dirs.get(series_dir)
        if dir_sync is None:
            series_dir.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                _fsync_dir(series_dir.parent)
                _fsync_dir(self.root)
            dir_sync = self._known_dirs.setdefault(series_dir, _DirSync(series_dir))
        path = series_dir / f"{sop}.dcm"
        tmp = series_dir / f".{sop}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, parts)
                if self.fsync:
                    os.fdatasync(fd)  # data and size; the name is the folder's fsync below
                # read back what the file system holds before answering success
                on_disk = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if on_disk != size:
                raise OSError(f"{on_disk} of {size} bytes on disk after writing {tmp.name}")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            dir_sync.sync()
        self._arrived(study, series, calling_aet)
        return path

    def _arrived(self, study: str, series: str, calling_aet: str) -> None:
        now = time.time()
        with self._lock:
            self.received += 1
            a = self._open.get(study)
            new = a is None
            if a is None:
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
    ssl_context : ssl.SSLContext, optional
        DICOM TLS on the port (plain DICOM is then refused).
    timeout, artim_timeout, max_instance_bytes
        Of :class:`workers.ingest.scp.Scp`: idle seconds between PDUs, seconds from the
        connection to a complete A-ASSOCIATE-RQ (PS3.8 ARTIM), largest data set held.
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
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
        artim_timeout: float = 30.0,
        max_instance_bytes: int = 2 << 30,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.artim_timeout = artim_timeout
        self.max_instance_bytes = max_instance_bytes
        self.ssl_context = ssl_context
        self.aet = aet
        self.host = host
        self.port = port
        self.allowed = [a.strip() for a in allowed_aets if a.strip()]
        self.max_associations = max_associations
        self._server: scp.Scp | None = None
        self._stop = threading.Event()
        self._tracker: threading.Thread | None = None

    # -- handlers --------------------------------------------------------------------------
    def _on_store(self, req: scp.Request) -> scp.Response:
        """Judge the header, write the bytes as received, answer: on the association's thread."""
        body = req.parts[0] if len(req.parts) == 1 else b"".join(req.parts)
        v = judge(BytesIO(body), req.transfer_syntax, req.sop_class, req.sop_instance)
        if v.status == STATUS_SUCCESS:
            head = scp.file_meta(req.sop_class, req.sop_instance, req.transfer_syntax,
                                 req.calling_aet)  # fmt: skip
            try:
                self.store.write(v.study, v.series, v.sop, (head, *req.parts), req.calling_aet)
            except OSError as e:
                v.status, v.defect = STATUS_OUT_OF_RESOURCES, f"could not be stored ({e})"
        if v.status != STATUS_SUCCESS:
            return self._refuse(req, v)
        log.debug("event=instance_stored study=%s series=%s sop=%s image=%s",
                  v.study, v.series, v.sop, v.image)  # fmt: skip
        return scp.Response(STATUS_SUCCESS)

    def _refuse(self, req: scp.Request, v: Verdict) -> scp.Response:
        """One log line (no patient data: UIDs and the defect) and the failure status."""
        with self.store._lock:
            self.store.refused += 1
        level = logging.ERROR if v.status == STATUS_OUT_OF_RESOURCES else logging.WARNING
        log.log(
            level,
            "event=instance_refused status=0x%04X calling_aet=%s sop=%s series=%s defect=%r",
            v.status, req.calling_aet, req.sop_instance, v.series or "-", v.defect[:400],
        )  # fmt: skip
        # Error Comment (LO, 64 characters) is shown by most senders next to the status.
        comment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in v.defect[:64])
        return scp.Response(v.status, comment)

    @staticmethod
    def _on_rejected(calling_aet: str, address: tuple) -> None:
        log.warning("event=association_rejected calling_aet=%s address=%s",
                    calling_aet, address[0])  # fmt: skip

    @staticmethod
    def _on_accepted(calling_aet: str, address: tuple) -> None:
        log.info("event=association_accepted calling_aet=%s address=%s",
                 calling_aet, address[0])  # fmt: skip

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> Listener:
        self._server = scp.Scp(
            self._on_store, host=self.host, port=self.port, allowed_aets=self.allowed,
            max_associations=self.max_associations, ssl_context=self.ssl_context,
            on_accepted=self._on_accepted, on_rejected=self._on_rejected, timeout=self.timeout,
            artim_timeout=self.artim_timeout, max_instance_bytes=self.max_instance_bytes,
        ).start()  # fmt: skip
        self.port = self._server.server_address[1]
        self._stop.clear()
        self._tracker = threading.Thread(
            target=self._track, name="sprim-listen-tracker", daemon=True
        )
        self._tracker.start()
        log.info(
            "event=listen_started aet=%s host=%s port=%d tls=%s allowed=%s quiet_period=%.1f "
            "root=%s", self.aet, self.host, self.port, _tls_mode(self.ssl_context),
            ",".join(self.allowed) or "*", self.store.quiet_period, self.store.root,
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


def _tls_mode(ctx: ssl.SSLContext | None) -> str:
    if ctx is None:
        return "off"
    return "mutual" if ctx.verify_mode == ssl.CERT_REQUIRED else "on"
