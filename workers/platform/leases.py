"""Leases: a running attempt holds one its heartbeat renews; what happens when it lapses.

:func:`recover` (before every release) requeues jobs whose lease lapsed, with backoff, and
fails poison jobs after ``SPRIM_MAX_WORKER_LOSSES``; :func:`sweep_work` removes work folders of
attempts no longer running. Lease owners are named ``<kind>:<host>:<pid>`` (:func:`process_tag`)
so a process can tell whether the owner of a lease is known to have died.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil

from workers.core.config import settings
from workers.platform.dispatcher import Dispatcher, release_later
from workers.platform.jobstore import Job, JobStore, open_store, retrying

log = logging.getLogger("sprim.jobs")


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


def process_tag(kind: str) -> str:
    """``<kind>:<host>:<pid>`` — names a lease owner or an in-process queue (see :func:`dead`)."""
    return f"{kind}:{_HOST}:{os.getpid()}"


def dead(tag: str | None) -> bool:
    """Whether the process a tag names is known to have ended (only knowable on this host)."""
    parts = (tag or "").split(":")
    if len(parts) < 3 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    return not psutil.pid_exists(int(parts[2]))


def is_local(owner: str | None) -> bool:
    parts = (owner or "").split(":")
    return len(parts) > 2 and parts[1] == _HOST


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def backoff(attempt: int) -> float:
    return min(300.0, settings().retry_backoff_s * 2 ** max(0, attempt - 1))


class Lease:
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
        written: tuple[str | None, float] = (None, 0.0)
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
    delay = backoff(losses)
    why = f"{cause} (worker {(job.lease_owner or '?').split(':', 1)[-1]}, {_loss_info(job)})"
    out = retrying(
        store.transition, job.id, "queued", expect=("running",), where=guard,
        detail=f"{why}; retry in {delay:.0f}s", error=why, worker_losses=losses,
        not_before=now + delay, dispatched_at=None, dispatched_to=None,
        lease_owner=None, lease_expires_at=None,
    )  # fmt: skip
    if out:
        log.warning("job=%d event=requeued cause=%r delay=%.1f", job.id, why, delay)
        release_later(disp, delay)
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
