"""Archives sprim reads studies from and stores derived objects into.

Implementations: a folder (embedded default), DICOMweb (Orthanc or any PACS), DIMSE C-STORE.
All share :class:`Archive`; the job executor only talks to this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


class ArchiveError(Exception):
    """The archive failed a request.

    ``transient`` is True for what a retry with backoff may fix (connection refused, timeout,
    HTTP 5xx, DIMSE association rejected transiently); False for a permanent refusal, whose
    ``reason`` is the archive's own words (HTTP body, DIMSE status) for the failed job.
    """

    def __init__(self, message: str, *, transient: bool, reason: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.reason = reason


@runtime_checkable
class Archive(Protocol):
    """What a job needs from an archive."""

    name: str

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Series-level attributes for routing: one dict per series, DICOM keyword -> value.

        Include at least StudyInstanceUID, SeriesInstanceUID, Modality, SeriesDescription,
        SeriesNumber, BodyPartExamined, ImageType, SliceThickness, InstitutionName,
        NumberOfSeriesRelatedInstances, SOPClassUID (of its first instance).
        """
        ...

    def fetch_series(self, study_uid: str, series_uid: str, dest: Path) -> list[Path]:
        """Copy every instance of the series into ``dest``; return the file paths."""
        ...

    def store(self, files: Sequence[Path]) -> None:
        """Store ``files``; return only once the archive confirmed every instance."""
        ...
