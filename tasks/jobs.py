"""Thin tasks: run a job, route a study after its quiet period, release waiting jobs."""

from __future__ import annotations

import logging
import threading

from celery import signals
from celery.exceptions import TimeLimitExceeded

from tasks.app import app, dead_letter_queue
from tasks.dispatch import CeleryDispatcher
from workers import jobs
from workers.config import settings
from workers.jobstore import _STORES, open_store
from workers.plugins import load_plugins

log = logging.getLogger("sprim.tasks")
DISPATCHER = CeleryDispatcher()
jobs.set_dispatcher(DISPATCHER)
load_plugins()  # SPRIM_PLUGINS step modules: registered in every worker process


@app.task(name="sprim.run_job", bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self, job_id: int) -> str | None:
    """Execute a job; transient archive errors come back later (backoff), others fail it."""
    try:
        job = jobs.execute_job(job_id, disp=DISPATCHER)
    except jobs.RetryLater as e:
        job = open_store().get(job_id)
        if job is not None:
            DISPATCHER.send_retry(job, e.delay_s)
        return "retry"
    return job.state if job else None


@app.task(name="sprim.route_study", acks_late=True)
def route_study(study_uid: str, seq: int, rules: list[str]) -> int:
    """Route a study whose quiet period elapsed (superseded if it changed since ``seq``)."""
    return len(jobs.route_due(study_uid, seq, rules, disp=DISPATCHER))


@app.task(name="sprim.release")
def release() -> int:
    return len(jobs.release(disp=DISPATCHER))


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
    open_store().transition(job_id, "failed", expect=("running", "queued"), error=msg, detail=msg)
    log.error("job=%s event=failed error=%s", job_id, msg)
    jobs.release(disp=DISPATCHER)


@signals.worker_process_init.connect
def _after_fork(**_kw) -> None:
    for store in _STORES.values():  # never share a parent's DB connections
        store.engine.dispose(close=False)


@signals.worker_ready.connect
def _start_release_loop(**_kw) -> None:
    """Declare the dead-letter queue; release waiting jobs periodically too (after a restart)."""
    try:
        with app.connection_for_write() as conn:
            dead_letter_queue()(conn.default_channel).declare()
    except Exception:
        log.exception("event=dead_letter_declare_failed")

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(max(1.0, settings().release_interval_s)):
            try:
                jobs.release(disp=DISPATCHER)
            except Exception:
                log.exception("event=release_loop_error")

    threading.Thread(target=loop, name="sprim-release", daemon=True).start()
