"""Derived DICOM objects from step outputs: one writer per output kind.

``write_output`` is the only entry point the runner uses; each writer module owns one IOD and
registers itself with :func:`workers.writers.base.writer`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines import Output
from workers.reading.source import SourceSeries
from workers.writers.base import _WRITERS, Provenance, WrittenObject, writer

__all__ = ["Provenance", "WrittenObject", "write_output", "writer"]


def write_output(
    output: Output, source: SourceSeries, prov: Provenance, out_dir: Path
) -> list[WrittenObject]:
    """Write ``output`` as DICOM under ``out_dir`` (a sub-folder per series); return what was written."""
    from workers.writers import derived_series, seg, sr, stl  # noqa: F401  (built-ins register)

    try:
        fn = _WRITERS[output.kind]
    except KeyError:
        raise TypeError(f"no DICOM writer for output kind {output.kind!r}") from None
    return fn(output, source, prov, out_dir)
