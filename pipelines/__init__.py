"""Pure post-processing: volumes in, typed results out. No I/O, no Celery, no DICOM files."""

from pipelines.registry import Step, all_steps, canonical_params, get_step, step
from pipelines.types import Code, ImageSeries, Labelmap, Mesh, Output, Segment, StepError, Volume

__all__ = [
    "Code",
    "ImageSeries",
    "Labelmap",
    "Mesh",
    "Output",
    "Segment",
    "Step",
    "StepError",
    "Volume",
    "all_steps",
    "canonical_params",
    "get_step",
    "step",
]
