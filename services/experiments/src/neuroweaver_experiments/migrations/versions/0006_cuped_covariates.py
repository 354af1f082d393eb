"""CUPED covariates: metric_events.covariate (the event's), unit_metrics.covariate and covariate_since (the unit's
first one and its count when set), variant_stats' co-moments (covariate_units, covariate_mean, covariate_m2,
comoment). All nullable, added without values: existing variant_stats rows stay NULL (their units' covariates are
unknown), so results report CUPED as not applied for those metrics (domain.cuped). Downgrade drops the columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS: dict[str, list[sa.Column]] = {
    "metric_events": [sa.Column("covariate", sa.Float(), nullable=True)],
    "unit_metrics": [
        sa.Column("covariate", sa.Float(), nullable=True),
        sa.Column("covariate_since", sa.BigInteger(), nullable=True),
    ],
    "variant_stats": [
        sa.Column("covariate_units", sa.BigInteger(), nullable=True),
        sa.Column("covariate_mean", sa.Float(), nullable=True),
        sa.Column("covariate_m2", sa.Float(), nullable=True),
        sa.Column("comoment", sa.Float(), nullable=True),
    ],
}


def upgrade() -> None:
    for table, columns in _COLUMNS.items():
        for column in columns:
            op.add_column(table, column)


def downgrade() -> None:
    for table, columns in _COLUMNS.items():
        # batch mode: SQLite before 3.35 cannot drop a column in place (alembic rebuilds the table)
        with op.batch_alter_table(table) as batch:
            for column in reversed(columns):
                batch.drop_column(column.name)
