"""Every byte of I/O: DICOM series to volumes, derived-object writers, archives, job store, CLI."""

from workers.source import SeriesError, SourceSeries

__all__ = ["SeriesError", "SourceSeries"]
