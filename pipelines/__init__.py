"""Pure post-processing: volumes in, typed results out. No I/O, no Celery, no DICOM files."""

from pipelines.catalog import all_steps, get_step
from pipelines.registry import Step, canonical_params, step
from pipelines.types import (
    Code,
    ImageSeries,
    Labelmap,
    Measurement,
    Measurements,
    Mesh,
    Output,
    SegAlgorithm,
    Segment,
    StepError,
    Volume,
    output_kind,
    output_kinds,
)

__all__ = [
    "Code",
    "ImageSeries",
    "Labelmap",
    "Measurement",
    "Measurements",
    "Mesh",
    "Output",
    "SegAlgorithm",
    "Segment",
    "Step",
    "StepError",
    "Volume",
    "all_steps",
    "canonical_params",
    "get_step",
    "output_kind",
    "output_kinds",
    "step",
]
