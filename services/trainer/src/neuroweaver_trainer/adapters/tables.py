"""SQLAlchemy Core tables of the trainer (one schema for SQLite and PostgreSQL).

`training_jobs` doubles as the durable queue (highest `priority` first, then oldest): a job is claimed by setting
`lease_owner` and `lease_expires_at` (epoch seconds) in one transaction (claims are serialised), and
`last_sequence` hands out gap-free per-job event sequences under the job row's lock.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from neuroweaver_runtime.idempotency import idempotency_table

metadata = MetaData()

jobs = Table(
    "training_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("project", String(64), nullable=False),
    Column("display_name", String(200), nullable=False, default=""),
    Column("base_model", String(2048), nullable=False),
    Column("dataset_uri", String(2048), nullable=False),
    Column("eval_dataset_uri", String(2048), nullable=False, default=""),
    Column("method", String(32), nullable=False),
    Column("executor", String(16), nullable=False),
    Column("spec", JSON, nullable=False),  # lora, hyperparameters, resources (effective values)
    Column("target_model", String(256), nullable=False),
    Column("version_bump", String(8), nullable=False),
    Column("labels", JSON, nullable=False, default=dict),
    Column("state", String(16), nullable=False),
    Column("stage", String(32), nullable=False, default=""),
    Column("error", Text, nullable=False, default=""),
    Column("model_version", String(512), nullable=False, default=""),
    Column("output_uri", String(2048), nullable=False, default=""),
    Column("dataset_digest", String(64), nullable=False, default=""),
    Column("eval_dataset_digest", String(64), nullable=False, default=""),
    Column("current_step", BigInteger, nullable=False, default=0),
    Column("total_steps", BigInteger, nullable=False, default=0),
    Column("resumed_from_step", BigInteger, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("start_time", DateTime(timezone=True), nullable=True),
    Column("end_time", DateTime(timezone=True), nullable=True),
    Column("last_sequence", BigInteger, nullable=False, default=0),
    Column("lease_owner", String(128), nullable=False, default=""),
    Column("lease_expires_at", Float, nullable=False, default=0.0),
    Column("external_ref", String(512), nullable=False, default=""),  # Kubernetes Job `namespace/name`
    # W3C traceparent of the CreateTrainingJob call: the worker continues that trace (0002)
    Column("trace_parent", String(128), nullable=False, default="", server_default=""),
    # scheduling (0003): queue order, quota accounting (GPUs of the job's resources), the worker's controls
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    Column("gpus", Integer, nullable=False, default=0, server_default="0"),
    Column("interrupt", String(16), nullable=False, default="", server_default=""),
    Column("checkpoint_requests", Integer, nullable=False, default=0, server_default="0"),
    Column("yielded_attempts", Integer, nullable=False, default=0, server_default="0"),
    # {attempt: lease owner} of the replica that ran each attempt: a local worker's log lies on its disk (0004)
    Column("attempt_owners", JSON, nullable=False, default=dict, server_default="{}"),
    Index("ix_jobs_project_create", "project", "create_time", "id"),
    Index("ix_jobs_queue", "state", "create_time", "id"),
    Index("ix_jobs_queue_priority", "state", "priority", "create_time", "id"),
)

events = Table(
    "training_job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("type", String(32), nullable=False),
    Column("stage", String(32), nullable=False, default=""),
    Column("state", String(16), nullable=False, default=""),
    Column("step", JSON, nullable=True),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("message", Text, nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("job_id", "sequence", name="uq_job_event_sequence"),
)

idempotency_keys = idempotency_table(metadata)
