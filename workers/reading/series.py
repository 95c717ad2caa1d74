"""DICOM series to volume: find series in folders and zips, read one into an LPS SimpleITK image.

``scan`` reads headers only and groups files by (SeriesInstanceUID, SOPClassUID); its
``attributes`` feed the routing rules. ``read_series`` builds the volume (CT in HU, int16 when
the rescale allows it, float32 otherwise) or refuses the series with a :class:`SeriesError`
naming the series and the defect. Geometry decisions (gantry tilt, uneven spacing, missing
slices) are documented in :mod:`workers.reading.stack`; enhanced multi-frame objects in
:mod:`workers.reading.enhanced`.

Speed and memory: scan keeps each header and the file offset of its PixelData; uncompressed
pixels are then read straight into the image buffer (no per-slice arrays, no float64 copies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName

from pipelines.rules.attributes import IMAGE_KEYWORDS, stack_attributes
from workers.reading import pixels, validate
from workers.reading.inputs import InputWalk, Skipped, series_uid_of, why_unreadable
from workers.reading.source import SeriesError, SourceSeries, make_source
from workers.reading.stack import StackPlan, apply_plan, output_shape, plan_stack

log = logging.getLogger(__name__)

#: Never opened as series (a DICOMDIR is an index, not an image).
_SKIP_SOP_CLASSES = {"1.2.840.10008.1.3.10"}
DEFER_SIZE = "64 KB"


@dataclass
class SeriesFiles:
    """The files of one series as found by :func:`scan`.

    Attributes
    ----------
    files : list[Path]
        Sorted by InstanceNumber, then path.
    attributes : dict
        Series-level routing attributes, DICOM keyword -> plain value (str, int, float,
        list[str] / list[float]) of ``pipelines.rules.ROUTING_KEYWORDS`` (see :func:`series_attributes`).
    headers : list[Dataset]
        Header of each file (no pixel data), same order as ``files``; empty = read on demand.
    pixel_offsets : list[int | None]
        File offset of each file's PixelData element (None = none found).
    """

    files: list[Path]
    attributes: dict[str, Any]
    headers: list[Dataset] = field(default_factory=list, repr=False)
    pixel_offsets: list[int | None] = field(default_factory=list, repr=False)
    #: Files of this series that could not be read (name, reason): the gate judges the rest.
    unreadable: list[Skipped] = field(default_factory=list, repr=False)
    #: Keeps a temporary extraction folder (zip input) alive as long as the series is used.
    _keepalive: Any = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return series_name(self.attributes)


def series_name(attrs: dict[str, Any] | Dataset) -> str:
    """How a PACS admin finds the series: 'series 3 "CHEST 1mm" (UID ...)'."""
    get = attrs.get
    desc = get("SeriesDescription") or ""
    num = get("SeriesNumber")
    num_s = f" {num}" if num not in (None, "") else ""
    desc_s = f' "{desc}"' if desc else ""
    return f"series{num_s}{desc_s} ({get('SeriesInstanceUID', 'no SeriesInstanceUID')})"


def plain(value: Any) -> Any:
    """A DICOM value as plain Python (str, int, float or lists of them)."""
    if isinstance(value, MultiValue | list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, DSfloat | DSdecimal | float):
        return float(value)
    if isinstance(value, IS | int):
        return int(value)
    if isinstance(value, PersonName | UID | str):
        return str(value)
    return None if isinstance(value, bytes | Dataset) else str(value)


def _read_header(path: Path) -> tuple[Dataset, int | None] | None:
    """Header without pixels and the offset of PixelData; None for non-DICOM files."""
    try:
        with open(path, "rb") as fp:
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE)
            except InvalidDicomError:
                # No preamble: old exports still start with a group 0008 (or 0002) element.
                fp.seek(0)
                if fp.read(2) not in (b"\x08\x00", b"\x02\x00"):
                    return None
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE, force=True)
                if "SOPClassUID" not in ds:
                    return None
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = (
                    (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
                    if little
                    else ExplicitVRBigEndian
                )
            offset = fp.tell()
            tag = fp.read(4)
    except (InvalidDicomError, OSError, EOFError):
        return None
    # pydicom raises anything (struct.error, KeyError, NotImplementedError...) on a corrupt header:
    except Exception as e:  # noqa: BLE001  a corrupt file must not stop the scan of the others
        log.warning("unreadable DICOM file skipped: %s (%s)", path, e)
        return None
    little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
    pixel_tag = b"\xe0\x7f\x10\x00" if little else b"\x7f\xe0\x00\x10"
    return ds, (offset if tag == pixel_tag else None)


def scan(inputs: Path | list[Path], skipped: list[Skipped] | None = None) -> list[SeriesFiles]:
    """Find the DICOM series in folders, files and ``.zip`` archives (headers only).

    Files that are not DICOM images (text, LICENSE, DICOMDIR, NIfTI, unreadable headers) and
    zip members or archives refused by :mod:`workers.reading.inputs` are left out; each is appended to
    ``skipped`` (name and reason) when given. One bad header never stops the scan of the
    others. Zip archives are extracted into a temporary folder that lives as long as the
    returned series do.

    Returns
    -------
    list[SeriesFiles]
        One per (SeriesInstanceUID, SOPClassUID), sorted by study, SeriesNumber, UID.
    """
    paths = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    walk = InputWalk()
    out = _series_files(_headers_by_series(walk, paths), walk)
    for s in out:  # damaged files whose SeriesInstanceUID could be recovered
        uid = s.attributes.get("SeriesInstanceUID")
        s.unreadable = [k for k in walk.skipped if k.series_uid and k.series_uid == uid]
    if skipped is not None:
        skipped += walk.skipped
    out.sort(
        key=lambda s: (
            s.attributes.get("StudyInstanceUID", ""),
            _int(s.attributes.get("SeriesNumber")),
            s.attributes["SeriesInstanceUID"],
            s.attributes.get("SOPClassUID", ""),
        )
    )
    return out


_Member = tuple[Path, Dataset, int | None]


def _headers_by_series(walk: InputWalk, paths: list[Path]) -> dict[tuple[str, str], list[_Member]]:
    """(path, header, PixelData offset) of each image file, by (SeriesInstanceUID, SOPClassUID).

    Non-DICOM files, unreadable headers, DICOMDIRs and files without a SeriesInstanceUID are
    recorded on ``walk`` as skipped.
    """
    groups: dict[tuple[str, str], list[_Member]] = {}
    for path in walk.files(paths):
        try:
            got = _read_header(path)
            if got is None:
                walk.skip(path, why_unreadable(path), series_uid_of(path))
                continue
            ds, offset = got
            sop_class = str(pixels.value(ds, "SOPClassUID", ""))
            uid = pixels.value(ds, "SeriesInstanceUID")
        except Exception as e:  # noqa: BLE001  one malformed header must not stop the scan
            reason = f"unreadable DICOM header ({type(e).__name__}: {e})"[:240]
            walk.skip(path, reason, series_uid_of(path))
            continue
        if sop_class in _SKIP_SOP_CLASSES:
            walk.skip(path, "DICOMDIR (an index, not an image)")
        elif not uid or not isinstance(uid, str):
            reason = "DICOM file without a SeriesInstanceUID (cut short, or not an image)"
            walk.skip(path, reason, series_uid_of(path))
        else:
            groups.setdefault((str(uid), sop_class), []).append((path, ds, offset))
    return groups


def _series_files(
    groups: dict[tuple[str, str], list[_Member]], walk: InputWalk
) -> list[SeriesFiles]:
    """One :class:`SeriesFiles` per group, images in order; a group whose routing attributes
    cannot be read is skipped whole."""
    keepalive = walk.keep or None
    out = []
    for members in groups.values():
        members.sort(key=lambda m: (_instance_number(m[1]), str(m[0])))
        try:
            attributes = series_attributes([m[1] for m in members])
        except Exception as e:  # noqa: BLE001  a malformed series header costs that series only
            for m in members:
                walk.skip(m[0], f"unreadable series attributes ({type(e).__name__}: {e})"[:240])
            continue
        out.append(
            SeriesFiles(
                files=[m[0] for m in members],
                attributes=attributes,
                headers=[m[1] for m in members],
                pixel_offsets=[m[2] for m in members],
                _keepalive=keepalive,
            )
        )
    return out


def _instance_number(ds: Dataset) -> int:
    try:
        return _int(pixels.value(ds, "InstanceNumber"))
    except (TypeError, ValueError, OverflowError):  # non-numeric InstanceNumber: sorts last
        return 2**31


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 2**31


@dataclass(frozen=True)
class InstanceSummary:
    """What routing needs of one instance: its image keywords and the geometry of its images."""

    order: tuple[int, str]  # (InstanceNumber, SOPInstanceUID): the series' first image is the least
    attributes: dict[str, Any]
    frames: list[tuple[list[float] | None, list[float] | None]]


def _in_groups(ds: Dataset, keyword: str) -> Any:
    """``keyword`` in the shared, else first per-frame, functional groups of an enhanced object."""
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq)
        if not groups:
            continue
        for elem in groups[0]:
            if elem.VR == "SQ" and elem.value and keyword in elem.value[0]:
                return elem.value[0].get(keyword)
    return None


def _vector(ds: Dataset | None, keyword: str) -> list[float] | None:
    v = ds.get(keyword) if ds is not None else None
    try:
        return [float(x) for x in v] if v is not None and len(v) else None
    except (TypeError, ValueError):
        return None


def _frame_geometry(ds: Dataset) -> list[tuple[list[float] | None, list[float] | None]]:
    """(ImageOrientationPatient, ImagePositionPatient) of each image (frame) of ``ds``."""
    n = int(pixels.value(ds, "NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        if n > 1:  # frames without functional groups: no position of their own
            return [(None, None)] * n
        return [(_vector(ds, "ImageOrientationPatient"), _vector(ds, "ImagePositionPatient"))]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]

    def group(frame: Dataset, seq: str, keyword: str) -> list[float] | None:
        for src in (frame, shared):
            if src is not None and src.get(seq):
                return _vector(src.get(seq)[0], keyword)
        return None

    return [
        (
            group(f, "PlaneOrientationSequence", "ImageOrientationPatient"),
            group(f, "PlanePositionSequence", "ImagePositionPatient"),
        )
        for f in per_frame
    ]


def image_order(ds: Dataset) -> tuple[int, str]:
    """Sort key of the instances of a series: the first image has the least."""
    return (_instance_number(ds), str(ds.get("SOPInstanceUID", "")))


def image_attributes(ds: Dataset) -> dict[str, Any]:
    """The image keywords of one instance's header (see :mod:`pipelines.rules.attributes`)."""
    attrs: dict[str, Any] = {}
    for kw in IMAGE_KEYWORDS:
        value = ds.get(kw)
        if value is None or value == "":
            value = _in_groups(ds, kw)
        value = plain(value) if value is not None else None
        if value is None or value == "" or value == []:
            continue
        attrs[kw] = value
    if isinstance(attrs.get("ImageType"), str):
        attrs["ImageType"] = [attrs["ImageType"]]
    if isinstance(attrs.get("PixelSpacing"), float):
        attrs["PixelSpacing"] = [attrs["PixelSpacing"]]
    return attrs


def instance_summary(ds: Dataset) -> InstanceSummary:
    """The routing view of one instance, for an archive's index."""
    return InstanceSummary(image_order(ds), image_attributes(ds), _frame_geometry(ds))


def series_routing(instances: list[InstanceSummary]) -> dict[str, Any]:
    """Routing attributes of a series from its instances' summaries (an archive's index)."""
    first = min(instances, key=lambda i: i.order)
    frames = [f for i in instances for f in i.frames]
    return {**first.attributes, **stack_attributes(len(instances), frames)}


def series_attributes(headers: list[Dataset]) -> dict[str, Any]:
    """Routing attributes of a series from its headers (``pipelines.rules.ROUTING_KEYWORDS``):
    the first image's keywords and what every image's geometry gives. Only the first header
    needs the routing keywords; the others, their order and geometry."""
    first = min(headers, key=image_order)
    frames = [f for h in headers for f in _frame_geometry(h)]
    return {**image_attributes(first), **stack_attributes(len(headers), frames)}


def read_series(series: SeriesFiles) -> SourceSeries:
    """Build the volume of one series, or refuse it with a :class:`SeriesError`.

    Every series passes the gate (:func:`workers.reading.validate.check_series`) before any pixel is
    read. See :mod:`workers.reading.stack` for geometry decisions and :mod:`workers.reading.enhanced` for
    multi-frame objects. ``headers`` of the result are in volume order (one per acquired
    slice; after gantry-tilt or uneven-spacing resampling the volume has its own slice count).
    """
    unreadable = [(Path(k.path).name, k.reason) for k in series.unreadable]
    if not series.headers:
        files, headers, offsets = [], [], []
        for p in series.files:
            try:
                got = _read_header(p)
            except Exception as e:  # noqa: BLE001  a damaged file is one missing image
                got, why = None, f"unreadable DICOM header ({type(e).__name__})"
            else:
                why = "not readable DICOM"
            if got is None:
                unreadable.append((p.name, why))
                continue
            files.append(p)
            headers.append(got[0])
            offsets.append(got[1])
        if not headers:
            raise SeriesError(f"{series.name}: no file is readable DICOM", code="unreadable")
        series.files, series.headers, series.pixel_offsets = files, headers, offsets
    name = series.name
    ok = validate.check_series(name, series.files, series.headers, series.pixel_offsets, unreadable)
    if validate.is_multiframe(ok.headers[0]):
        from workers.reading.enhanced import read_enhanced

        source = read_enhanced(name, ok.files, ok.headers)
    else:
        source = read_classic(name, ok.files, ok.headers, ok.offsets)
    source.notes[:0] = ok.notes
    if series._keepalive is not None:
        source._keepalive = series._keepalive  # type: ignore[attr-defined]
    return source


def diagnose(series: SeriesFiles) -> str | None:
    """Why the gate would refuse ``series``, from its headers only (no pixel read); None if not.

    For series the rules left out: a series that is "not a volume" because of a defect (NaN
    positions, a lying NumberOfFrames...) is then reported with the gate's words.
    """
    if not series.headers:
        return None
    try:
        ok = validate.check_series(
            series.name, series.files, series.headers, series.pixel_offsets,
            [(Path(k.path).name, k.reason) for k in series.unreadable],
        )  # fmt: skip
        if not validate.is_multiframe(ok.headers[0]) and len(ok.headers) > 1:
            _plan_classic(series.name, ok.files, ok.headers)
    except SeriesError as e:
        return str(e)
    return None


def _floats(ds: Dataset, keyword: str, n: int) -> list[float]:
    try:
        got = pixels.value(ds, keyword)
        if isinstance(got, float | int) and n == 1:
            got = [got]
        if not isinstance(got, list) or len(got) != n:
            return [float("nan")] * n
        return [float(x) for x in got]
    except (TypeError, ValueError):
        return [float("nan")] * n


def _plan_classic(name: str, files: list[Path], headers: list[Dataset]) -> StackPlan:
    """The stack plan of single-frame images (headers only; refuses with SeriesError)."""
    return plan_stack(
        name,
        np.array([_floats(h, "ImagePositionPatient", 3) for h in headers]),
        np.array([_floats(h, "ImageOrientationPatient", 6) for h in headers]),
        np.array([_floats(h, "PixelSpacing", 2) for h in headers]),
        [(pixels.value(h, "Rows", 0), pixels.value(h, "Columns", 0)) for h in headers],
        [str(pixels.value(h, "SOPInstanceUID", i)) for i, h in enumerate(headers)],
        labels=[f"image {f.name}" for f in files],
    )


def read_classic(
    name: str, files: list[Path], headers: list[Dataset], offsets: list[int | None]
) -> SourceSeries:
    """A volume from single-frame images (one file per slice)."""
    if len(headers) == 1:
        raise SeriesError(f"{name}: a single image, not a volume")
    plan = _plan_classic(name, files, headers)
    order = plan.order
    hs = [headers[i] for i in order]
    for_uid, notes = validate.frame_of_reference(name, hs)
    notes += _fill_slice_thickness(hs, plan.spacing[2])
    lut = ["ModalityLUTSequence" in h for h in hs]
    rescales = [
        (1.0, 0.0) if lut[k] else pixels.display_rescale(h, pixels.rescale_of(h))
        for k, h in enumerate(hs)
    ]
    ranges = [(0, 2**16 - 1) if lut[k] else pixels.stored_range(h) for k, h in enumerate(hs)]
    dtype = pixels.output_dtype(rescales, ranges)
    rows, cols = int(hs[0].Rows), int(hs[0].Columns)
    validate.check_volume_size(name, len(order) * rows * cols, dtype.itemsize)
    validate.check_volume_size(name, int(np.prod(output_shape(plan, rows, cols))), dtype.itemsize)
    # Compressed: the first image is decoded before the volume exists, so that a header
    # claiming a larger image than the data holds is refused without allocating for it.
    early = {}
    if not lut[0] and not _native(headers[order[0]], offsets[order[0]]):
        early[order[0]] = _decoded(name, files[order[0]], rows, cols)
    image, vol = pixels.new_volume((len(order), rows, cols), dtype)
    for k, i in enumerate(order):
        if lut[k]:
            pixels.put(vol[k], _lut_applied(name, files[i], headers[i], rows, cols), 1.0, 0.0)
        elif i in early or not pixels.read_native_into(
            files[i], offsets[i], headers[i], vol[k], rescales[k]
        ):
            raw = early.pop(i) if i in early else _decoded(name, files[i], rows, cols)
            pixels.put(vol[k], raw, *rescales[k])
    padded = [
        None if lut[k] else pixels.padded_values(h, rescales[k], dtype) for k, h in enumerate(hs)
    ]
    notes += pixels.mask_padding_noted(vol, padded)
    del vol  # the view must not outlive the image buffer
    if any(lut):
        notes.append("Modality LUT Sequence applied")
    image = apply_plan(pixels.narrow(image), plan)
    return make_source(
        name,
        image,
        hs,
        [files[i] for i in order],
        plan.notes + notes + pixels.display_notes(hs),
        for_uid,
    )


def _fill_slice_thickness(headers: list[Dataset], spacing: float) -> list[str]:
    """SliceThickness (type 2, may be empty) set to the slice spacing where absent.

    Derived objects describe their pixel measures from it (a SEG's PixelMeasuresSequence).
    """
    missing = [h for h in headers if pixels.value(h, "SliceThickness") is None]
    if not missing:
        return []
    for h in missing:
        h.SliceThickness = f"{spacing:.6g}"
    return [
        f"SliceThickness absent in {len(missing)} image(s): the slice spacing ({spacing:.6g} mm) "
        "is used for derived objects"
    ]


def _native(ds: Dataset, offset: int | None) -> bool:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return offset is not None and ts in validate.NATIVE_SYNTAXES


def _decoded(name: str, path: Path, rows: int, cols: int) -> np.ndarray:
    """Stored values of one single-frame file, checked against the header's image size."""
    raw = pixels.decode(path, name=name)
    if raw.shape != (rows, cols):
        raise SeriesError(
            f"{name}: image {path.name}: the pixel data decodes to "
            f"{'x'.join(str(d) for d in raw.shape[::-1])} pixels, the header says {cols}x{rows}",
            code="pixel-format",
        )
    return raw


def _lut_applied(name: str, path: Path, ds: Dataset, rows: int, cols: int) -> np.ndarray:
    """Values of an image with a Modality LUT Sequence (any shape of table: a lookup)."""
    from pydicom.pixels import apply_modality_lut

    raw = _decoded(name, path, rows, cols)
    try:
        return apply_modality_lut(raw, ds)
    except Exception as e:  # noqa: BLE001  a malformed table is an input defect
        raise SeriesError(
            f"{name}: image {path.name}: the Modality LUT Sequence cannot be applied "
            f"({type(e).__name__}: {e})",
            code="values",
        ) from e
