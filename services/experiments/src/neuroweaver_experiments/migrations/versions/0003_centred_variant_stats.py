"""variant_stats keep centred moments: (n, sum, sum_sq) → (n, mean, m2 = Σ(x − mean)²).

Σx² − (Σx)²/n cancels every digit once |mean| ≫ sd, so the ingest now merges batches into (n, mean, M2)
(domain.aggregation.StatsDelta). Existing rows convert with mean = Σx/n and M2 = Σx² − (Σx)²/n: as exact as the
old sums allow, no better (clamped at 0 where their rounding made it negative; an overflowed inf stays inf, so
such a row never yields a decision). Downgrade: Σx = n·mean, Σx² = M2 + n·mean².

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _greatest0(expr: str) -> str:
    return f"GREATEST(0, {expr})" if op.get_bind().dialect.name == "postgresql" else f"max(0, {expr})"


def _square(x: str) -> str:
    # PostgreSQL raises "underflow" for squares of |x| < ~1e-154; those are 0 for these sums
    return f"(CASE WHEN abs({x}) < 1e-150 THEN 0 ELSE {x} * {x} END)"


def upgrade() -> None:
    with op.batch_alter_table("variant_stats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mean", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("m2", sa.Float(), nullable=False, server_default="0"))
    m2 = _greatest0(f"sum_sq - {_square('sum')} / n")
    op.execute(
        "UPDATE variant_stats SET "
        "mean = CASE WHEN n > 0 AND abs(sum) >= 1e-280 THEN sum / n ELSE 0 END, "
        f"m2 = CASE WHEN n > 1 THEN {m2} ELSE 0 END"
    )
    with op.batch_alter_table("variant_stats", schema=None) as batch_op:
        batch_op.alter_column("mean", server_default=None)
        batch_op.alter_column("m2", server_default=None)
        batch_op.drop_column("sum")
        batch_op.drop_column("sum_sq")


def downgrade() -> None:
    with op.batch_alter_table("variant_stats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sum", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("sum_sq", sa.Float(), nullable=False, server_default="0"))
    op.execute(f"UPDATE variant_stats SET sum = n * mean, sum_sq = m2 + n * {_square('mean')}")
    with op.batch_alter_table("variant_stats", schema=None) as batch_op:
        batch_op.alter_column("sum", server_default=None)
        batch_op.alter_column("sum_sq", server_default=None)
        batch_op.drop_column("mean")
        batch_op.drop_column("m2")
