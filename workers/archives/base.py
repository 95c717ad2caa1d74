"""The archive protocol every kind implements, and its error."""

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
        """Routing attributes of each series of the study: one dict per series.

        Every keyword of ``pipelines.rules.ROUTING_KEYWORDS`` the images carry, computed by
        :func:`workers.reading.series.series_routing` from the instances' headers, so that rules see
        the same attributes from every archive (missing: the images do not carry it).
        """
        ...

    def fetch_series(self, study_uid: str, series_uid: str, dest: Path) -> list[Path]:
        """Copy every instance of the series into ``dest``; return the file paths."""
        ...

    def store(self, files: Sequence[Path]) -> None:
        """Store ``files``; return only once the archive confirmed every instance."""
        ...


def instance_count(archive: Archive, study_uid: str, series_uid: str) -> int | None:
    """How many instances a series has now, when the archive can tell cheaply (optional
    ``instance_count`` method; ``None``: it cannot, the series is fetched every time)."""
    counter = getattr(archive, "instance_count", None)
    return None if counter is None else counter(study_uid, series_uid)
