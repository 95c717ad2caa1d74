"""Preview pictures of a job's outputs, as the console serves them.

The job records its preview files (``workers.processing.previews.PreviewFile.record``: path,
series UID, caption, frames) with its outputs; the files live under the job store's home. The
console serves a preview only by its name among the job's own records, and only from inside
the previews folder: a request never names a path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.core.config import settings
from workers.platform.jobstore import Job

MEDIA = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
         ".gif": "image/gif"}  # fmt: skip


def previews_root() -> Path:
    """Where jobs keep their previews."""
    return settings().home / "previews"


def _records(job: Job) -> Iterator[tuple[dict | None, dict]]:
    """(output record or None, preview record) for every preview the job recorded."""
    for o in job.outputs or []:
        for p in o.get("previews") or []:
            if isinstance(p, dict) and p.get("path"):
                yield o, p
    for p in (job.context or {}).get("previews") or []:
        if isinstance(p, dict) and p.get("path"):
            yield None, p


def _resolve(job: Job, rec: dict) -> Path | None:
    root = previews_root().resolve()
    raw = Path(str(rec["path"]))
    for cand in [raw] if raw.is_absolute() else [root / f"job-{job.id}" / raw, root / raw]:
        try:
            p = cand.resolve()
        except OSError:
            continue
        if p.is_relative_to(root) and p.is_file() and p.suffix.lower() in MEDIA:
            return p
    return None


def output_previews(job: Job, output: dict) -> list[dict[str, Any]]:
    """The previews of one output record of ``job``: ``name`` (for the URL), caption, frames,
    and ``missing`` when the file is not (or no longer) there."""
    out = []
    for o, rec in _records(job):
        mine = o is output or (o is None and rec.get("series_uid") == output.get("series_uid"))
        if not mine:
            continue
        out.append({
            "name": Path(str(rec["path"])).name, "caption": str(rec.get("caption", "")),
            "frames": int(rec.get("frames") or 1), "missing": _resolve(job, rec) is None,
        })  # fmt: skip
    return out


def preview_file(job: Job, name: str) -> tuple[Path, str] | None:
    """(file, media type) of the preview called ``name`` among ``job``'s records."""
    for _o, rec in _records(job):
        if Path(str(rec["path"])).name == name:
            path = _resolve(job, rec)
            return (path, MEDIA[path.suffix.lower()]) if path else None
    return None
