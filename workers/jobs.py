"""Job submission, routing and execution — the same code in-process and in Celery workers.

- :func:`notify_study`: a study changed (new instances); routes after each rule's quiet period.
- :func:`submit_study`: route a study now with the rule set; create jobs; dispatch fairly.
- :func:`execute_job`: fetch -> read_series -> run_steps -> store; ``done`` only after the
  archive confirmed (``partial`` when some outputs failed). Input defects fail the job at once;
  transient archive errors requeue it with a retry time until ``SPRIM_MAX_ATTEMPTS``.
- Leases: a running attempt holds a lease its heartbeat renews; :func:`recover` (before every
  release) requeues jobs whose lease lapsed, with backoff, and fails poison jobs after
  ``SPRIM_MAX_WORKER_LOSSES``. :func:`sweep_work` removes work folders of dead attempts.

Dispatch goes through a :class:`~workers.dispatch.Dispatcher` (dependency injection): in-process
by default, the Celery one installed by ``tasks`` — ``workers`` never imports Celery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from pydantic import ValidationError

from pipelines import StepError, canonical_params, get_step
from pipelines.rules import Match, explain, route
from workers.archive import Archive, ArchiveError, destination_for, open_archive
from workers.config import settings
from workers.dispatch import Dispatcher, InProcessDispatcher, dispatcher, set_dispatcher
from workers.jobstore import FINAL, Job, JobStore, StoreUnavailable, open_store, retrying
from workers.rulesource import current_rules
from workers.source import SeriesError

__all__ = [
    "CompletionPending",
    "Dispatcher",
    "InProcessDispatcher",
    "archive_for",
    "dispatcher",
    "execute_job",
    "notify_study",
    "record_final",
    "recover",
    "release",
    "route_due",
    "set_dispatcher",
    "submit_study",
    "sweep_work",
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
    """Hand waiting jobs to the dispatcher, fairly, up to ``SPRIM_DISPATCH_WINDOW`` in flight.

    Jobs whose lease lapsed are requeued first (:func:`recover`), so they never hold the window.
    """
    store = store or open_store()
    disp = disp or dispatcher()
    recover(store, disp)
    return store.release(settings().dispatch_window, disp.send_job, getattr(disp, "ident", None))


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
def _host_id() -> str:
    """This host as lease owners name it: hostname and PID namespace (containers sharing a
    hostname never judge each other's processes)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{socket.gethostname()}~{ns}"


_HOST = _host_id()


class CompletionPending(Exception):
    """The job store stayed unreachable when a job's final state had to be recorded.

    ``final`` (JSON) records it later (:func:`record_final`): the caller must keep it somewhere
    durable (Celery: a retry message), never drop it — the outputs are in the archive already.
    """

    def __init__(self, job_id: int, final: dict) -> None:
        super().__init__(f"job {job_id}: final state {final['state']} not recorded yet")
        self.job_id, self.final = job_id, final


def _backoff(attempt: int) -> float:
    return min(300.0, settings().retry_backoff_s * 2 ** max(0, attempt - 1))


def _rule_index(rule: str | None, store: JobStore) -> int:
    """Position of ``rule`` in the current rule set (SeriesNumber scheme); 9 if not there."""
    names = [r.name for r in current_rules(store).rules]
    return names.index(rule) if rule in names else 9


def process_tag(kind: str) -> str:
    """``<kind>:<host>:<pid>`` — names a lease owner or an in-process queue (see :func:`dead`)."""
    return f"{kind}:{_HOST}:{os.getpid()}"


def dead(tag: str | None) -> bool:
    """Whether the process a tag names is known to have ended (only knowable on this host)."""
    parts = (tag or "").split(":")
    if len(parts) < 3 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    return not psutil.pid_exists(int(parts[2]))


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class _Lease:
    """Heartbeat of one attempt: renews its lease, records the current step and peak RSS."""

    def __init__(self, store: JobStore, job_id: int, owner: str) -> None:
        self.store, self.job_id, self.owner = store, job_id, owner
        self.step = "fetch"
        self.peak = _rss_mb()
        self.lost = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._wake.set()  # first record at once
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)
        self._thread.start()

    def at(self, step: str) -> None:
        self.step = step
        self._wake.set()  # record the step now: a worker killed in it is reported with it

    def _run(self) -> None:
        lease = settings().lease_s
        written = (None, 0.0)
        next_renew = time.monotonic() + lease / 4
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.peak = peak = max(self.peak, _rss_mb())
            step = self.step
            # write on schedule, and early when the step changes or memory grows (poison report)
            if (
                time.monotonic() < next_renew
                and written[0] == step
                and (peak < written[1] * 1.25 + 50)
            ):
                continue
            try:
                ok = self.store.renew_lease(
                    self.job_id, self.owner, time.time() + lease,
                    last_step=step[:128], peak_rss_mb=round(peak, 1),
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001  (store outage: keep trying; the lease says how long)
                log.warning(
                    "job=%d event=lease_renew_failed error=%s", self.job_id, type(e).__name__
                )
                next_renew = time.monotonic() + 1.0
                continue
            if not ok:
                self.lost = True
                log.warning("job=%d event=lease_lost owner=%s", self.job_id, self.owner)
                return
            written = (step, peak)
            next_renew = time.monotonic() + lease / 4

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, _rss_mb())


def _loss_info(job: Job) -> str:
    rss = f"{job.peak_rss_mb:.0f} MB" if job.peak_rss_mb is not None else "unknown"
    return f"last step {job.last_step or 'none'}, peak RSS {rss}"


def requeue_lost(
    store: JobStore, job: Job, cause: str, disp: Dispatcher | None = None
) -> Job | None:
    """The attempt holding ``job`` is gone (``cause``: "worker lost", "lease expired"): back off
    and requeue it, or fail it as a poison job after ``SPRIM_MAX_WORKER_LOSSES``."""
    losses = (job.worker_losses or 0) + 1
    guard = {"lease_owner": job.lease_owner}
    now = time.time()
    if losses >= settings().max_worker_losses:
        msg = f"worker lost {losses} times ({_loss_info(job)})"
        out = retrying(
            store.transition, job.id, "failed", expect=("running",), where=guard,
            detail=f"{cause}; {msg}", error=msg, finished_at=now, worker_losses=losses,
            lease_owner=None, lease_expires_at=None,
        )  # fmt: skip
        if out:
            log.error("job=%d event=failed error=%s", job.id, msg)
        return out
    delay = _backoff(losses)
    why = f"{cause} (worker {(job.lease_owner or '?').split(':', 1)[-1]}, {_loss_info(job)})"
    out = retrying(
        store.transition, job.id, "queued", expect=("running",), where=guard,
        detail=f"{why}; retry in {delay:.0f}s", error=why, worker_losses=losses,
        not_before=now + delay, dispatched_at=None, dispatched_to=None,
        lease_owner=None, lease_expires_at=None,
    )  # fmt: skip
    if out:
        log.warning("job=%d event=requeued cause=%r delay=%.1f", job.id, why, delay)
        _release_later(disp, delay)
    return out


def recover(store: JobStore | None = None, disp: Dispatcher | None = None) -> int:
    """Requeue jobs whose lease lapsed, jobs handed to an in-process queue that died, and jobs
    handed to the broker ``SPRIM_LEASE_S`` ago that never started (a message lost with a broker:
    sent again; a duplicate message finds the job running or final and is dropped).

    Called before every release (so the window never counts them); returns how many moved.
    """
    store = store or open_store()
    now = time.time()
    n = 0
    for job in store.lapsed(now, dead, stale_before=now - settings().lease_s):
        if job.state == "running":
            cause = "worker lost" if dead(job.lease_owner) else "lease expired"
            n += requeue_lost(store, job, cause, disp) is not None
            continue
        why = (
            f"sent to the broker {now - (job.dispatched_at or now):.0f} s ago, never started"
            if job.dispatched_to is None
            else "its in-process queue ended with its process"
        )
        out = store.transition(
            job.id, "queued", expect=("queued",),
            where={"dispatched_to": job.dispatched_to, "dispatched_at": job.dispatched_at},
            detail=f"{why}; released again", dispatched_at=None, dispatched_to=None,
        )  # fmt: skip
        n += out is not None
    return n


def _release_later(disp: Dispatcher | None, delay: float) -> None:
    try:
        (disp or dispatcher()).send_retry(None, delay)
    except Exception:  # noqa: BLE001  (the periodic release catches up)
        log.warning("event=release_later_failed delay=%.1f", delay)


_REASONS = {  # internal errors that have a plainer name
    "SoftTimeLimitExceeded": "time limit exceeded (SPRIM_STEP_TIME_LIMIT_S)",
}


def _plain(reason: str) -> str:
    """A failure reason for the job record: known internal errors by their plain name, the
    others pointing at the worker log (where the traceback is)."""
    plain = dict(_REASONS)
    if settings().job_memory_mb:
        plain["MemoryError"] = (
            f"memory limit of {settings().job_memory_mb} MB exceeded (SPRIM_JOB_MEMORY_MB)"
        )
    for name, text in plain.items():
        reason = re.sub(rf"internal error \({name}\)( — see worker log)?", text, reason)
    return re.sub(
        r"internal error \((\w+)\)(?! —)", r"internal error (\1) — see worker log", reason
    )


def execute_job(
    job_id: int,
    store: JobStore | None = None,
    disp: Dispatcher | None = None,
    *,
    redelivered: bool = False,
) -> Job | None:
    """Run one job to a final state, or requeue it with a reason; safe to call again.

    ``redelivered``: the broker gave this message back because its previous holder died. A job
    already final, or held by a live attempt (a duplicate message), or waiting for its retry
    time, is left alone. Store outages are retried for ``SPRIM_STORE_RETRY_S``; then
    :class:`~workers.jobstore.StoreUnavailable` (nothing recorded yet: send the job again) or
    :class:`CompletionPending` (outputs stored, final state to record: see :func:`record_final`).
    """
    from workers.plugins import load_plugins

    load_plugins()
    store = store or open_store()
    job = retrying(store.get, job_id)
    if job is None:
        log.warning("job=%s event=unknown_job", job_id)
        return None
    if job.state in FINAL:
        log.info("job=%d event=skip state=%s", job.id, job.state)
        return job
    now = time.time()
    if job.state == "running":
        held = job.lease_expires_at is not None and job.lease_expires_at > now
        if dead(job.lease_owner) or (redelivered and not _local(job.lease_owner)):
            return requeue_lost(store, job, "worker lost", disp)
        if not held:
            return requeue_lost(store, job, "lease expired", disp)
        log.info("job=%d event=skip reason=held owner=%s", job.id, job.lease_owner)
        return job
    if job.not_before and job.not_before > now:
        log.info("job=%d event=skip reason=waiting retry_at=%.0f", job.id, job.not_before)
        return job
    max_attempts = settings().max_attempts
    if job.attempts >= max_attempts:
        msg = f"gave up after {job.attempts} attempts ({job.error or 'archive unavailable'})"
        job = retrying(
            store.transition, job.id, "failed", expect=("queued",), detail=msg, error=msg,
            finished_at=now,
        )  # fmt: skip
        log.error("job=%d event=failed error=%s", job_id, msg)
        _release_after(store, disp)
        return job
    attempt = job.attempts + 1
    owner = f"{process_tag('w')}:{attempt}:{uuid.uuid4().hex[:6]}"
    detail = f"attempt {attempt}" + (f" after: {job.error}" if job.error else "")
    started = retrying(
        store.transition, job.id, "running", expect=("queued",), detail=detail[:2000],
        attempts=attempt, started_at=now, error=None, not_before=None, lease_owner=owner,
        lease_expires_at=now + settings().lease_s, last_step="fetch", peak_rss_mb=None,
    )  # fmt: skip
    if started is None:  # cancelled, or another message started it meanwhile
        return store.get(job_id)
    log.info("job=%d event=started attempt=%d rule=%s study=%s series=%s",
             job.id, attempt, job.rule or job.requester, job.study_uid, job.series_uid)  # fmt: skip
    lease = _Lease(store, job.id, owner)
    try:
        final = _attempt(store, started, lease)
    except Exception as e:  # a bug outside the steps: the job still ends, with a reason
        log.exception("job=%d event=internal_error", job.id)
        msg = f"internal error ({type(e).__name__}) — see worker log"
        final = {"state": "failed", "expect": ("running",), "attempt": attempt, "detail": msg,
                 "values": {"error": msg, "finished_at": time.time()}}  # fmt: skip
    finally:
        lease.stop()
    final["values"]["peak_rss_mb"] = round(lease.peak, 1)
    final["values"]["last_step"] = lease.step[:128]
    if final["state"] == "queued":  # transient archive error
        final["values"]["not_before"] = time.time() + final.pop("delay")
    try:
        out = retrying(_record, store, job.id, final)
    except StoreUnavailable:
        log.error("job=%d event=completion_pending state=%s", job.id, final["state"])
        raise CompletionPending(job.id, final) from None
    _after(store, job.id, out, final, disp)
    return out or store.get(job.id)


def _local(owner: str | None) -> bool:
    parts = (owner or "").split(":")
    return len(parts) > 2 and parts[1] == _HOST


def _record(store: JobStore, job_id: int, final: dict) -> Job | None:
    return store.transition(
        job_id, final["state"], expect=final["expect"], where={"attempts": final["attempt"]},
        detail=final["detail"], lease_owner=None, lease_expires_at=None, **final["values"],
    )  # fmt: skip


def record_final(
    job_id: int, final: dict, store: JobStore | None = None, disp: Dispatcher | None = None
) -> Job | None:
    """Record a final state kept by :class:`CompletionPending` (idempotent: its outputs are in
    the archive already; dropped when another attempt started since)."""
    store = store or open_store()
    final = {**final, "expect": ("running", "queued")}
    out = retrying(_record, store, job_id, final)
    if out is None:
        log.info("job=%d event=completion_dropped reason=job moved on", job_id)
    _after(store, job_id, out, final, disp)
    return out or store.get(job_id)


def _after(store: JobStore, job_id: int, out: Job | None, final: dict, disp) -> None:
    if out is None:
        log.warning(
            "job=%d event=result_dropped reason=lease lost (another attempt owns it)", job_id
        )
    elif final["state"] == "queued":
        delay = max(0.0, (out.not_before or 0) - time.time())
        log.warning("job=%d event=retry attempt=%d delay=%.1f error=%s",
                    job_id, out.attempts, delay, out.error)  # fmt: skip
        _release_later(disp, delay)
        return
    elif final["state"] == "done":
        log.info("job=%d event=done objects=%d seconds=%.2f", job_id,
                 sum(len(o["instances"]) for o in out.outputs), sum(out.timings.values()))  # fmt: skip
    else:
        log.error("job=%d event=%s error=%s", job_id, final["state"],
                  (out.error or "").replace("\n", " ")[:500])  # fmt: skip
    _release_after(store, disp)


def _attempt(store: JobStore, job: Job, lease: _Lease) -> dict:
    """Run one attempt; return the final transition to record (never raises for the job)."""
    from workers.runner import StepCall, run_steps
    from workers.series import read_series, scan

    work = settings().work_dir / f"job-{job.id}-a{job.attempts}-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}

    def final(state: str, detail: str, **values: Any) -> dict:
        values.setdefault("finished_at", time.time())
        values["timings"] = {k: round(v, 4) for k, v in timings.items()}
        return {"state": state, "expect": ("running",), "attempt": job.attempts,
                "detail": detail[:2000], "values": values}  # fmt: skip

    def failed(msg: str) -> dict:
        return final("failed", msg, error=msg)

    try:
        calls = []
        for s in job.steps:
            try:
                st = get_step(s["use"])
            except KeyError:
                return failed(f"bad job parameters: unknown step {s.get('use')!r}")
            try:
                calls.append(StepCall(st, st.validate(s.get("with") or {})))
            except ValidationError as e:
                return failed(f"bad job parameters: {st.name}: {e}")
        rule_index = retrying(_rule_index, job.rule, store)
        t0 = time.perf_counter()
        archive = archive_for(job.archive)
        files = archive.fetch_series(job.study_uid, job.series_uid or "", work / "in")
        timings["fetch"] = time.perf_counter() - t0
        lease.at("read")
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
        report = run_steps(
            source, calls, job.rule or "reprocess", work / "out", progress=lease.at,
            description_suffix=job.description_suffix or "", rule_index=rule_index,
        )  # fmt: skip
        for sr in report.steps:
            timings[sr.name] = timings.get(sr.name, 0.0) + sr.seconds
        written, state = report.written, report.state
        failures = [_plain(str(f)) for f in report.failures]
        lease.at("store")
        t0 = time.perf_counter()
        if written:
            dest = archive_for(job.destination) if job.destination else archive
            dest.store([w.path for w in written])
        timings["store"] = time.perf_counter() - t0
    except ArchiveError as e:
        if e.transient and job.attempts < settings().max_attempts:
            delay = _backoff(job.attempts)
            why = f"archive transient error: {e}"
            return {**final("queued", f"{why}; retry in {delay:.0f}s", error=why, finished_at=None,
                            dispatched_at=None, dispatched_to=None), "delay": delay}  # fmt: skip
        return failed(
            f"archive: {e.reason or e}"
            if not e.transient
            else f"archive unavailable after {job.attempts} attempts: {e}"
        )
    except (StepError, SeriesError) as e:  # input defects: as they are, no retry
        return failed(str(e))
    except MemoryError:
        log.exception("job=%d event=memory_error", job.id)
        return failed(_plain("internal error (MemoryError)"))
    except Exception as e:  # bugs (and time limits): no retry, traceback in the log only
        log.exception("job=%d event=internal_error", job.id)
        name = type(e).__name__
        return failed(_plain(f"internal error ({name})"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outputs: dict[str, dict] = {}
    for w in written:
        o = outputs.setdefault(w.series_uid, {
            "series_uid": w.series_uid, "kind": w.kind, "series_number": w.series_number,
            "series_description": w.series_description,
            "sop_class_uid": w.sop_class_uid, "instances": [],
            "notes": list(w.notes),  # what the writer changed in copied source attributes
        })  # fmt: skip
        o["instances"].append(w.sop_instance_uid)
    stored = f"{len(written)} objects stored"
    if state == "done":
        return final("done", stored, outputs=list(outputs.values()), error=None)
    why = "; ".join(failures)
    return final(state, f"{stored}; failed: {why}" if written else why,
                 outputs=list(outputs.values()), error=why)  # fmt: skip


def sweep_work(store: JobStore | None = None, root: Path | None = None) -> int:
    """Remove ``SPRIM_HOME/work/job-*`` folders (or ``root``'s) of attempts no longer running.

    A folder is kept only while its job is ``running`` that very attempt (``job-<id>-a<n>-…``)
    and its owner is not known dead. Returns how many folders were removed. A long-running
    caller passes the store and folder it was started with: the job ids are that store's.
    """
    root = root or settings().work_dir
    if not root.is_dir():
        return 0
    store = store or open_store()
    n = 0
    for d in root.iterdir():
        m = re.fullmatch(r"job-(\d+)-(?:a(\d+)-)?[0-9a-f]+", d.name)
        if not m or not d.is_dir():
            continue
        job = store.get(int(m.group(1)))
        alive = (
            job is not None and job.state == "running" and m.group(2) is not None
            and int(m.group(2)) == job.attempts and not dead(job.lease_owner)
        )  # fmt: skip
        if not alive:
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    if n:
        log.info("event=work_swept folders=%d", n)
    return n


def _release_after(store: JobStore, disp: Dispatcher | None) -> None:
    try:
        release(store, disp)
    except Exception as e:  # noqa: BLE001  (the periodic release catches up)
        log.warning("event=release_failed error=%s", type(e).__name__)
