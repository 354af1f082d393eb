"""exposure_counts per (epoch, bucket class, variant): the sample-ratio test's strata after weight changes.

With coverage < 1, units first exposed after a weight change are not spread over the new epoch's buckets as new
units are (those outside the earlier coverage come back into part of the new ranges only), so the test expects
each (epoch, bucket class) to split as its buckets do (domain.assignment.BucketClasses). Rows counted before this
version get bucket_class -1 (not recorded): exact where their epoch has one class (epoch 0, or coverage 1), left out
of the test otherwise. Downgrade: the classes of an (epoch, variant) are summed into one row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PK = "exposure_counts_pkey"  # PostgreSQL's name for 0001's primary key


def _sqlite_rebuild(key: list[str], copy: str) -> None:
    """SQLite cannot change a primary key: build the table anew with `key`, copy the rows (`copy` selects them in
    the new column order) and swap it in."""
    columns: list[sa.Column] = [
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        *([sa.Column("bucket_class", sa.Integer(), nullable=False)] if "bucket_class" in key else []),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
    ]
    op.create_table(
        "exposure_counts_rebuilt",
        *columns,
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint(*key),
    )
    op.execute(f"INSERT INTO exposure_counts_rebuilt ({', '.join(c.name for c in columns)}) {copy}")
    op.drop_table("exposure_counts")
    op.rename_table("exposure_counts_rebuilt", "exposure_counts")


def upgrade() -> None:
    key = ["experiment_id", "epoch", "bucket_class", "variant"]
    if op.get_bind().dialect.name != "postgresql":
        _sqlite_rebuild(key, "SELECT experiment_id, epoch, -1, variant, units FROM exposure_counts")
        return
    op.drop_constraint(_PK, "exposure_counts", type_="primary")
    op.add_column("exposure_counts", sa.Column("bucket_class", sa.Integer(), nullable=False, server_default="-1"))
    op.alter_column("exposure_counts", "bucket_class", server_default=None)
    op.create_primary_key(_PK, "exposure_counts", key)


def downgrade() -> None:
    key = ["experiment_id", "epoch", "variant"]
    if op.get_bind().dialect.name != "postgresql":
        _sqlite_rebuild(
            key, "SELECT experiment_id, epoch, variant, sum(units) FROM exposure_counts GROUP BY experiment_id, epoch, variant"
        )
        return
    same = "s.experiment_id = exposure_counts.experiment_id AND s.epoch = exposure_counts.epoch AND s.variant = exposure_counts.variant"
    first = f"(SELECT min(s.bucket_class) FROM exposure_counts s WHERE {same})"
    op.execute(
        f"UPDATE exposure_counts SET units = (SELECT sum(s.units) FROM exposure_counts s WHERE {same}) WHERE bucket_class = {first}"
    )
    op.execute(f"DELETE FROM exposure_counts WHERE bucket_class > {first}")
    op.drop_constraint(_PK, "exposure_counts", type_="primary")
    op.drop_column("exposure_counts", "bucket_class")
    op.create_primary_key(_PK, "exposure_counts", key)
