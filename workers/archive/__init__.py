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
        """Routing attributes of each series of the study: one dict per series.

        Every keyword of ``pipelines.rules.ROUTING_KEYWORDS`` the images carry, computed by
        :func:`workers.series.series_routing` from the instances' headers, so that rules see
        the same attributes from every archive (missing: the images do not carry it).
        """
        ...

    def fetch_series(self, study_uid: str, series_uid: str, dest: Path) -> list[Path]:
        """Copy every instance of the series into ``dest``; return the file paths."""
        ...

    def store(self, files: Sequence[Path]) -> None:
        """Store ``files``; return only once the archive confirmed every instance."""
        ...


def open_archive(spec: str | None = None, *, name: str | None = None) -> Archive:
    """The archive a spec names; extend here for new kinds.

    ``None`` -> ``SPRIM_ARCHIVE_URL`` or, unset, the folder ``SPRIM_HOME/archive``;
    ``http(s)://...`` -> DICOMweb; ``folder:PATH``, ``file://PATH`` or a plain path -> folder;
    ``dicom://AET@host:port`` -> C-STORE (store only); a name in ``SPRIM_ARCHIVES`` -> its spec.
    """
    from workers.config import settings

    if spec is None:
        spec = settings().archive_url or f"folder:{(settings().home / 'archive').resolve()}"
    named = getattr(settings(), "archives", {}) or {}
    if spec in named:
        name, spec = name or spec, named[spec]
    if spec in settings().archives:  # a named archive (SPRIM_ARCHIVES)
        name, spec = name or spec, settings().archives[spec]
    if spec.startswith(("http://", "https://")):
        from workers.archive.dicomweb import DicomWebArchive

        return DicomWebArchive(spec, name=name)
    if spec.startswith("dicom://"):  # C-STORE destination: dicom://AET@host:port
        from workers.archive.dimse import DimseArchive

        return DimseArchive.from_url(spec, calling_aet=settings().ae_title)
    from workers.archive.folder import FolderArchive

    path = spec.removeprefix("folder:").removeprefix("file://")
    return FolderArchive(Path(path), name=name or f"folder:{Path(path).resolve()}")


def destination_for(source: str | None, institution: str | None) -> str | None:
    """Output archive configured for a source archive or institution (``SPRIM_DESTINATIONS``).

    None: no mapping; outputs go back to the archive the study came from.
    """
    from workers.config import settings

    dest = settings().destinations
    return dest.get(source or "") or dest.get(institution or "") or None
