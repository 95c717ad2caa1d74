"""Archives sprim reads studies from and stores derived objects into.

Implementations: a folder (embedded default), DICOMweb (Orthanc or any PACS), DIMSE C-STORE.
All share :class:`Archive`; the job executor only talks to this protocol.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from workers.archives.base import Archive, ArchiveError

__all__ = ["Archive", "ArchiveError", "destination_for", "open_archive"]


def open_archive(spec: str | None = None, *, name: str | None = None) -> Archive:
    """The archive a spec names; extend here for new kinds.

    ``None`` -> ``SPRIM_ARCHIVE_URL`` or, unset, the folder ``SPRIM_HOME/archive``;
    ``http(s)://...`` -> DICOMweb; ``folder:PATH``, ``file://PATH`` or a plain path -> folder;
    ``dicom://AET@host:port`` -> C-STORE (store only), ``dicom+tls://`` the same over DICOM TLS;
    a name in ``SPRIM_ARCHIVES`` -> its spec.

    Credentials and TLS settings (:func:`workers.core.config.archive_access`) are those of the
    archive's name, or of ``SPRIM_ARCHIVE_URL`` when the spec is that URL; a URL is matched to
    its name in ``SPRIM_ARCHIVES`` (job records keep the URL).

    Raises
    ------
    ArchiveError
        Permanent, for credentials in the URL or unusable access settings (the message names
        the variable, never a secret).
    """
    from workers.core.config import ConfigError, archive_access, settings

    cfg = settings()
    if spec is None:
        spec = cfg.archive_url or f"folder:{(cfg.home / 'archive').resolve()}"
    if spec in cfg.archives:  # a named archive (SPRIM_ARCHIVES)
        name, spec = name or spec, cfg.archives[spec]
    access = None
    if spec.startswith(("http://", "https://", "dicom+tls://")):
        if urlparse(spec).password is not None or (
            spec.startswith("http") and urlparse(spec).username is not None
        ):
            label = name or _without_userinfo(spec)
            raise ArchiveError(
                f"{label}: credentials in the archive URL are not accepted (they would show in "
                "logs and job records): set SPRIM_ARCHIVE_<NAME>_USERNAME and _PASSWORD",
                transient=False,
                reason="credentials in the archive URL",
            )
        if name:
            key: str | None = name
        elif spec.rstrip("/") == (cfg.archive_url or "").rstrip("/"):
            key = None  # SPRIM_ARCHIVE_URL's own variables
        else:  # a URL SPRIM_ARCHIVES names (job records keep URLs), else none: no credentials
            key = _name_of(spec, cfg.archives) or ""
        try:
            access = archive_access(key) if key != "" else None
        except ConfigError as e:
            raise ArchiveError(
                f"{name or spec}: {e}", transient=False, reason=str(e)[:500]
            ) from None
    if spec.startswith(("http://", "https://")):
        from workers.archives.dicomweb import DicomWebArchive

        return DicomWebArchive(spec, name=name, access=access)
    if spec.startswith(("dicom://", "dicom+tls://")):  # C-STORE destination: dicom://AET@host:port
        from workers.archives.dimse import DimseArchive

        tls = None
        if spec.startswith("dicom+tls://"):
            from workers.archives.access import dicom_tls_context
            from workers.core.tls import client_context

            tls = dicom_tls_context(access) if access else client_context()
        return DimseArchive.from_url(
            spec, calling_aet=cfg.ae_title, tls=tls, name=name,
            variables=access.variables if access else "SPRIM_ARCHIVE_<NAME>_",
        )  # fmt: skip
    from workers.archives.folder import FolderArchive

    path = spec.removeprefix("folder:").removeprefix("file://")
    return FolderArchive(Path(path), name=name or f"folder:{Path(path).resolve()}")


def _without_userinfo(url: str) -> str:
    u = urlparse(url)
    return u._replace(netloc=u.hostname + (f":{u.port}" if u.port else "")).geturl()


def _name_of(url: str, archives: dict[str, str]) -> str | None:
    """The name ``SPRIM_ARCHIVES`` gives this URL (None: none does)."""
    url = url.rstrip("/")
    return next((n for n, s in archives.items() if s.rstrip("/") == url), None)


def destination_for(source: str | None, institution: str | None) -> str | None:
    """Output archive configured for a source archive or institution (``SPRIM_DESTINATIONS``).

    None: no mapping; outputs go back to the archive the study came from.
    """
    from workers.core.config import settings

    dest = settings().destinations
    return dest.get(source or "") or dest.get(institution or "") or None
