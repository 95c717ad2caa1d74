"""A DICOMweb archive (Orthanc or any PACS): QIDO-RS and WADO-RS metadata to route, WADO-RS to
fetch, STOW-RS to store.

Fetching streams: each instance is written to the job folder as it arrives, the series is never
held in memory. Storing posts the files in batches and checks that the archive confirmed every
SOP instance; a refusal (FailedSOPSequence, HTTP 4xx) is a permanent :class:`ArchiveError` with
the archive's reason, a connection error, timeout or HTTP 5xx a transient one.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

from pipelines.rules.attributes import IMAGE_KEYWORDS
from workers.archives.access import configure_session
from workers.archives.base import ArchiveError
from workers.archives.multipart import boundary_of, iter_parts, parts_of
from workers.core.config import ArchiveAccess
from workers.core.tls import describe_tls_error, tls_advice
from workers.reading.series import image_order, series_attributes

log = logging.getLogger(__name__)


def _tags(*keywords: str) -> frozenset[str]:
    return frozenset(f"{tag_for_keyword(kw):08X}" for kw in keywords)


#: What routing reads of every instance's metadata (DICOM JSON tags): order and image geometry.
_GEOMETRY_TAGS = _tags(
    "InstanceNumber",
    "SOPInstanceUID",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)
#: ... and of the series' first image: the declared keywords too.
_FIRST_IMAGE_TAGS = _GEOMETRY_TAGS | _tags(*IMAGE_KEYWORDS)
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_SEQ = "00081199"
_FAILURE_REASON = "00081197"
_REF_SOP_INSTANCE = "00081155"


def _value(item: dict, tag: str):
    """A DICOM JSON attribute as a Python value (single value unwrapped; PN as its text)."""
    attr = item.get(tag)
    if not attr or "Value" not in attr:
        return None
    vals = attr["Value"]
    vals = [
        v.get("Alphabetic", "") if isinstance(v, dict) and attr.get("vr") == "PN" else v
        for v in vals
    ]
    if attr.get("vr") == "CS" and tag == "00080008":
        return list(vals)
    return vals[0] if len(vals) == 1 else list(vals)


def _header(item: dict, tags: frozenset[str]) -> Dataset:
    """The ``tags`` of one instance's DICOM JSON metadata as a pydicom header.

    Element by element: a value the archive encoded oddly is left out (that attribute is then
    missing for routing), it does not make the whole study unroutable.
    """
    ds = Dataset()
    for tag, value in item.items():
        if tag in tags:
            try:
                ds.update(Dataset.from_json({tag: value}, bulk_data_uri_handler=lambda *_: b""))
            except Exception as e:  # noqa: BLE001
                log.warning("event=metadata_value_skipped tag=%s error=%s", tag, e)
    return ds


def _transient_http(status: int) -> bool:
    return status >= 500 or status in (408, 429)


class _TimeoutSession(requests.Session):
    """A session with a default (connect, read) timeout on every request."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


class DicomWebArchive:
    """An archive reached by DICOMweb.

    Parameters
    ----------
    url : str
        DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
    name : str
        Name in logs and job records (default: the URL).
    timeout : float
        Read timeout of one request, seconds (connect timeout is 5 s).
    batch_bytes : int
        Upper bound of one STOW-RS request body (a batch holds at least one file).
    parallel : int
        STOW-RS requests in flight at once (batches are independent).
    verify : bool
        After STOW-RS, check by QIDO-RS that every instance is in the archive. Orthanc answers
        success for an instance its ``ReceivedInstanceFilter`` dropped: the STOW-RS answer alone
        does not prove the instance was kept.
    access : ArchiveAccess, optional
        Credentials (basic or bearer) and TLS settings (:func:`workers.core.config.archive_access`).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        timeout: float = 60.0,
        batch_bytes: int = 16 * 2**20,
        verify: bool = True,
        parallel: int = 2,
        access: ArchiveAccess | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.batch_bytes = batch_bytes
        self.verify = verify
        self.parallel = parallel
        self._session = _TimeoutSession((5.0, timeout))
        self.access = access
        if access is not None:  # credentials, CA bundle, client certificate
            configure_session(self._session, access, self.name)
        self._client = DICOMwebClient(self.url, session=self._session, timeout=(5.0, timeout))
        # Retries belong to the job (backoff, state); the client must fail fast.
        self._client.set_http_retry_params(retry=False)

    def __repr__(self) -> str:
        return f"DicomWebArchive({self.url!r})"

    # -- errors ----------------------------------------------------------------------------
    def _error(self, what: str, exc: Exception) -> ArchiveError:
        var = self.access.variables if self.access else "SPRIM_ARCHIVE_<NAME>_"
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            body = (exc.response.text or "")[:500].strip()
            if status in (401, 403):  # configuration, not an outage: no retry
                given = bool(self.access and self.access.has_credentials)
                why = (
                    "the archive refused sprim's credentials"
                    if status == 401 and given
                    else "the archive requires credentials, none are set"
                    if status == 401
                    else "the archive denies this user access"
                )
                hint = f"check {var}USERNAME and {var}PASSWORD, or {var}TOKEN"
                return ArchiveError(
                    f"{self.name}: {what}: HTTP {status}: {why} ({hint})",
                    transient=False,
                    reason=f"{self.name}: HTTP {status}: {why} ({hint})",
                )
            return ArchiveError(
                f"{self.name}: {what}: HTTP {status}",
                transient=_transient_http(status),
                reason=f"HTTP {status} {body}".strip(),
            )
        tls = describe_tls_error(exc) if isinstance(exc, requests.exceptions.SSLError) else None
        if tls:  # certificates are configuration: no retry
            hint, transient = tls_advice(tls, var)
            return ArchiveError(
                f"{self.name}: {what}: {tls}; {hint}",
                transient=transient,
                reason=f"{self.name}: {tls}; {hint}",
            )
        if isinstance(exc, requests.RequestException | OSError):
            return ArchiveError(
                f"{self.name}: {what}: {type(exc).__name__}: {exc}",
                transient=True,
                reason=str(exc)[:500],
            )
        return ArchiveError(f"{self.name}: {what}: {exc}", transient=False, reason=str(exc)[:500])

    # -- routing ---------------------------------------------------------------------------
    def series_of_study(self, study_uid: str) -> list[dict]:
        """Routing attributes of each series of the study, as ``sprim run`` computes them.

        QIDO-RS lists the series; WADO-RS Retrieve Metadata of each series gives every
        instance's header (no pixels), from which :func:`workers.reading.series.series_attributes`
        derives the attributes, as for files. With Orthanc, keep the DICOMweb plugin's ``SeriesMetadata``
        at ``Full`` (its default): ``MainDicomTags`` leaves out most routing keywords.
        """
        try:
            found = self._client.search_for_series(
                study_instance_uid=study_uid, fields=["0020000E"]
            )
        except Exception as e:  # noqa: BLE001  (mapped to transient/permanent)
            raise self._error(f"QIDO-RS series of study {study_uid}", e) from e
        out: list[dict] = []
        for item in found:
            series_uid = _value(item, "0020000E")
            instances = self._series_metadata(study_uid, str(series_uid))
            if not instances:  # deleted since the search
                continue
            headers = [_header(m, _GEOMETRY_TAGS) for m in instances]
            first = min(range(len(headers)), key=lambda i: image_order(headers[i]))
            headers[first] = _header(instances[first], _FIRST_IMAGE_TAGS)
            out.append(series_attributes(headers))
        return out

    def _series_metadata(self, study_uid: str, series_uid: str) -> list[dict]:
        url = f"{self.url}/studies/{study_uid}/series/{series_uid}/metadata"
        try:
            r = self._session.get(url, headers={"Accept": "application/dicom+json"})
            if r.status_code == 404:
                return []
            r.raise_for_status()
            data = r.json()
        except Exception as e:  # noqa: BLE001
            raise self._error(f"WADO-RS metadata of series {series_uid}", e) from e
        return data if isinstance(data, list) else []

    # -- fetch -----------------------------------------------------------------------------
    def instance_count(self, study_uid: str, series_uid: str) -> int | None:
        """NumberOfSeriesRelatedInstances of the series now (QIDO-RS at series level: the
        archive counts from its index, without opening any instance); 0 when it is not there,
        None when the archive does not give the count."""
        try:
            hits = self._client.search_for_series(
                study_instance_uid=study_uid,
                search_filters={"SeriesInstanceUID": series_uid},
                fields=["00201209"],
            )
        except Exception as e:  # noqa: BLE001
            raise self._error(f"QIDO-RS series {series_uid}", e) from e
        for h in hits:
            if _value(h, "0020000E") == series_uid:
                n = _value(h, "00201209")
                return None if n is None else int(n)
        return 0

    def fetch_series(self, study_uid: str, series_uid: str, dest: Path) -> list[Path]:
        """Stream the series by WADO-RS into ``dest``, one file per instance as it arrives.

        The multipart answer is split as it streams and each part's bytes are written as they
        came (no decoding, no re-encoding, the original transfer syntax: ``transfer-syntax=*``);
        memory holds at most one instance. Files appear under a temporary name and are renamed,
        so ``dest`` never holds a partial instance.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths: list[Path] = []
        nbytes = 0
        url = f"{self.url}/studies/{study_uid}/series/{series_uid}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        try:
            with self._session.get(url, headers={"Accept": accept}, stream=True) as r:
                r.raise_for_status()
                boundary = boundary_of(r.headers.get("Content-Type", ""))
                for i, part in enumerate(iter_parts(r.iter_content(1 << 20), boundary)):
                    path = dest / f"{i:05d}.dcm"
                    tmp = dest / f".{i:05d}.part"
                    with open(tmp, "wb") as fh:
                        fh.write(part)
                    os.replace(tmp, path)
                    nbytes += len(part)
                    paths.append(path)
        except ArchiveError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(f"WADO-RS series {series_uid}", e) from e
        if not paths:
            raise ArchiveError(
                f"{self.name}: series {series_uid} of study {study_uid} not found",
                transient=False,
                reason="no instance returned by WADO-RS",
            )
        dt = time.perf_counter() - t0
        log.info(
            "event=fetch archive=%s series=%s instances=%d mb=%.1f seconds=%.2f",
            self.name, series_uid, len(paths), nbytes / 1e6, dt,
        )  # fmt: skip
        return paths

    # -- store -----------------------------------------------------------------------------
    def store(self, files: Sequence[Path]) -> None:
        """STOW-RS the files in batches; return once every SOP instance is confirmed.

        Raises
        ------
        ArchiveError
            ``transient`` for connection errors, timeouts, HTTP 5xx/408/429 or an archive out of
            resources (0xA7xx); permanent otherwise, ``reason`` quoting the archive.
        """
        files = [Path(f) for f in files]
        t0 = time.perf_counter()
        sent: dict[tuple[str, str], set[str]] = {}
        batches = list(_batches(files, self.batch_bytes))
        if self.parallel > 1 and len(batches) > 1:
            # Requests in flight side by side: the archive stores (and fsyncs) one batch while
            # the next is uploaded. All are awaited; a permanent refusal wins over a transient.
            with ThreadPoolExecutor(min(self.parallel, len(batches))) as pool:
                futures = [pool.submit(self._store_batch, b) for b in batches]
                results, errors = [], []
                for f in futures:
                    try:
                        results.append(f.result())
                    except ArchiveError as e:
                        errors.append(e)
            if errors:
                raise next((e for e in errors if not e.transient), errors[0])
        else:
            results = [self._store_batch(b) for b in batches]
        for keys in results:
            for key, uids in keys.items():
                sent.setdefault(key, set()).update(uids)
        if self.verify:
            for (study, series), uids in sent.items():
                self._verify(study, series, uids)
        log.info(
            "event=store archive=%s instances=%d seconds=%.2f",
            self.name, len(files), time.perf_counter() - t0,
        )  # fmt: skip

    def _verify(self, study: str, series: str, uids: set[str]) -> None:
        # The series holds exactly as many instances as were sent: kept (a count is cheap; the
        # instance-level QIDO-RS below makes Orthanc open every instance).
        if self.instance_count(study, series) == len(uids):
            return
        try:
            hits = self._client.search_for_instances(
                study_instance_uid=study, series_instance_uid=series, fields=["00080018"]
            )
        except Exception as e:  # noqa: BLE001
            raise self._error(f"QIDO-RS check of stored series {series}", e) from e
        missing = uids - {_value(h, "00080018") for h in hits}
        if missing:
            raise ArchiveError(
                f"{self.name}: accepted but did not keep {len(missing)} of {len(uids)} instances"
                f" of series {series}",
                transient=False,
                reason=f"instance {sorted(missing)[0]} absent after STOW-RS success"
                " (dropped by an archive filter?)",
            )

    def _store_batch(self, batch: list[Path]) -> dict[tuple[str, str], set[str]]:
        sent: dict[str, Path] = {}
        keys: dict[tuple[str, str], set[str]] = {}
        for f in batch:
            try:
                ds = pydicom.dcmread(
                    f,
                    stop_before_pixels=True,
                    specific_tags=["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"],
                )
                sent[str(ds.SOPInstanceUID)] = f
                key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                keys.setdefault(key, set()).add(str(ds.SOPInstanceUID))
            except Exception as e:  # noqa: BLE001
                raise ArchiveError(
                    f"{f}: not a DICOM file", transient=False, reason=str(e)[:300]
                ) from e
        boundary = uuid.uuid4().hex
        body = b"".join(parts_of(batch, boundary))
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            r = self._session.post(f"{self.url}/studies", data=body, headers=headers)
        except Exception as e:  # noqa: BLE001
            raise self._error(f"STOW-RS {len(batch)} instances", e) from e
        answer = _json(r)
        failed = (answer.get(_FAILED_SOP_SEQ) or {}).get("Value") or []
        if failed:
            reasons = []
            transient = True
            for item in failed:
                code = _value(item, _FAILURE_REASON)
                uid = _value(item, _REF_SOP_INSTANCE)
                reasons.append(
                    f"{uid}: 0x{int(code or 0):04X} {_FAILURE_TEXT.get(code, '')}".strip()
                )
                transient &= code is not None and 0xA700 <= int(code) <= 0xA7FF
            raise ArchiveError(
                f"{self.name}: STOW-RS refused {len(failed)} of {len(batch)} instances",
                transient=transient,
                reason="; ".join(reasons)[:1000],
            )
        if not r.ok:
            raise self._error(f"STOW-RS {len(batch)} instances", requests.HTTPError(response=r))
        confirmed = {
            _value(item, _REF_SOP_INSTANCE)
            for item in (answer.get(_REFERENCED_SOP_SEQ) or {}).get("Value") or []
        }
        missing = set(sent) - confirmed
        if missing:
            raise ArchiveError(
                f"{self.name}: STOW-RS did not confirm {len(missing)} of {len(batch)} instances",
                transient=True,
                reason=f"unconfirmed, e.g. {sorted(missing)[0]}",
            )
        return keys


#: STOW-RS failure reasons (PS3.18 / PS3.4 C-STORE statuses) as the archive reports them.
_FAILURE_TEXT = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}


def _json(r: requests.Response) -> Dataset | dict:
    try:
        data = r.json()
    except ValueError:
        return {}
    if isinstance(data, list):
        data = data[0] if data else {}
    return data if isinstance(data, dict) else {}


def _batches(files: Sequence[Path], limit: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for f in files:
        n = f.stat().st_size
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += n
    if batch:
        yield batch
