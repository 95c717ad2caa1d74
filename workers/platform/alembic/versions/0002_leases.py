"""Leases, retry times and worker-loss accounting of running jobs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("lease_owner", sa.String(160)))
        b.add_column(sa.Column("lease_expires_at", sa.Float))
        b.add_column(sa.Column("dispatched_to", sa.String(160)))
        b.add_column(sa.Column("not_before", sa.Float))
        b.add_column(sa.Column("worker_losses", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("last_step", sa.String(128)))
        b.add_column(sa.Column("peak_rss_mb", sa.Float))
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_lease", "jobs")
    with op.batch_alter_table("jobs") as b:
        for c in ("peak_rss_mb", "last_step", "worker_losses", "not_before", "dispatched_to",
                  "lease_expires_at", "lease_owner"):  # fmt: skip
            b.drop_column(c)
