"""One fetch and one read per series: the jobs of the rules that match one series share them.

Each job stays a job (its own priority, fairness, provenance, UIDs and failures); only the
source is shared, at two levels:

- **Host**: the fetched files live in ``SPRIM_HOME/cache/series/<series>-<key>/``. The key is a
  digest of the archive, the study, the series and its instance count as the archive gives it
  just before the fetch (QIDO-RS at series level: counted from the archive's index, no
  instance opened), so an instance added (or removed) later gives a new key and a new fetch.
  An entry is published only when the fetch brought exactly that many instances and the count
  did not change meanwhile, and it is used for ``SPRIM_SERIES_CACHE_S`` after its fetch (the
  jobs of one series start within seconds; an archive that overwrites instances in place keeps
  their count). Concurrent processes (Celery pool processes, worker hosts sharing
  ``SPRIM_HOME``) coordinate with ``flock``: exclusive while fetching, shared while reading;
  the least recently used entries beyond ``SPRIM_SERIES_CACHE_MB`` are evicted, never one in
  use.
- **Process**: the last :class:`~workers.reading.source.SourceSeries` read, under the same key,
  kept ``SPRIM_SERIES_MEMO_S`` seconds for the next job of that series in this process.

An archive that cannot count a series' instances (no ``instance_count``: folder, C-STORE) is
fetched per job into the job's folder, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workers.archives.base import Archive, instance_count
from workers.core.config import settings
from workers.reading.source import SeriesError

if TYPE_CHECKING:
    from workers.reading.source import SourceSeries

log = logging.getLogger("sprim.jobs")

_COMPLETE = ".complete"


def cache_root() -> Path:
    return settings().home / "cache" / "series"


def content_key(archive: str, study_uid: str, series_uid: str, count: int) -> str:
    """Digest naming one series content: an instance more or less -> another key."""
    doc = json.dumps([archive, study_uid, series_uid, count])
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


@dataclass
class Loaded:
    """A series ready for the steps, and how it was obtained."""

    source: SourceSeries
    how: str  # "memo" (this process had it), "cache" (host cache), "fetch" (fetched now)
    key: str | None
    fetch_s: float
    read_s: float


# -- process memo ------------------------------------------------------------------------------
class _Memo:
    """The last series this process read; freed after ``SPRIM_SERIES_MEMO_S`` idle seconds."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.source: SourceSeries | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def get(self, key: str) -> SourceSeries | None:
        with self._lock:
            if self.key == key and self.source is not None:
                self._arm()
                return self.source
            return None

    def drop_other(self, key: str | None) -> None:
        """Free another series before reading this one (peak memory: one series at a time)."""
        with self._lock:
            if self.key != key:
                self._clear()

    def put(self, key: str, source: SourceSeries) -> None:
        if settings().series_memo_s <= 0:
            return
        with self._lock:
            self.key, self.source = key, source
            self._arm()

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.key, self.source = None, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(settings().series_memo_s, self.clear)
        self._timer.name, self._timer.daemon = "sprim-series-memo", True
        self._timer.start()


MEMO = _Memo()


# -- host cache ------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path, mode: int, *, block: bool = True) -> Iterator[bool]:
    """``flock`` on ``path`` (created); yields False when ``block`` is off and it is taken.

    The lock file may be removed by an eviction between open and lock: the inode is checked
    after locking and the lock taken again on the new file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue
            yield True
            return
        finally:
            os.close(fd)  # releases the lock


def _entry_files(entry: Path) -> list[Path]:
    return sorted(p for p in entry.iterdir() if p.suffix == ".dcm")


def _fetch_entry(
    archive: Archive, study_uid: str, series_uid: str, entry: Path, count: int
) -> bool:
    """Fetch into ``entry`` (exclusive lock held); True if published for other jobs."""
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}")
    shutil.rmtree(entry, ignore_errors=True)
    try:
        files = archive.fetch_series(study_uid, series_uid, tmp)
        ok = len(files) == count == instance_count(archive, study_uid, series_uid)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ok:
        size = sum(f.stat().st_size for f in _entry_files(entry))
        marker = {"series": series_uid, "bytes": size, "fetched_at": time.time()}
        (entry / _COMPLETE).write_text(json.dumps(marker))
    else:  # the series changed while it was fetched: this job's copy only
        log.info("event=series_cache_skip series=%s reason=changed during fetch", series_uid)
    return ok


def _fresh(entry: Path) -> bool:
    """A complete entry fetched less than ``SPRIM_SERIES_CACHE_S`` ago."""
    try:
        marker = json.loads((entry / _COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return time.time() - float(marker.get("fetched_at", 0)) < settings().series_cache_s


def _evict(keep: Path) -> None:
    """Remove least recently used complete entries beyond ``SPRIM_SERIES_CACHE_MB``."""
    root = cache_root()
    limit = settings().series_cache_mb * 2**20
    entries = []
    for d in root.iterdir():
        if d.name.startswith(".") and time.time() - d.stat().st_mtime > 3600:
            shutil.rmtree(d, ignore_errors=True)  # a fetch whose process died
            continue
        marker = d / _COMPLETE
        if d.is_dir() and marker.exists():
            try:
                size = int(json.loads(marker.read_text()).get("bytes", 0))
                entries.append((marker.stat().st_mtime, d, size))
            except (OSError, ValueError):
                continue
    total = sum(s for _, _, s in entries)
    for _, d, size in sorted(entries):
        if total <= limit:
            break
        if d == keep:
            continue
        lock = d.with_name(d.name + ".lock")
        with _locked(lock, fcntl.LOCK_EX, block=False) as got:
            if not got:  # in use: a later eviction gets it
                continue
            shutil.rmtree(d, ignore_errors=True)
            lock.unlink(missing_ok=True)
        total -= size
        log.info("event=series_cache_evict entry=%s mb=%.0f", d.name, size / 2**20)


def load_series(
    archive: Archive,
    study_uid: str,
    series_uid: str,
    dest: Path,
    on_read: Callable[[], None] | None = None,
) -> Loaded:
    """The job's source series: from this process's memo, the host cache, or fetched now.

    ``dest`` is the job's own folder, used when the series is not cached. ``on_read`` is
    called when fetching ends and reading begins (the lease's step).
    """
    t0 = time.perf_counter()
    count = instance_count(archive, study_uid, series_uid) if settings().series_cache_mb else None
    if not count:  # no count (or none there: the fetch says "not found")
        return _fetch_uncached(archive, study_uid, series_uid, dest, on_read, t0)
    key = content_key(archive.name, study_uid, series_uid, count)
    if (memo := MEMO.get(key)) is not None:
        log.info("event=series_memo_hit series=%s key=%s", series_uid, key)
        return Loaded(memo, "memo", key, time.perf_counter() - t0, 0.0)
    MEMO.drop_other(key)
    entry, how = _cache_entry(archive, study_uid, series_uid, dest, key, count)
    fetch_s = time.perf_counter() - t0
    if on_read:
        on_read()
    t1 = time.perf_counter()
    source = _read_entry(entry, dest, series_uid, fetched=how == "fetch")
    if source is None:  # evicted between fetch and read: once more
        return load_series(archive, study_uid, series_uid, dest, on_read)
    read_s = time.perf_counter() - t1
    MEMO.put(key, source)
    log.info("event=series_loaded series=%s how=%s key=%s fetch_s=%.2f read_s=%.2f",
             series_uid, how, key, fetch_s, read_s)  # fmt: skip
    return Loaded(source, how, key, fetch_s, read_s)


def _fetch_uncached(
    archive: Archive,
    study_uid: str,
    series_uid: str,
    dest: Path,
    on_read: Callable[[], None] | None,
    t0: float,
) -> Loaded:
    """Fetch into the job's folder and read, bypassing the cache (and emptying the memo)."""
    MEMO.clear()
    files = archive.fetch_series(study_uid, series_uid, dest)
    fetch_s = time.perf_counter() - t0
    if on_read:
        on_read()
    t1 = time.perf_counter()
    source = _read(dest, series_uid, len(files))
    return Loaded(source, "fetch", None, fetch_s, time.perf_counter() - t1)


def _cache_entry(
    archive: Archive, study_uid: str, series_uid: str, dest: Path, key: str, count: int
) -> tuple[Path, str]:
    """(folder holding the series, "cache" or "fetch"): the host cache's entry, fetched into it
    when missing; ``dest`` when the series is too large to be shared."""
    entry = cache_root() / f"{series_uid}-{key}"
    lock = _lock_of(entry)
    with _locked(lock, fcntl.LOCK_SH):
        hit = _fresh(entry)
    if hit:
        return entry, "cache"
    with _locked(lock, fcntl.LOCK_EX):
        if _fresh(entry):  # another process fetched meanwhile
            return entry, "cache"
        if not _fetch_entry(archive, study_uid, series_uid, entry, count):
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, dest)  # not shared: the job's own copy
            entry = dest
    return entry, "fetch"


def _lock_of(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


def _read_entry(entry: Path, dest: Path, series_uid: str, *, fetched: bool) -> SourceSeries | None:
    """Read the series from its folder; None when its cache entry was evicted before the read."""
    if entry == dest:
        return _read(dest, series_uid, len(_entry_files(dest)))
    with _locked(_lock_of(entry), fcntl.LOCK_SH):  # an eviction waits until the read is over
        if not (entry / _COMPLETE).exists():
            return None
        os.utime(entry / _COMPLETE)  # recently used
        source = _read(entry, series_uid, len(_entry_files(entry)))
    if fetched:
        with contextlib.suppress(OSError):
            _evict(keep=entry)
    return source


def _read(folder: Path, series_uid: str, n_files: int) -> SourceSeries:
    """Read the series through the input gate (every read, cached or not)."""
    from workers.reading.series import read_series, scan

    found = [s for s in scan(folder) if s.attributes.get("SeriesInstanceUID") == series_uid]
    if not found:
        raise SeriesError(f"series {series_uid}: none of the {n_files} fetched files is DICOM")
    return read_series(found[0])
