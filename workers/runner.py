"""Run a job's steps on one source series and write every output as DICOM.

The same code runs in ``sprim run``, in the embedded job executor and in Celery workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from pipelines import Output, Step, StepError
from workers.source import SourceSeries
from workers.writers import Provenance, WrittenObject, write_output


@dataclass(frozen=True)
class StepCall:
    """A step with validated params, as a job asks for it."""

    step: Step
    params: BaseModel


@dataclass
class StepReport:
    name: str
    version: str
    params: dict
    seconds: float
    outputs: list[WrittenObject] = field(default_factory=list)


@dataclass
class RunReport:
    source_series_uid: str
    steps: list[StepReport] = field(default_factory=list)

    @property
    def written(self) -> list[WrittenObject]:
        return [w for s in self.steps for w in s.outputs]


Progress = Callable[[str], None]


def run_steps(
    source: SourceSeries,
    calls: Sequence[StepCall],
    rule: str,
    out_dir: Path,
    progress: Progress | None = None,
    description_suffix: str = "",
    rule_index: int = 0,
) -> RunReport:
    """Run ``calls`` in order on ``source``; outputs go to ``out_dir``.

    Raises
    ------
    StepError
        A step refused the input (deterministic: do not retry). The message names the step.
    """
    report = RunReport(source.series_uid)
    prior: list[Output] = []
    for i, call in enumerate(calls):
        if progress:
            progress(f"{call.step.name}")
        t0 = time.perf_counter()
        try:
            outputs = call.step(source.volume, call.params, tuple(prior))
        except StepError as e:
            raise StepError(f"{call.step.name}: {e}") from e
        written: list[WrittenObject] = []
        for j, out in enumerate(outputs):
            prov = Provenance(
                rule,
                call.step,
                call.params,
                step_index=i,
                output_index=j,
                output_key=f"{j}:{out.description}",
                rule_index=rule_index,
                description_suffix=description_suffix,
            )
            written += write_output(out, source, prov, out_dir)
        prior += outputs
        report.steps.append(
            StepReport(
                call.step.name,
                call.step.version,
                call.params.model_dump(mode="json"),
                time.perf_counter() - t0,
                written,
            )
        )
    return report
