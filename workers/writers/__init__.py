"""Derived DICOM objects from step outputs: one writer per output kind.

``write_output`` is the only entry point the runner uses; each writer module owns one IOD and
registers itself with :func:`workers.writers.base.writer`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipelines import Output
from workers.reading.source import SourceSeries
from workers.writers.base import _WRITERS, Provenance, WrittenObject, writer

__all__ = ["Provenance", "WrittenObject", "write_output", "writer"]


#: The built-in writer module of each output kind, imported when an output of that kind is
#: first written: the SEG and SR writers import highdicom (~0.4 s), which a job writing only
#: image series (``sprim run --step reformat.mpr``) never needs.
BUILTIN_WRITERS = {"series": "derived_series", "labelmap": "seg", "measurements": "sr",
                   "mesh": "stl"}  # fmt: skip


def write_output(
    output: Output, source: SourceSeries, prov: Provenance, out_dir: Path
) -> list[WrittenObject]:
    """Write ``output`` as DICOM under ``out_dir`` (a sub-folder per series); return what was written."""
    module = BUILTIN_WRITERS.get(output.kind)
    if module:  # the built-in registers on import (once)
        importlib.import_module(f"workers.writers.{module}")
    try:
        fn = _WRITERS[output.kind]
    except KeyError:
        raise TypeError(f"no DICOM writer for output kind {output.kind!r}") from None
    return fn(output, source, prov, out_dir)
