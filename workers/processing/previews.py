"""Preview files of written outputs: JPEG stills, animated WebP for a cine, under ``previews/``.

Rendering is :mod:`pipelines.previews`; here the pictures are encoded (each file at most
:data:`MAX_BYTES`, quality lowered and then the picture shrunk until it fits) and written next to
the job's outputs in ``OUT/previews/``. They are pictures for people, not DICOM: archives are
given only the written DICOM objects, never this folder.

A preview that cannot be made is logged and left out; it never fails the output it shows.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import Output
from pipelines.previews import Preview, preview
from workers.reading.source import SourceSeries
from workers.writers import WrittenObject
from workers.writers.common import slug

log = logging.getLogger(__name__)

#: Folder of the previews inside an output folder.
FOLDER = "previews"
#: Largest preview file (bytes).
MAX_BYTES = 100_000
_QUALITIES = (85, 75, 60, 45)


@dataclass(frozen=True)
class PreviewFile:
    """One preview written: the picture of one output (a derived series, a SEG, a mesh)."""

    path: Path
    #: The derived object it shows: its series (the SEG's, not its volume SR's).
    series_uid: str
    series_number: int
    series_description: str
    kind: str
    caption: str
    frames: int
    bytes: int
    seconds: float

    def record(self, relative_to: Path | None = None) -> dict:
        """JSON-ready, the path relative to ``relative_to`` when given."""
        d = asdict(self)
        d["path"] = str(self.path.relative_to(relative_to) if relative_to else self.path)
        d["seconds"] = round(self.seconds, 3)
        return d


def encode(p: Preview, max_bytes: int = MAX_BYTES) -> tuple[bytes, str]:
    """``(file bytes, extension)``: a still as JPEG (greyscale when it has no colour), an
    animation as a looping WebP; quality lowered, then the picture halved, until it fits."""
    frames = [_image(f) for f in p.frames]
    while True:
        for quality in _QUALITIES:
            data = _encode(frames, quality, p.frame_seconds)
            if len(data) <= max_bytes:
                return data, "webp" if len(frames) > 1 else "jpg"
        w, h = frames[0].size
        if min(w, h) < 32:
            raise ValueError(f"preview does not fit in {max_bytes} bytes even at {w}x{h}")
        frames = [
            f.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS) for f in frames
        ]


def _image(rgb: np.ndarray) -> Image.Image:
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return Image.fromarray(np.ascontiguousarray(rgb[..., 0] if grey else rgb))


def _encode(frames: list[Image.Image], quality: int, frame_seconds: float | None) -> bytes:
    buf = io.BytesIO()
    if len(frames) == 1:
        frames[0].save(buf, "JPEG", quality=quality, optimize=True)
    else:
        frames[0].save(
            buf,
            "WEBP",
            save_all=True,
            append_images=frames[1:],
            duration=round(1000 * (frame_seconds or 0.1)),
            loop=0,
            quality=quality,
            method=4,
        )
    return buf.getvalue()


def _shown(written: Sequence[WrittenObject]) -> WrittenObject:
    """The object a preview stands for: the first one that is not the SEG's volume report."""
    return next((w for w in written if w.kind != "sr"), written[0])


def write_previews(
    shown: Sequence[tuple[Output, Sequence[WrittenObject]]], source: SourceSeries, out_dir: Path
) -> list[PreviewFile]:
    """A preview file for each ``(output, objects written for it)``, in ``out_dir/previews/``.

    Never raises for a preview (logged, left out), except the task runner's time limit, which
    is passed on.
    """
    body_part = str(source.first.get("BodyPartExamined", "") or "")
    made = []
    for out, written in shown:
        if not written:
            continue
        t0 = time.perf_counter()
        w = _shown(written)
        try:
            p = preview(out, source.volume, body_part)
            if p is None:
                continue
            data, ext = encode(p)
            folder = out_dir / FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{w.series_number}_{slug(w.series_description)}.{ext}"
            path.write_bytes(data)
        except Exception as e:
            if type(e).__name__ == "SoftTimeLimitExceeded":
                raise
            log.warning("preview of %s not made", out.description, exc_info=True)
            continue
        made.append(
            PreviewFile(
                path,
                w.series_uid,
                w.series_number,
                w.series_description,
                out.kind,
                p.caption,
                len(p.frames),
                len(data),
                time.perf_counter() - t0,
            )
        )
    return made


def job_previews_dir(job_id: int) -> Path:
    """Where a platform job keeps its previews (``SPRIM_HOME/previews/job-<id>/``): its work
    folder is removed after the attempt; the console serves them from here."""
    from workers.core.config import settings

    return settings().home / FOLDER / f"job-{job_id}"


def keep(previews: Sequence[PreviewFile], folder: Path, series_uids: set[str]) -> list[PreviewFile]:
    """Move the previews of ``series_uids`` (the outputs stored) into ``folder``; the others
    (outputs the archive refused) are left to be removed with the work folder."""
    kept = []
    for p in previews:
        if p.series_uid not in series_uids or not p.path.is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / p.path.name
        shutil.move(p.path, target)
        kept.append(replace(p, path=target))
    return kept
