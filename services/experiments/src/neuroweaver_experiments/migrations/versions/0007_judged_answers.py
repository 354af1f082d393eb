"""Judge-scored live answers: experiments.answer_judging (the judge settings, NULL = none), metric_events.judge_version
(a score's lineage, NULL for callers' events) and the judged_answers table (answers recorded with RecordAnswers:
durable, so a restart resumes the pending ones). Downgrade drops them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 11:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("experiments", sa.Column("answer_judging", sa.JSON(), nullable=True))
    op.add_column("metric_events", sa.Column("judge_version", sa.String(256), nullable=True))
    op.create_table(
        "judged_answers",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(256), nullable=False),
        sa.Column("unit_id", sa.String(256), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("judge_version", sa.String(256), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=False),
        sa.Column("lease_expires_at", sa.Float(), nullable=False),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("uq_judged_answers_key", "judged_answers", ["experiment_id", "idempotency_key"], unique=True)
    op.create_index("ix_judged_answers_state", "judged_answers", ["state", "experiment_id", "id"])


def downgrade() -> None:
    op.drop_table("judged_answers")
    # batch mode: SQLite before 3.35 cannot drop a column in place (alembic rebuilds the table)
    with op.batch_alter_table("metric_events") as batch:
        batch.drop_column("judge_version")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("answer_judging")
