"""What ``sprim run`` is given: folders, files and ``.zip`` archives walked into a list of files.

Zip archives are extracted into a temporary folder under limits set in :mod:`workers.core.config`:
uncompressed size of all archives of one scan together (``SPRIM_ZIP_MAX_MB``), compression
ratio of a member (``SPRIM_ZIP_MAX_RATIO``), member count (``SPRIM_ZIP_MAX_MEMBERS``) and depth
(``SPRIM_ZIP_MAX_DEPTH``: 1 = a zip inside the given zip is opened, a zip inside that one is
not). Sizes are counted while streaming, not taken from the member headers: a header that
understates a member's size cannot put more than the limit into TMPDIR. An archive over a
limit is refused whole (none of its files are used: a partial series would be silently
incomplete); a member with an absolute or ``..`` name, a link, or corrupt data is skipped and
reported, the other members go on.

Everything not used is reported as a :class:`Skipped` (file name as the user knows it, and
why), so that ``sprim run`` can say what it left out.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from workers.core.config import settings

_CHUNK = 1 << 20
#: Members this small are exempt from the ratio check (padded headers compress very well).
_RATIO_FLOOR = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"
_UID = re.compile(rb"[0-9.]{1,64}")


@dataclass
class Skipped:
    """A file (or archive, or archive member) that was not used, and why."""

    path: str
    reason: str
    #: SeriesInstanceUID read from the damaged file, when one could be recovered: that series
    #: is then known to be incomplete.
    series_uid: str = ""


class _ZipRefused(Exception):
    """The whole archive is refused (over a limit): nothing from it is used."""


@dataclass
class InputWalk:
    """Walks inputs into files; collects what was skipped and the temporary folders to keep."""

    skipped: list[Skipped] = field(default_factory=list)
    keep: list[tempfile.TemporaryDirectory] = field(default_factory=list)
    #: Extracted file -> the name the user knows it by ("study.zip:CT/1.dcm").
    names: dict[Path, str] = field(default_factory=dict)
    #: Bytes extracted so far from every archive of this walk (nested ones included): the
    #: ``SPRIM_ZIP_MAX_MB`` budget is shared, so zips inside a zip cannot multiply it.
    extracted: int = 0

    def name(self, path: Path) -> str:
        return self.names.get(path, str(path))

    def skip(self, path: Path | str, reason: str, series_uid: str = "") -> None:
        shown = self.name(path) if isinstance(path, Path) else path
        self.skipped.append(Skipped(shown, reason, series_uid))

    def files(self, inputs: Iterable[Path]) -> Iterator[Path]:
        """Every regular file of ``inputs`` (folders walked sorted, zips extracted)."""
        for p in inputs:
            p = Path(p)
            if p.is_dir():
                for root, dirs, names in os.walk(p):
                    dirs.sort()
                    for n in sorted(names):
                        yield from self._file(Path(root) / n, depth=0)
            elif p.exists():
                yield from self._file(p, depth=0)
            else:
                self.skip(str(p), "does not exist")

    def _file(self, p: Path, depth: int) -> Iterator[Path]:
        if p.is_symlink() and not p.exists():
            self.skip(p, "broken symbolic link")
        elif not p.is_file():
            self.skip(p, "not a regular file")
        elif _looks_like_zip(p):
            yield from self._zip(p, depth)
        else:
            yield p

    def _zip(self, p: Path, depth: int) -> Iterator[Path]:
        cfg = settings()
        shown = self.name(p)
        if depth > cfg.zip_max_depth:
            self.skip(
                p,
                f"zip archive nested {depth} levels deep, more than SPRIM_ZIP_MAX_DEPTH="
                f"{cfg.zip_max_depth}: not opened",
            )
            return
        try:
            zf = zipfile.ZipFile(p)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            self.skip(p, f"not a readable zip archive (truncated or corrupt: {_short(e)})")
            return
        tmp = tempfile.TemporaryDirectory(prefix="sprim-zip-")
        try:
            with zf:
                extracted = self._extract(zf, shown, Path(tmp.name))
        except _ZipRefused as e:
            tmp.cleanup()
            self.skip(p, f"zip archive refused, none of its files used: {e}")
            return
        self.keep.append(tmp)
        for path in extracted:
            yield from self._file(path, depth + 1)

    def _extract(self, zf: zipfile.ZipFile, shown: str, dest: Path) -> list[Path]:
        cfg = settings()
        max_bytes = cfg.zip_max_mb * 1024 * 1024
        members = zf.infolist()
        if len(members) > cfg.zip_max_members:
            raise _ZipRefused(
                f"{len(members)} members, more than SPRIM_ZIP_MAX_MEMBERS={cfg.zip_max_members}"
            )
        declared = self.extracted + sum(m.file_size for m in members)
        if declared > max_bytes:
            raise _ZipRefused(_over_total(declared, cfg.zip_max_mb))
        for m in members:
            if _ratio_exceeded(m.file_size, m.compress_size, cfg.zip_max_ratio):
                raise _ZipRefused(
                    f"member {m.filename!r} expands {m.file_size / max(m.compress_size, 1):.0f}"
                    f" times, more than SPRIM_ZIP_MAX_RATIO={cfg.zip_max_ratio} (a zip bomb?)"
                )
        out: list[Path] = []
        total = self.extracted
        for k, m in enumerate(members):
            if m.is_dir():
                continue
            label = f"{shown}:{m.filename}"
            defect = _member_defect(m)
            if defect:
                self.skip(label, defect)
                continue
            # Our own flat names: nothing from the archive decides where bytes land.
            target = dest / f"{k:06d}{PurePosixPath(m.filename).suffix[:16]}"
            try:
                total = _stream(zf, m, target, total, max_bytes, cfg.zip_max_ratio)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as e:
                uid = series_uid_of(target)
                target.unlink(missing_ok=True)
                self.skip(label, f"corrupt zip member ({_short(e)})", uid)
                continue
            except NotImplementedError as e:
                target.unlink(missing_ok=True)
                self.skip(label, f"zip member not extractable ({_short(e)})")
                continue
            self.names[target] = label
            out.append(target)
        self.extracted = total
        return out


def _stream(
    zf: zipfile.ZipFile, m: zipfile.ZipInfo, target: Path, total: int, max_bytes: int, ratio: int
) -> int:
    """Copy one member to ``target`` counting real bytes; the running total is returned."""
    written = 0
    with zf.open(m) as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise _ZipRefused(_over_total(total, max_bytes // (1024 * 1024), at_least=True))
            if written > m.file_size:
                raise zipfile.BadZipFile("member larger than its header declares")
            if _ratio_exceeded(written, m.compress_size, ratio):
                raise _ZipRefused(
                    f"member {m.filename!r} expands more than SPRIM_ZIP_MAX_RATIO={ratio} times"
                )
            dst.write(chunk)
    return total


def _ratio_exceeded(size: int, compressed: int, ratio: int) -> bool:
    return size > _RATIO_FLOOR and size > ratio * max(compressed, 1)


def _over_total(size: int, limit_mb: int, at_least: bool = False) -> str:
    more = "at least " if at_least else ""
    return f"{more}{size / 1024 / 1024:.0f} MB uncompressed, more than SPRIM_ZIP_MAX_MB={limit_mb}"


def _member_defect(m: zipfile.ZipInfo) -> str:
    name = m.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path in a zip archive: refused"
    if ".." in parts:
        return "'..' in a zip member name (path traversal): refused"
    mode = m.external_attr >> 16
    if m.create_system == 3 and mode and not stat.S_ISREG(mode):
        return "a link or special file inside a zip archive: refused"
    if m.flag_bits & 0x1:
        return "encrypted zip member: cannot be read"
    return ""


def _looks_like_zip(p: Path) -> bool:
    if p.suffix.lower() == ".zip":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def why_unreadable(path: Path) -> str:
    """Why a file the scan could not use is not a DICOM image, in words."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "empty file"
    if head[128:132] != b"DICM" and head[:2] not in (b"\x08\x00", b"\x02\x00"):
        return "not a DICOM file"
    import pydicom

    try:
        pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # noqa: BLE001  any parser failure is the answer
        return f"unreadable DICOM header ({_short(e)})"
    return "DICOM file without SOPClassUID or SeriesInstanceUID"


def series_uid_of(path: Path) -> str:
    """SeriesInstanceUID (0020,000E) of a damaged file, by byte search ('' if not found)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return ""
    at = data.find(b"\x20\x00\x0e\x00")
    if at < 0:
        return ""
    rest = data[at + 4 :]
    if rest[:2] == b"UI":
        n, value = int.from_bytes(rest[2:4], "little"), rest[4:]
    else:
        n, value = int.from_bytes(rest[:4], "little"), rest[4:]
    got = _UID.fullmatch(value[:n].rstrip(b"\0 "))
    return got.group().decode() if got and 0 < n <= 64 else ""


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
