"""PHI minimization: what the job store keeps of a series, and library warnings that leak names.

The job store needs a series' routing attributes (``sprim rules simulate`` routes over them) and
its geometry (the API estimates a reprocess output's size before queueing it) — nothing about
the patient. :data:`STORED_SERIES_KEYWORDS` is the one allow-list of what it keeps; patient
attributes, AccessionNumber and dates never reach it. InstitutionName stays: it is routing
context and decides which API token sees the study.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

#: Series attributes the job store keeps (routing, display, output-size estimate).
STORED_SERIES_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "BodyPartExamined",
    "ImageType",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "PatientPosition",
    "InstitutionName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "NumberOfSeriesRelatedInstances",
    "NumberOfImages",
    "NumberOfFrames",
    "IsVolume",
)
#: Routing keywords the store does not keep: rules may test them, ``rules simulate`` cannot.
NOT_STORED_ROUTING_KEYWORDS = ("AccessionNumber", "StudyDate")


def stored_series(series: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each series' attributes reduced to :data:`STORED_SERIES_KEYWORDS`."""
    return [{k: s[k] for k in STORED_SERIES_KEYWORDS if k in s} for s in series]


class _DropPatientValues(logging.Filter):
    """highdicom.base logs a rejected patient_name with its value: drop such records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "patient_name" not in str(record.msg)


def quiet_phi_warnings() -> None:
    """Silence library warnings that print patient data (idempotent; call at start-up).

    highdicom's person-name check warns ``The string "<PatientName>" is unlikely to represent
    the intended person name`` for every single-component name — into every worker log.
    """
    warnings.filterwarnings(
        "ignore", message=r"The string .* is unlikely to represent the intended person name"
    )
    log = logging.getLogger("highdicom.base")  # filters do not apply to child loggers
    if not any(isinstance(f, _DropPatientValues) for f in log.filters):
        log.addFilter(_DropPatientValues())
