"""Pixel data into a preallocated volume: type choice, rescale, native fast path, decoders.

The output type is int16 when every slice has RescaleSlope 1 and an integer intercept and the
stored range plus intercept fits int16 (CT in HU); float32 otherwise. Values are written slice by
slice into the SimpleITK image buffer itself, so the volume exists once in memory (DESIGN §6:
``np.stack`` of a list costs 2.5x, ``apply_rescale`` float64 8x).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from workers.source import SeriesError

_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
_SITK = {
    np.dtype(np.int16): sitk.sitkInt16,
    np.dtype(np.int32): sitk.sitkInt32,
    np.dtype(np.float32): sitk.sitkFloat32,
}
_CTYPES = {
    np.dtype(np.int16): ctypes.c_int16,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.float32): ctypes.c_float,
}
#: Words in SOP class names of objects that are not images to build a volume from.
_NON_IMAGE = (
    "Segmentation",
    " SR ",
    "SR Storage",
    "Report",
    "Presentation State",
    "RT Structure",
    "RT Plan",
    "RT Beams",
    "RT Dose",
    "Treatment",
    "Key Object",
    "Encapsulated",
    "Registration",
    "Raw Data",
    "Waveform",
    "Surface",
    "Spectroscopy",
    "Directory",
)


def value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """A plain top-level value, parsed from the raw bytes when pydicom has not converted it.

    pydicom's lazy conversion costs ~50 µs per element; reading a dozen values from 400
    headers that way is a quarter of the series read time. Handles DS/IS (numbers), text VRs
    and US; anything else (or a deferred value) goes through pydicom.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return default
    elem = ds.get_item(tag)
    raw = getattr(elem, "value", None)
    vr = dictionary_VR(tag)
    if not isinstance(raw, bytes) or not getattr(elem, "is_raw", False):
        got = ds[tag].value
        if got is None or got == "":
            return default
        if vr == "DS":
            return [float(x) for x in got] if isinstance(got, list | MultiValue) else float(got)
        return got
    if vr == "US":
        return int.from_bytes(raw[:2], "little" if elem.is_little_endian else "big")
    text = raw.decode("latin-1").strip(" \0")
    if not text:
        return default
    parts = text.split("\\")
    if vr == "DS":
        nums = [float(x) for x in parts]
    elif vr == "IS":
        nums = [int(float(x)) for x in parts]
    else:
        return parts[0] if len(parts) == 1 else parts
    return nums[0] if len(nums) == 1 else nums


def is_image_sop_class(sop_class_uid: str) -> bool:
    """False for SOP classes that are not images to build a volume from (SR, SEG, PR, RT...)."""
    sop = UID(str(sop_class_uid))
    sop_name = sop.name if sop.is_valid else str(sop)
    return not any(word in f" {sop_name} " for word in _NON_IMAGE)


def check_image_series(name: str, headers: list[Dataset], offsets: list[int | None]) -> None:
    """Refuse non-image objects, colour images and series without pixel data."""
    sop = UID(str(headers[0].get("SOPClassUID", "")))
    sop_name = sop.name if sop.is_valid else str(sop)
    if not is_image_sop_class(sop):
        raise SeriesError(
            f"{name}: not an image series ({sop_name}); only CT, MR and PET images make volumes"
        )
    photometric = {str(value(h, "PhotometricInterpretation", "")) for h in headers}
    samples = {value(h, "SamplesPerPixel", 1) for h in headers}
    if samples != {1} or not photometric <= {"MONOCHROME1", "MONOCHROME2"}:
        kinds = "/".join(sorted(p for p in photometric if p))
        raise SeriesError(f"{name}: colour images ({kinds}); sprim builds greyscale volumes only")
    if all(o is None for o in offsets):
        raise SeriesError(f"{name}: no pixel data (header-only or float pixel data objects)")


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), defaulting to (1, 0)."""
    slope = ds.get("RescaleSlope")
    icpt = ds.get("RescaleIntercept")
    return (
        1.0 if slope in (None, "") else float(slope),
        0.0 if icpt in (None, "") else float(icpt),
    )


def stored_range(ds: Dataset) -> tuple[int, int]:
    """The range BitsStored and PixelRepresentation allow."""
    bits = int(value(ds, "BitsStored") or value(ds, "BitsAllocated") or 16)
    if value(ds, "PixelRepresentation", 0):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def output_dtype(rescales: list[tuple[float, float]], ranges: list[tuple[int, int]]) -> np.dtype:
    """int16 if guaranteed to fit, int32 when integer but not guaranteed, else float32."""
    if not all(s == 1.0 and float(i).is_integer() for s, i in rescales):
        return np.dtype(np.float32)
    lo = min(r[0] + i for r, (_, i) in zip(ranges, rescales, strict=True))
    hi = max(r[1] + i for r, (_, i) in zip(ranges, rescales, strict=True))
    if lo >= -(2**15) and hi < 2**15:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def new_volume(shape: tuple[int, int, int], dtype: np.dtype) -> tuple[sitk.Image, np.ndarray]:
    """A SimpleITK image and a writable numpy view (z, y, x) of its buffer.

    SimpleITK only hands out read-only views; writing through the buffer address avoids a
    second full-size copy (GetImageFromArray). The view is valid while the image lives and is
    not copied, so it must not escape the reader.
    """
    n, rows, cols = shape
    image = sitk.Image(cols, rows, n, _SITK[dtype])
    address = sitk.GetArrayViewFromImage(image).__array_interface__["data"][0]
    buf = (_CTYPES[dtype] * (n * rows * cols)).from_address(address)
    return image, np.frombuffer(buf, dtype=dtype).reshape(shape)


def put(dst: np.ndarray, raw: np.ndarray, slope: float, intercept: float) -> None:
    """Write ``raw * slope + intercept`` into ``dst`` in dst's type, without float64."""
    if dst.dtype.kind == "f":
        np.multiply(raw, np.float32(slope), out=dst, casting="unsafe")
        if intercept:
            dst += np.float32(intercept)
    elif intercept:
        np.add(raw, np.int32(intercept), out=dst, casting="unsafe")
    else:
        np.copyto(dst, raw, casting="unsafe")


def read_native_into(
    path: Path, offset: int | None, ds: Dataset, dst: np.ndarray, rescale: tuple[float, float]
) -> bool:
    """Read uncompressed single-frame pixels straight into ``dst``; False if not applicable."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    bits = value(ds, "BitsAllocated", 0)
    if offset is None or ts not in _NATIVE or bits not in (8, 16, 32):
        return False
    big = ts == ExplicitVRBigEndian
    raw_dtype = np.dtype(
        f"{'>' if big else '<'}{'i' if value(ds, 'PixelRepresentation', 0) else 'u'}{bits // 8}"
    )
    nbytes = dst.size * raw_dtype.itemsize
    with open(path, "rb") as fp:
        fp.seek(offset)
        head = fp.read(8)
        if ts != ImplicitVRLittleEndian and head[4:6] in (b"OB", b"OW", b"UN"):
            head += fp.read(4)
            length = int.from_bytes(head[8:12], "big" if big else "little")
        else:
            length = int.from_bytes(head[4:8], "big" if big else "little")
        if length == 0xFFFFFFFF or length < nbytes:
            return False  # encapsulated or short: let pydicom decide
        stored = value(ds, "BitsStored", bits)
        if raw_dtype.itemsize == dst.dtype.itemsize and dst.dtype.kind == "i":
            # Same width: read straight into the volume, fix and rescale in place.
            if fp.readinto(memoryview(dst).cast("B")) != nbytes:
                return False
            raw = dst.view(raw_dtype)
            _only_stored_bits(raw, stored)
            if raw.dtype != dst.dtype or rescale != (1.0, 0.0):
                put(dst, raw, *rescale)  # numpy buffers the overlap
            return True
        raw = np.fromfile(fp, dtype=raw_dtype, count=dst.size)
        if raw.size != dst.size:
            return False
        _only_stored_bits(raw, stored)
        put(dst, raw.reshape(dst.shape), *rescale)
        return True


def _only_stored_bits(raw: np.ndarray, bits_stored: int) -> None:
    """Clear bits above BitsStored (unsigned) or sign-extend from it (signed), in place."""
    width = raw.dtype.itemsize * 8
    if bits_stored >= width:
        return
    if raw.dtype.kind == "u":
        np.bitwise_and(raw, raw.dtype.type((1 << bits_stored) - 1), out=raw)
    else:
        shift = raw.dtype.type(width - bits_stored)
        np.left_shift(raw, shift, out=raw)
        np.right_shift(raw, shift, out=raw)


def decode(path: Path, index: int | None = None) -> np.ndarray:
    """Stored values of a file (any transfer syntax pydicom's plugins decode)."""
    try:
        return pixel_array(str(path), index=index)
    except Exception as e:  # decoder messages are technical; keep them, add the context
        raise SeriesError(f"cannot decode the pixel data of {path.name}: {e}") from e


def read_pixels(path: Path) -> np.ndarray:
    """One file's pixels as they go into a volume: (frames, rows, columns), rescaled.

    int16 where the rescale allows it, float32 otherwise; per-frame rescale of enhanced
    objects is not applied here (see :mod:`workers.enhanced`).
    """
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rescale = rescale_of(ds)
    dtype = output_dtype([rescale], [stored_range(ds)])
    raw = decode(path)
    raw = raw.reshape((-1, *raw.shape[-2:]))
    out = np.empty(raw.shape, dtype=dtype)
    put(out, raw, *rescale)
    if dtype == np.int32:  # as narrow() does for volumes
        fits = out.min() >= -(2**15) and out.max() < 2**15
        return out.astype(np.int16 if fits else np.float32)
    return out


def narrow(image: sitk.Image) -> sitk.Image:
    """int32 volumes become int16 when the values fit, float32 otherwise."""
    if image.GetPixelID() != sitk.sitkInt32:
        return image
    arr = sitk.GetArrayViewFromImage(image)
    fits = arr.min() >= -(2**15) and arr.max() < 2**15
    return sitk.Cast(image, sitk.sitkInt16 if fits else sitk.sitkFloat32)
