"""The job store: jobs, their state machine, an audit trail, known studies, fair release.

SQLAlchemy 2; SQLite under ``SPRIM_HOME`` by default, PostgreSQL by ``SPRIM_JOB_STORE_URL``.
Schema changes go through Alembic (``workers/platform/alembic``); :meth:`JobStore.migrate` applies them.

Fairness lives here (:meth:`JobStore.release`): jobs wait in the store, and at most ``capacity``
are handed to the broker at a time (one per free worker slot). Each release picks the highest
priority first, then the institution with the fewest jobs in flight (a job's rank = jobs its
institution has in flight + its place in the institution's queue), then the least recently
served institution, then age — round-robin across institutions, so one site's burst never
queues ahead of another site's study in the broker.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    and_,
    case,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import sessionmaker

from workers.core import metrics
from workers.core.phi import stored_series
from workers.platform.jobmodels import AuditRow, JobRow, LockRow, StudyRow

__all__ = [
    "ACTIVE", "FINAL", "STATES", "Audit", "AuditRow", "Job", "JobRow", "JobStore", "LockRow",
    "StoreUnavailable", "StudyRow", "default_url", "is_outage", "open_store", "retrying",
]  # fmt: skip

log = logging.getLogger("sprim.jobs")

STATES = ("queued", "running", "done", "partial", "failed", "cancelled", "no_match")
ACTIVE = ("queued", "running")
FINAL = ("done", "partial", "failed", "cancelled", "no_match")


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row."""

    id: int
    created_at: float
    updated_at: float
    rule: str | None
    requester: str | None
    study_uid: str
    series_uid: str | None
    institution: str
    source: str
    archive: str
    destination: str | None
    priority: int
    steps: list
    job_key: str | None
    description_suffix: str
    state: str
    attempts: int
    dispatched_at: float | None
    started_at: float | None
    finished_at: float | None
    timings: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    error: str | None = None
    context: dict = field(default_factory=dict)
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    dispatched_to: str | None = None
    not_before: float | None = None
    worker_losses: int = 0
    last_step: str | None = None
    peak_rss_mb: float | None = None

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Audit:
    at: float
    job_id: int | None
    event: str
    from_state: str | None
    to_state: str | None
    actor: str
    detail: str


def default_url(home: Path) -> str:
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(home / 'jobs.db').resolve()}"


class JobStore:
    """Jobs and audit trail in a SQL database (see module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        kw: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kw["connect_args"] = {"timeout": 60, "check_same_thread": False}
        else:
            # an unreachable server fails fast and the caller's retry decides how long to wait
            kw["pool_pre_ping"] = True
            kw["connect_args"] = {"connect_timeout": 5}
        self.engine = create_engine(url, **kw)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metrics.time_store_statements(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision (idempotent).

        One info line when it changed the schema, none otherwise: Alembic's own set-up lines
        (plugins, "Context impl ...", "Will assume transactional DDL") stay below warning unless
        the ``alembic`` logger was configured.
        """
        alembic_log = logging.getLogger("alembic")
        if alembic_log.level == logging.NOTSET:  # before the import: it logs its plugins
            alembic_log.setLevel(logging.WARNING)
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "alembic"))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        with self._migration_lock(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # concurrent first starts: one migrates
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7262017)")
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        log.info("event=job_store_migrated from=%s to=%s", current or "empty", head)

    @contextlib.contextmanager
    def _migration_lock(self):
        """A file lock next to a SQLite database (PostgreSQL uses an advisory lock)."""
        db = self.engine.url.database if self.engine.url.get_backend_name() == "sqlite" else None
        if not db or db == ":memory:" or not Path(db).parent.is_dir():  # SQLite says why
            yield
            return
        import fcntl

        with open(f"{db}.migrate.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- jobs ----------------------------------------------------------------------------------
    def create_job(self, *, actor: str = "", state: str = "queued", **values: Any) -> Job:
        """Insert a job (``queued`` unless ``state`` says otherwise) and its audit entry."""
        now = time.time()
        with self.Session.begin() as s:
            row = JobRow(created_at=now, updated_at=now, state=state, **values)
            s.add(row)
            s.flush()
            s.add(
                AuditRow(at=now, job_id=row.id, event="created", to_state=state, actor=actor,
                         detail=values.get("rule") or values.get("requester") or "")
            )  # fmt: skip
            job = Job.of(row)
        metrics.job_entered(state, job.rule, job.institution)
        return job

    def get(self, job_id: int) -> Job | None:
        with self.Session() as s:
            row = s.get(JobRow, int(job_id))
            return Job.of(row) if row else None

    def list(
        self,
        *,
        state: str | Sequence[str] | None = None,
        institution: str | None = None,
        study_uid: str | None = None,
        job_key: str | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> builtins.list[Job]:
        q = select(JobRow)
        if state:
            q = q.where(JobRow.state.in_([state] if isinstance(state, str) else list(state)))
        if institution is not None:
            q = q.where(JobRow.institution == institution)
        if study_uid is not None:
            q = q.where(JobRow.study_uid == study_uid)
        if job_key is not None:
            q = q.where(JobRow.job_key == job_key)
        q = q.order_by(JobRow.id.desc() if newest_first else JobRow.id.asc()).limit(limit)
        with self.Session() as s:
            return [Job.of(r) for r in s.scalars(q)]

    def counts(self) -> dict[str, int]:
        with self.Session() as s:
            rows = s.execute(select(JobRow.state, func.count()).group_by(JobRow.state))
            return {st: n for st, n in rows}

    def census(self) -> dict[str, Any]:
        """What the store holds now, for metrics (:class:`workers.core.metrics.StoreCensus`):
        jobs per (state, rule, institution), queued jobs waiting per priority, queued jobs
        handed to the dispatcher, running jobs."""
        dispatched = (JobRow.state == "queued") & JobRow.dispatched_at.is_not(None)
        with self.Session() as s:
            states = s.execute(
                select(JobRow.state, JobRow.rule, JobRow.institution, func.count())
                .group_by(JobRow.state, JobRow.rule, JobRow.institution)
            ).all()  # fmt: skip
            waiting = s.execute(
                select(JobRow.priority, func.count())
                .where(JobRow.state == "queued", JobRow.dispatched_at.is_(None))
                .group_by(JobRow.priority)
            ).all()  # fmt: skip
            n_dispatched = s.scalar(select(func.count()).select_from(JobRow).where(dispatched))
        running = sum(n for st, _r, _i, n in states if st == "running")
        return {
            "states": [tuple(r) for r in states], "waiting": [tuple(r) for r in waiting],
            "dispatched": n_dispatched or 0, "running": running,
        }  # fmt: skip

    def transition(
        self,
        job_id: int,
        to_state: str,
        *,
        expect: Iterable[str] | None = None,
        where: dict[str, Any] | None = None,
        actor: str = "",
        detail: str = "",
        **values: Any,
    ) -> Job | None:
        """Atomically move a job to ``to_state`` if its state is in ``expect``; audit it.

        ``where``: columns that must also hold these values (e.g. the attempt's lease owner).
        Returns the updated job, or None when the job is missing or in another state.
        """
        now = time.time()
        with self.Session.begin() as s:
            q = select(JobRow).where(JobRow.id == int(job_id)).with_for_update()
            row = s.scalars(q).first()
            if row is None or (expect is not None and row.state not in tuple(expect)):
                return None
            if any(getattr(row, k) != v for k, v in (where or {}).items()):
                return None
            before = row.state
            row.state, row.updated_at = to_state, now
            for k, v in values.items():
                setattr(row, k, v)
            s.add(AuditRow(at=now, job_id=row.id, event="state", from_state=before,
                           to_state=to_state, actor=actor, detail=detail[:2000]))  # fmt: skip
            s.flush()
            job = Job.of(row)
        metrics.job_entered(to_state, job.rule, job.institution)
        return job

    # -- leases --------------------------------------------------------------------------------
    def renew_lease(self, job_id: int, owner: str, until: float, **values: Any) -> bool:
        """Extend the lease of the attempt ``owner`` (and record ``values``); False if it lost it."""
        with self.Session.begin() as s:
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == int(job_id), JobRow.state == "running",
                       JobRow.lease_owner == owner)
                .values(lease_expires_at=until, **values)
            )  # fmt: skip
            n = cast("CursorResult[Any]", res).rowcount
        return bool(n)

    def lapsed(
        self, now: float, dead_owners: Callable[[str], bool], stale_before: float = 0.0
    ) -> builtins.list[Job]:
        """Running jobs whose lease expired or whose owner is known dead; queued jobs dispatched
        to an in-process queue that is known dead (its process ended), or to the broker before
        ``stale_before`` and never started (the message was lost with a broker)."""
        with self.Session() as s:
            rows = s.scalars(
                select(JobRow).where(
                    or_(JobRow.state == "running",
                        and_(JobRow.state == "queued", JobRow.dispatched_at.is_not(None),
                             or_(JobRow.dispatched_to.is_not(None),
                                 JobRow.dispatched_at < stale_before)))
                )
            ).all()  # fmt: skip
            out = []
            for r in rows:
                if r.state == "running":
                    expired = r.lease_expires_at is not None and r.lease_expires_at < now
                    if expired or (r.lease_owner and dead_owners(r.lease_owner)):
                        out.append(Job.of(r))
                elif r.dispatched_to is None or dead_owners(r.dispatched_to):
                    out.append(Job.of(r))
            return out

    # -- audit ---------------------------------------------------------------------------------
    def audit(
        self, event_: str, detail: str = "", *, job_id: int | None = None, actor: str = ""
    ) -> None:
        with self.Session.begin() as s:
            s.add(AuditRow(at=time.time(), job_id=job_id, event=event_, actor=actor, detail=detail))

    def audit_trail(
        self, *, job_id: int | None = None, event_: str | None = None, limit: int = 200
    ) -> builtins.list[Audit]:
        q = select(AuditRow)
        if job_id is not None:
            q = q.where(AuditRow.job_id == job_id)
        if event_ is not None:
            q = q.where(AuditRow.event == event_)
        q = q.order_by(AuditRow.id.desc()).limit(limit)
        with self.Session() as s:
            return [
                Audit(r.at, r.job_id, r.event, r.from_state, r.to_state, r.actor, r.detail)
                for r in reversed(list(s.scalars(q)))
            ]

    # -- studies -------------------------------------------------------------------------------
    def note_study(
        self,
        study_uid: str,
        *,
        series: builtins.list[dict] | None = None,
        bump: bool = True,
        **values: Any,
    ) -> int:
        """Record a study (``bump``: it changed now, new instances); returns its change sequence."""
        now = time.time()
        with self.Session.begin() as s:
            row = s.scalars(
                select(StudyRow).where(StudyRow.study_uid == study_uid).with_for_update()
            ).first()
            if row is None:
                row = StudyRow(study_uid=study_uid, change_seq=0)
                s.add(row)
            if bump or not row.change_seq:
                row.change_seq = (row.change_seq or 0) + 1
                row.last_change_at = now
            if series is not None:
                row.series = _jsonable(stored_series(series))  # allow-list: workers.core.phi
            for k, v in values.items():
                setattr(row, k, v)
            s.flush()
            return row.change_seq

    def study(self, study_uid: str) -> StudyRow | None:
        with self.Session() as s:
            return s.get(StudyRow, study_uid)

    def studies(self, limit: int = 100_000) -> builtins.list[StudyRow]:
        with self.Session() as s:
            return list(s.scalars(select(StudyRow).order_by(StudyRow.last_change_at).limit(limit)))

    # -- fair release --------------------------------------------------------------------------
    def release(
        self, capacity: int, send: Callable[[Job], None], to: str | None = None
    ) -> builtins.list[Job]:
        """Hand waiting jobs to ``send`` until ``capacity`` jobs are in flight; return them.

        ``to`` names the dispatcher (an in-process queue dies with its process: see
        :meth:`lapsed`). A job waiting for its retry time (``not_before``) is neither in flight
        nor released before that time. In flight = running, or queued and already dispatched.
        Order: priority (urgent first),
        then round-robin across institutions (rank of the job within its institution, then the
        institution served least recently), then age. ``send`` is called after the commit; a
        failed send makes the job wait again.
        """
        now = time.time()
        with self.Session.begin() as s:
            s.execute(update(LockRow).where(LockRow.id == 1).values(n=LockRow.n + 1))
            inflight = s.scalar(
                select(func.count()).select_from(JobRow).where(
                    or_(JobRow.state == "running",
                        (JobRow.state == "queued") & JobRow.dispatched_at.is_not(None))
                )
            )  # fmt: skip
            free = capacity - (inflight or 0)
            if free <= 0:
                return []
            in_flight = or_(
                JobRow.state == "running",
                (JobRow.state == "queued") & JobRow.dispatched_at.is_not(None),
            )
            last = (
                select(
                    JobRow.institution,
                    func.max(JobRow.dispatched_at).label("last"),
                    func.sum(case((in_flight, 1), else_=0)).label("busy"),
                )
                .group_by(JobRow.institution)
                .subquery()
            )
            rank = func.row_number().over(
                partition_by=(JobRow.priority, JobRow.institution), order_by=JobRow.id
            )
            waiting = (
                select(JobRow.id, JobRow.priority, JobRow.institution, rank.label("rn"))
                .where(
                    JobRow.state == "queued",
                    JobRow.dispatched_at.is_(None),
                    or_(JobRow.not_before.is_(None), JobRow.not_before <= now),
                )
                .subquery()
            )
            q = (
                select(waiting.c.id)
                .join(last, last.c.institution == waiting.c.institution, isouter=True)
                .order_by(
                    waiting.c.priority.desc(),
                    # the job would be its institution's n-th concurrent one: fewest first
                    waiting.c.rn + func.coalesce(last.c.busy, 0),
                    func.coalesce(last.c.last, 0.0),
                    waiting.c.id,
                )
                .limit(free)
            )
            ids = list(s.scalars(q))
            if not ids:
                return []
            s.execute(
                update(JobRow).where(JobRow.id.in_(ids)).values(dispatched_at=now, dispatched_to=to)
            )
            rows = s.scalars(select(JobRow).where(JobRow.id.in_(ids))).all()
            order = {j: i for i, j in enumerate(ids)}
            jobs = sorted((Job.of(r) for r in rows), key=lambda j: order[j.id])
        sent = []
        for job in jobs:
            try:
                send(job)
                sent.append(job)
                metrics.RELEASED.labels(priority=str(job.priority)).inc()
            except Exception:
                with self.Session.begin() as s:
                    s.execute(update(JobRow).where(JobRow.id == job.id).values(dispatched_at=None))
                raise
        return sent


class StoreUnavailable(RuntimeError):
    """The job store stayed unreachable for the whole retry budget."""


def is_outage(e: BaseException) -> bool:
    """A database error that may pass (server down, connection lost, SQLite busy)."""
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    return isinstance(e, OperationalError | InterfaceError)


def retrying(fn: Callable[..., Any], *args: Any, budget_s: float | None = None, **kw: Any) -> Any:
    """``fn(*args, **kw)``, retried with backoff (0.25 s doubling to 5 s) while the store is
    unreachable, for at most ``budget_s`` (default ``SPRIM_STORE_RETRY_S``); then
    :class:`StoreUnavailable`. Other errors propagate at once."""
    if budget_s is None:
        from workers.core.config import settings

        budget_s = settings().store_retry_s
    deadline = time.monotonic() + budget_s
    delay = 0.25
    while True:
        try:
            return fn(*args, **kw)
        except Exception as e:
            if not is_outage(e):
                raise
            metrics.STORE_UNREACHABLE.inc()
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"job store unreachable for {budget_s:.0f} s ({type(e).__name__})"
                ) from e
            log.warning("event=store_unreachable retry_in=%.2f error=%s", delay, type(e).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


_STORES: dict[str, JobStore] = {}


def open_store(url: str | None = None) -> JobStore:
    """The process-wide store for ``url`` (default: ``SPRIM_JOB_STORE_URL`` or SQLite), migrated."""
    from workers.core.config import settings

    url = url or settings().job_store_url or default_url(settings().home)
    if url not in _STORES:
        store = JobStore(url)
        store.migrate()
        _STORES[url] = store
    return _STORES[url]


def after_fork() -> None:
    """In a forked child: drop the parent's pooled connections (never share a DB connection)."""
    for store in _STORES.values():
        store.engine.dispose(close=False)


#: Errors that mean "the job store cannot answer now" (down, unreachable, pool exhausted).
UNREACHABLE = (DBAPIError, SQLAlchemyTimeoutError, StoreUnavailable)


def unreachable(exc: BaseException, url: str | None = None) -> str:
    """One line for the CLI and the API: where the store is (no password) and why it failed."""
    from workers.core.config import settings

    url = url or settings().job_store_url or f"sqlite:///{settings().home / 'jobs.db'}"
    try:
        where = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (a malformed URL is still worth naming, without secrets)
        where = url.split("@")[-1]
    cause = exc.__cause__ if isinstance(exc, StoreUnavailable) and exc.__cause__ else exc
    reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    short = (reason[0] if reason else type(exc).__name__).removeprefix("connection failed: ")
    return f"job store unreachable at {where}: {short[:200]}"
