"""Archives sprim reads studies from and stores derived objects into.

Implementations: a folder (embedded default), DICOMweb (Orthanc or any PACS), DIMSE C-STORE.
All share :class:`Archive`; the job executor only talks to this protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from workers.archives.base import Archive, ArchiveError

if TYPE_CHECKING:
    from workers.core.config import ArchiveAccess, Settings

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
    from workers.core.config import settings

    cfg = settings()
    if spec is None:
        spec = cfg.archive_url or f"folder:{(cfg.home / 'archive').resolve()}"
    if spec in cfg.archives:  # a named archive (SPRIM_ARCHIVES)
        name, spec = name or spec, cfg.archives[spec]
    access = None
    if spec.startswith(("http://", "https://", "dicom+tls://")):
        _refuse_credentials_in(spec, name)
        access = _access_of(spec, name, cfg)
    if spec.startswith(("http://", "https://")):
        from workers.archives.dicomweb import DicomWebArchive

        return DicomWebArchive(spec, name=name, access=access)
    if spec.startswith(("dicom://", "dicom+tls://")):  # C-STORE destination: dicom://AET@host:port
        return _dimse_archive(spec, name, access, calling_aet=cfg.ae_title)
    from workers.archives.folder import FolderArchive

    path = spec.removeprefix("folder:").removeprefix("file://")
    return FolderArchive(Path(path), name=name or f"folder:{Path(path).resolve()}")


def _refuse_credentials_in(url: str, name: str | None) -> None:
    """A password in any URL, or a user name in an HTTP one, is a permanent ArchiveError."""
    u = urlparse(url)
    if u.password is not None or (url.startswith("http") and u.username is not None):
        label = name or _without_userinfo(url)
        raise ArchiveError(
            f"{label}: credentials in the archive URL are not accepted (they would show in "
            "logs and job records): set SPRIM_ARCHIVE_<NAME>_USERNAME and _PASSWORD",
            transient=False,
            reason="credentials in the archive URL",
        )


def _access_of(url: str, name: str | None, cfg: Settings) -> ArchiveAccess | None:
    """Credentials and TLS settings of a URL archive: its name's, SPRIM_ARCHIVE_URL's own, or
    those of the name SPRIM_ARCHIVES gives the URL (job records keep URLs); else none."""
    from workers.core.config import ConfigError, archive_access

    if name:
        key: str | None = name
    elif url.rstrip("/") == (cfg.archive_url or "").rstrip("/"):
        key = None  # SPRIM_ARCHIVE_URL's own variables
    else:
        key = _name_of(url, cfg.archives) or ""
    try:
        return archive_access(key) if key != "" else None
    except ConfigError as e:
        raise ArchiveError(f"{name or url}: {e}", transient=False, reason=str(e)[:500]) from None


def _dimse_archive(
    url: str, name: str | None, access: ArchiveAccess | None, *, calling_aet: str
) -> Archive:
    """``dicom://AET@host:port`` (C-STORE only), ``dicom+tls://`` over DICOM TLS."""
    from workers.archives.dimse import DimseArchive

    tls = None
    if url.startswith("dicom+tls://"):
        from workers.archives.access import dicom_tls_context
        from workers.core.tls import client_context

        tls = dicom_tls_context(access) if access else client_context()
    return DimseArchive.from_url(
        url, calling_aet=calling_aet, tls=tls, name=name,
        variables=access.variables if access else "SPRIM_ARCHIVE_<NAME>_",
    )  # fmt: skip


def _without_userinfo(url: str) -> str:
    u = urlparse(url)
    return u._replace(netloc=(u.hostname or "") + (f":{u.port}" if u.port else "")).geturl()


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
