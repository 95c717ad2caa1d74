"""Byte-level DICOM encoding (explicit VR little endian) for fast series writers.

A derived series shares almost every attribute between its instances: encode those once with
pydicom (``encode``), then build each file from bytes (``element``, ``sequence``, ``item``,
``meta_encoder``) instead of serialising a Dataset per slice (pydicom 0.61 s for 256
slices, raw bytes 0.035 s). Callers keep elements in ascending tag order.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from workers.writers.common import file_meta


def encode(elem: DataElement, encodings: list[str]) -> bytes:
    """One element (any VR, sequences included) encoded by pydicom."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def element(tag: int, vr: str, value: str) -> bytes:
    """A short-form text element (UI, IS, DS, SH, CS): tag, VR, 2-byte length, padded value."""
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    return head + vr.encode() + len(raw).to_bytes(2, "little") + raw


def sequence(tag: int, items: list[bytes]) -> bytes:
    """A defined-length SQ element from pre-encoded items (explicit VR little endian)."""
    body = b"".join(items)
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + b"SQ\x00\x00"
    return head + len(body).to_bytes(4, "little") + body


def item(body: bytes) -> bytes:
    """A defined-length sequence item around an encoded dataset."""
    return b"\xfe\xff\x00\xe0" + len(body).to_bytes(4, "little") + body


def meta_encoder(sop_class: str) -> Callable[[str], bytes]:
    """Preamble, DICM prefix and File Meta Information for one SOP instance UID at a time."""
    meta = file_meta(sop_class, "1.2")  # the constant part; the instance UID varies
    sop_class_el = element(0x00020002, "UI", sop_class)
    tail = (
        element(0x00020010, "UI", meta.TransferSyntaxUID)
        + element(0x00020012, "UI", meta.ImplementationClassUID)
        + element(0x00020013, "SH", meta.ImplementationVersionName or "")
    )
    version = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"

    def encode_meta(sop_uid: str) -> bytes:
        body = version + sop_class_el + element(0x00020003, "UI", sop_uid) + tail
        length = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little")
        return b"\x00" * 128 + b"DICM" + length + body

    return encode_meta
