"""The input gate: every header value a volume is built from is checked here before use.

Every series (folder, zip, listener store, DICOMweb fetch: all end in ``scan`` + ``read_series``)
passes :func:`check_series` before any pixel buffer is allocated; slice geometry passes
:func:`check_geometry` (called by :func:`workers.reading.stack.plan_stack`) and the size of the
volume to build :func:`check_volume_size`. A defect refuses the series with a
:class:`~workers.reading.source.SeriesError` whose ``code`` names the family and whose message names the
series and the defect; tolerable quirks are accepted with a *note* (run summary, provenance).
The policy table in ``docs/dicom.md`` ("Reading a series") lists every check; the constants
below are its numbers.

:func:`check_instance` is the same per-image check for one dataset (the C-STORE listener).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from workers.core.config import settings
from workers.reading import pixels
from workers.reading.pixels import pixel_data_header, transfer_syntax
from workers.reading.source import SeriesError

#: Rows and Columns of one image (a 2D slice larger than this is not a CT/MR/PET slice).
MAX_MATRIX = 8192
#: Plausible PixelSpacing and slice spacing, mm.
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 30.0
#: Plausible |coordinate| of ImagePositionPatient, mm (10 m).
MAX_POSITION_MM = 10_000.0
#: |length - 1| of each ImageOrientationPatient vector accepted (then normalised).
UNIT_TOLERANCE = 1e-2
#: |cos(angle)| between the row and column vectors accepted (0.057°; then made exact).
ORTHOGONAL_TOLERANCE = 1e-3
#: float32 keeps every stored step when |intercept| <= this x |slope|.
MAX_INTERCEPT_STEPS = 2.0**24
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Character set used when SpecificCharacterSet names one pydicom does not know.
FALLBACK_CHARSET = "ISO_IR 100"

NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}


@dataclass
class Accepted:
    """What the gate hands the reader: checked values and notes.

    Attributes
    ----------
    files, headers, offsets : list
        The files of the series, their headers and PixelData offsets.
    notes : list[str]
        Quirks accepted, for the run summary and the provenance.
    """

    files: list[Path]
    headers: list[Dataset]
    offsets: list[int | None]
    notes: list[str] = field(default_factory=list)


# --- reading raw header values safely ---------------------------------------------------------

#: Pixel format and rescale: checked per distinct combination (one per series, usually).
_FORMAT_KEYS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
)
#: The values the gate reads of every image (once: 400 headers must stay cheap).
_KEYWORDS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
    *_FORMAT_KEYS,
    "SliceThickness",
    "ImagePositionPatient",
)


class _Malformed:
    """A value that is not what its VR says (e.g. DS 'abc')."""

    def __repr__(self) -> str:
        return "malformed"


BAD = _Malformed()


def _value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    try:
        return pixels.value(ds, keyword, default)
    except (ValueError, TypeError, OverflowError):
        return BAD


def header_values(ds: Dataset) -> dict[str, Any]:
    """The gate's values of one header (``BAD`` where malformed, None where absent)."""
    return {kw: _value(ds, kw) for kw in _KEYWORDS}


def _numbers(got: Any, keyword: str, n: int) -> list[float] | str:
    """``n`` finite numbers, or the words saying what is wrong with them."""
    if got is BAD:
        return f"{keyword} is not a number"
    if got is None:
        return f"{keyword} is missing"
    vals = got if isinstance(got, list) else [got]
    if len(vals) != n:
        return f"{keyword} has {len(vals)} values instead of {n}"
    try:
        out = [float(v) for v in vals]
    except (ValueError, TypeError):
        return f"{keyword} is not a number"
    if not all(math.isfinite(v) for v in out):
        return f"{keyword} is not finite ({', '.join(str(v) for v in out)})"
    return out


def _int(v: dict[str, Any], keyword: str, default: int | None = None) -> int | None:
    got = v.get(keyword)
    if got is None:
        return default
    try:
        return int(got) if not isinstance(got, list | _Malformed) else None
    except (ValueError, TypeError, OverflowError):
        return None


def is_multiframe(ds: Dataset) -> bool:
    n = _int({"n": _value(ds, "NumberOfFrames")}, "n", 1)
    return "PerFrameFunctionalGroupsSequence" in ds or (n is not None and n > 1)


# --- one instance -----------------------------------------------------------------------------


def sop_class_defect(ds: Dataset | dict[str, Any]) -> tuple[str, str] | None:
    """(code, words) when the SOP class is not an image class sprim builds volumes from."""
    from workers.reading.pixels import is_image_sop_class

    got = ds.get("SOPClassUID") if isinstance(ds, dict) else _value(ds, "SOPClassUID")
    raw = "" if got is None or got is BAD else str(got)
    if not raw:
        return "identity", "SOPClassUID is missing"
    uid = UID(raw)
    name = uid.name if uid.is_valid else raw
    if not is_image_sop_class(raw):
        return "not-image", f"not an image series ({name}); only CT, MR and PET images make volumes"
    if not uid.is_valid or uid.type != "SOP Class" or "Image Storage" not in name:
        return "not-image", f"SOPClassUID {raw} is not a known image storage class"
    return None


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(text: str) -> bool:
    """A UID as PS3.5 9.1 says: digits and dots, no leading zeros, at most 64 characters."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def _uid_defects(v: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        got = v.get(kw)
        raw = "" if got is None or got is BAD else str(got)
        if not raw:
            out.append(("identity", f"{kw} is missing"))
        elif not valid_uid(raw):
            out.append(("identity", f"{kw} {raw[:70]!r} is not a valid UID"))
    return out


def expected_pixel_bytes(v: dict[str, Any]) -> int:
    """Bytes of native PixelData the header values describe."""
    rows, cols = _int(v, "Rows", 0) or 0, _int(v, "Columns", 0) or 0
    frames = _int(v, "NumberOfFrames", 1) or 1
    samples = _int(v, "SamplesPerPixel", 1) or 1
    bits = _int(v, "BitsAllocated", 0) or 0
    return rows * cols * frames * samples * bits // 8


def _pixel_format_defects(v: dict[str, Any], pixel_bytes: int | None) -> list[tuple[str, str]]:
    colour = _colour_defect(v)
    if colour is not None:
        return [("pixel-format", colour)]
    rows, cols = _int(v, "Rows"), _int(v, "Columns")
    words = _matrix_defects(v, rows, cols)
    bits = _int(v, "BitsAllocated")
    words += _bits_defects(v, bits)
    frames = _int(v, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        words.append(f"NumberOfFrames {v.get('NumberOfFrames')!r} is not a positive number")
    if not words and pixel_bytes is not None:
        want = expected_pixel_bytes(v)
        if pixel_bytes not in (want, want + want % 2):
            words.append(
                f"PixelData holds {pixel_bytes} bytes but {rows} x {cols} x {frames} frame(s) of "
                f"{bits} bits need {want}"
            )
    return [("pixel-format", w) for w in words]


def _colour_defect(v: dict[str, Any]) -> str | None:
    samples = _int(v, "SamplesPerPixel", 1)
    photometric = str(v.get("PhotometricInterpretation") or "")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return (
            f"colour images ({photometric or f'{samples} samples per pixel'}); "
            "sprim builds greyscale volumes only"
        )
    return None


def _matrix_defects(v: dict[str, Any], rows: int | None, cols: int | None) -> list[str]:
    out = []
    for kw, n in (("Rows", rows), ("Columns", cols)):
        if n is None or not 1 <= n <= MAX_MATRIX:
            shown = n if n is not None else "missing" if v.get(kw) is None else "not a number"
            out.append(f"{kw} {shown} (1 to {MAX_MATRIX} expected)")
    return out


def _bits_defects(v: dict[str, Any], bits: int | None) -> list[str]:
    """BitsAllocated, BitsStored and HighBit (first defect only), PixelRepresentation."""
    out = []
    stored = _int(v, "BitsStored", bits)
    high = _int(v, "HighBit", None if stored is None else stored - 1)
    rep = _int(v, "PixelRepresentation", 0)
    if bits not in (8, 16, 32):
        out.append(f"BitsAllocated {bits} (8, 16 or 32 expected)")
    elif stored is None or not 1 <= stored <= bits:
        out.append(f"BitsStored {stored} does not fit BitsAllocated {bits}")
    elif high != stored - 1:
        out.append(f"HighBit {high} is not BitsStored - 1 ({stored - 1})")
    if rep not in (0, 1):
        out.append(f"PixelRepresentation {rep} (0 or 1 expected)")
    return out


def rescale_defect(slope: float, intercept: float, lo: int, hi: int) -> str | None:
    """Why (slope, intercept) cannot be applied to stored values lo..hi in float32/int16."""
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        return f"RescaleSlope {slope} / RescaleIntercept {intercept} are not finite"
    if slope == 0:
        return "RescaleSlope is 0 (every pixel would have the same value)"
    if abs(slope) * max(abs(lo), abs(hi)) + abs(intercept) > FLOAT32_MAX:
        return f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} overflow 32-bit floats"
    if abs(intercept) > MAX_INTERCEPT_STEPS * abs(slope):
        return (
            f"RescaleIntercept {intercept:g} is too large for RescaleSlope {slope:g}: the values "
            "would lose their precision"
        )
    return None


def _value_defects(v: dict[str, Any]) -> list[tuple[str, str]]:
    got = []
    for kw, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        if v.get(kw) is None:
            got.append(default)
            continue
        n = _numbers(v[kw], kw, 1)
        if isinstance(n, str):
            return [("values", n)]
        got.append(n[0])
    bits = _int(v, "BitsStored") or _int(v, "BitsAllocated") or 16
    if _int(v, "PixelRepresentation", 0):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    why = rescale_defect(got[0], got[1], lo, hi)
    return [("values", why)] if why else []


def _classic_geometry(ds: Dataset) -> list[tuple[str, str]]:
    got = []
    for kw, n in (
        ("ImagePositionPatient", 3),
        ("ImageOrientationPatient", 6),
        ("PixelSpacing", 2),
    ):
        nums = _numbers(_value(ds, kw), kw, n)
        if isinstance(nums, str):
            return [("geometry", nums)]
        got.append(nums)
    found = geometry_defects(np.array([got[0]]), np.array([got[1]]), np.array([got[2]]))
    return [("geometry", w) for _, w in found]


def _frozen(v: dict[str, Any], keys: tuple[str, ...]) -> tuple:
    def one(x: Any) -> Any:
        if isinstance(x, list | MultiValue | tuple):
            return tuple(x)
        return x if isinstance(x, str | int | float | _Malformed | None) else repr(x)

    return tuple((k, one(v.get(k))) for k in keys)


@lru_cache(maxsize=256)
def _format_and_values(key: tuple, pixel_bytes: int | None) -> tuple[tuple[str, str], ...]:
    """Pixel format and rescale defects (the same for most images of a series: cached)."""
    v = {k: list(x) if isinstance(x, tuple) else x for k, x in key}
    fmt = _pixel_format_defects(v, pixel_bytes)
    return tuple(fmt + ([] if fmt else _value_defects(v)))


def _instance_defects(
    v: dict[str, Any], pixel_bytes: int | None, ds: Dataset | None = None
) -> list[tuple[str, str]]:
    """(code, words) of one image; ``ds`` given (one instance, not a series whose SOP class is
    checked once): the SOP class and the slice geometry are checked too."""
    sop = sop_class_defect(v) if ds is not None else None
    if sop is not None:
        return [sop]
    out = _uid_defects(v) + list(_format_and_values(_frozen(v, _FORMAT_KEYS), pixel_bytes))
    t = v.get("SliceThickness")
    if t is not None:
        n = _numbers(t, "SliceThickness", 1)
        if isinstance(n, str) or n[0] < 0:
            out.append(("geometry", f"SliceThickness {t} is not a length"))
    if ds is not None and not is_multiframe(ds):
        out += _classic_geometry(ds)
    return out


def check_instance(ds: Dataset, pixel_bytes: int | None = None) -> list[str]:
    """Defects of one image instance in plain words; [] if sprim can use it.

    Parameters
    ----------
    ds : Dataset
        The header (pixel data may be present or not).
    pixel_bytes : int, optional
        Length of the native PixelData element, when known: must match the header.
    """
    if pixel_bytes is None and "PixelData" in ds:
        ts = getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID")
        if ts in NATIVE_SYNTAXES:
            pixel_bytes = len(ds.PixelData)
    return [words for _, words in _instance_defects(header_values(ds), pixel_bytes, ds)]


# --- geometry ---------------------------------------------------------------------------------


def geometry_defects(
    positions: np.ndarray, orientations: np.ndarray, spacings: np.ndarray
) -> list[tuple[int, str]]:
    """(index, words) of slices whose position, orientation or pixel spacing is not usable."""
    out: list[tuple[int, str]] = []
    finite_pos = np.isfinite(positions).all(axis=1)
    finite_iop = np.isfinite(orientations).all(axis=1)
    finite_sp = np.isfinite(spacings).all(axis=1)
    for i in np.flatnonzero(~finite_pos):
        out.append((int(i), "ImagePositionPatient is missing or not finite"))
    for i in np.flatnonzero(~finite_iop):
        out.append((int(i), "ImageOrientationPatient is missing or not finite"))
    for i in np.flatnonzero(~finite_sp):
        out.append((int(i), "PixelSpacing is missing or not finite"))
    far = finite_pos & (
        np.abs(np.where(finite_pos[:, None], positions, 0)).max(axis=1) > MAX_POSITION_MM
    )
    for i in np.flatnonzero(far):
        out.append(
            (
                int(i),
                f"ImagePositionPatient {positions[i].tolist()} is more than "
                f"{MAX_POSITION_MM / 1000:g} m from the origin",
            )
        )
    sp = np.where(finite_sp[:, None], spacings, 1.0)
    odd = finite_sp & ((sp < MIN_SPACING_MM) | (sp > MAX_SPACING_MM)).any(axis=1)
    for i in np.flatnonzero(odd):
        out.append(
            (
                int(i),
                f"PixelSpacing {spacings[i].tolist()} mm is outside "
                f"{MIN_SPACING_MM:g}–{MAX_SPACING_MM:g} mm",
            )
        )
    iop = np.where(finite_iop[:, None], orientations, 0.0)
    r, c = iop[:, :3], iop[:, 3:]
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    not_unit = finite_iop & ((np.abs(nr - 1) > UNIT_TOLERANCE) | (np.abs(nc - 1) > UNIT_TOLERANCE))
    for i in np.flatnonzero(not_unit):
        out.append(
            (int(i), f"ImageOrientationPatient {orientations[i].tolist()} is not two unit vectors")
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.abs((r * c).sum(axis=1)) / (nr * nc)
    skew = finite_iop & ~not_unit & (cos > ORTHOGONAL_TOLERANCE)
    for i in np.flatnonzero(skew):
        angle = math.degrees(math.acos(min(1.0, float(cos[i]))))
        out.append(
            (
                int(i),
                f"ImageOrientationPatient row and column directions are "
                f"{angle:.2f}° apart, not perpendicular",
            )
        )
    return out


def check_geometry(
    name: str,
    positions: np.ndarray,
    orientations: np.ndarray,
    spacings: np.ndarray,
    labels: Sequence[str] | None = None,
) -> None:
    """Refuse a stack whose slice positions, orientations or pixel spacings are unusable."""
    bad = geometry_defects(positions, orientations, spacings)
    if bad:
        i, words = bad[0]
        where = labels[i] if labels else f"image {i + 1}"
        more = len({j for j, _ in bad}) - 1
        also = f" (and {more} more)" if more > 0 else ""
        raise SeriesError(f"{name}: {where}: {words}{also}", code="geometry")


def check_slice_spacing(name: str, step: float) -> None:
    """Refuse slices further apart than a plausible volume's (the regular step, mm)."""
    if not MIN_SPACING_MM <= step <= MAX_SPACING_MM:
        raise SeriesError(
            f"{name}: slices {step:.2f} mm apart (plausible: {MIN_SPACING_MM:g}–"
            f"{MAX_SPACING_MM:g} mm); this is not one volume",
            code="geometry",
        )


# --- series -----------------------------------------------------------------------------------


def pixel_data_length(
    path: Path, offset: int, ds: Dataset, ts: str | None = None
) -> tuple[int, int]:
    """(value length, element header length) of PixelData at ``offset`` (cheap: 12 bytes)."""
    with open(path, "rb") as fp:
        fp.seek(offset)
        return pixel_data_header(fp.read(12), ds, ts)


def _pixel_bytes(path: Path, offset: int | None, ds: Dataset) -> tuple[int | None, str | None]:
    """(native PixelData length, why the file is unreadable)."""
    if offset is None:
        return None, "it has no pixel data"
    ts = transfer_syntax(ds)
    try:
        length, head = pixel_data_length(path, offset, ds, ts)
        size = os.path.getsize(path)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if length == 0xFFFFFFFF:
        if ts in NATIVE_SYNTAXES:
            return None, "its pixel data is compressed but the transfer syntax says uncompressed"
        return None, None
    if ts not in NATIVE_SYNTAXES:
        return None, "its pixel data is uncompressed but the transfer syntax says compressed"
    if offset + head + length > size:
        return None, (
            f"it is truncated (pixel data of {length} bytes, {size - offset - head} in the file)"
        )
    return length, None


def _charset_note(headers: list[Dataset]) -> str | None:
    """Unknown SpecificCharacterSet -> FALLBACK_CHARSET in every header, and a note."""
    unknown: set[str] = set()
    for h in headers:
        cs = _value(h, "SpecificCharacterSet")
        if cs is None or cs is BAD:
            continue
        terms = [str(t) for t in (cs if isinstance(cs, list) else [cs])]
        bad = [t for t in terms if t.strip() and t.strip() not in python_encoding]
        if bad:
            unknown.update(bad)
            h.SpecificCharacterSet = FALLBACK_CHARSET
    if not unknown:
        return None
    return (
        f"unknown character set {', '.join(sorted(unknown))}: text read as {FALLBACK_CHARSET} "
        "(Latin-1)"
    )


def _first_defect(
    name: str, files: list[Path], defects: list[list[tuple[str, str]]]
) -> SeriesError | None:
    hit = [(i, d) for i, d in enumerate(defects) if d]
    if not hit:
        return None
    i, d = hit[0]
    code, words = d[0]
    more = len(hit) - 1
    also = f" (and {more} more image{'s' if more > 1 else ''})" if more else ""
    where = f"image {files[i].name}" if len(files) > 1 else f"{files[i].name}"
    return SeriesError(f"{name}: {where}: {words}{also}", code=code)


def check_series(
    name: str,
    files: list[Path],
    headers: list[Dataset],
    offsets: list[int | None],
    unreadable: Sequence[tuple[str, str]] = (),
) -> Accepted:
    """The series gate: pixel format, identity, values and sizes, before any pixel is read.

    Raises
    ------
    SeriesError
        With ``code`` "not-image", "pixel-format", "identity", "values", "geometry", "size" or
        "unreadable" and a message naming the series, the file and the defect.
    """
    notes: list[str] = []
    sop = sop_class_defect(headers[0])
    if sop is not None:
        raise SeriesError(f"{name}: {sop[1]}", code=sop[0])
    lost: list[tuple[str, str]] = list(unreadable)
    keep: list[int] = []
    lengths: list[int | None] = []
    for i, (f, h, o) in enumerate(zip(files, headers, offsets, strict=True)):
        length, why = _pixel_bytes(f, o, h)
        if why is not None:
            lost.append((f.name, why))
        else:
            keep.append(i)
            lengths.append(length)
    if lost:
        if not keep and all(w == "it has no pixel data" for _, w in lost):
            raise SeriesError(
                f"{name}: no pixel data (header-only or float pixel data objects)",
                code="pixel-format",
            )
        # A series known to be incomplete is not built: outputs would look complete.
        shown = "; ".join(f"{f}: {w}" for f, w in lost[:3])
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        raise SeriesError(
            f"{name}: {len(lost)} of {len(files) + len(unreadable)} file(s) cannot be used "
            f"({shown}{more}); refused rather than built without them",
            code="unreadable",
        )

    values = [header_values(h) for h in headers]
    err = _first_defect(
        name, files, [_instance_defects(v, n) for v, n in zip(values, lengths, strict=True)]
    )
    if err is not None:
        raise err
    _check_consistent(name, files, values)
    charset = _charset_note(headers)
    if charset:
        notes.append(charset)
    if (0x2005, 0x100E) in headers[0]:
        notes.append(
            "Philips private scale slope (2005,100E) present and not applied: values are "
            "RescaleSlope/Intercept-scaled as displayed"
        )
    return Accepted(files, headers, offsets, notes)


#: Values one volume's images must share (pixel format and identity).
_SAME = (
    ("pixel-format", ("Rows", "Columns"), "image sizes"),
    ("pixel-format", ("BitsAllocated", "BitsStored", "PixelRepresentation"), "pixel formats"),
    ("pixel-format", ("PhotometricInterpretation",), "photometric interpretations"),
    ("identity", ("PatientID",), "patients (PatientID)"),
    ("identity", ("StudyInstanceUID",), "studies (StudyInstanceUID)"),
    ("identity", ("SeriesInstanceUID",), "series (SeriesInstanceUID)"),
)


def _check_consistent(name: str, files: list[Path], values: list[dict[str, Any]]) -> None:
    for code, keywords, what in _SAME:
        seen: dict[tuple, list[int]] = {}
        for i, v in enumerate(values):
            key = tuple("" if v.get(kw) is None else str(v.get(kw)) for kw in keywords)
            seen.setdefault(key, []).append(i)
        if len(seen) > 1:
            groups = sorted(seen.items(), key=lambda kv: -len(kv[1]))
            if keywords == ("Rows", "Columns"):
                shown = ", ".join(f"{c}x{r}" for r, c in sorted(seen)[:4])
                raise SeriesError(
                    f"{name}: mixed image sizes ({shown}); a volume needs one size", code=code
                )
            odd = groups[-1]
            odd_files = ", ".join(files[i].name for i in odd[1][:3])
            raise SeriesError(
                f"{name}: images of {len(seen)} different {what}: "
                f"{'/'.join(odd[0]) or 'none'} in {len(odd[1])} image(s) ({odd_files}), "
                f"{'/'.join(groups[0][0]) or 'none'} in {len(groups[0][1])}; "
                "one volume must come from one acquisition",
                code=code,
            )
    seen_sop: dict[str, tuple[int, Any]] = {}
    for i, v in enumerate(values):
        uid, pos = str(v["SOPInstanceUID"]), v["ImagePositionPatient"]
        if uid in seen_sop and seen_sop[uid][1] != pos:
            raise SeriesError(
                f"{name}: two different images share SOPInstanceUID {uid} "
                f"({files[seen_sop[uid][0]].name}, {files[i].name})",
                code="identity",
            )
        seen_sop.setdefault(uid, (i, pos))


def frame_of_reference(name: str, headers: list[Dataset]) -> tuple[str, list[str]]:
    """The one FrameOfReferenceUID of a volume (headers in volume order) and any note.

    Called after the stack geometry was checked (one orientation, positions on one line with
    regular spacing): different UIDs per slice then are an anonymiser artifact, not different
    coordinate systems.
    """
    uids = [str(_value(h, "FrameOfReferenceUID") or "") for h in headers]
    valid = [u for u in uids if u and valid_uid(u)]
    if not valid:
        from workers.core.uids import derive_uid

        made = derive_uid(str(_value(headers[0], "SeriesInstanceUID")), "frame-of-reference")
        return made, [
            f"no valid FrameOfReferenceUID in the images: outputs use {made}, derived from the "
            "series (the slice positions and orientations place them)"
        ]
    distinct = list(dict.fromkeys(uids))
    if len(distinct) == 1:
        return valid[0], []
    return valid[0], [
        f"the images carry {len(distinct)} different FrameOfReferenceUIDs (or none) but form "
        f"one consistent geometry; outputs use {valid[0]} (first image)"
    ]


def check_volume_size(name: str, voxels: int, itemsize: int) -> None:
    """Refuse a volume larger than ``SPRIM_MAX_VOLUME_MB`` before it is allocated."""
    limit = settings().max_volume_mb
    mb = voxels * itemsize / 2**20
    if mb > limit:
        raise SeriesError(
            f"{name}: the volume would need {mb:,.0f} MB, more than the {limit} MB allowed "
            "(SPRIM_MAX_VOLUME_MB)",
            code="size",
        )
