"""A tiny zip writer that can lie: declared sizes, link members, pre-compressed bomb streams.

``zipfile`` only writes honest archives; the corpus needs the dishonest ones.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_MB = 1 << 20


@dataclass
class Member:
    name: str
    data: bytes = b""
    #: Raw deflate stream to store instead of compressing ``data`` (bombs).
    deflated: bytes | None = None
    size: int | None = None  # true uncompressed size when ``deflated`` is given
    crc: int | None = None
    #: What the headers claim (None = the truth).
    declared_size: int | None = None
    symlink: bool = False


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zeros_bomb(name: str, mb: int) -> Member:
    """``mb`` MB of zeros in about 1 KB per MB of deflate stream, made in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    seg = c.compress(bytes(_MB)) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    crc = 0
    block = bytes(_MB)
    for _ in range(mb):
        crc = zlib.crc32(block, crc)
    return Member(name, deflated=seg * mb + end, size=mb * _MB, crc=crc)


def write_zip(path: Path, members: list[Member]) -> Path:
    body = bytearray()
    central = bytearray()
    for m in members:
        name = m.name.encode()
        if m.deflated is not None:
            comp, size, crc = m.deflated, m.size or 0, m.crc or 0
        else:
            comp, size, crc = deflate(m.data), len(m.data), zlib.crc32(m.data)
        declared = size if m.declared_size is None else m.declared_size
        offset = len(body)
        body += struct.pack(
            "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(comp), declared, len(name), 0
        )
        body += name + comp
        made_by = (3 << 8) | 20
        attr = ((0o120777 if m.symlink else 0o100644) << 16) & 0xFFFFFFFF
        central += struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            made_by,
            20,
            0,
            8,
            0,
            0x21,
            crc,
            len(comp),
            declared,
            len(name),
            0,
            0,
            0,
            0,
            attr,
            offset,
        )
        central += name
    eocd = struct.pack(
        "<4s4H2LH",
        b"PK\x05\x06",
        0,
        0,
        len(members),
        len(members),
        len(central),
        len(body),
        0,
    )
    path.write_bytes(bytes(body + central + eocd))
    return path
