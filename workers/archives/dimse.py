"""Store back by DIMSE C-STORE to a configured AE (pynetdicom), for PACS without STOW-RS.

A destination is written ``dicom://AET@host:port`` (optionally ``?calling=SPRIM``), or
``dicom+tls://AET@host:port`` for DICOM TLS (the archive's CA bundle and client certificate:
``SPRIM_ARCHIVE_<NAME>_CA_BUNDLE``, ``_CLIENT_CERT``, ``_CLIENT_KEY``). Reading
(routing attributes, fetch) is delegated to another archive (``read_from``): the DICOMweb archive
or the listener's folder; without one those calls raise a permanent :class:`ArchiveError`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pydicom
from pydicom import Dataset
from pynetdicom import AE, Association, evt

from workers.archives.base import Archive, ArchiveError
from workers.core.tls import describe_tls_error, tls_advice

log = logging.getLogger(__name__)

#: C-STORE status meanings (PS3.4 B.2.3 and common vendor codes).
STATUS_TEXT = {
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0xA700: "refused: out of resources",
    0xA900: "error: data set does not match SOP class",
    0xC000: "error: cannot understand",
}


def status_meaning(code: int) -> str:
    """Human words for a C-STORE status code."""
    if code in STATUS_TEXT:
        return STATUS_TEXT[code]
    if 0xA700 <= code <= 0xA7FF:
        return "refused: out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "error: data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "error: cannot understand"
    if code in (0xB000, 0xB007, 0xB006):
        return "warning"
    return "failure"


def _is_transient_status(code: int) -> bool:
    return 0xA700 <= code <= 0xA7FF or code in (0x0210,)


class DimseArchive:
    """C-STORE SCU to one AE.

    Parameters
    ----------
    aet, host, port : str, str, int
        The called AE (the archive).
    calling_aet : str
        Our AE title (must be known to the archive).
    read_from : Archive, optional
        Where ``series_of_study`` and ``fetch_series`` go.
    timeout : float
        ACSE/DIMSE/network timeout, seconds.
    tls : ssl.SSLContext, optional
        DICOM TLS (PS3.15 B): the association runs over TLS with this client context.
    """

    def __init__(
        self,
        aet: str,
        host: str,
        port: int,
        *,
        calling_aet: str = "SPRIM",
        read_from: Archive | None = None,
        timeout: float = 30.0,
        name: str | None = None,
        tls: ssl.SSLContext | None = None,
        variables: str = "SPRIM_ARCHIVE_<NAME>_",
    ) -> None:
        self.aet, self.host, self.port = aet, host, int(port)
        self.tls = tls
        #: how this archive's variables start, for error messages
        self.variables = variables
        self.calling_aet = calling_aet
        self.read_from = read_from
        self.timeout = timeout
        self.name = name or f"dicom://{aet}@{host}:{port}"

    @classmethod
    def from_url(cls, url: str, **kw) -> DimseArchive:
        """``dicom[+tls]://AET@host:port[?calling=SPRIM]`` -> archive."""
        u = urlparse(url)
        if u.scheme not in ("dicom", "dicom+tls") or not u.username or not u.hostname or not u.port:
            raise ValueError(f"not a DIMSE destination (dicom://AET@host:port): {url!r}")
        if u.scheme == "dicom+tls" and kw.get("tls") is None:
            raise ValueError(f"{url!r}: dicom+tls needs a TLS context")
        calling = parse_qs(u.query).get("calling", [kw.pop("calling_aet", "SPRIM")])[0]
        name = kw.pop("name", None) or url
        return cls(u.username, u.hostname, u.port, calling_aet=calling, name=name, **kw)

    def __repr__(self) -> str:
        return f"DimseArchive({self.name!r})"

    # -- reading is delegated --------------------------------------------------------------
    def series_of_study(self, study_uid: str) -> list[dict]:
        if self.read_from is None:
            raise ArchiveError(f"{self.name}: store-only", transient=False, reason="no C-FIND")
        return self.read_from.series_of_study(study_uid)

    def fetch_series(self, study_uid: str, series_uid: str, dest: Path) -> list[Path]:
        if self.read_from is None:
            raise ArchiveError(f"{self.name}: store-only", transient=False, reason="no C-GET")
        return self.read_from.fetch_series(study_uid, series_uid, dest)

    # -- store -----------------------------------------------------------------------------
    def store(self, files: Sequence[Path]) -> None:
        """C-STORE every file on one association; return once each got a success status.

        Raises
        ------
        ArchiveError
            Transient when the association cannot be made or breaks, or on 0xA7xx (out of
            resources); permanent with the status meaning otherwise.
        """
        files = [Path(f) for f in files]
        if not files:
            return
        t0 = time.perf_counter()
        headers = [_header(f) for f in files]
        assoc = self._associate(headers)
        try:
            for f, h in zip(files, headers, strict=True):
                self._store_one(assoc, f, h)
        finally:
            if assoc.is_established:
                assoc.release()
        log.info(
            "event=store archive=%s instances=%d seconds=%.2f",
            self.name, len(files), time.perf_counter() - t0,
        )  # fmt: skip

    def _associate(self, headers: list[Dataset]) -> Association:
        """One association with a presentation context per SOP class and transfer syntax of
        ``headers`` (each also offered as native); transient ArchiveError when refused."""
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        pairs = sorted({(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers})
        for sop, ts in pairs[:128]:
            ae.add_requested_context(sop, [ts] if ts in _NATIVE else [ts, *_NATIVE])
        assoc = ae.associate(
            self.host, self.port, ae_title=self.aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
            tls_args=(self.tls, self.host) if self.tls else None,
        )  # fmt: skip
        if not assoc.is_established and self.tls is not None:
            self._raise_tls_failure()
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            raise ArchiveError(
                f"{self.name}: association {why}",
                transient=True,
                reason=f"association {why} with {self.aet}@{self.host}:{self.port}",
            )
        return assoc

    def _store_one(self, assoc: Association, f: Path, h: Dataset) -> None:
        """C-STORE one file; ArchiveError unless the archive answered success or a warning."""
        try:
            status = assoc.send_c_store(f)
        except Exception as e:  # noqa: BLE001
            raise ArchiveError(
                f"{self.name}: C-STORE {h.SOPInstanceUID}: {e}",
                transient=True,
                reason=str(e)[:300],
            ) from e
        if not status or "Status" not in status:
            raise ArchiveError(
                f"{self.name}: no C-STORE response for {h.SOPInstanceUID}",
                transient=True,
                reason="association lost or DIMSE timeout",
            )
        code = int(status.Status)
        if code != 0x0000 and code not in (0xB000, 0xB007, 0xB006):
            comment = str(status.get("ErrorComment", "") or "")
            raise ArchiveError(
                f"{self.name}: C-STORE {h.SOPInstanceUID} status 0x{code:04X}",
                transient=_is_transient_status(code),
                reason=f"0x{code:04X} {status_meaning(code)} {comment}".strip(),
            )

    def _raise_tls_failure(self) -> None:
        """pynetdicom only logs why a TLS connection failed: handshake once more to say it."""
        assert self.tls is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw:
                with self.tls.wrap_socket(raw, server_hostname=self.host):
                    return  # the handshake works: the association failed for another reason
        except OSError as e:
            why = describe_tls_error(e)
            if why is None:
                return
        hint, transient = tls_advice(why, self.variables)
        text = f"{self.name}: DICOM TLS: {why}; {hint}"
        raise ArchiveError(text, transient=transient, reason=text)


def _header(f: Path) -> Dataset:
    """The file's header; a permanent ArchiveError when it is not DICOM."""
    try:
        return pydicom.dcmread(f, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001
        raise ArchiveError(f"{f}: not DICOM", transient=False, reason=str(e)[:300]) from e


def _nodelay(event) -> None:
    """Nagle off on the association's socket (a stall per PDU otherwise)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_NATIVE = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
