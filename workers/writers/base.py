"""What every writer shares: the provenance of an output, the record of a file written, and the
registry of writers by output kind (:func:`writer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from pipelines import Output, Step, canonical_params
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
    """

    path: Path
    kind: str  # series | seg | sr | stl
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    series_number: int
    series_description: str
    notes: tuple[str, ...] = ()


Writer = Callable[[Output, SourceSeries, Provenance, Path], list[WrittenObject]]
_WRITERS: dict[str, Writer] = {}


def writer(kind: str) -> Callable[[Writer], Writer]:
    """Register the writer of an output kind."""

    def register(fn: Writer) -> Writer:
        _WRITERS[kind] = fn
        return fn

    return register
