"""Execution of one job: fetch -> read_series -> run_steps -> store, the same code in-process
and in Celery workers.

``done`` only after the archive confirmed every output (``partial`` when some outputs failed).
Input defects fail the job at once; transient archive errors requeue it with a retry time until
``SPRIM_MAX_ATTEMPTS``. A running attempt holds a lease (:mod:`workers.platform.leases`).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipelines import StepError, get_step
from workers.archives import Archive, ArchiveError
from workers.core import metrics
from workers.core.config import settings
from workers.platform.dispatcher import Dispatcher, release_later
from workers.platform.jobstore import FINAL, Job, JobStore, StoreUnavailable, open_store, retrying
from workers.platform.leases import Lease, backoff, dead, is_local, process_tag, requeue_lost
from workers.platform.storing import OutputStore, overlap_s
from workers.platform.submission import archive_for, release_after
from workers.processing.previews import job_previews_dir, keep
from workers.processing.routing import current_rules
from workers.reading.source import SeriesError

if TYPE_CHECKING:  # the runner and readers are imported when a job runs (CLI start-up time)
    from workers.processing.runner import RunReport, StepCall
    from workers.reading.source import SourceSeries
    from workers.writers import WrittenObject

log = logging.getLogger("sprim.jobs")


class CompletionPending(Exception):
    """The job store stayed unreachable when a job's final state had to be recorded.

    ``final`` (JSON) records it later (:func:`record_final`): the caller must keep it somewhere
    durable (Celery: a retry message), never drop it — the outputs are in the archive already.
    """

    def __init__(self, job_id: int, final: dict) -> None:
        super().__init__(f"job {job_id}: final state {final['state']} not recorded yet")
        self.job_id, self.final = job_id, final


def _rule_index(rule: str | None, store: JobStore) -> int:
    """Position of ``rule`` in the current rule set (SeriesNumber scheme); 9 if not there."""
    names = [r.name for r in current_rules(store).rules]
    return names.index(rule) if rule in names else 9


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
    :class:`~workers.platform.jobstore.StoreUnavailable` (nothing recorded yet: send the job
    again) or :class:`CompletionPending` (outputs stored, final state to record: see
    :func:`record_final`).
    """
    from workers.core.plugins import load_plugins

    load_plugins()
    store = store or open_store()
    job = retrying(store.get, job_id)
    if job is None:
        log.warning("job=%s event=unknown_job", job_id)
        return None
    started, run = _claim(store, job, disp, redelivered)
    if not run or started is None:
        return started
    final, lease = _run_attempt(store, started)
    return _finish(store, started, final, lease, disp)


def _claim(
    store: JobStore, job: Job, disp: Dispatcher | None, redelivered: bool
) -> tuple[Job | None, bool]:
    """Decide what this delivery does with ``job``: start an attempt (``(job, True)``: running,
    leased to this process) or not (``(job as it is now, False)``)."""
    if job.state in FINAL:
        log.info("job=%d event=skip state=%s", job.id, job.state)
        return job, False
    now = time.time()
    if job.state == "running":
        held = job.lease_expires_at is not None and job.lease_expires_at > now
        if dead(job.lease_owner) or (redelivered and not is_local(job.lease_owner)):
            return requeue_lost(store, job, "worker lost", disp), False
        if not held:
            return requeue_lost(store, job, "lease expired", disp), False
        log.info("job=%d event=skip reason=held owner=%s", job.id, job.lease_owner)
        return job, False
    if job.not_before and job.not_before > now:
        log.info("job=%d event=skip reason=waiting retry_at=%.0f", job.id, job.not_before)
        return job, False
    if job.attempts >= settings().max_attempts:
        msg = f"gave up after {job.attempts} attempts ({job.error or 'archive unavailable'})"
        out = retrying(
            store.transition, job.id, "failed", expect=("queued",), detail=msg, error=msg,
            finished_at=now,
        )  # fmt: skip
        log.error("job=%d event=failed error=%s", job.id, msg)
        release_after(store, disp)
        return out, False
    attempt = job.attempts + 1
    owner = f"{process_tag('w')}:{attempt}:{uuid.uuid4().hex[:6]}"
    detail = f"attempt {attempt}" + (f" after: {job.error}" if job.error else "")
    started = retrying(
        store.transition, job.id, "running", expect=("queued",), detail=detail[:2000],
        attempts=attempt, started_at=now, error=None, not_before=None, lease_owner=owner,
        lease_expires_at=now + settings().lease_s, last_step="fetch", peak_rss_mb=None,
    )  # fmt: skip
    if started is None:  # cancelled, or another message started it meanwhile
        return store.get(job.id), False
    log.info("job=%d event=started attempt=%d rule=%s study=%s series=%s",
             job.id, attempt, job.rule or job.requester, job.study_uid, job.series_uid)  # fmt: skip
    return started, True


def _run_attempt(store: JobStore, job: Job) -> tuple[dict, Lease]:
    """Run the attempt under its lease; a bug outside the steps still ends the job with a reason."""
    lease = Lease(store, job.id, job.lease_owner or "")
    try:
        final = _attempt(store, job, lease)
    except Exception as e:  # noqa: BLE001  (any bug: the job ends, the worker keeps serving)
        log.exception("job=%d event=internal_error", job.id)
        msg = f"internal error ({type(e).__name__}) — see worker log"
        final = {"state": "failed", "expect": ("running",), "attempt": job.attempts, "detail": msg,
                 "values": {"error": msg, "finished_at": time.time()}}  # fmt: skip
    finally:
        lease.stop()
    final["values"]["peak_rss_mb"] = round(lease.peak, 1)
    final["values"]["last_step"] = lease.step[:128]
    metrics.attempt_finished(
        job.rule, final["state"], job.started_at, final["values"].get("timings", {})
    )
    if final["state"] == "queued":  # transient archive error
        final["values"]["not_before"] = time.time() + final.pop("delay")
    return final, lease


def _finish(
    store: JobStore, job: Job, final: dict, lease: Lease, disp: Dispatcher | None
) -> Job | None:
    """Record the attempt's final state (or hand it to the caller if the store stays away)."""
    try:
        out = retrying(_record, store, job.id, final)
    except StoreUnavailable:
        log.error("job=%d event=completion_pending state=%s", job.id, final["state"])
        raise CompletionPending(job.id, final) from None
    _after(store, job.id, out, final, disp)
    return out or store.get(job.id)


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
        release_later(disp, delay)
        return
    elif final["state"] == "done":
        metrics.stable_to_stored(out, store.study)
        objects = sum(len(o["instances"]) for o in out.outputs)
        log.info("job=%d event=done objects=%d seconds=%.2f", job_id, objects,
                 sum(out.timings.values()))  # fmt: skip
    else:
        log.error("job=%d event=%s error=%s", job_id, final["state"],
                  (out.error or "").replace("\n", " ")[:500])  # fmt: skip
    release_after(store, disp)


def _attempt(store: JobStore, job: Job, lease: Lease) -> dict:
    """Run one attempt: fetch, read, run the steps, store; return the final transition to
    record (never raises for the job)."""
    return _Attempt(store, job, lease).run()


class _Attempt:
    """One attempt of a job, from its work folder to the final transition to record."""

    def __init__(self, store: JobStore, job: Job, lease: Lease) -> None:
        self.store, self.job, self.lease = store, job, lease
        self.work = settings().work_dir / f"job-{job.id}-a{job.attempts}-{uuid.uuid4().hex[:8]}"
        self.timings: dict[str, float] = {}

    def final(self, state: str, detail: str, **values: Any) -> dict:
        values.setdefault("finished_at", time.time())
        values["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return {"state": state, "expect": ("running",), "attempt": self.job.attempts,
                "detail": detail[:2000], "values": values}  # fmt: skip

    def failed(self, msg: str) -> dict:
        return self.final("failed", msg, error=msg)

    def run(self) -> dict:
        job = self.job
        try:
            report = self._compute_and_store()
            # Previews of the stored outputs outlive the work folder (the console shows them).
            previews_dir = job_previews_dir(job.id)
            kept = keep(report.previews, previews_dir, {w.series_uid for w in report.written})
        except ArchiveError as e:
            return self._archive_failure(e)
        except (StepError, SeriesError) as e:  # input defects: as they are, no retry
            metrics.refused(e)
            return self.failed(str(e))
        except MemoryError:
            log.exception("job=%d event=memory_error", job.id)
            return self.failed(_plain("internal error (MemoryError)"))
        except Exception as e:  # noqa: BLE001  (bugs, time limits: no retry, traceback in the log only)
            log.exception("job=%d event=internal_error", job.id)
            return self.failed(_plain(f"internal error ({type(e).__name__})"))
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        records = _output_records(report.written)
        for o in records:  # paths relative to the job's previews folder
            o["previews"] = [
                p.record(previews_dir) for p in kept if p.series_uid == o["series_uid"]
            ]
        stored = f"{len(report.written)} objects stored"
        if report.state == "done":
            return self.final("done", stored, outputs=records, error=None)
        why = "; ".join(_plain(str(f)) for f in report.failures)
        return self.final(report.state, f"{stored}; failed: {why}" if report.written else why,
                          outputs=records, error=why)  # fmt: skip

    def _compute_and_store(self) -> RunReport:
        """Fetch and read the series, run the steps; each output is stored as soon as it is
        written, while the next steps compute. Returns once every output is confirmed."""
        from workers.processing.runner import run_steps

        job, lease, timings = self.job, self.lease, self.timings
        calls = _step_calls(job)
        rule_index = retrying(_rule_index, job.rule, self.store)
        archive = archive_for(job.archive)
        dest = archive_for(job.destination) if job.destination else archive
        source = _fetch_and_read(job, archive, self.work / "in", lease, timings)
        with OutputStore(dest, job.id, settings().store_parallel) as outputs:

            def progress(step: str) -> None:
                outputs.check()  # a transient store error ends the attempt now
                lease.at(step)

            report = run_steps(
                source, calls, job.rule or "reprocess", self.work / "out", progress=progress,
                description_suffix=job.description_suffix or "", rule_index=rule_index,
                on_output=outputs.submit,
            )  # fmt: skip
            steps_end = time.time()
            del source  # the steps are over: memory for the stores (the memo may keep it)
            for sr in report.steps:
                timings[sr.name] = timings.get(sr.name, 0.0) + sr.seconds
            lease.at("store")
            t0 = time.perf_counter()
            stored = outputs.finish(report)
            timings["store"] = time.perf_counter() - t0  # the wait after the last step
        log.info("job=%d event=stores outputs=%d during_steps_s=%.2f after_steps_s=%.2f",
                 job.id, len(stored), overlap_s(stored, steps_end), timings["store"])  # fmt: skip
        return report

    def _archive_failure(self, e: ArchiveError) -> dict:
        """Transient: requeued with backoff while attempts remain; permanent: failed."""
        job = self.job
        metrics.archive_error("fetch" if self.lease.step == "fetch" else "store", e.transient)
        if e.transient and job.attempts < settings().max_attempts:
            delay = backoff(job.attempts)
            why = f"archive transient error: {e}"
            queued = self.final(
                "queued", f"{why}; retry in {delay:.0f}s", error=why, finished_at=None,
                dispatched_at=None, dispatched_to=None,
            )  # fmt: skip
            return {**queued, "delay": delay}
        return self.failed(
            f"archive: {e.reason or e}"
            if not e.transient
            else f"archive unavailable after {job.attempts} attempts: {e}"
        )


def _step_calls(job: Job) -> list[StepCall]:
    """The job's steps with validated params; a bad step or param refuses the job."""
    from workers.processing.runner import StepCall

    calls = []
    for s in job.steps:
        try:
            st = get_step(s["use"])
        except KeyError:
            raise StepError(f"bad job parameters: unknown step {s.get('use')!r}") from None
        try:
            calls.append(StepCall(st, st.validate(s.get("with") or {})))
        except ValidationError as e:
            raise StepError(f"bad job parameters: {st.name}: {e}") from None
    return calls


def _fetch_and_read(
    job: Job, archive: Archive, dest: Path, lease: Lease, timings: dict[str, float]
) -> SourceSeries:
    """The job's series read through the gate: fetched into ``dest``, or shared with the other
    jobs of the same series content (:mod:`workers.platform.seriescache`)."""
    from workers.platform.seriescache import load_series

    loaded = load_series(
        archive, job.study_uid, job.series_uid or "", dest, on_read=lambda: lease.at("read")
    )
    timings["fetch"], timings["read"] = loaded.fetch_s, loaded.read_s
    return loaded.source


def _output_records(written: list[WrittenObject]) -> list[dict]:
    """One record per derived series stored: its UIDs, number, description and notes."""
    outputs: dict[str, dict] = {}
    for w in written:
        o = outputs.setdefault(w.series_uid, {
            "series_uid": w.series_uid, "kind": w.kind, "series_number": w.series_number,
            "series_description": w.series_description,
            "sop_class_uid": w.sop_class_uid, "instances": [],
            "notes": list(w.notes),  # what the writer changed in copied source attributes
        })  # fmt: skip
        o["instances"].append(w.sop_instance_uid)
    return list(outputs.values())
