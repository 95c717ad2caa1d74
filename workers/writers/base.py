"""What every writer shares: the provenance of an output, the record of a file written, and the
registry of writers by output kind (:func:`writer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from pipelines import Segment, Step, canonical_params
from workers.core.uids import OutputUIDs
from workers.reading.source import SourceSeries


@dataclass(frozen=True)
class Provenance:
    """What produced an output: the rule (or requester), the step, its params, its place in the job.

    ``rule_index`` (position of the rule in its rule set), ``step_index`` (position of the step in
    the job) and ``output_index`` (position of the output among the step's outputs) feed the
    SeriesNumber scheme, so outputs of different rules on one source never share a number.
    """

    rule: str
    step: Step
    params: BaseModel
    step_index: int = 0
    output_index: int = 0
    output_key: str = ""
    rule_index: int = 0
    #: What a reprocessing request changed ("thickness_mm=5"), appended to SeriesDescription.
    description_suffix: str = ""
    #: Objects this job wrote before this output (a measurement SR references their SEG).
    earlier: tuple[WrittenObject, ...] = ()

    @property
    def params_canonical(self) -> str:
        return canonical_params(self.params)

    def uids(self, source: SourceSeries) -> OutputUIDs:
        return OutputUIDs(
            source.series_uid,
            self.rule,
            self.step.name,
            self.step.version,
            self.params_canonical,
            self.output_key or str(self.output_index),
        )


@dataclass(frozen=True)
class WrittenObject:
    """One DICOM file written.

    ``notes``: what the writer changed while copying source attributes (invalid values emptied
    or left out, repairs, the frame of reference chosen), one sentence each, for the job report.
    ``segments`` (SEG): the labelmap's segments in SEG segment-number order (1, 2, ...).
    """

    path: Path
    kind: str  # series | seg | sr | stl
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    series_number: int
    series_description: str
    notes: tuple[str, ...] = ()
    segments: tuple[Segment, ...] = ()


#: ``fn(output, source, provenance, out_dir) -> written``; ``output`` is of the kind registered.
Writer = Callable[..., list[WrittenObject]]
_WRITERS: dict[str, Writer] = {}
W = TypeVar("W", bound=Writer)


def writer(kind: str) -> Callable[[W], W]:
    """Register the writer of an output kind."""

    def register(fn: W) -> W:
        _WRITERS[kind] = fn
        return fn

    return register
