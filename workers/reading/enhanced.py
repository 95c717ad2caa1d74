"""Enhanced (multi-frame) CT/MR/PET objects to a volume.

Each frame's geometry and rescale come from its per-frame functional group, falling back to the
shared group: PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
PixelValueTransformationSequence. Frames of all files of the series are pooled, so a volume
split over several multi-frame objects (slabs) is read as one.

Several stacks (decision): sprim reads one 3D stack per series. When frames share a slice
position (several temporal positions, echoes, b-values or image types such as magnitude +
field map), the series is **refused** with a message naming what varies ("4 temporal
positions"), rather than silently picking one: which stack a rule wants is the rule's business
(a future ``select_stack`` parameter), and a wrong pick would look like a valid volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels import iter_pixels

from workers.reading import pixels, validate
from workers.reading.source import SeriesError, SourceSeries, make_source
from workers.reading.stack import apply_plan, output_shape, plan_stack

_FRAME_TYPE_SEQS = (
    "MRImageFrameTypeSequence",
    "CTImageFrameTypeSequence",
    "PETFrameTypeSequence",
)


def _group_value(frame: Dataset | None, shared: Dataset | None, seq: str, keyword: str) -> Any:
    """``keyword`` inside functional group ``seq`` of the frame, else of the shared groups."""
    for src in (frame, shared):
        if src is not None and seq in src and len(src[seq].value):
            item = src[seq].value[0]
            if keyword in item:
                return item[keyword].value
    return None


def _frame_type(frame: Dataset | None, shared: Dataset | None) -> str:
    for seq in _FRAME_TYPE_SEQS:
        value = _group_value(frame, shared, seq, "FrameType")
        if value is not None:
            return "\\".join(value) if not isinstance(value, str) else value
    return ""


def _vec(value: Any, n: int) -> list[float]:
    try:
        if value is None or len(value) != n:
            return [float("nan")] * n
        return [float(x) for x in value]
    except (TypeError, ValueError):
        return [float("nan")] * n


def _rescale(name: str, slope: Any, icpt: Any, ds: Dataset) -> tuple[float, float]:
    """A frame's (slope, intercept), checked by the gate's rule."""
    try:
        got = (float(slope), float(icpt or 0.0))
    except (TypeError, ValueError):
        raise SeriesError(
            f"{name}: RescaleSlope / RescaleIntercept of a frame are not numbers", code="values"
        ) from None
    why = validate.rescale_defect(*got, *pixels.stored_range(ds))
    if why:
        raise SeriesError(f"{name}: {why}", code="values")
    return got


def _describe(frames: list[dict[str, Any]]) -> Callable[[list[int]], str]:
    """What differs between frames at one position, in radiology words."""
    labels = (
        ("temporal", "temporal positions", ", a dynamic or functional series"),
        ("frame_type", "image types", ""),
        ("echo", "echo times", ""),
        ("bvalue", "diffusion b-values", ""),
        ("stack", "stacks", ""),
        ("file", "multi-frame objects (files) covering the same slices", ""),
    )

    def why(indices: list[int]) -> str:
        for key, words, what in labels:
            values = list(dict.fromkeys(frames[i][key] for i in indices))
            if len(values) > 1:
                shown = ", ".join(str(v) for v in values[:4])
                return f"{len(values)} {words} ({shown}){what}"
        return ""

    return why


def _frames(name: str, files: list[Path], headers: list[Dataset]) -> list[dict[str, Any]]:
    """Every frame of every file: geometry, rescale and what tells stacks apart."""
    frames: list[dict[str, Any]] = []
    for f, h in enumerate(headers):
        try:
            frames += _file_frames(name, f, h)
        except SeriesError:
            raise
        except Exception as e:  # noqa: BLE001  a damaged functional group sequence is an input defect
            raise SeriesError(
                f"{name}: the functional groups of {files[f].name} cannot be read "
                f"({type(e).__name__}: {e})",
                code="unreadable",
            ) from e
    return frames


def _file_frames(name: str, f: int, h: Dataset) -> list[dict[str, Any]]:
    """The frames of file ``f`` from its per-frame, else shared, functional groups."""
    n = int(h.get("NumberOfFrames") or 1)
    per_frame = list(h.get("PerFrameFunctionalGroupsSequence") or [])
    shared_seq = h.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if not per_frame and shared is None:
        raise SeriesError(
            f"{name}: multi-frame object without functional groups (no per-frame slice "
            "positions), cannot place its frames in a volume"
        )
    if per_frame and len(per_frame) != n:
        raise SeriesError(f"{name}: {n} frames but {len(per_frame)} per-frame descriptions")
    return [_frame(name, f, h, i, per_frame[i] if per_frame else None, shared) for i in range(n)]


def _frame(
    name: str, f: int, h: Dataset, i: int, fr: Dataset | None, shared: Dataset | None
) -> dict[str, Any]:
    slope = _group_value(fr, shared, "PixelValueTransformationSequence", "RescaleSlope")
    icpt = _group_value(fr, shared, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope, icpt = pixels.rescale_of(h)
    rescale = pixels.display_rescale(h, _rescale(name, slope, icpt, h))
    return {
        "file": f,
        "index": i,
        "pos": _vec(_group_value(fr, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
        "iop": _vec(
            _group_value(fr, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        ),
        "spacing": _vec(_group_value(fr, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
        "rescale": rescale,
        "temporal": _group_value(fr, shared, "FrameContentSequence", "TemporalPositionIndex"),
        "stack": _group_value(fr, shared, "FrameContentSequence", "StackID"),
        "echo": _group_value(fr, shared, "MREchoSequence", "EffectiveEchoTime"),
        "bvalue": _group_value(fr, shared, "MRDiffusionSequence", "DiffusionBValue"),
        "frame_type": _frame_type(fr, shared),
        "key": f"{h.get('SOPInstanceUID', f)}:{i}",
    }


def _decode_frames(
    name: str,
    files: list[Path],
    chosen: list[dict[str, Any]],
    rescales: list[tuple[float, float]],
    vol: np.ndarray,
    shape: tuple[int, int],
) -> None:
    """Decode the chosen frames of each file into ``vol`` (one slice each), rescaled."""
    rows, cols = shape
    for f, path in enumerate(files):
        wanted = {fr["index"]: k for k, fr in enumerate(chosen) if fr["file"] == f}
        if not wanted:
            continue
        indices = sorted(wanted)
        try:
            for idx, raw in zip(indices, iter_pixels(str(path), indices=indices), strict=True):
                k = wanted[idx]
                if raw.shape != (rows, cols):
                    raise SeriesError(
                        f"{name}: frame {idx + 1} of {path.name} decodes to "
                        f"{'x'.join(str(d) for d in raw.shape[::-1])} pixels, the header says "
                        f"{cols}x{rows}",
                        code="pixel-format",
                    )
                pixels.put(vol[k], raw, *rescales[k])
        except SeriesError:
            raise
        except Exception as e:
            raise SeriesError(
                f"{name}: cannot decode the pixel data of {path.name}: {e}", code="unreadable"
            ) from e


def read_enhanced(name: str, files: list[Path], headers: list[Dataset]) -> SourceSeries:
    """A volume from enhanced multi-frame objects; see the module docstring for stacks."""
    frames = _frames(name, files, headers)
    if any(np.isnan(fr["pos"]).any() or np.isnan(fr["iop"]).any() for fr in frames):
        raise SeriesError(
            f"{name}: frames without plane position or orientation, cannot place them in a volume",
            code="geometry",
        )
    plan = plan_stack(
        name,
        np.array([fr["pos"] for fr in frames]),
        np.array([fr["iop"] for fr in frames]),
        np.array([fr["spacing"] for fr in frames]),
        [(int(headers[fr["file"]].Rows), int(headers[fr["file"]].Columns)) for fr in frames],
        [fr["key"] for fr in frames],
        unit="frame",
        why_same_position=_describe(frames),
        labels=[f"frame {fr['index'] + 1} of {files[fr['file']].name}" for fr in frames],
    )
    chosen = [frames[i] for i in plan.order]
    used = sorted({fr["file"] for fr in chosen})
    for_uid, notes = validate.frame_of_reference(name, [headers[f] for f in used])
    rescales = [fr["rescale"] for fr in chosen]
    dtype = pixels.output_dtype(
        rescales, [pixels.stored_range(headers[fr["file"]]) for fr in chosen]
    )
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    validate.check_volume_size(name, len(chosen) * rows * cols, dtype.itemsize)
    validate.check_volume_size(name, int(np.prod(output_shape(plan, rows, cols))), dtype.itemsize)
    image, vol = pixels.new_volume((len(chosen), rows, cols), dtype)
    _decode_frames(name, files, chosen, rescales, vol, (rows, cols))
    padded = [
        pixels.padded_values(headers[fr["file"]], rescales[k], dtype) for k, fr in enumerate(chosen)
    ]
    notes += pixels.mask_padding_noted(vol, padded)
    del vol  # the view must not outlive the image buffer
    image = apply_plan(pixels.narrow(image), plan)
    hs = [headers[f] for f in used]
    return make_source(
        name,
        image,
        hs,
        [files[f] for f in used],
        plan.notes + notes + pixels.display_notes(hs),
        for_uid,
    )
