"""deployments.lease_owner / lease_expires_at / lease_epoch: which deployer replica converges a deployment

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # additive: existing deployments start free (no owner, expired, epoch 0); the first replica to run claims them
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("lease_expires_at", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("lease_epoch", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("lease_epoch")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_owner")
