"""Dispatchers: who runs a job once the store releases it (dependency injection).

``workers`` never imports Celery: :class:`InProcessDispatcher` runs jobs in this process (the
embedded default); ``tasks.dispatch.CeleryDispatcher`` sends them to RabbitMQ.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Protocol

from workers.jobstore import Job, JobStore, open_store

log = logging.getLogger("sprim.jobs")


class Dispatcher(Protocol):
    """Hands work to whatever runs it (a thread here, Celery in ``tasks``)."""

    def send_job(self, job: Job) -> None:
        """Run ``execute_job(job.id)`` somewhere, at ``job.priority``."""

    def send_route(self, study_uid: str, seq: int, rules: list[str], delay_s: float) -> None:
        """Run ``route_due(study_uid, seq, rules)`` after ``delay_s`` seconds."""

    def send_retry(self, job: Job, delay_s: float) -> None:
        """Run ``execute_job(job.id)`` again after ``delay_s`` (transient archive error)."""


class RetryLater(Exception):
    """A transient archive error: run the job again after ``delay_s``."""

    def __init__(self, job_id: int, delay_s: float, cause: Exception) -> None:
        super().__init__(f"job {job_id}: retry in {delay_s:.0f}s: {cause}")
        self.job_id, self.delay_s, self.cause = job_id, delay_s, cause


class InProcessDispatcher:
    """Embedded default: runs jobs in this process, one at a time, in submission order.

    ``background=False`` (CLI) runs them before ``send_*`` returns (re-entrant calls queue up);
    ``background=True`` runs them in a daemon thread. Delays use timers.
    """

    def __init__(self, store: JobStore | None = None, *, background: bool = False) -> None:
        self.store = store
        self.background = background
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._draining = False

    def _push(self, fn, *args) -> None:
        with self._lock:
            self._queue.append((fn, args))
            if self._draining:
                return
            self._draining = True
        if self.background:
            threading.Thread(target=self._drain, daemon=True).start()
        else:
            self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                fn, args = self._queue.popleft()
            try:
                fn(*args)
            except RetryLater as e:
                job = (self.store or open_store()).get(e.job_id)
                if job is not None:
                    self.send_retry(job, e.delay_s)
            except Exception:
                log.exception("event=inprocess_error")

    def send_job(self, job: Job) -> None:
        from workers.jobs import execute_job

        self._push(execute_job, job.id, self.store, self)

    def send_retry(self, job: Job, delay_s: float) -> None:
        from workers.jobs import execute_job

        t = threading.Timer(delay_s, self._push, args=(execute_job, job.id, self.store, self))
        t.daemon = True
        t.start()

    def send_route(self, study_uid: str, seq: int, rules: list[str], delay_s: float) -> None:
        from workers.jobs import route_due

        args = (route_due, study_uid, seq, rules, self.store, self)
        if delay_s <= 0:
            self._push(*args)
            return
        t = threading.Timer(delay_s, self._push, args=args)
        t.daemon = True
        t.start()


_default_dispatcher: Dispatcher | None = None


def set_dispatcher(d: Dispatcher) -> None:
    """Install the process-wide dispatcher (``tasks`` installs the Celery one)."""
    global _default_dispatcher
    _default_dispatcher = d


def dispatcher() -> Dispatcher:
    global _default_dispatcher
    if _default_dispatcher is None:
        _default_dispatcher = InProcessDispatcher()
    return _default_dispatcher
