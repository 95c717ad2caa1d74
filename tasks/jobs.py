"""Thin tasks: run a job, route a study after its quiet period, release waiting jobs.

Task state tells the truth: a job that ends ``failed`` or ``partial`` makes its task end in
FAILURE with the job's reason (:class:`JobFailed`, raised after the state is recorded; acked, no
Celery retry). A job whose state could not be recorded (job store unreachable) is never acked
without it: the task is retried later, carrying the final state when the outputs are stored.
"""

from __future__ import annotations

import logging
import threading

from celery import signals
from celery.exceptions import TimeLimitExceeded

from tasks.app import app, dead_letter_queue
from tasks.celery_dispatcher import CeleryDispatcher
from workers.core.config import settings
from workers.core.plugins import load_plugins
from workers.platform import dispatcher, executor, leases, submission
from workers.platform.jobstore import StoreUnavailable, after_fork, open_store, retrying

log = logging.getLogger("sprim.tasks")
DISPATCHER = CeleryDispatcher()
dispatcher.set_dispatcher(DISPATCHER)
load_plugins()  # SPRIM_PLUGINS step modules: registered in every worker process


class JobFailed(Exception):
    """The job ended ``failed`` or ``partial`` (its state is recorded in the job store)."""


def _store_retry_delay(retries: int) -> float:
    return min(60.0, 5.0 * 2 ** min(retries, 4))


@app.task(
    name="sprim.run_job", bind=True, acks_late=True, reject_on_worker_lost=True,
    throws=(JobFailed,), max_retries=None,
)  # fmt: skip
def run_job(self, job_id: int, final: dict | None = None) -> str | None:
    """Execute a job (or record the final state an earlier delivery could not record)."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    try:
        if final is not None:
            job = executor.record_final(job_id, final, disp=DISPATCHER)
        else:
            job = executor.execute_job(job_id, disp=DISPATCHER, redelivered=redelivered)
    except executor.CompletionPending as e:
        raise self.retry(
            args=[job_id],
            kwargs={"final": e.final},
            countdown=_store_retry_delay(self.request.retries),
        ) from None
    except StoreUnavailable as e:
        log.warning(
            "job=%s event=store_unreachable retry=%d error=%s", job_id, self.request.retries, e
        )
        raise self.retry(
            args=[job_id], kwargs={}, countdown=_store_retry_delay(self.request.retries)
        ) from None
    if job is not None and job.state in ("failed", "partial"):
        raise JobFailed(f"job {job.id} {job.state}: {job.error}")
    return job.state if job else None


@app.task(name="sprim.route_study", bind=True, acks_late=True, max_retries=None)
def route_study(self, study_uid: str, seq: int, rules: list[str]) -> int:
    """Route a study whose quiet period elapsed (superseded if it changed since ``seq``)."""
    try:
        return len(retrying(submission.route_due, study_uid, seq, rules, disp=DISPATCHER))
    except StoreUnavailable:
        raise self.retry(countdown=_store_retry_delay(self.request.retries)) from None


@app.task(name="sprim.release")
def release() -> int:
    try:
        return len(submission.release(disp=DISPATCHER))
    except Exception as e:  # noqa: BLE001  (store outage: the periodic release catches up)
        log.warning("event=release_failed error=%s", type(e).__name__)
        return 0


@signals.task_failure.connect
def _on_failure(sender=None, task_id=None, exception=None, args=None, **_kw) -> None:
    """A hard time limit killed the job's process: record it as failed (no retry)."""
    if getattr(sender, "name", "") != "sprim.run_job" or not isinstance(
        exception, TimeLimitExceeded
    ):
        return
    job_id = args[0] if args else None
    if job_id is None:
        return
    msg = f"hard time limit exceeded ({exception})"
    open_store().transition(
        job_id, "failed", expect=("running", "queued"), error=msg, detail=msg,
        lease_owner=None, lease_expires_at=None,
    )  # fmt: skip
    log.error("job=%s event=failed error=%s", job_id, msg)
    submission.release(disp=DISPATCHER)


@signals.worker_process_init.connect
def _after_fork(**_kw) -> None:
    after_fork()
    _limit_memory()


def _limit_memory() -> None:
    """``SPRIM_JOB_MEMORY_MB``: RLIMIT_AS of this pool process (see docs/platform.md)."""
    mb = settings().job_memory_mb
    if mb:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mb * 2**20, resource.RLIM_INFINITY))


@signals.worker_ready.connect
def _start_release_loop(**_kw) -> None:
    """Declare the dead-letter queue; sweep dead attempts' work folders; release waiting jobs
    periodically (after a restart, retry times, lapsed leases)."""
    try:
        with app.connection_for_write() as conn:
            dead_letter_queue()(conn.default_channel).declare()
    except Exception:
        log.exception("event=dead_letter_declare_failed")

    def tick() -> None:
        try:
            leases.sweep_work()
            submission.release(disp=DISPATCHER)
        except Exception as e:  # noqa: BLE001  (store or broker outage: next tick)
            log.warning("event=release_loop_error error=%s", type(e).__name__)

    def loop() -> None:
        stop = threading.Event()
        tick()
        while not stop.wait(max(1.0, settings().release_interval_s)):
            tick()

    threading.Thread(target=loop, name="sprim-release", daemon=True).start()
