"""Job store: jobs, audit trail, studies, scheduler lock.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("rule", sa.String(128)),
        sa.Column("requester", sa.String(128)),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64)),
        sa.Column("institution", sa.String(128), nullable=False),
        sa.Column("source", sa.String(256), nullable=False),
        sa.Column("archive", sa.String(512), nullable=False),
        sa.Column("destination", sa.String(512)),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("steps", sa.JSON, nullable=False),
        sa.Column("job_key", sa.String(64)),
        sa.Column("description_suffix", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("dispatched_at", sa.Float),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("outputs", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("context", sa.JSON, nullable=False),
    )
    for col in ("created_at", "rule", "study_uid", "institution", "job_key", "state"):
        op.create_index(f"ix_jobs_{col}", "jobs", [col])
    op.create_index("ix_jobs_institution_dispatched", "jobs", ["institution", "dispatched_at"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16)),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_job_id", "audit", ["job_id"])
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("institution", sa.String(128), nullable=False),
        sa.Column("source", sa.String(256), nullable=False),
        sa.Column("archive", sa.String(512), nullable=False),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("series", sa.JSON, nullable=False),
        sa.Column("change_seq", sa.Integer, nullable=False),
        sa.Column("last_change_at", sa.Float, nullable=False),
    )
    lock = op.create_table(
        "scheduler_lock",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )
    op.bulk_insert(lock, [{"id": 1, "n": 0}])


def downgrade() -> None:
    op.drop_table("scheduler_lock")
    op.drop_table("studies")
    op.drop_table("audit")
    op.drop_table("jobs")
