"""Archives sprim reads studies from and stores derived objects into.

Implementations: a folder (embedded default), DICOMweb (Orthanc or any PACS), DIMSE C-STORE.
All share :class:`Archive`; the job executor only talks to this protocol.
"""

from __future__ import annotations

from pathlib import Path

from workers.archives.base import Archive, ArchiveError

__all__ = ["Archive", "ArchiveError", "destination_for", "open_archive"]


def open_archive(spec: str | None = None, *, name: str | None = None) -> Archive:
    """The archive a spec names; extend here for new kinds.

    ``None`` -> ``SPRIM_ARCHIVE_URL`` or, unset, the folder ``SPRIM_HOME/archive``;
    ``http(s)://...`` -> DICOMweb; ``folder:PATH``, ``file://PATH`` or a plain path -> folder;
    ``dicom://AET@host:port`` -> C-STORE (store only); a name in ``SPRIM_ARCHIVES`` -> its spec.
    """
    from workers.core.config import settings

    if spec is None:
        spec = settings().archive_url or f"folder:{(settings().home / 'archive').resolve()}"
    named = getattr(settings(), "archives", {}) or {}
    if spec in named:
        name, spec = name or spec, named[spec]
    if spec in settings().archives:  # a named archive (SPRIM_ARCHIVES)
        name, spec = name or spec, settings().archives[spec]
    if spec.startswith(("http://", "https://")):
        from workers.archives.dicomweb import DicomWebArchive

        return DicomWebArchive(spec, name=name)
    if spec.startswith("dicom://"):  # C-STORE destination: dicom://AET@host:port
        from workers.archives.dimse import DimseArchive

        return DimseArchive.from_url(spec, calling_aet=settings().ae_title)
    from workers.archives.folder import FolderArchive

    path = spec.removeprefix("folder:").removeprefix("file://")
    return FolderArchive(Path(path), name=name or f"folder:{Path(path).resolve()}")


def destination_for(source: str | None, institution: str | None) -> str | None:
    """Output archive configured for a source archive or institution (``SPRIM_DESTINATIONS``).

    None: no mapping; outputs go back to the archive the study came from.
    """
    from workers.core.config import settings

    dest = settings().destinations
    return dest.get(source or "") or dest.get(institution or "") or None
