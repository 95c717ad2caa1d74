"""``sprim run``: the main job on embedded defaults — a folder (or .zip) of DICOM in, derived DICOM out.

No broker, no archive: series are selected by routing rules (built-in by default), each selected
series is read, its steps run, and the outputs are written under ``--out`` with a
``summary.json``. One series failing never stops the others.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipelines import StepError, get_step
from pipelines.rules import RulesError  # noqa: F401  (the CLI catches it from here)
from workers.processing.report import REPORT_FILE, write_report
from workers.processing.runner import StepCall, run_steps
from workers.processing.summary import JobResult, RunSummary
from workers.reading.inputs import Skipped
from workers.reading.series import SeriesFiles, diagnose, read_series, scan
from workers.reading.source import SeriesError, SourceSeries

log = logging.getLogger(__name__)
#: Warnings and tracebacks of a run, in its output folder.
LOG_FILE = "sprim-run.log"


@dataclass
class PlannedJob:
    """A series picked for processing by a rule (or by ``--step``)."""

    rule: str
    series: SeriesFiles
    calls: list[StepCall]
    rule_index: int = 0


class UsageError(Exception):
    """Bad command-line input (unknown step, param that does not validate)."""


def parse_sets(steps: Sequence[str], sets: Sequence[str]) -> list[StepCall]:
    """``--step NAME`` and ``--set key=value`` into validated step calls.

    A ``key=value`` applies to every given step that has a param ``key``; values are YAML
    (``planes=[coronal,sagittal]``, ``thickness_mm=5``). ``NAME.key=value`` targets one step.
    """
    try:
        chosen = [get_step(s) for s in steps]
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    values: dict[str, dict] = {s.name: {} for s in chosen}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected key=value")
        target, _, key = key.rpartition(".") if "." in key else ("", "", key)
        value = yaml.safe_load(raw) if raw else ""
        hit = [
            s for s in chosen if (not target or s.name == target) and key in s.params.model_fields
        ]
        if not hit:
            raise UsageError(f"--set {item!r}: no given step has a param {key!r}")
        for s in hit:
            values[s.name][key] = value
    calls = []
    for s in chosen:
        try:
            calls.append(StepCall(s, s.validate(values[s.name])))
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise UsageError(f"{s.name}: {msg}") from None
    return calls


def run(
    inputs: Sequence[Path],
    out_dir: Path,
    *,
    plan_fn,
    progress=None,
) -> RunSummary:
    """Scan ``inputs``, plan jobs with ``plan_fn(series_list) -> (jobs, unmatched)``, run them.

    Never raises for bad input or a bug: ``summary.json`` is always written, an unexpected
    exception becomes ``summary.error`` ("internal error ...") with its traceback in
    ``OUT/sprim-run.log``.
    """
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary([str(p) for p in inputs], str(out_dir), 0)
    handler = _log_to(out_dir / LOG_FILE)
    try:
        skipped: list[Skipped] = []
        found = scan(list(inputs), skipped)
        summary.series_found = len(found)
        summary.skipped = [asdict(s) for s in skipped]
        if not found:
            summary.error = "no DICOM series found in the input" + (
                f" ({len(skipped)} file(s) skipped, see 'skipped')" if skipped else " (it is empty)"
            )
        jobs, summary.unmatched = plan_fn(found)
        reads = _Reads(jobs)
        for job in jobs:
            summary.jobs.append(_run_one(job, out_dir, progress, reads))
    except Exception as e:  # noqa: BLE001  the summary must say what happened, not a traceback
        log.exception("sprim run failed")
        summary.error = f"internal error ({type(e).__name__}); details in {out_dir / LOG_FILE}"
    finally:
        summary.seconds = round(time.perf_counter() - t0, 3)
        (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
        try:
            write_report(summary, out_dir)
        except Exception:  # noqa: BLE001  summary.json holds it all; the page is for reading
            log.exception("%s not written", REPORT_FILE)
        _unlog(handler)
    return summary


def _log_to(path: Path) -> logging.Handler:
    """Warnings and tracebacks of this run go to ``path``, never to the terminal."""
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)
    return handler


def _unlog(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


class _Reads:
    """Each series read once for all the rules that picked it, freed after its last job."""

    def __init__(self, jobs: Sequence[PlannedJob]) -> None:
        self.left = Counter(id(j.series) for j in jobs)
        self.kept: dict[int, SourceSeries | SeriesError] = {}

    def read(self, job: PlannedJob) -> SourceSeries:
        key = id(job.series)
        if key not in self.kept:
            try:
                self.kept[key] = read_series(job.series)
            except SeriesError as e:  # the same defect for every rule that picked it
                self.kept[key] = e
        got = self.kept[key]
        if isinstance(got, SeriesError):
            raise got
        return got

    def done(self, job: PlannedJob) -> None:
        key = id(job.series)
        self.left[key] -= 1
        if self.left[key] <= 0:
            self.kept.pop(key, None)


def _run_one(job: PlannedJob, out_dir: Path, progress, reads: _Reads | None = None) -> JobResult:
    a = job.series.attributes
    res = JobResult(
        job.rule,
        a.get("SeriesInstanceUID", ""),
        f"{a.get('SeriesNumber', '')} {a.get('SeriesDescription', '')}".strip(),
        a.get("Modality", ""),
        "failed",
        0.0,
    )
    t0 = time.perf_counter()
    try:
        if progress:
            progress(f"reading {res.series_description}")
        source = reads.read(job) if reads else read_series(job.series)
        res.notes = list(source.notes)
        report = run_steps(
            source, job.calls, job.rule, out_dir, progress=progress, rule_index=job.rule_index
        )
        res.failures = [asdict(f) for f in report.failures]
        res.error = "; ".join(str(f) for f in report.failures)
        res.state = report.state
        # What the writers changed in copied source attributes, each sentence once.
        res.notes = list(dict.fromkeys(res.notes + [n for w in report.written for n in w.notes]))
        res.steps = [
            {
                "step": s.name,
                "version": s.version,
                "params": s.params,
                "seconds": round(s.seconds, 3),
                "outputs": [
                    {
                        "kind": w.kind,
                        "series_number": w.series_number,
                        "series_description": w.series_description,
                        "series_uid": w.series_uid,
                        "sop_instance_uid": w.sop_instance_uid,
                        "path": str(w.path),
                    }
                    for w in s.outputs
                ],
            }
            for s in report.steps
        ]
        res.previews = [p.record(out_dir) for p in report.previews]
    except (SeriesError, StepError) as e:
        res.error = str(e)
    except Exception as e:  # noqa: BLE001  one broken series must not stop the run
        log.exception("series %s failed unexpectedly", res.series_uid)
        res.error = (
            f"internal error while processing this series ({type(e).__name__}); "
            f"details in {out_dir / LOG_FILE}"
        )
    finally:
        if reads:
            reads.done(job)
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


def load_ruleset(path: Path | None = None):
    """The rules in ``path``, else ``SPRIM_RULES_FILE``, else the built-in rules (RulesError if bad)."""
    from workers.processing.routing import load_rules_file, rules_path

    return load_rules_file(path or rules_path())


def _is_image_series(s: SeriesFiles) -> bool:
    return bool(s.attributes.get("Rows"))


def plan_steps(calls: list[StepCall]):
    """Planner for ``--step``: every image series gets the same step calls."""

    def plan(found: list[SeriesFiles]):
        jobs = [PlannedJob("cli", s, calls) for s in found if _is_image_series(s)]
        unmatched = [
            {"series": _label(s), "reason": "not an image series"}
            for s in found
            if not _is_image_series(s)
        ]
        return jobs, unmatched

    return plan


def plan_rules(path: Path | None):
    """Planner for routing rules: route each study's series, one job per (rule, picked series)."""
    from pipelines.rules import explain, route

    ruleset = load_ruleset(path)

    def plan(found: list[SeriesFiles]):
        by_study: dict[str, list[SeriesFiles]] = {}
        for s in found:
            by_study.setdefault(str(s.attributes.get("StudyInstanceUID", "")), []).append(s)
        jobs, unmatched = [], []
        for series in by_study.values():
            by_key = {id(s.attributes): s for s in series}
            attrs = [s.attributes for s in series]
            picked: set[int] = set()
            for m in route(ruleset, attrs):
                src = next(
                    s
                    for s in series
                    if s.attributes.get("SeriesInstanceUID") == m.series_uid
                    and s.attributes.get("SOPClassUID") == m.series.get("SOPClassUID")
                )
                picked.add(id(src.attributes))
                calls = [StepCall(rs.step, rs.params) for rs in m.steps]
                jobs.append(PlannedJob(m.rule.name, src, calls, ruleset.rules.index(m.rule)))
            verdicts = explain(ruleset, attrs)
            for key, s in by_key.items():
                if key in picked:
                    continue
                uid = s.attributes.get("SeriesInstanceUID")
                reasons = [
                    f"{v.rule}: {sv.reason}"
                    for v in verdicts
                    for sv in v.series
                    if sv.series_uid == uid
                ]
                entry = {"series": _label(s), "reason": "; ".join(reasons)}
                if _is_image_series(s) and "IsVolume" in entry["reason"]:
                    defect = diagnose(s)
                    if defect:
                        entry["defect"] = defect
                        entry["reason"] += f"; the input gate: {defect}"
                unmatched.append(entry)
        return jobs, unmatched

    return plan


def _label(s: SeriesFiles) -> str:
    a = s.attributes
    return f"{a.get('Modality', '')} {a.get('SeriesNumber', '')} {a.get('SeriesDescription', '')}".strip()
