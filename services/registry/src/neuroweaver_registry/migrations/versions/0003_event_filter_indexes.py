"""model_events: indexes for ListModelEvents / WatchModelEvents filters by type, actor and resource

A filtered page, newest or oldest first, walks one of these in sequence order and reads only the rows it returns,
where (project, sequence) alone would read every non-matching event in between (a rare actor: the whole table).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-14 10:00:00
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_events_project_type_seq": ["project", "type", "sequence"],
    "ix_events_project_actor_seq": ["project", "actor", "sequence"],
    "ix_events_project_resource_seq": ["project", "resource", "sequence"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "model_events", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="model_events")
