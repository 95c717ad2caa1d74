"""Multipart/related bodies of DICOMweb: split a streamed WADO-RS answer, build a STOW-RS body."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from workers.archives.base import ArchiveError


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header."""
    for param in content_type.split(";")[1:]:
        k, _, v = param.strip().partition("=")
        if k.lower() == "boundary":
            return v.strip().strip('"').encode()
    raise ArchiveError(
        f"WADO-RS answer is not multipart: {content_type!r}", transient=False, reason=content_type
    )


def iter_parts(chunks: Iterator[bytes], boundary: bytes) -> Iterator[bytes]:
    """The bodies of a streamed multipart message, each as soon as it is complete.

    Uses a part's Content-Length when given (Orthanc does), else searches the delimiter.
    Raises a transient :class:`ArchiveError` if the stream ends before the closing delimiter.
    """
    delim = b"--" + boundary
    buf = bytearray()
    started = False
    scan = 0
    for chunk in chunks:
        buf += chunk
        while True:
            if not started:
                i = buf.find(delim)
                if i < 0:
                    break
                del buf[: i + len(delim)]
                started = True
            if len(buf) < 2:
                break
            if buf[:2] == b"--":
                return
            h = buf.find(b"\r\n\r\n")
            if h < 0:
                break
            length = content_length(bytes(buf[:h]))
            body = h + 4
            if length is not None:
                end = body + length
                if len(buf) < end + 2 + len(delim):
                    break
            else:
                end = buf.find(b"\r\n" + delim, max(body, scan))
                if end < 0:
                    scan = max(body, len(buf) - len(delim) - 2)
                    break
            yield bytes(buf[body:end])
            del buf[: end + 2 + len(delim)]
            scan = 0
    raise ArchiveError(
        "WADO-RS answer ended before its closing boundary", transient=True, reason="truncated"
    )


def content_length(headers: bytes) -> int | None:
    """The Content-Length of a part's header block, if any."""
    for line in headers.split(b"\r\n"):
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v.strip())
    return None


def parts_of(files: Sequence[Path], boundary: str) -> Iterator[bytes]:
    """The STOW-RS body of ``files`` (each file's bytes as they are), piece by piece."""
    for f in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield f.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
