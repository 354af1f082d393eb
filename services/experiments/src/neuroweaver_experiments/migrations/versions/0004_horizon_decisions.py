"""horizon_decisions: the one decision of a fixed-horizon experiment, taken at the first look with its planned
sample size and reported at every later look (re-deciding at each look was peeking).

Experiments that passed their horizon before this version have no row: their next look decides and stores it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 11:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "horizon_decisions",
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("power", sa.Float(), nullable=True),
        sa.Column("decide_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("experiment_id"),
    )


def downgrade() -> None:
    op.drop_table("horizon_decisions")
