"""What ``sprim run`` reports: one result per job and the run's summary (``summary.json``,
``report.html``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class JobResult:
    rule: str
    series_uid: str
    series_description: str
    modality: str
    state: str  # done | partial (some outputs failed) | failed
    seconds: float
    error: str = ""
    notes: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    #: Each output (or whole step, output "") that could not be made: step, output, reason.
    failures: list[dict] = field(default_factory=list)
    #: A picture of each output (workers.processing.previews.PreviewFile, path relative to OUT).
    previews: list[dict] = field(default_factory=list)


@dataclass
class RunSummary:
    inputs: list[str]
    out_dir: str
    series_found: int
    jobs: list[JobResult] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: Files, archives and archive members not used, each with the reason (workers.reading.inputs).
    skipped: list[dict] = field(default_factory=list)
    #: Why the run as a whole did nothing useful ("no DICOM series ...", "internal error ...").
    error: str = ""

    @property
    def failed(self) -> list[JobResult]:
        return [j for j in self.jobs if j.state != "done"]
