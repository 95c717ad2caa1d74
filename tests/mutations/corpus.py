"""The mutation corpus: broken inputs derived from the shared CT and MR series, from a seed.

Each :class:`Case` builds one input (folder or zip) for ``sprim run`` and says what must happen:

- ``processed``: exit 0, derived series written;
- ``refused``: exit 1, a reason in summary.json, nothing written;
- ``partial``: a good series beside a broken one: exit 1, the good one written, the bad refused;
- ``any``: random damage whose effect is not defined (header bit flips, ...): processed or
  refused are both right; a traceback, hang, silent exit or RSS over the bound is not.

Sources are 24 consecutive slices of each series (in slice order, so "first"/"last" are ends
of the volume): enough for the default rules (>= 20 instances) and fast.
"""

from __future__ import annotations

import io
import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from tests.mutations.zips import Member, write_zip, zeros_bomb

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SOURCES = {
    "ct": DATA / "ct-abdomen-tcia" / "series",
    "mr": DATA / "mr-brain-oblique-ge" / "In" / "05_3D_Ax_T1_MP_RAGE_R22",
}
N_SLICES = 24
#: First InstanceNumber used: the CT's top (lung bases, for the chest rule), the MR's middle.
FIRST_INSTANCE = {"ct": 1, "mr": 50}
SEED = 9

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    expect: str  # processed | refused | partial | any
    what: str
    build: Callable[[Path, random.Random], Path] = field(repr=False, compare=False)
    #: Extra environment for this run (e.g. a lowered zip limit).
    env: tuple[tuple[str, str], ...] = ()
    #: A name that must appear in summary.json "skipped" (the file reported by name).
    skipped: str = ""
    #: Text that must appear in the job notes or errors (e.g. the damaged file's name).
    mentions: str = ""

    def make(self, root: Path, seed: int = SEED) -> Path:
        rng = random.Random(seed * 1_000_003 + zlib.crc32(self.name.encode()))
        dest = root / self.name
        dest.mkdir(parents=True, exist_ok=True)
        return self.build(dest, rng)


# -- the sources -----------------------------------------------------------------------------


@lru_cache
def _source(mod: str) -> tuple[bytes, ...]:
    """The chosen slices as file bytes, in slice order along the normal."""
    found = []
    for f in sorted(SOURCES[mod].iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        found.append((int(ds.InstanceNumber), f))
    found.sort()
    picked = [f for n, f in found if FIRST_INSTANCE[mod] <= n < FIRST_INSTANCE[mod] + N_SLICES]
    dss = [pydicom.dcmread(f) for f in picked]
    normal = np.cross(*np.reshape(np.array(dss[0].ImageOrientationPatient, float), (2, 3)))
    order = sorted(
        range(len(dss)), key=lambda i: float(np.dot(normal, dss[i].ImagePositionPatient))
    )
    return tuple(Path(picked[i]).read_bytes() for i in order)


def slices(mod: str) -> list[Dataset]:
    return [pydicom.dcmread(io.BytesIO(b)) for b in _source(mod)]


def write(dest: Path, dss: list[Dataset], prefix: str = "") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(dss):
        ds.save_as(dest / f"{prefix}{i:03d}.dcm", enforce_file_format=False)
    return dest


def copy_source(dest: Path, mod: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(_source(mod)):
        (dest / f"{i:03d}.dcm").write_bytes(b)
    return dest


def raw(ds: Dataset, keyword: str, value: bytes) -> None:
    """Put bytes as the value, unvalidated (NaN, 'abc' in IS, ...)."""
    tag = Tag(tag_for_keyword(keyword))
    if len(value) % 2:
        value += b"\0" if dictionary_VR(tag) == "UI" else b" "
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, True, True)


def pick(n: int, where: str) -> list[int]:
    return {"first": [0], "mid": [n // 2], "last": [n - 1], "all": list(range(n))}[where]


def _normal(ds: Dataset) -> np.ndarray:
    return np.cross(*np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3)))


# -- case builders ---------------------------------------------------------------------------

Mut = Callable[[Dataset], None]
CASES: list[Case] = []


def case(name: str, family: str, expect: str, what: str, build, **kw) -> None:
    CASES.append(Case(name, family, expect, what, build, **kw))


def header(mod: str, where: str, fn: Mut):
    def build(dest: Path, rng: random.Random) -> Path:
        dss = slices(mod)
        for i in pick(len(dss), where):
            fn(dss[i])
        return write(dest / "in", dss)

    return build


def series_fn(mod: str, fn: Callable[[list[Dataset], random.Random], None]):
    def build(dest: Path, rng: random.Random) -> Path:
        dss = slices(mod)
        fn(dss, rng)
        return write(dest / "in", dss)

    return build


def file_bytes(mod: str, where: str, fn: Callable[[bytes, random.Random], bytes]):
    def build(dest: Path, rng: random.Random) -> Path:
        folder = copy_source(dest / "in", mod)
        files = sorted(folder.iterdir())
        for i in pick(len(files), where):
            files[i].write_bytes(fn(files[i].read_bytes(), rng))
        return folder

    return build


def set_raw(keyword: str, value: bytes) -> Mut:
    return lambda ds: raw(ds, keyword, value)


def delete(keyword: str) -> Mut:
    def fn(ds: Dataset) -> None:
        if keyword in ds:
            del ds[keyword]

    return fn


def set_value(keyword: str, value) -> Mut:
    return lambda ds: setattr(ds, keyword, value)


def _pixel_offset(data: bytes) -> int:
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data) // 2


def flip_bits(n: int, region: str):
    def fn(data: bytes, rng: random.Random) -> bytes:
        b = bytearray(data)
        px = _pixel_offset(data)
        lo, hi = (132, px) if region == "header" else (px + 12, len(b))
        for _ in range(n):
            k = rng.randrange(lo, hi)
            b[k] ^= 1 << rng.randrange(8)
        return bytes(b)

    return fn


def truncate(fraction: float | None = None, to: int | None = None):
    def fn(data: bytes, rng: random.Random) -> bytes:
        return data[: to if to is not None else int(len(data) * fraction)]

    return fn


# -- families --------------------------------------------------------------------------------


def _baseline() -> None:
    for mod in ("ct", "mr"):
        case(
            f"baseline-{mod}",
            "baseline",
            "processed",
            "unchanged",
            lambda d, r, m=mod: copy_source(d / "in", m),
        )


def _truncation() -> None:
    for mod in ("ct", "mr"):
        case(
            f"trunc-half-mid-{mod}",
            "truncation",
            "refused",
            "mid slice cut at half its size (pixel data short): a gap",
            file_bytes(mod, "mid", truncate(0.5)),
            mentions="012.dcm",
        )
        case(
            f"trunc-half-last-{mod}",
            "truncation",
            "refused",
            "last slice cut at half its size: the series refused, the file named",
            file_bytes(mod, "last", truncate(0.5)),
            mentions="023.dcm",
        )
        case(
            f"trunc-header-mid-{mod}",
            "truncation",
            "refused",
            "mid slice cut to 300 bytes (header unreadable: a gap)",
            file_bytes(mod, "mid", truncate(to=300)),
            skipped="in/",
        )
        case(
            f"trunc-empty-mid-{mod}",
            "truncation",
            "refused",
            "mid slice emptied (0 bytes)",
            file_bytes(mod, "mid", truncate(to=0)),
            skipped="in/",
        )
        case(
            f"trunc-2bytes-all-{mod}",
            "truncation",
            "refused",
            "every slice 2 bytes short",
            file_bytes(mod, "all", lambda b, r: b[:-2]),
        )
    case(
        "trunc-header-last-ct",
        "truncation",
        "any",
        "last slice cut to 300 bytes: unreadable, cannot be tied to its series",
        file_bytes("ct", "last", truncate(to=300)),
        skipped="in/",
    )


def _bit_flips() -> None:
    for k in range(6):
        mod = "ct" if k % 2 == 0 else "mr"
        case(
            f"bitflip-header-{k}-{mod}",
            "bit flips",
            "any",
            "16 random bit flips in the header of one random slice",
            _random_slice(mod, flip_bits(16, "header")),
        )
    for k in range(3):
        mod = "ct" if k % 2 == 0 else "mr"
        case(
            f"bitflip-pixels-{k}-{mod}",
            "bit flips",
            "processed",
            "64 random bit flips in the pixel data of every slice (undetectable noise)",
            file_bytes(mod, "all", flip_bits(64, "pixels")),
        )


def _random_slice(mod: str, fn):
    def build(dest: Path, rng: random.Random) -> Path:
        folder = copy_source(dest / "in", mod)
        f = rng.choice(sorted(folder.iterdir()))
        f.write_bytes(fn(f.read_bytes(), rng))
        return folder

    return build


def _pixel_format() -> None:
    lies: list[tuple[str, str, Mut, str]] = [
        ("bits8", "BitsAllocated 8 on 16-bit data", set_value("BitsAllocated", 8), "refused"),
        ("rows-half", "Rows halved", lambda ds: setattr(ds, "Rows", ds.Rows // 2), "refused"),
        ("rows-cols-0", "Rows = Columns = 0", _rows_cols(0), "refused"),
        ("rows-cols-65535", "Rows = Columns = 65535", _rows_cols(65535), "refused"),
        ("rows-cols-6000", "Rows = Columns = 6000 (size bomb)", _rows_cols(6000), "refused"),
        (
            "bitsstored-17",
            "BitsStored 17 > BitsAllocated 16",
            set_value("BitsStored", 17),
            "refused",
        ),
        ("highbit-3", "HighBit 3 with BitsStored 12/16", set_value("HighBit", 3), "refused"),
        ("samples-3", "SamplesPerPixel 3 on grey data", set_value("SamplesPerPixel", 3), "refused"),
        (
            "rgb",
            "PhotometricInterpretation RGB",
            set_value("PhotometricInterpretation", "RGB"),
            "refused",
        ),
        (
            "frames-10",
            "NumberOfFrames 10 on a single frame",
            set_value("NumberOfFrames", 10),
            "refused",
        ),
        ("pixeldata-short", "PixelData 1000 bytes short", _pixel_bytes(-1000), "refused"),
        ("pixeldata-long", "PixelData 4096 bytes too long", _pixel_bytes(4096), "refused"),
        ("header-only", "no PixelData (header-only file)", delete("PixelData"), "refused"),
    ]
    for key, what, fn, expect in lies:
        for where, mod in (("all", "ct"), ("mid", "ct"), ("all", "mr")):
            if key == "rows-cols-6000" and where == "mid":
                continue
            case(
                f"pixfmt-{key}-{where}-{mod}",
                "pixel-format lies",
                expect,
                f"{what} ({where})",
                header(mod, where, fn),
            )
    case(
        "pixfmt-monochrome1-all-ct",
        "pixel-format lies",
        "any",
        "PhotometricInterpretation MONOCHROME1 (inverted grey)",
        header("ct", "all", set_value("PhotometricInterpretation", "MONOCHROME1")),
    )
    case(
        "pixfmt-pixelrep-flip-all-mr",
        "pixel-format lies",
        "any",
        "PixelRepresentation flipped (signed <-> unsigned)",
        header(
            "mr", "all", lambda ds: setattr(ds, "PixelRepresentation", 1 - ds.PixelRepresentation)
        ),
    )
    case(
        "pixfmt-frames-100000-all-ct",
        "size bombs",
        "refused",
        "NumberOfFrames 100000 (size bomb)",
        header("ct", "all", set_value("NumberOfFrames", 100000)),
    )


def _rows_cols(n: int) -> Mut:
    def fn(ds: Dataset) -> None:
        ds.Rows = n
        ds.Columns = n

    return fn


def _pixel_bytes(delta: int) -> Mut:
    def fn(ds: Dataset) -> None:
        data = ds.PixelData
        ds.PixelData = data[:delta] if delta < 0 else data + bytes(delta)

    return fn


def _geometry() -> None:
    spacing_values = {
        "missing": None,
        "nan": b"nan\\nan",
        "inf": b"inf\\inf",
        "zero": b"0\\0",
        "negative": b"-0.7\\-0.7",
    }
    for key, value in spacing_values.items():
        fn = delete("PixelSpacing") if value is None else set_raw("PixelSpacing", value)
        for where, mod in (("first", "ct"), ("mid", "ct"), ("all", "ct"), ("all", "mr")):
            case(
                f"spacing-{key}-{where}-{mod}",
                "geometry",
                "refused",
                f"PixelSpacing {key} ({where})",
                header(mod, where, fn),
            )
    for key, value in {"100mm": b"100\\100", "1e-6": b"1e-6\\1e-6", "one-value": b"0.7"}.items():
        case(
            f"spacing-{key}-all-ct",
            "geometry",
            "refused",
            f"PixelSpacing {key}",
            header("ct", "all", set_raw("PixelSpacing", value)),
        )
    positions = {
        "missing": None,
        "nan": b"nan\\nan\\nan",
        "inf": b"-inf\\0\\0",
        "two-values": b"1\\2",
    }
    for key, value in positions.items():
        fn = (
            delete("ImagePositionPatient")
            if value is None
            else set_raw("ImagePositionPatient", value)
        )
        for where, mod in (("first", "ct"), ("mid", "mr"), ("all", "ct")):
            case(
                f"position-{key}-{where}-{mod}",
                "geometry",
                "refused",
                f"ImagePositionPatient {key} ({where})",
                header(mod, where, fn),
            )
    for mod in ("ct", "mr"):
        case(
            f"slice-spacing-500mm-{mod}",
            "geometry",
            "refused",
            "slices 500 mm apart",
            series_fn(mod, _spread(500.0)),
        )
        case(
            f"slice-spacing-0-{mod}",
            "geometry",
            "refused",
            "every slice at the same position",
            series_fn(mod, _spread(0.0)),
        )
    case(
        "thickness-nan-ct",
        "geometry",
        "refused",
        "SliceThickness NaN",
        header("ct", "all", set_raw("SliceThickness", b"nan")),
    )
    case(
        "thickness-negative-ct",
        "geometry",
        "refused",
        "SliceThickness -3",
        header("ct", "all", set_raw("SliceThickness", b"-3")),
    )
    case(
        "thickness-missing-ct",
        "geometry",
        "processed",
        "SliceThickness absent (type 2)",
        header("ct", "all", delete("SliceThickness")),
    )


def _spread(step: float):
    def fn(dss: list[Dataset], rng: random.Random) -> None:
        n = _normal(dss[0])
        p0 = np.array(dss[0].ImagePositionPatient, float)
        for k, ds in enumerate(dss):
            ds.ImagePositionPatient = [f"{v:.4f}" for v in p0 + k * step * n]

    return fn


def _orientation() -> None:
    def skew(deg: float) -> Mut:
        def fn(ds: Dataset) -> None:
            r, c = np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3))
            a = math.radians(deg)
            c2 = math.cos(a) * c + math.sin(a) * r
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *(c2 / np.linalg.norm(c2)))]

        return fn

    def scaled(f: float) -> Mut:
        def fn(ds: Dataset) -> None:
            ds.ImageOrientationPatient = [f"{float(v) * f:.8f}" for v in ds.ImageOrientationPatient]

        return fn

    def parallel(ds: Dataset) -> None:
        r = list(ds.ImageOrientationPatient)[:3]
        ds.ImageOrientationPatient = r + r

    variants: list[tuple[str, Mut, str]] = [
        ("skew-11deg", skew(11), "refused"),
        ("skew-45deg", skew(45), "refused"),
        ("parallel", parallel, "refused"),
        ("zero", set_raw("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0"), "refused"),
        ("length-2", scaled(2.0), "refused"),
        ("nan", set_raw("ImageOrientationPatient", b"nan\\0\\0\\0\\1\\0"), "refused"),
        ("five-values", set_raw("ImageOrientationPatient", b"1\\0\\0\\0\\1"), "refused"),
        ("missing", delete("ImageOrientationPatient"), "refused"),
        ("skew-0.001deg", skew(0.001), "processed"),
        ("length-1.00001", scaled(1.00001), "processed"),
    ]
    for key, fn, expect in variants:
        for where, mod in (("all", "ct"), ("all", "mr"), ("mid", "ct")):
            if expect == "processed" and where == "mid":
                continue
            case(
                f"iop-{key}-{where}-{mod}",
                "orientation",
                expect,
                f"ImageOrientationPatient {key} ({where})",
                header(mod, where, fn),
            )


def _identity() -> None:
    other = "1.2.826.0.1.3680043.8.498.99999999"
    for mod in ("ct", "mr"):
        case(
            f"identity-patient-mid-{mod}",
            "mixed identity",
            "refused",
            "one slice of another patient (PatientID)",
            header(mod, "mid", set_value("PatientID", "OTHER-PATIENT")),
        )
        case(
            f"identity-study-mid-{mod}",
            "mixed identity",
            "refused",
            "one slice of another study",
            header(mod, "mid", set_value("StudyInstanceUID", other + ".1")),
        )
        case(
            f"identity-series-mid-{mod}",
            "mixed identity",
            "refused",
            "one slice of another series (a gap)",
            header(mod, "mid", set_value("SeriesInstanceUID", other + ".2")),
        )
        case(
            f"uid-study-missing-all-{mod}",
            "missing UIDs",
            "refused",
            "StudyInstanceUID absent",
            header(mod, "all", delete("StudyInstanceUID")),
        )
        case(
            f"uid-sop-missing-mid-{mod}",
            "missing UIDs",
            "refused",
            "SOPInstanceUID absent on one slice",
            header(mod, "mid", delete("SOPInstanceUID")),
        )
        case(
            f"uid-for-missing-all-{mod}",
            "missing UIDs",
            "processed",
            "FrameOfReferenceUID absent on every slice (a note; one derived from the series)",
            header(mod, "all", delete("FrameOfReferenceUID")),
        )
        case(
            f"uid-series-missing-all-{mod}",
            "missing UIDs",
            "refused",
            "SeriesInstanceUID absent (no series)",
            header(mod, "all", delete("SeriesInstanceUID")),
        )
        case(
            f"uid-sopclass-1.2.3-all-{mod}",
            "missing UIDs",
            "refused",
            "SOPClassUID '1.2.3'",
            header(mod, "all", set_raw("SOPClassUID", b"1.2.3")),
        )
    case(
        "identity-patient-name-mid-ct",
        "mixed identity",
        "any",
        "one slice with another PatientName, same PatientID",
        header("ct", "mid", set_value("PatientName", "OTHER^NAME")),
    )
    case(
        "uid-study-invalid-all-ct",
        "missing UIDs",
        "refused",
        "StudyInstanceUID '1.2.abc'",
        header("ct", "all", set_raw("StudyInstanceUID", b"1.2.abc")),
    )
    case(
        "uid-sop-duplicate-ct",
        "missing UIDs",
        "refused",
        "two slices share one SOPInstanceUID",
        series_fn("ct", _dup_sop),
    )
    case(
        "uid-for-differs-mid-ct",
        "mixed identity",
        "processed",
        "one slice with another FrameOfReferenceUID, same geometry (note)",
        header("ct", "mid", set_value("FrameOfReferenceUID", other + ".3")),
    )


def _dup_sop(dss: list[Dataset], rng: random.Random) -> None:
    dss[5].SOPInstanceUID = dss[6].SOPInstanceUID


def _values() -> None:
    for key, slope in {"nan": b"nan", "inf": b"inf", "-inf": b"-inf"}.items():
        for where, mod in (("all", "ct"), ("mid", "ct")):
            case(
                f"rescale-slope-{key}-{where}-{mod}",
                "values",
                "refused",
                f"RescaleSlope {key} ({where})",
                header(mod, where, set_raw("RescaleSlope", slope)),
            )
    case(
        "rescale-slope-nan-all-mr",
        "values",
        "refused",
        "RescaleSlope NaN on MR (no rescale before)",
        header("mr", "all", set_raw("RescaleSlope", b"nan")),
    )
    case(
        "rescale-intercept-nan-all-ct",
        "values",
        "refused",
        "RescaleIntercept NaN",
        header("ct", "all", set_raw("RescaleIntercept", b"nan")),
    )
    case(
        "rescale-intercept-1e12-all-ct",
        "values",
        "any",
        "RescaleIntercept 1e12",
        header("ct", "all", set_raw("RescaleIntercept", b"1e12")),
    )
    case(
        "rescale-slope-0-all-ct",
        "values",
        "any",
        "RescaleSlope 0",
        header("ct", "all", set_raw("RescaleSlope", b"0")),
    )
    case(
        "rescale-slope-1e300-all-ct",
        "values",
        "refused",
        "RescaleSlope 1e300 (overflows float32)",
        header("ct", "all", set_raw("RescaleSlope", b"1e300")),
    )
    case(
        "rescale-slope-neg-all-mr",
        "values",
        "processed",
        "RescaleSlope -1 (valid, inverts; on CT the segmentations would rightly find no patient)",
        header("mr", "all", set_raw("RescaleSlope", b"-1")),
    )
    case(
        "rescale-slope-text-all-ct",
        "values",
        "refused",
        "RescaleSlope 'abc'",
        header("ct", "all", set_raw("RescaleSlope", b"abc")),
    )


def _charset() -> None:
    case(
        "charset-999-all-ct",
        "character sets",
        "processed",
        "SpecificCharacterSet 'ISO_IR 999'",
        header("ct", "all", set_raw("SpecificCharacterSet", b"ISO_IR 999")),
    )
    case(
        "charset-999-all-mr",
        "character sets",
        "processed",
        "SpecificCharacterSet 'ISO_IR 999'",
        header("mr", "all", set_raw("SpecificCharacterSet", b"ISO_IR 999")),
    )

    def bad_utf8(ds: Dataset) -> None:
        raw(ds, "SpecificCharacterSet", b"ISO_IR 192")
        raw(ds, "SeriesDescription", b"bad \xff\xfe utf8 \xc3")
        raw(ds, "PatientName", b"\xff\xfe^\x80")

    case(
        "charset-bad-utf8-all-ct",
        "character sets",
        "processed",
        "invalid UTF-8 in names under ISO_IR 192",
        header("ct", "all", bad_utf8),
    )

    def iso2022(ds: Dataset) -> None:
        raw(ds, "SpecificCharacterSet", b"\\ISO 2022 IR 87")
        raw(ds, "SeriesDescription", b"\x1b$B\xff\xff\x1b(B junk")

    case(
        "charset-iso2022-junk-all-mr",
        "character sets",
        "processed",
        "ISO 2022 escape with junk bytes",
        header("mr", "all", iso2022),
    )


def _strings() -> None:
    hostile = {
        "markup-close": b"[/]",
        "markup-open": b"[bold red]x[/bold] [/] [link=file:///etc/passwd]y",
        "control": b"\x1b[2J\x1b[31mRED\x07\x08\x00x",
        "bidi": "evil \u202etxt.exe".encode(),
        "long": b"X" * 20000,
    }
    for key, value in hostile.items():
        mod = "mr" if key == "bidi" else "ct"
        case(
            f"string-{key}-desc-{mod}",
            "hostile strings",
            "processed",
            f"SeriesDescription {key}",
            header(mod, "all", set_raw("SeriesDescription", value)),
        )
    case(
        "string-markup-patient-ct",
        "hostile strings",
        "processed",
        "PatientName '[/]' and StudyDescription control characters",
        header("ct", "all", _names),
    )


def _names(ds: Dataset) -> None:
    raw(ds, "PatientName", b"[/]^[red]")
    raw(ds, "StudyDescription", b"\x1b]0;title\x07 study")


def _instance_number() -> None:
    for mod in ("ct", "mr"):
        case(
            f"instance-abc-mid-{mod}",
            "instance numbers",
            "processed",
            "InstanceNumber 'abc' on one slice",
            header(mod, "mid", set_raw("InstanceNumber", b"abc")),
        )
        case(
            f"instance-abc-all-{mod}",
            "instance numbers",
            "processed",
            "InstanceNumber 'abc' on every slice",
            header(mod, "all", set_raw("InstanceNumber", b"abc")),
        )
    case(
        "instance-missing-all-ct",
        "instance numbers",
        "processed",
        "InstanceNumber absent",
        header("ct", "all", delete("InstanceNumber")),
    )
    case(
        "instance-same-all-ct",
        "instance numbers",
        "processed",
        "every InstanceNumber 1",
        header("ct", "all", set_value("InstanceNumber", 1)),
    )
    case(
        "instance-huge-mid-ct",
        "instance numbers",
        "processed",
        "InstanceNumber 1e99 on one slice",
        header("ct", "mid", set_raw("InstanceNumber", b"1e99")),
    )


def _transfer_syntax() -> None:
    labels = {
        "big-endian": b"1.2.840.10008.1.2.2",
        "explicit-le": b"1.2.840.10008.1.2.1",
        "deflate": b"1.2.840.10008.1.2.1.99",
    }
    for key, uid in labels.items():
        case(
            f"ts-{key}-label-on-implicit-ct",
            "transfer syntax lies",
            "any",
            f"{key} transfer syntax label on implicit VR files",
            _ts_label("ct", "all", uid),
        )
    case(
        "ts-jpeg-label-on-native-mid-mr",
        "transfer syntax lies",
        "refused",
        "JPEG baseline label on native pixel data (one slice)",
        _ts_label("mr", "mid", b"1.2.840.10008.1.2.4.50"),
    )
    case(
        "ts-unknown-all-mr",
        "transfer syntax lies",
        "refused",
        "unknown transfer syntax 1.2.3.4",
        _ts_label("mr", "all", b"1.2.3.4"),
    )


def _ts_label(mod: str, where: str, uid: bytes):
    def fn(data: bytes, rng: random.Random) -> bytes:
        at = data.find(b"\x02\x00\x10\x00")  # (0002,0010) in the explicit VR file meta
        n = int.from_bytes(data[at + 6 : at + 8], "little")
        value = uid + b"\0" * (n - len(uid)) if len(uid) <= n else uid[:n]
        return data[: at + 8] + value + data[at + 8 + n :]

    return file_bytes(mod, where, fn)


def _deep_sequences() -> None:
    def nested(depth: int) -> Mut:
        def fn(ds: Dataset) -> None:
            inner = Dataset()
            inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            for _ in range(depth):
                outer = Dataset()
                outer.ReferencedImageSequence = Sequence([inner])
                inner = outer
            ds.ReferencedImageSequence = inner.ReferencedImageSequence

        return fn

    case(
        "deep-seq-50-all-ct",
        "deep sequences",
        "processed",
        "sequences nested 50 deep",
        header("ct", "all", nested(50)),
    )
    case(
        "deep-seq-120-mid-mr",
        "deep sequences",
        "any",
        "sequences nested 120 deep (one slice; pydicom cannot write 400)",
        header("mr", "mid", nested(120)),
    )


def _junk() -> None:
    def junk_folder(dest: Path, rng: random.Random) -> Path:
        folder = dest / "in"
        folder.mkdir()
        for i in range(20):
            (folder / f"junk{i:02d}.dcm").write_bytes(rng.randbytes(rng.randrange(10, 200_000)))
        (folder / "DICM.dcm").write_bytes(bytes(128) + b"DICM" + rng.randbytes(5000))
        (folder / "notes.txt").write_text("not an image\n")
        return folder

    def empty(dest: Path, rng: random.Random) -> Path:
        (dest / "in").mkdir()
        return dest / "in"

    def good_plus_junk(dest: Path, rng: random.Random) -> Path:
        folder = copy_source(dest / "in" / "ct", "ct")
        (folder.parent / "junk.dcm").write_bytes(rng.randbytes(4096))
        (folder.parent / "DICM-garbage.dcm").write_bytes(bytes(128) + b"DICM" + rng.randbytes(3000))
        (folder.parent / "empty.dcm").write_bytes(b"")
        return dest / "in"

    def zero_file(dest: Path, rng: random.Random) -> Path:
        (dest / "in").mkdir()
        (dest / "in" / "x.dcm").write_bytes(b"")
        return dest / "in"

    case(
        "junk-folder",
        "junk",
        "refused",
        "a folder of random bytes, a DICM preamble with garbage, text",
        junk_folder,
        skipped="junk00.dcm",
    )
    case("junk-empty-folder", "junk", "refused", "an empty folder", empty)
    case("junk-zero-byte-file", "junk", "refused", "one empty file", zero_file, skipped="x.dcm")
    case(
        "junk-beside-good-ct",
        "junk",
        "processed",
        "a good CT beside junk files",
        good_plus_junk,
        skipped="junk.dcm",
    )


def _zip_members(folder: Path, prefix: str = "") -> list[Member]:
    return [Member(prefix + f.name, f.read_bytes()) for f in sorted(folder.iterdir())]


def _zips() -> None:
    def good(mod: str):
        def build(dest: Path, rng: random.Random) -> Path:
            return write_zip(
                dest / f"{mod}.zip", _zip_members(copy_source(dest / "src", mod), f"{mod}/")
            )

        return build

    def nested(depth: int):
        def build(dest: Path, rng: random.Random) -> Path:
            inner = write_zip(dest / "z0.zip", _zip_members(copy_source(dest / "src", "ct"), "ct/"))
            for k in range(depth):
                inner = write_zip(
                    dest / f"z{k + 1}.zip", [Member(f"level{k}.zip", inner.read_bytes())]
                )
            return inner

        return build

    def bomb(dest: Path, rng: random.Random) -> Path:
        members = _zip_members(copy_source(dest / "src", "ct"), "ct/")
        return write_zip(dest / "bomb.zip", members + [zeros_bomb("ct/zz-bomb.dcm", 1024)])

    def declared_huge(dest: Path, rng: random.Random) -> Path:
        members = _zip_members(copy_source(dest / "src", "ct"), "ct/")
        members[0].declared_size = 0xF0000000
        members[1].declared_size = 0xF0000000
        return write_zip(dest / "declared.zip", members)

    def understated(dest: Path, rng: random.Random) -> Path:
        members = _zip_members(copy_source(dest / "src", "ct"), "ct/")
        members[N_SLICES // 2].declared_size = 100  # the header lies: the member is 512 KB
        return write_zip(dest / "lie.zip", members)

    def traversal(dest: Path, rng: random.Random) -> Path:
        members = _zip_members(copy_source(dest / "src", "ct"), "ct/")
        evil = _source("ct")[0]
        extra = [
            Member("../../sprim-fuzz-escape.dcm", evil),
            Member("/tmp/sprim-fuzz-absolute.dcm", evil),
            Member("C:/sprim-fuzz-drive.dcm", evil),
            Member("ct/link.dcm", b"/etc/passwd", symlink=True),
        ]
        return write_zip(dest / "traversal.zip", members + extra)

    def truncated(dest: Path, rng: random.Random) -> Path:
        z = good("ct")(dest, rng)
        z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
        return z

    def corrupt_member(dest: Path, rng: random.Random) -> Path:
        z = good("ct")(dest, rng)
        data = bytearray(z.read_bytes())
        with __import__("zipfile").ZipFile(z) as zf:
            info = zf.infolist()[N_SLICES // 2]
        start = info.header_offset + 30 + len(info.filename)
        for k in range(start + 200, start + 260):
            data[k] ^= 0x5A
        z.write_bytes(bytes(data))
        return z

    def junk_zip(dest: Path, rng: random.Random) -> Path:
        return write_zip(
            dest / "junk.zip", [Member(f"j{i}.dcm", rng.randbytes(3000)) for i in range(10)]
        )

    def empty_zip(dest: Path, rng: random.Random) -> Path:
        return write_zip(dest / "empty.zip", [])

    def text_zip(dest: Path, rng: random.Random) -> Path:
        (dest / "fake.zip").write_text("this is not a zip\n")
        return dest / "fake.zip"

    def many(dest: Path, rng: random.Random) -> Path:
        members = _zip_members(copy_source(dest / "src", "ct"), "ct/")
        return write_zip(dest / "many.zip", members + [Member(f"e{i}.txt", b"") for i in range(40)])

    def good_plus_bad_zip(dest: Path, rng: random.Random) -> Path:
        copy_source(dest / "in" / "ct", "ct")
        (dest / "in" / "broken.zip").write_bytes(b"PK\x03\x04" + rng.randbytes(2000))
        return dest / "in"

    case("zip-good-ct", "zips", "processed", "the CT series in a zip", good("ct"))
    case("zip-good-mr", "zips", "processed", "the MR series in a zip", good("mr"))
    case(
        "zip-nested-1",
        "nested zips",
        "processed",
        "a zip inside a zip (depth 1: allowed)",
        nested(1),
    )
    case(
        "zip-nested-2",
        "nested zips",
        "refused",
        "zip in zip in zip (depth 2: refused)",
        nested(2),
        skipped="level",
    )
    case("zip-nested-5", "nested zips", "refused", "zips nested 5 deep", nested(5), skipped="level")
    case(
        "zip-bomb-1gb",
        "zip bombs",
        "refused",
        "a 1 GB zero member (1 MB compressed) beside the CT",
        bomb,
        skipped="bomb.zip",
    )
    case(
        "zip-declares-7.5gb",
        "zip bombs",
        "refused",
        "members declare 7.5 GB uncompressed",
        declared_huge,
        skipped="declared.zip",
    )
    case(
        "zip-understated-member",
        "zip bombs",
        "refused",
        "a member's headers claim 100 bytes (it is 512 KB)",
        understated,
        skipped="lie.zip",
    )
    case(
        "zip-traversal",
        "zip traversal",
        "processed",
        "the CT plus '../', absolute, drive-letter and symlink members",
        traversal,
        skipped="sprim-fuzz-escape",
    )
    case("zip-truncated", "zips", "refused", "the CT zip cut at half", truncated, skipped="ct.zip")
    case(
        "zip-corrupt-member",
        "zips",
        "refused",
        "one member's compressed bytes damaged (CRC error)",
        corrupt_member,
        skipped="ct.zip:",
    )
    case("zip-junk", "junk", "refused", "a zip of random bytes", junk_zip, skipped="junk.zip")
    case("zip-empty", "zips", "refused", "an empty zip", empty_zip)
    case("zip-not-a-zip", "zips", "refused", "a text file named .zip", text_zip, skipped="fake.zip")
    case(
        "zip-too-many-members",
        "zips",
        "refused",
        "64 members with SPRIM_ZIP_MAX_MEMBERS=30",
        many,
        env=(("SPRIM_ZIP_MAX_MEMBERS", "30"),),
        skipped="many.zip",
    )
    case(
        "zip-corrupt-beside-good-ct",
        "zips",
        "processed",
        "a good CT folder beside a corrupt zip",
        good_plus_bad_zip,
        skipped="broken.zip",
    )


def _mixed() -> None:
    def good_and_bad(bad_mod: str, fn: Mut, good_mod: str):
        def build(dest: Path, rng: random.Random) -> Path:
            copy_source(dest / "in" / "good", good_mod)
            dss = slices(bad_mod)
            for i in pick(len(dss), "all" if fn is not _other_patient else "mid"):
                fn(dss[i])
            write(dest / "in" / "bad", dss)
            return dest / "in"

        return build

    case(
        "mixed-good-ct-bad-mr-spacing",
        "one bad series",
        "partial",
        "a good CT beside an MR with NaN PixelSpacing",
        good_and_bad("mr", set_raw("PixelSpacing", b"nan\\nan"), "ct"),
    )
    case(
        "mixed-good-mr-bad-ct-patient",
        "one bad series",
        "partial",
        "a good MR beside a CT with one slice of another patient",
        good_and_bad("ct", _other_patient, "mr"),
    )
    case(
        "mixed-good-ct-bad-mr-instance",
        "one bad series",
        "processed",
        "a good CT beside an MR with non-numeric InstanceNumbers",
        good_and_bad("mr", set_raw("InstanceNumber", b"x1"), "ct"),
    )


def _other_patient(ds: Dataset) -> None:
    ds.PatientID = "OTHER-PATIENT"


for _family in (
    _baseline,
    _truncation,
    _bit_flips,
    _pixel_format,
    _geometry,
    _orientation,
    _identity,
    _values,
    _charset,
    _strings,
    _instance_number,
    _transfer_syntax,
    _deep_sequences,
    _junk,
    _zips,
    _mixed,
):
    _family()

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
BY_NAME = {c.name: c for c in CASES}
