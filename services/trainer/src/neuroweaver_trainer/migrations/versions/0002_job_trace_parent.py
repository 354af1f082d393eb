"""training_jobs.trace_parent: the W3C traceparent of CreateTrainingJob, continued by the worker

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # additive: existing jobs get "" (no trace to continue)
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trace_parent", sa.String(length=128), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.drop_column("trace_parent")
