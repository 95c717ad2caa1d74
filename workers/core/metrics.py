"""Prometheus metrics of sprim: one definition of every series, for the API and the workers.

Counters and histograms are process-local: the process that did the work counts it. The API
adds, at scrape time, what the job store holds now (:class:`StoreCensus`: jobs per state, queue
depth, dispatch window use). Celery's prefork pool runs jobs in child processes: workers use
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, one empty folder per worker;
served by ``tasks.metrics`` on ``SPRIM_METRICS_PORT``) and :func:`exposition` reads it.
``sprim watch`` and ``sprim listen`` serve theirs on ``SPRIM_METRICS_PORT`` (:func:`serve_metrics`).

Labels are bounded: rule names, institutions, step names, defect codes, states, operations —
never a study, series or job id.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "ARCHIVE_ERRORS", "JOBS", "JOB_SECONDS", "REFUSALS", "RELEASED", "STABLE_TO_STORED",
    "STEP_SECONDS", "STORE_SECONDS", "STORE_UNREACHABLE", "StoreCensus", "archive_error",
    "attempt_finished", "exposition", "job_entered", "refused", "rule_label", "stable_to_stored",
    "serve_metrics", "time_store_statements",
]  # fmt: skip

# Multiprocess mode writes a file per process there from the first metric on: it must exist.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_LATENCY_BUCKETS = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600)
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

JOBS = Counter(
    "sprim_jobs",
    "Jobs entering a state (created, or moved by a transition), by rule and institution.",
    ["state", "rule", "institution"],
)
STEP_SECONDS = Histogram(
    "sprim_step_duration_seconds",
    "Seconds of each phase of a job attempt: fetch, read, each step by name, store.",
    ["step"],
    buckets=_STEP_BUCKETS,
)
JOB_SECONDS = Histogram(
    "sprim_job_duration_seconds",
    "Seconds of one job attempt, from its start to its outcome (state: done, partial, "
    "failed, or queued for a retry).",
    ["rule", "state"],
    buckets=_STEP_BUCKETS,
)
STABLE_TO_STORED = Histogram(
    "sprim_stable_to_stored_seconds",
    "Seconds from the study's last change (last instance received) to the job's outputs "
    "confirmed by the archive (job done); includes the rule's quiet period.",
    ["rule"],
    buckets=_LATENCY_BUCKETS,
)
ARCHIVE_ERRORS = Counter(
    "sprim_archive_errors",
    "Archive errors met by jobs and routing, by operation and kind (transient: retried "
    "with backoff; permanent: the job fails).",
    ["operation", "kind"],
)
REFUSALS = Counter(
    "sprim_refusals",
    "Jobs refused for an input defect, by defect code (SeriesError.code; 'step' for a "
    "step's own refusal or bad params).",
    ["code"],
)
RELEASED = Counter(
    "sprim_jobs_released",
    "Jobs handed by the job store to the dispatcher (broker or in-process queue).",
    ["priority"],
)
STORE_SECONDS = Histogram(
    "sprim_job_store_query_duration_seconds",
    "Seconds of each job-store SQL statement, by kind.",
    ["operation"],
    buckets=_STORE_BUCKETS,
)
STORE_UNREACHABLE = Counter(
    "sprim_job_store_unreachable",
    "Job-store calls that failed because the store could not answer (each is retried).",
)


def rule_label(rule: str | None) -> str:
    """A job's rule as a label: reprocess requests have none."""
    return rule or "reprocess"


def job_entered(state: str, rule: str | None, institution: str | None) -> None:
    JOBS.labels(state=state, rule=rule_label(rule), institution=institution or "unknown").inc()


def attempt_finished(
    rule: str | None, state: str, started_at: float | None, timings: Mapping[str, float]
) -> None:
    """One attempt ended (``state``: the state it records); its phases' and its own seconds."""
    for name, seconds in timings.items():
        STEP_SECONDS.labels(step=name).observe(max(0.0, float(seconds)))
    if started_at:
        JOB_SECONDS.labels(rule=rule_label(rule), state=state).observe(
            max(0.0, time.time() - started_at)
        )


def stable_to_stored(job: Any, study_of: Callable[[str], Any]) -> None:
    """A job ended ``done``: observe its study's last change -> now stored (never raises)."""
    try:
        row = study_of(job.study_uid)
        if row is not None and row.last_change_at and job.finished_at:
            STABLE_TO_STORED.labels(rule=rule_label(job.rule)).observe(
                max(0.0, job.finished_at - row.last_change_at)
            )
    except Exception:  # noqa: BLE001  (a metric never fails a job)
        pass


def archive_error(operation: str, transient: bool) -> None:
    ARCHIVE_ERRORS.labels(operation=operation, kind="transient" if transient else "permanent").inc()


def refused(exc: BaseException) -> None:
    REFUSALS.labels(code=str(getattr(exc, "code", None) or "step")).inc()


_SQL_VERBS = ("select", "insert", "update", "delete")


def time_store_statements(engine: Any) -> None:
    """Observe every SQL statement of ``engine`` (a SQLAlchemy engine) in STORE_SECONDS."""
    from sqlalchemy import event

    def before(conn, _cursor, _stmt, _params, _ctx, _many) -> None:
        conn.info.setdefault("sprim_t0", []).append(time.perf_counter())

    def after(conn, _cursor, stmt, _params, _ctx, _many) -> None:
        started = conn.info.get("sprim_t0")
        if not started:
            return
        verb = stmt.lstrip().split(None, 1)[0].lower() if stmt.strip() else ""
        STORE_SECONDS.labels(operation=verb if verb in _SQL_VERBS else "other").observe(
            time.perf_counter() - started.pop()
        )

    def failed(ctx) -> None:  # the statement raised: drop its start time
        started = ctx.connection.info.get("sprim_t0") if ctx.connection is not None else None
        if started:
            started.pop()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "handle_error", failed)


def _dispatch_window() -> int:
    from workers.core.config import settings

    return settings().dispatch_window


class StoreCensus(Collector):
    """What the job store holds at scrape time.

    ``census()`` returns ``{"states": [(state, rule, institution, n)], "waiting": [(priority,
    n)], "dispatched": n, "running": n}`` (see ``JobStore.census``); ``window()`` the dispatch
    window (default ``SPRIM_DISPATCH_WINDOW``). A store that cannot answer gives ``sprim_job_store_up 0``
    and the rest of the scrape still works.
    """

    def __init__(
        self, census: Callable[[], Mapping[str, Any]], window: Callable[[], int] | None = None
    ) -> None:
        self.census, self.window = census, window or _dispatch_window

    def describe(self) -> Iterable:
        return []  # collected at scrape time only (never at registration)

    def collect(self) -> Iterable:
        up = GaugeMetricFamily("sprim_job_store_up", "1 when the job store answered this scrape.")
        try:
            c = self.census()
        except Exception:  # noqa: BLE001  (an outage is a value here, not a failed scrape)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            "sprim_jobs_in_state",
            "Jobs in the job store now, by state, rule and institution.",
            labels=["state", "rule", "institution"],
        )
        for state, rule, inst, n in c["states"]:
            jobs.add_metric([state, rule_label(rule), inst or "unknown"], n)
        yield jobs
        depth = GaugeMetricFamily(
            "sprim_queue_depth",
            "Queued jobs now: 'store' = waiting in the job store for a dispatch slot (by "
            "priority), 'broker' = handed to the dispatcher, not started yet.",
            labels=["where", "priority"],
        )
        for prio, n in c["waiting"]:
            depth.add_metric(["store", str(prio)], n)
        depth.add_metric(["broker", "all"], c["dispatched"])
        yield depth
        inflight = GaugeMetricFamily(
            "sprim_dispatch_in_flight",
            "Jobs holding a dispatch slot now (running, or handed to the dispatcher).",
        )
        inflight.add_metric([], c["dispatched"] + c["running"])
        yield inflight
        window = GaugeMetricFamily(
            "sprim_dispatch_window",
            "Dispatch window: jobs handed to the dispatcher at most (SPRIM_DISPATCH_WINDOW).",
        )
        window.add_metric([], self.window())
        yield window


class _Union(Collector):
    """Several collectors (or registries) as one, for one exposition."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def collect(self) -> Iterable:
        for p in self.parts:
            yield from p.collect()


def serve_metrics() -> None:
    """``SPRIM_METRICS_PORT``: serve this process's metrics over HTTP (``sprim watch``,
    ``sprim listen``; a Celery worker serves its pool's: ``tasks.metrics``)."""
    from workers.core.config import settings

    port = settings().metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
        logging.getLogger("sprim").info("event=metrics_serving port=%d", port)


def exposition(*extra: Collector) -> bytes:
    """The text exposition of this process's metrics (or, under ``PROMETHEUS_MULTIPROC_DIR``,
    of every process writing there) plus ``extra`` collectors."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        base: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(base)
    else:
        base = REGISTRY
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Union(base, *extra))
    return generate_latest(reg)
