"""A source series as read from DICOM: headers (no pixels) and the volume built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
        What the reader corrected (e.g. "gantry tilt 18.5° resampled"), for the run summary.
    """

    series_uid: str
    study_uid: str
    sop_class_uid: str
    modality: str
    headers: list[Dataset]
    volume: Volume
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.headers[0]


class SeriesError(Exception):
    """A series cannot be made into a volume; the message names the series and the defect."""
