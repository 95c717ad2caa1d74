"""Alembic environment of the job store. ``JobStore.migrate`` passes a live connection."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from workers.platform.jobmodels import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """``SPRIM_JOB_STORE_URL`` when set (command-line use), else the ini's URL."""
    return os.environ.get("SPRIM_JOB_STORE_URL") or config.get_main_option("sqlalchemy.url") or ""


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url())
    with engine.begin() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run()
