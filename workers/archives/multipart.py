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
    reader = _PartReader(boundary)
    for chunk in chunks:
        reader.buf += chunk
        while (part := reader.next_part()) is not None:
            yield part
        if reader.closed:
            return
    raise ArchiveError(
        "WADO-RS answer ended before its closing boundary", transient=True, reason="truncated"
    )


class _PartReader:
    """A multipart body as it arrives: append to ``buf``, take complete parts with
    :meth:`next_part` (``closed`` once the closing delimiter is read)."""

    def __init__(self, boundary: bytes) -> None:
        self.delim = b"--" + boundary
        self.buf = bytearray()
        self.started = False  # the preamble and first delimiter are consumed
        self.closed = False
        self.scan = 0  # where the delimiter search resumes (the bytes before were searched)

    def next_part(self) -> bytes | None:
        """The next complete part's body, removed from ``buf``; None until more arrives."""
        if not self._past_preamble() or len(self.buf) < 2:
            return None
        if self.buf[:2] == b"--":
            self.closed = True
            return None
        h = self.buf.find(b"\r\n\r\n")
        if h < 0:
            return None
        body = h + 4
        end = self._body_end(content_length(bytes(self.buf[:h])), body)
        if end is None:
            return None
        part = bytes(self.buf[body:end])
        del self.buf[: end + 2 + len(self.delim)]
        self.scan = 0
        return part

    def _past_preamble(self) -> bool:
        if not self.started:
            i = self.buf.find(self.delim)
            if i < 0:
                return False
            del self.buf[: i + len(self.delim)]
            self.started = True
        return True

    def _body_end(self, length: int | None, body: int) -> int | None:
        """Where the part's body ends: by its Content-Length, else at the next delimiter;
        None while the body or the delimiter after it has not fully arrived."""
        if length is not None:
            end = body + length
            return end if len(self.buf) >= end + 2 + len(self.delim) else None
        end = self.buf.find(b"\r\n" + self.delim, max(body, self.scan))
        if end < 0:
            self.scan = max(body, len(self.buf) - len(self.delim) - 2)
            return None
        return end


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
