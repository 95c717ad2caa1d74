"""A source series as read from DICOM: headers (no pixels) and the volume built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from pipelines.types import Volume


@dataclass
class SourceSeries:
    """One source series ready for steps and writers.

    Attributes
    ----------
    series_uid, study_uid, sop_class_uid, modality : str
    headers : list[Dataset]
        One header per slice, sorted along the slice normal in the same order as the volume's
        third axis, pixel data removed. For an enhanced multi-frame object: the single dataset
        (per-frame functional groups hold the geometry).
    volume : Volume
        The int16/float32 LPS image built from the series.
    files : list[Path]
        The files the series was read from.
    notes : list[str]
        What the reader corrected or accepted with a remark (e.g. "gantry tilt 18.5°
        resampled"), for the run summary and the provenance.
    memo : dict
        Values writers derive once per source and reuse for every output of it.
    frame_of_reference_uid : str
        The one frame of reference every output uses: the source's; when the slices carried
        different FrameOfReferenceUIDs but one consistent geometry, the first slice's in
        volume order (with a note).
    """

    series_uid: str
    study_uid: str
    sop_class_uid: str
    modality: str
    headers: list[Dataset]
    volume: Volume
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    frame_of_reference_uid: str = ""
    #: Values writers derive once per source and reuse for every output (encoded references).
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def first(self) -> Dataset:
        return self.headers[0]


class SeriesError(Exception):
    """A series cannot be made into a volume; the message names the series and the defect.

    ``code`` is the defect family, for reports and tests: "pixel-format", "geometry",
    "identity", "size", "values", "unreadable", "not-image" or "series" (anything else about
    the stack: missing slices, several images at one position...).
    """

    def __init__(self, message: str, code: str = "series") -> None:
        super().__init__(message)
        self.code = code


def make_source(
    name: str,
    image: Any,
    headers: list[Dataset],
    files: list[Path],
    notes: list[str],
    frame_of_reference_uid: str,
) -> SourceSeries:
    """Wrap a finished volume and its headers (volume order) as a :class:`SourceSeries`."""
    first = headers[0]
    modality = str(first.get("Modality", ""))
    return SourceSeries(
        series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.get("StudyInstanceUID", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        modality=modality,
        headers=headers,
        volume=Volume(image, modality, str(first.get("SeriesDescription", ""))),
        files=files,
        notes=notes,
        frame_of_reference_uid=frame_of_reference_uid,
    )
