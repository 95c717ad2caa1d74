"""Run a job's steps on one source series and write every output as DICOM.

The same code runs in ``sprim run``, in the embedded job executor and in Celery workers.

Outputs fail one by one: a step that refuses the volume, or a writer that cannot write one
output, is recorded in :attr:`RunReport.failures` and the run goes on with the other steps and
outputs. A step that needs the output of a failed step (a mesh of the lungs after
``segment.lungs`` failed) is not run and is reported as failed for that reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipelines import Output, Step, StepError
from workers.core.config import settings
from workers.processing.previews import PreviewFile, write_previews
from workers.reading.source import SeriesError, SourceSeries
from workers.writers import Provenance, WrittenObject, write_output

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class OutputFailure:
    """One output (or a whole step, ``output == ""``) that could not be made."""

    step: str
    output: str
    reason: str

    def __str__(self) -> str:
        what = f"{self.step} ({self.output})" if self.output else self.step
        return f"{what}: {self.reason}"


@dataclass
class RunReport:
    source_series_uid: str
    steps: list[StepReport] = field(default_factory=list)
    failures: list[OutputFailure] = field(default_factory=list)
    #: Pictures of the outputs for people (``OUT/previews/``), never sent to an archive.
    previews: list[PreviewFile] = field(default_factory=list)

    @property
    def written(self) -> list[WrittenObject]:
        return [w for s in self.steps for w in s.outputs]

    @property
    def complete(self) -> bool:
        """Every step ran and every output was written."""
        return not self.failures

    @property
    def state(self) -> str:
        """``done``, ``partial`` (some outputs written, some failed) or ``failed`` (none)."""
        return "done" if self.complete else "partial" if self.written else "failed"


Progress = Callable[[str], None]
#: ``(step name, output description, objects written)``, called once per output written.
OutputDone = Callable[[str, str, list[WrittenObject]], None]


def _reason(e: Exception, what: str) -> str:
    """An input defect in its own words; anything else as an internal error (traceback logged)."""
    if isinstance(e, SeriesError | StepError):
        from workers.core import metrics  # prometheus-client: not on `sprim run`'s start-up

        metrics.refused(e)
        return str(e)
    log.exception("internal error in %s", what)
    return f"internal error ({type(e).__name__})"


def _needs(call: StepCall, earlier: Sequence[StepCall]) -> list[str]:
    """Earlier steps of this job whose output ``call`` builds on (a segment named in its params)."""
    from pipelines.steps.mesh import SEGMENT_STEPS

    names = {c.step.name for c in earlier}
    makers = [
        SEGMENT_STEPS.get(v.strip().lower())
        for k, v in call.params.model_dump().items()
        if k.endswith("segment") and isinstance(v, str)
    ]
    return [m for m in dict.fromkeys(makers) if m in names]


def run_steps(
    source: SourceSeries,
    calls: Sequence[StepCall],
    rule: str,
    out_dir: Path,
    progress: Progress | None = None,
    description_suffix: str = "",
    rule_index: int = 0,
    on_output: OutputDone | None = None,
) -> RunReport:
    """Run ``calls`` in order on ``source``; outputs go to ``out_dir``.

    Never raises for a step or an output: each failure is in ``report.failures`` (see module
    docstring) and what could be made is in ``report.written``. ``on_output(step, output,
    objects)`` is called as soon as each output is written (the job stores it meanwhile).
    """
    run = _Run(source, rule, out_dir, description_suffix, rule_index, on_output)
    max_bytes = settings().max_volume_mb * 2**20
    for i, call in enumerate(calls):
        if progress:
            progress(call.step.name)
        if not run.step(i, call, calls, max_bytes):
            return _not_run(run.report, calls[i + 1 :])
    return run.report


@dataclass
class _Run:
    """The state of one :func:`run_steps`: what was made, what failed, what later steps see."""

    source: SourceSeries
    rule: str
    out_dir: Path
    description_suffix: str
    rule_index: int
    on_output: OutputDone | None
    report: RunReport = field(init=False)
    prior: list[Output] = field(default_factory=list)
    failed_steps: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.report = RunReport(self.source.series_uid)

    def step(self, i: int, call: StepCall, calls: Sequence[StepCall], max_bytes: int) -> bool:
        """Run step ``i`` and write its outputs; False when the job's time is up."""
        name = call.step.name
        lost = [n for n in _needs(call, calls[:i]) if n in self.failed_steps]
        if lost:
            self.failed_steps.add(name)
            self.report.failures.append(
                OutputFailure(name, "", f"needs the output of {lost[0]}, which failed")
            )
            return True
        t0 = time.perf_counter()
        try:
            img = self.source.volume.image  # refuse absurd params before any memory is asked for
            call.step.check_output_size(
                call.params, img.GetSize()[::-1], img.GetSpacing(), max_bytes, img.GetDirection()
            )
            outputs = call.step(self.source.volume, call.params, tuple(self.prior))
        except Exception as e:  # noqa: BLE001  (one step never takes the others down)
            self.failed_steps.add(name)
            self.report.failures.append(OutputFailure(name, "", _reason(e, name)))
            return not _out_of_time(e)
        written, marks, stop = self._write_all(i, call, outputs)
        # The step's outputs exist even when one could not be written: later steps use them.
        self.prior += outputs
        self.report.steps.append(
            StepReport(
                name,
                call.step.version,
                call.params.model_dump(mode="json"),
                time.perf_counter() - t0,
                written,
            )
        )
        if not stop:  # after the step's timing: drawing previews is not the step's work
            stop = not self._previews(outputs, written, marks)
        _release_memory()
        return not stop

    def _write_all(
        self, i: int, call: StepCall, outputs: Sequence[Output]
    ) -> tuple[list[WrittenObject], list[int], bool]:
        """Write each output (one failing never stops the others, the time limit does);
        returns what was written, where each output's objects start, and whether time is up."""
        name = call.step.name
        written: list[WrittenObject] = []
        stop = False
        marks: list[int] = []  # where each output's objects start in ``written``
        for j, out in enumerate(outputs):
            marks.append(len(written))
            if stop:
                self.report.failures.append(OutputFailure(name, out.description, _NOT_RUN))
                continue
            prov = Provenance(
                self.rule,
                call.step,
                call.params,
                step_index=i,
                output_index=j,
                output_key=f"{j}:{out.description}",
                rule_index=self.rule_index,
                description_suffix=self.description_suffix,
                earlier=(*self.report.written, *written),
            )
            try:
                made = _write(out, self.source, prov, self.out_dir)
            except Exception as e:  # noqa: BLE001  (one output never takes the others down)
                self.report.failures.append(
                    OutputFailure(name, out.description, _reason(e, f"{name} {out.description}"))
                )
                stop = _out_of_time(e)
                continue
            written += made
            if self.on_output:
                self.on_output(name, out.description, made)
        return written, marks, stop

    def _previews(
        self, outputs: Sequence[Output], written: list[WrittenObject], marks: list[int]
    ) -> bool:
        """A picture of each output written; False only when the job's time ran out."""
        marks = [*marks, len(written)]
        shown = [(o, written[a:b]) for o, a, b in zip(outputs, marks[:-1], marks[1:], strict=True)]
        try:
            self.report.previews += write_previews(shown, self.source, self.out_dir)
        except Exception:  # noqa: BLE001  (only the time limit is passed on)
            return False
        return True


def _release_memory() -> None:
    """Give what the step's temporaries left in the heap back to the system: glibc keeps
    freed memory below its trim threshold and in per-thread arenas (50-70 MB per step on a
    400-slice CT, measured); the next step then peaks from a lower floor. No-op off glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = getattr(lib, "malloc_trim", False)
        except OSError:
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


_NOT_RUN = "not made: the job's time limit was reached"


def _out_of_time(e: Exception) -> bool:
    """The task runner's soft time limit (Celery's, known by name: workers never import
    Celery): the job's time is used up, the steps after it are not run."""
    return type(e).__name__ == "SoftTimeLimitExceeded"


def _not_run(report: RunReport, calls: Sequence[StepCall]) -> RunReport:
    report.failures += [OutputFailure(c.step.name, "", _NOT_RUN) for c in calls]
    return report


def _write(out: Output, source: SourceSeries, prov: Provenance, out_dir: Path) -> list:
    """Write one output into a staging folder, then move its files into ``out_dir``: an
    output that fails half-way leaves nothing behind (the staging folder is removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".writing-", dir=out_dir))
    try:
        written = write_output(out, source, prov, stage)
        moved = []
        for w in written:
            target = out_dir / w.path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(w.path, target)
            moved.append(dataclasses.replace(w, path=target))
        return moved
    finally:
        shutil.rmtree(stage, ignore_errors=True)
