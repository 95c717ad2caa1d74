"""Submission: a study arrives or changes; the rules decide which jobs exist; jobs are released.

- :func:`notify_study`: a study changed (new instances); routes after each rule's quiet period.
- :func:`submit_study`: route a study now with the rule set; create jobs; dispatch fairly.
- :func:`release`: hand waiting jobs to the dispatcher, fairly, within the dispatch window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines import canonical_params
from pipelines.rules import Match, explain, route
from workers.archives import Archive, ArchiveError, destination_for, open_archive
from workers.core import metrics
from workers.core.config import settings
from workers.platform.dispatcher import Dispatcher, dispatcher
from workers.platform.jobstore import Job, JobStore, open_store
from workers.platform.leases import recover
from workers.processing.routing import current_rules

log = logging.getLogger("sprim.jobs")


_ARCHIVES: dict[str, Archive] = {}


def archive_for(spec: str | None) -> Archive:
    """A cached archive per spec (a folder archive keeps its header index between jobs)."""
    key = spec or ""
    if key not in _ARCHIVES:
        _ARCHIVES[key] = open_archive(spec or None)
    return _ARCHIVES[key]


def series_of(archive: Archive, study_uid: str) -> list[dict]:
    """``archive.series_of_study``, its errors counted (``sprim_archive_errors_total``)."""
    try:
        return archive.series_of_study(study_uid)
    except ArchiveError as e:
        metrics.archive_error("series_of_study", e.transient)
        raise


def archive_spec(archive: Archive) -> str:
    return str(getattr(archive, "url", None) or getattr(archive, "root", None) or archive.name)


def release(store: JobStore | None = None, disp: Dispatcher | None = None) -> list[Job]:
    """Hand waiting jobs to the dispatcher, fairly, up to ``SPRIM_DISPATCH_WINDOW`` in flight.

    Jobs whose lease lapsed are requeued first (:func:`recover`), so they never hold the window.
    """
    store = store or open_store()
    disp = disp or dispatcher()
    recover(store, disp)
    return store.release(settings().dispatch_window, disp.send_job, getattr(disp, "ident", None))


def release_after(store: JobStore, disp: Dispatcher | None) -> None:
    try:
        release(store, disp)
    except Exception as e:  # noqa: BLE001  (the periodic release catches up)
        log.warning("event=release_failed error=%s", type(e).__name__)


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
    attrs = series if series is not None else series_of(archive, study_uid)
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
    quiet_s: float = 0.0,
    inline: bool = False,
) -> int:
    """A study received instances now: route it once each rule's quiet period has elapsed.

    Call on every arrival (listener) or change-feed event; a later call supersedes earlier
    ones, so a late series re-triggers the rules after their quiet period. Returns the study's
    change sequence.

    ``quiet_s``: how long the study has already been quiet (``sprim watch``: since Orthanc's
    last instance of it), taken off every rule's quiet period. ``inline``: rules already due
    are routed in the caller before this returns (the change-feed cursor then only moves past
    a routed study); the others are scheduled on the dispatcher.
    """
    store = store or open_store()
    disp = disp or dispatcher()
    ctx = {"source": archive.name, **dict(source_context or {})}
    seq = store.note_study(
        study_uid, source=ctx["source"], archive=archive_spec(archive), context=ctx
    )
    by_delay: dict[float, list[str]] = {}
    for r in current_rules(store).rules:
        by_delay.setdefault(max(0.0, r.quiet_period_s - quiet_s), []).append(r.name)
    log.info("event=study_changed study=%s seq=%d", study_uid, seq)
    for delay, names in sorted(by_delay.items()):
        if delay <= 0 and inline:
            route_due(study_uid, seq, names, store, disp)
        else:
            log.info("event=route_scheduled study=%s seq=%d rules=%s in_s=%.1f",
                     study_uid, seq, ",".join(names), delay)  # fmt: skip
            disp.send_route(study_uid, seq, names, delay)
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
    attrs = series_of(archive, study_uid)
    ctx = dict(row.context or {})
    return submit_study(study_uid, archive, ctx, store=store, disp=disp, series=attrs, rules=rules)
