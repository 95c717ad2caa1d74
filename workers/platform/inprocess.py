"""The embedded dispatcher: jobs run in this process, no broker needed (``sprim run``-style
set-ups, ``sprim serve``/``watch``/``listen`` without ``SPRIM_BROKER_URL``, tests)."""

from __future__ import annotations

import logging
import threading
from collections import deque

from workers.core.config import settings
from workers.platform.executor import CompletionPending, execute_job, record_final
from workers.platform.jobstore import Job, JobStore, StoreUnavailable, open_store
from workers.platform.leases import process_tag, sweep_work
from workers.platform.submission import release, route_due

log = logging.getLogger("sprim.jobs")


class InProcessDispatcher:
    """Embedded default: runs jobs in this process, one at a time, in submission order.

    ``background=False`` (CLI) runs them before ``send_*`` returns (re-entrant calls queue up);
    ``background=True`` runs them in a daemon thread. Delays use timers. :meth:`start` (long
    running embedded services) recovers what a previous process left and releases periodically.
    """

    def __init__(self, store: JobStore | None = None, *, background: bool = False) -> None:

        self.store = store
        self.background = background
        self.ident = process_tag("p")  # jobs dispatched here die with this process
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._draining = False
        self._loop: threading.Thread | None = None
        self._timers: set[threading.Timer] = set()
        self._stopped = threading.Event()

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
            except CompletionPending as e:  # kept in memory; the lease covers a crash meanwhile
                self._later(5.0, record_final, e.job_id, e.final, self.store, self)
            except StoreUnavailable:
                if fn is execute_job:
                    self._later(5.0, fn, *args)
                log.warning("event=inprocess_store_unreachable")
            except Exception:
                log.exception("event=inprocess_error")

    def _later(self, delay_s: float, fn, *args) -> None:
        if self._stopped.is_set():
            return

        def fire() -> None:
            self._timers.discard(t)
            if not self._stopped.is_set():
                self._push(fn, *args)

        t = threading.Timer(delay_s, fire)
        t.daemon = True
        self._timers.add(t)
        t.start()

    def stop(self) -> None:
        """Cancel pending delayed work and the release loop (the process goes on without them:
        what is left is recovered by the next embedded process or release)."""
        self._stopped.set()
        for t in list(self._timers):
            t.cancel()
        self._timers.clear()

    def send_job(self, job: Job) -> None:

        self._push(execute_job, job.id, self.store, self)

    def send_retry(self, job: Job | None, delay_s: float) -> None:

        self._later(max(0.0, delay_s), release, self.store, self)

    def send_route(self, study_uid: str, seq: int, rules: list[str], delay_s: float) -> None:

        args = (route_due, study_uid, seq, rules, self.store, self)
        if delay_s <= 0:
            self._push(*args)
            return
        self._later(delay_s, *args)

    def start(self) -> None:
        """Recover (work folders, jobs of a previous process), then release every
        ``SPRIM_RELEASE_INTERVAL_S`` (retry times, lapsed leases) in a daemon thread."""
        if self._loop is not None:
            return
        # Bound now: the loop must never judge one store's work folders by another's jobs.
        self.store = self.store or open_store()
        work_dir = settings().work_dir

        def tick() -> None:
            try:
                sweep_work(self.store, work_dir)
                release(self.store, self)
            except Exception as e:  # noqa: BLE001  (store outage: next tick)
                log.warning("event=release_loop_error error=%s", type(e).__name__)

        def loop() -> None:
            while not self._stopped.wait(max(1.0, settings().release_interval_s)):
                tick()

        tick()
        self._loop = threading.Thread(target=loop, name="sprim-release", daemon=True)
        self._loop.start()
