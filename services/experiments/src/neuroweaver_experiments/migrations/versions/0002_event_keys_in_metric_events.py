"""idempotency keys live in metric_events: a unique (experiment_id, idempotency_key) index replaces the
event_keys table and the (experiment_id, id) index, so an ingested event writes one row and two index
entries instead of two rows and three index entries.

Every stored key already has its metric_events row (both were written in the same transaction), so no key
is lost and the unique index cannot meet a duplicate.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metric_events", schema=None) as batch_op:
        batch_op.create_index("uq_metric_events_key", ["experiment_id", "idempotency_key"], unique=True)
        batch_op.drop_index("ix_metric_events_experiment")
    op.drop_table("event_keys")
    if op.get_bind().dialect.name == "postgresql":
        # every ingest batch updates its units' aggregate rows: room on each page lets PostgreSQL update them in
        # place (HOT: no new index entry per update)
        op.execute("ALTER TABLE unit_metrics SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE unit_metrics RESET (fillfactor)")
    op.create_table(
        "event_keys",
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "key"),
    )
    op.execute(
        "INSERT INTO event_keys (experiment_id, key) "
        "SELECT experiment_id, idempotency_key FROM metric_events WHERE idempotency_key IS NOT NULL"
    )
    with op.batch_alter_table("metric_events", schema=None) as batch_op:
        batch_op.create_index("ix_metric_events_experiment", ["experiment_id", "id"], unique=False)
        batch_op.drop_index("uq_metric_events_key")
