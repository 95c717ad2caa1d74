"""A folder of DICOM files as an archive: the embedded default (no PACS needed).

Any layout is read (headers are indexed on demand, re-read only when a file changes); stored
objects go to ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, replacing
an existing file of the same SOPInstanceUID wherever it was, so a repeated job never duplicates.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from workers.archives.base import ArchiveError
from workers.reading.series import InstanceSummary, instance_summary, series_routing

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    mtime_ns: int
    size: int
    study: str
    series: str
    sop: str
    routing: InstanceSummary


class FolderArchive:
    """An archive in a folder (see module docstring).

    Parameters
    ----------
    root : Path
        The folder; created if missing.
    name : str, optional
        Archive name for rules (``source``) and logs; default ``folder:<root>``.
    """

    def __init__(self, root: Path | str, *, name: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name or f"folder:{self.root}"
        self._index: dict[str, _Entry] = {}
        self._dirs: dict[str, tuple[int, list[str]]] = {}
        self._dir_files: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return str(self.root.resolve())

    # -- index ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Index new or changed files, forget deleted ones.

        A directory whose mtime did not change is not listed again (files are stored by atomic
        rename, which changes the directory's mtime); the cost is one stat per directory.
        """
        seen_dirs: set[str] = set()
        stack = [str(self.root)]
        while stack:
            d = stack.pop()
            seen_dirs.add(d)
            stack.extend(self._refresh_dir(d))
        for d in set(self._dirs) - seen_dirs:
            for p in self._dir_files.pop(d, set()):
                self._index.pop(p, None)
            del self._dirs[d]

    def _refresh_dir(self, d: str) -> list[str]:
        """Index the files of directory ``d`` unless it is unchanged; its subdirectories."""
        try:
            mtime = os.stat(d).st_mtime_ns
        except FileNotFoundError:
            return []
        cached = self._dirs.get(d)
        # mtimes use a coarse clock: a directory changed in the last 2 s is listed again
        if cached is not None and cached[0] == mtime and time.time_ns() - mtime > 2e9:
            return cached[1]
        subdirs, files = [], set()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
                continue
            files.add(e.path)
            self._index_file(e)
        for p in self._dir_files.get(d, set()) - files:
            self._index.pop(p, None)
        self._dirs[d] = (mtime, subdirs)
        self._dir_files[d] = files
        return subdirs

    def _index_file(self, e: os.DirEntry[str]) -> None:
        """(Re-)read the header of a new or changed file; forget it if it is not DICOM."""
        try:
            st = e.stat()
        except FileNotFoundError:
            return
        old = self._index.get(e.path)
        if old is not None and old.mtime_ns == st.st_mtime_ns and old.size == st.st_size:
            return
        entry = self._read(Path(e.path), st)
        if entry is not None:
            self._index[e.path] = entry
        else:
            self._index.pop(e.path, None)

    @staticmethod
    def _read(p: Path, st: os.stat_result) -> _Entry | None:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=None)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            return None
        if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            return None
        return _Entry(
            st.st_mtime_ns, st.st_size, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID), instance_summary(ds),
        )  # fmt: skip

    # -- Archive protocol ----------------------------------------------------------------------
    def studies(self) -> list[str]:
        with self._lock:
            self.refresh()
            return sorted({e.study for e in self._index.values()})

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Routing attributes of each series of the study (as ``sprim run`` sees them)."""
        with self._lock:
            self.refresh()
            by_series: dict[str, list[InstanceSummary]] = {}
            for e in self._index.values():
                if e.study == study_uid:
                    by_series.setdefault(e.series, []).append(e.routing)
            out = [series_routing(members) for members in by_series.values()]
            return sorted(out, key=lambda s: (s.get("SeriesNumber") or 0, s["SeriesInstanceUID"]))

    def fetch_series(self, study_uid: str, series_uid: str, dest: Path) -> list[Path]:
        """Copy the series' files into ``dest``; ArchiveError (permanent) when it is not there."""
        with self._lock:
            self.refresh()
            srcs = [
                p for p, e in self._index.items() if e.study == study_uid and e.series == series_uid
            ]
        if not srcs:
            raise ArchiveError(
                f"{self.name}: series {series_uid} of study {study_uid} not found",
                transient=False, reason="not found",
            )  # fmt: skip
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        try:
            for i, p in enumerate(sorted(srcs)):
                q = dest / f"{i:05d}.dcm"
                shutil.copyfile(p, q)
                out.append(q)
        except OSError as e:
            raise ArchiveError(f"{self.name}: fetch failed: {e}", transient=True) from e
        return out

    def store(self, files: Sequence[Path]) -> None:
        """Copy ``files`` in (atomic rename), replacing same SOPInstanceUID; returns when on disk."""
        with self._lock:
            self.refresh()
            by_sop = {e.sop: Path(p) for p, e in self._index.items()}
            for f in files:
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                    study, series, sop = (
                        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
                    )  # fmt: skip
                except Exception as e:  # a file we wrote but cannot read back is a bug: permanent
                    raise ArchiveError(
                        f"{self.name}: cannot store {f}: {e}", transient=False, reason=str(e)
                    ) from e
                target = self.root / study / series / f"{sop}.dcm"
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.parent / f".{sop}.{uuid.uuid4().hex}.tmp"
                    shutil.copyfile(f, tmp)
                    with open(tmp, "rb") as fh:
                        os.fsync(fh.fileno())
                    os.replace(tmp, target)
                except OSError as e:
                    raise ArchiveError(f"{self.name}: store failed: {e}", transient=True) from e
                old = by_sop.get(sop)
                if old is not None and old != target:
                    old.unlink(missing_ok=True)
                    self._index.pop(str(old), None)
                by_sop[sop] = target
            self.refresh()
