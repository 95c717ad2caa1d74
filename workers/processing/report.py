"""``OUT/report.html`` of a ``sprim run``: one self-contained page a person opens first.

Each processed series with its outputs, their previews, notes, failures and timings; the series
the rules left out and why; the files skipped. Everything is in the one file: previews inlined
as ``data:`` URIs, CSS inline, no script, and a Content-Security-Policy that forbids fetching
anything, so the page shows the same from a USB stick, a mail attachment or a PACS share.

Every string from DICOM (SeriesDescription, notes quoting attribute values, file names) is
HTML-escaped by Jinja2's autoescape: a hostile header cannot inject markup.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.processing.summary import RunSummary

if TYPE_CHECKING:
    import jinja2


log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
_TEMPLATES = Path(__file__).parent / "templates"
_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def _environment() -> jinja2.Environment:
    import jinja2  # when the report is written, not at start-up (issue 13)

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["params"] = lambda p: json.dumps(p, separators=(", ", ": "), default=str)
    return env


def data_uri(path: Path) -> str | None:
    """The picture at ``path`` as a ``data:`` URI (None if it is gone)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _outputs(job: Any, out_dir: Path) -> list[dict]:
    """The job's derived series in the order written, each with its objects counted and the
    preview that shows it (a SEG's volume SR has none of its own)."""
    previews = {p["series_uid"]: p for p in job.previews}
    series: dict[str, dict] = {}
    for step in job.steps:
        for o in step["outputs"]:
            s = series.setdefault(
                o["series_uid"],
                {
                    "step": step["step"],
                    "kind": o["kind"],
                    "series_number": o["series_number"],
                    "series_description": o["series_description"],
                    "instances": 0,
                    "folder": _relative(Path(o["path"]).parent, out_dir),
                    "preview": None,
                },
            )
            s["instances"] += 1
    for uid, s in series.items():
        p = previews.get(uid)
        if p:
            s["preview"] = {**p, "src": data_uri(out_dir / p["path"])}
    return list(series.values())


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def render_report(summary: RunSummary, out_dir: Path) -> str:
    """The page's HTML."""
    jobs = [
        {
            "job": j,
            "outputs": _outputs(j, out_dir),
            "preview_seconds": round(sum(p["seconds"] for p in j.previews), 3),
        }
        for j in summary.jobs
    ]
    return (
        _environment()
        .get_template("report.html")
        .render(summary=summary, jobs=jobs, states=_STATES, out_dir=str(out_dir))
    )


_STATES = {"done": "ok", "partial": "warn", "failed": "bad"}


def write_report(summary: RunSummary, out_dir: Path) -> Path:
    """Write ``out_dir/report.html``; returns its path."""
    path = out_dir / REPORT_FILE
    path.write_text(render_report(summary, out_dir), encoding="utf-8")
    return path
