"""model_versions.artifacts: a version's exports (merged weights, GGUF, GGUF LoRA) as a JSON list

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 11:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("artifacts", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("artifacts")
