"""training_jobs: priority, gpus (quota accounting), the worker's controls (interrupt, checkpoint_requests) and
yielded_attempts; an index for the priority order of the queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 17:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # additive: existing jobs get priority 0, no controls and no yielded attempts
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("interrupt", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("checkpoint_requests", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("yielded_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.create_index("ix_jobs_queue_priority", ["state", "priority", "create_time", "id"])
    # the GPUs of unfinished jobs count against quotas from now on: copy them out of the stored spec
    jobs = sa.table("training_jobs", sa.column("id", sa.Integer), sa.column("state", sa.String), sa.column("spec", sa.JSON),
                    sa.column("gpus", sa.Integer))  # fmt: skip
    bind = op.get_bind()
    unfinished = bind.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.state.in_(["QUEUED", "RUNNING", "CANCELLING"])))
    for key, spec in unfinished.all():
        gpus = int(((spec or {}).get("resources") or {}).get("gpus") or 0)
        if gpus:
            bind.execute(sa.update(jobs).where(jobs.c.id == key).values(gpus=gpus))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_queue_priority")
        for column in ("yielded_attempts", "checkpoint_requests", "interrupt", "gpus", "priority"):
            batch_op.drop_column(column)
