"""ORM tables of the job store (the schema itself is owned by Alembic: ``workers/platform/alembic``)."""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)
    rule: Mapped[str | None] = mapped_column(String(128), index=True)
    requester: Mapped[str | None] = mapped_column(String(128))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    institution: Mapped[str] = mapped_column(String(128), index=True)
    source: Mapped[str] = mapped_column(String(256), default="")
    archive: Mapped[str] = mapped_column(String(512), default="")
    destination: Mapped[str | None] = mapped_column(String(512))
    priority: Mapped[int] = mapped_column(Integer, default=1)
    steps: Mapped[list] = mapped_column(JSON, default=list)
    job_key: Mapped[str | None] = mapped_column(String(64), index=True)
    description_suffix: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    outputs: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    context: Mapped[dict] = mapped_column(JSON, default=dict)
    # the attempt running the job holds a lease its worker renews (see workers/platform/executor.py)
    lease_owner: Mapped[str | None] = mapped_column(String(160))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    dispatched_to: Mapped[str | None] = mapped_column(String(160))
    not_before: Mapped[float | None] = mapped_column(Float)
    worker_losses: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[str | None] = mapped_column(String(128))
    peak_rss_mb: Mapped[float | None] = mapped_column(Float)


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class StudyRow(Base):
    """A study sprim has seen: routing attributes of its series and its quiet-period state."""

    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    institution: Mapped[str] = mapped_column(String(128), default="")
    source: Mapped[str] = mapped_column(String(256), default="")
    archive: Mapped[str] = mapped_column(String(512), default="")
    context: Mapped[dict] = mapped_column(JSON, default=dict)
    series: Mapped[list] = mapped_column(JSON, default=list)
    change_seq: Mapped[int] = mapped_column(Integer, default=0)
    last_change_at: Mapped[float] = mapped_column(Float, default=0.0)


class LockRow(Base):
    """One row, updated first in every release: serializes releases on SQLite and PostgreSQL."""

    __tablename__ = "scheduler_lock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)
