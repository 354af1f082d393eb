"""training_jobs.attempt_owners: the trainer replica that ran each attempt (ReadTrainingJobLogs names it when another
replica is asked for a local worker's log, which lies on that replica's disk)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # additive: earlier attempts' replicas are unknown ({}); their logs are read where they lie or not found
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt_owners", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.drop_column("attempt_owners")
