"""Job submission, routing and execution — the same code in-process and in Celery workers.

- :func:`notify_study`: a study changed (new instances); routes after each rule's quiet period.
- :func:`submit_study`: route a study now with the rule set; create jobs; dispatch fairly.
- :func:`execute_job`: fetch -> read_series -> run_steps -> store; ``done`` only after the
  archive confirmed. Step/series errors fail the job at once; transient archive errors ask the
  caller to retry later (:class:`RetryLater`) until ``SPRIM_MAX_ATTEMPTS``.

Dispatch goes through a :class:`~workers.dispatch.Dispatcher` (dependency injection): in-process
by default, the Celery one installed by ``tasks`` — ``workers`` never imports Celery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from pipelines import StepError, canonical_params, get_step
from pipelines.rules import Match, explain, route
from workers.archive import Archive, ArchiveError, destination_for, open_archive
from workers.config import settings
from workers.dispatch import Dispatcher, InProcessDispatcher, RetryLater, dispatcher, set_dispatcher
from workers.jobstore import Job, JobStore, open_store
from workers.rulesource import current_rules
from workers.source import SeriesError

__all__ = [
    "Dispatcher",
    "InProcessDispatcher",
    "RetryLater",
    "archive_for",
    "dispatcher",
    "execute_job",
    "notify_study",
    "release",
    "route_due",
    "set_dispatcher",
    "submit_study",
]

log = logging.getLogger("sprim.jobs")


_ARCHIVES: dict[str, Archive] = {}


def archive_for(spec: str | None) -> Archive:
    """A cached archive per spec (a folder archive keeps its header index between jobs)."""
    key = spec or ""
    if key not in _ARCHIVES:
        _ARCHIVES[key] = open_archive(spec or None)
    return _ARCHIVES[key]


def archive_spec(archive: Archive) -> str:
    return str(getattr(archive, "url", None) or getattr(archive, "root", None) or archive.name)


def release(store: JobStore | None = None, disp: Dispatcher | None = None) -> list[Job]:
    """Hand waiting jobs to the dispatcher, fairly, up to ``SPRIM_DISPATCH_WINDOW`` in flight."""
    store = store or open_store()
    disp = disp or dispatcher()
    return store.release(settings().dispatch_window, disp.send_job)


# -- routing ---------------------------------------------------------------------------------
def _institution(context: Mapping[str, Any], series: Sequence[Mapping[str, Any]]) -> str:
    inst = context.get("institution")
    if not inst:
        inst = next((s.get("InstitutionName") for s in series if s.get("InstitutionName")), None)
    return str(inst or "unknown")


def job_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _steps_of(m: Match) -> list[dict]:
    return [
        {"use": r.use, "version": r.step.version, "with": json.loads(canonical_params(r.params))}
        for r in m.rule.run
    ]


def submit_study(
    study_uid: str,
    archive: Archive,
    source_context: Mapping[str, Any] | None = None,
    *,
    store: JobStore | None = None,
    disp: Dispatcher | None = None,
    rules: Sequence[str] | None = None,
    series: list[dict] | None = None,
) -> list[Job]:
    """Route a study now and create one job per (matched rule, selected series); dispatch.

    Parameters
    ----------
    study_uid : str
    archive : Archive
        Where the study is (its ``series_of_study`` gives the routing attributes).
    source_context : dict, optional
        ``calling_ae``, ``institution``; ``source`` defaults to ``archive.name``.
    rules : sequence of str, optional
        Only these rules (a quiet period elapsed for them).
    series : list of dict, optional
        Routing attributes when the caller has them already (skips ``series_of_study``).

    Returns
    -------
    list[Job]
        The jobs created: none when the same rule already ran on the same series content
        (a repeated notification), one ``no_match`` record when no rule matched.
    """
    store = store or open_store()
    disp = disp or dispatcher()
    ctx = {"source": archive.name, **dict(source_context or {})}
    attrs = series if series is not None else archive.series_of_study(study_uid)
    inst = _institution(ctx, attrs)
    spec = archive_spec(archive)
    store.note_study(
        study_uid, series=attrs, institution=inst, source=ctx["source"], archive=spec,
        context=ctx, bump=False,
    )  # fmt: skip
    ruleset = current_rules(store)
    all_matches = route(ruleset, attrs, ctx)
    matches = [m for m in all_matches if rules is None or m.rule.name in rules]
    created: list[Job] = []
    if not all_matches:
        key = job_key(
            "no_match",
            study_uid,
            sorted(str(s.get("SeriesInstanceUID")) for s in attrs),
            ruleset.digest,
        )
        if not store.list(job_key=key, limit=1):
            why = "; ".join(
                f"{rv.rule}: {next((sv.reason for sv in rv.series), 'no series')}"
                for rv in explain(ruleset, attrs, ctx)
            )
            now = time.time()
            j = store.create_job(
                study_uid=study_uid, institution=inst, source=ctx["source"], archive=spec,
                steps=[], job_key=key, state="no_match", finished_at=now, context={**ctx, "why": why[:1500]},
            )  # fmt: skip
            log.info(
                "job=%d event=no_match study=%s series=%d rules=%s",
                j.id,
                study_uid,
                len(attrs),
                ruleset.digest,
            )
            created.append(j)
        return created
    for m in matches:
        steps = _steps_of(m)
        n = m.series.get("NumberOfSeriesRelatedInstances")
        # The rule's destination, else SPRIM_DESTINATIONS by source archive or institution,
        # else (None) the archive the study came from.
        dest = m.rule.destination or destination_for(ctx["source"], inst)
        key = job_key(m.rule.name, m.series_uid, steps, n, dest)
        if store.list(job_key=key, state=("queued", "running", "done"), limit=1):
            log.info(
                "event=skip_duplicate rule=%s study=%s series=%s",
                m.rule.name,
                study_uid,
                m.series_uid,
            )
            continue
        j = store.create_job(
            rule=m.rule.name, study_uid=study_uid, series_uid=m.series_uid, institution=inst,
            source=ctx["source"], archive=spec, destination=dest,
            priority=m.rule.priority_level, steps=steps, job_key=key, context=ctx,
            actor="rules:" + ruleset.digest,
        )  # fmt: skip
        log.info("job=%d event=queued rule=%s study=%s series=%s institution=%s priority=%s",
                 j.id, m.rule.name, study_uid, m.series_uid, inst, m.rule.priority)  # fmt: skip
        created.append(j)
    if created:
        release(store, disp)
    return created


def notify_study(
    study_uid: str,
    archive: Archive,
    source_context: Mapping[str, Any] | None = None,
    *,
    store: JobStore | None = None,
    disp: Dispatcher | None = None,
) -> int:
    """A study received instances now: route it once each rule's quiet period has elapsed.

    Call on every arrival (listener) or change-feed event; a later call supersedes earlier
    ones, so a late series re-triggers the rules after their quiet period. Returns the study's
    change sequence.
    """
    store = store or open_store()
    disp = disp or dispatcher()
    ctx = {"source": archive.name, **dict(source_context or {})}
    seq = store.note_study(
        study_uid, source=ctx["source"], archive=archive_spec(archive), context=ctx
    )
    by_delay: dict[float, list[str]] = {}
    for r in current_rules(store).rules:
        by_delay.setdefault(r.quiet_period_s, []).append(r.name)
    for delay, names in sorted(by_delay.items()):
        disp.send_route(study_uid, seq, names, delay)
    log.info("event=study_changed study=%s seq=%d", study_uid, seq)
    return seq


def route_due(
    study_uid: str,
    seq: int,
    rules: list[str],
    store: JobStore | None = None,
    disp: Dispatcher | None = None,
) -> list[Job]:
    """Route ``rules`` for a study whose quiet period elapsed, unless it changed since ``seq``."""
    store = store or open_store()
    row = store.study(study_uid)
    if row is None or row.change_seq != seq:
        log.info("event=route_superseded study=%s seq=%d", study_uid, seq)
        return []
    archive = archive_for(row.archive)
    attrs = archive.series_of_study(study_uid)
    ctx = dict(row.context or {})
    return submit_study(study_uid, archive, ctx, store=store, disp=disp, series=attrs, rules=rules)


# -- execution -------------------------------------------------------------------------------
_FINAL = ("done", "failed", "cancelled", "no_match")


def _backoff(attempt: int) -> float:
    return min(300.0, settings().retry_backoff_s * 2 ** max(0, attempt - 1))


def _rule_index(rule: str | None, store: JobStore) -> int:
    """Position of ``rule`` in the current rule set (SeriesNumber scheme); 9 if not there."""
    names = [r.name for r in current_rules(store).rules]
    return names.index(rule) if rule in names else 9


def execute_job(
    job_id: int, store: JobStore | None = None, disp: Dispatcher | None = None
) -> Job | None:
    """Run one job to a final state (or raise :class:`RetryLater`); safe to call again.

    A redelivered job (worker lost) runs again: its deterministic output UIDs replace what a
    previous attempt may have stored. A job already final is left alone.
    """
    from workers.plugins import load_plugins
    from workers.runner import StepCall, run_steps
    from workers.series import read_series, scan

    load_plugins()
    store = store or open_store()
    job = store.get(job_id)
    if job is None:
        log.warning("job=%s event=unknown_job", job_id)
        return None
    if job.state in _FINAL:
        log.info("job=%d event=skip state=%s", job.id, job.state)
        return job
    max_attempts = settings().max_attempts
    if job.attempts >= max_attempts:
        msg = f"gave up after {job.attempts} attempts (worker lost or archive unavailable)"
        job = store.transition(
            job.id,
            "failed",
            expect=("queued", "running"),
            detail=msg,
            error=msg,
            finished_at=time.time(),
        )
        log.error("job=%d event=failed error=%s", job_id, msg)
        _release_after(store, disp)
        return job
    now = time.time()
    job = store.transition(
        job.id, "running", expect=("queued", "running"), detail=f"attempt {job.attempts + 1}",
        attempts=job.attempts + 1, started_at=now, error=None,
    )  # fmt: skip
    if job is None:  # cancelled meanwhile
        return store.get(job_id)
    log.info("job=%d event=started attempt=%d rule=%s study=%s series=%s",
             job.id, job.attempts, job.rule or job.requester, job.study_uid, job.series_uid)  # fmt: skip
    work = settings().work_dir / f"job-{job.id}-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        archive = archive_for(job.archive)
        files = archive.fetch_series(job.study_uid, job.series_uid or "", work / "in")
        timings["fetch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = [
            s for s in scan(work / "in") if s.attributes.get("SeriesInstanceUID") == job.series_uid
        ]
        if not found:
            raise SeriesError(
                f"series {job.series_uid}: none of the {len(files)} fetched files is DICOM"
            )
        source = read_series(found[0])
        timings["read"] = time.perf_counter() - t0
        calls = []
        for s in job.steps:
            st = get_step(s["use"])
            calls.append(StepCall(st, st.validate(s.get("with") or {})))
        report = run_steps(
            source, calls, job.rule or "reprocess", work / "out",
            description_suffix=job.description_suffix or "", rule_index=_rule_index(job.rule, store),
        )  # fmt: skip
        for sr in report.steps:
            timings[sr.name] = timings.get(sr.name, 0.0) + sr.seconds
        written = report.written
        t0 = time.perf_counter()
        dest = archive_for(job.destination) if job.destination else archive
        dest.store([w.path for w in written])
        timings["store"] = time.perf_counter() - t0
    except ArchiveError as e:
        if e.transient and job.attempts < max_attempts:
            delay = _backoff(job.attempts)
            store.transition(
                job.id,
                "queued",
                expect=("running",),
                detail=f"transient: {e}; retry in {delay:.0f}s",
                error=str(e),
            )
            log.warning(
                "job=%d event=retry attempt=%d delay=%.1f error=%s", job.id, job.attempts, delay, e
            )
            raise RetryLater(job.id, delay, e) from e
        msg = (
            f"archive: {e.reason or e}"
            if not e.transient
            else f"archive unavailable after {job.attempts} attempts: {e}"
        )
        return _fail(store, job, msg, timings, disp)
    except (StepError, SeriesError) as e:
        return _fail(store, job, str(e), timings, disp)
    except (ValidationError, KeyError) as e:
        return _fail(store, job, f"bad job parameters: {e}", timings, disp)
    except Exception as e:  # SoftTimeLimitExceeded, bugs: fail with the reason, no retry
        log.exception("job=%d event=error", job.id)
        return _fail(store, job, f"{type(e).__name__}: {e}", timings, disp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outputs: dict[str, dict] = {}
    for w in written:
        o = outputs.setdefault(w.series_uid, {
            "series_uid": w.series_uid, "kind": w.kind, "series_number": w.series_number,
            "series_description": w.series_description,
            "sop_class_uid": w.sop_class_uid, "instances": [],
        })  # fmt: skip
        o["instances"].append(w.sop_instance_uid)
    done = store.transition(
        job.id, "done", expect=("running",), detail=f"{len(written)} objects stored",
        finished_at=time.time(), timings={k: round(v, 4) for k, v in timings.items()},
        outputs=list(outputs.values()),
    )  # fmt: skip
    log.info(
        "job=%d event=done objects=%d seconds=%.2f", job.id, len(written), sum(timings.values())
    )
    _release_after(store, disp)
    return done or store.get(job.id)


def _fail(
    store: JobStore, job: Job, msg: str, timings: dict, disp: Dispatcher | None
) -> Job | None:
    out = store.transition(
        job.id, "failed", expect=("running",), detail=msg, error=msg, finished_at=time.time(),
        timings={k: round(v, 4) for k, v in timings.items()},
    )  # fmt: skip
    log.error("job=%d event=failed error=%s", job.id, msg.replace("\n", " ")[:500])
    _release_after(store, disp)
    return out


def _release_after(store: JobStore, disp: Dispatcher | None) -> None:
    try:
        release(store, disp)
    except Exception:
        log.exception("event=release_failed")
