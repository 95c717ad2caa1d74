"""Every byte of I/O: DICOM series to volumes, derived-object writers, archives, job store, CLI."""

from workers.series import SeriesFiles, read_series, scan
from workers.source import SeriesError, SourceSeries

__all__ = ["SeriesError", "SeriesFiles", "SourceSeries", "read_series", "scan"]
