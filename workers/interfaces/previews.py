"""Preview pictures of a job's outputs, as the console serves them.

Each output record of a job lists its previews (``workers.processing.previews.PreviewFile.record``:
path relative to the job's folder ``SPRIM_HOME/previews/job-<id>/``, caption, frames). The
console serves a preview only by its name among the job's own records, and only from inside
that folder: a request never names a path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.platform.jobstore import Job
from workers.processing.previews import job_previews_dir

MEDIA = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
         ".gif": "image/gif"}  # fmt: skip


def _records(job: Job) -> Iterator[tuple[dict, dict]]:
    """(output record, preview record) for every preview the job recorded."""
    for o in job.outputs or []:
        for p in o.get("previews") or []:
            if isinstance(p, dict) and p.get("path"):
                yield o, p


def _resolve(job: Job, rec: dict) -> Path | None:
    root = job_previews_dir(job.id).resolve()
    try:
        p = (root / str(rec["path"])).resolve()
    except (OSError, ValueError):
        return None
    if p.is_relative_to(root) and p.is_file() and p.suffix.lower() in MEDIA:
        return p
    return None


def output_previews(job: Job, output: dict) -> list[dict[str, Any]]:
    """The previews of one output record of ``job``: ``name`` (for the URL), caption, frames,
    and ``missing`` when the file is not (or no longer) there."""
    out = []
    for o, rec in _records(job):
        if o is not output:
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
