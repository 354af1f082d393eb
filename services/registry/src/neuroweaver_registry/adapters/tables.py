"""SQLAlchemy Core tables of the registry (one schema for SQLite and PostgreSQL)."""

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

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("project", String(64), nullable=False),
    Column("display_name", String(200), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("specialization", String(64), nullable=False, default=""),
    Column("base_model", String(2048), nullable=False, default=""),
    Column("labels", JSON, nullable=False, default=dict),
    Column("state", String(16), nullable=False),
    Column("latest_version", String(160), nullable=False, default=""),
    Column("version_count", Integer, nullable=False, default=0),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("revision", Integer, nullable=False, default=1),
    Index("ix_models_project_name", "project", "name"),
)

versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    Column("version", String(160), nullable=False),
    Column("sort_key", String(600), nullable=False),
    Column("state", String(16), nullable=False),
    Column("artifact_uri", String(2048), nullable=False),
    Column("artifact_sha256", String(64), nullable=False),
    Column("artifact_size", BigInteger, nullable=False, default=0),
    Column("artifact_format", String(32), nullable=False),
    Column("lineage", JSON, nullable=False),
    Column("training_job", String(512), nullable=False, default=""),
    Column("base_model", String(2048), nullable=False, default=""),
    Column("labels", JSON, nullable=False, default=dict),
    Column("notes", Text, nullable=False, default=""),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("revision", Integer, nullable=False, default=1),
    # exports (merged, GGUF, GGUF LoRA): [{uri, sha256, size_bytes, format, quantization, produced_by, create_time}] (0002)
    Column("artifacts", JSON, nullable=False, default=list, server_default="[]"),
    UniqueConstraint("model_id", "sort_key", name="uq_version_precedence"),
    Index("ix_versions_model_create", "model_id", "create_time", "id"),
)

version_metrics = Table(
    "version_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("value", Float, nullable=False),
    Column("direction", String(16), nullable=False),
    Column("source", String(512), nullable=False, default=""),
    Column("record_time", DateTime(timezone=True), nullable=False),
    Index("ix_metrics_version", "version_id", "id"),
)

aliases = Table(
    "model_aliases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("version", String(160), nullable=False),
    Column("actor", String(256), nullable=False, default=""),
    Column("reason", String(1024), nullable=False, default=""),
    Column("update_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("model_id", "alias", name="uq_alias"),
)

alias_history = Table(
    "alias_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("action", String(16), nullable=False),
    Column("from_version", String(160), nullable=False, default=""),
    Column("to_version", String(160), nullable=False, default=""),
    Column("actor", String(256), nullable=False, default=""),
    Column("reason", String(1024), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Index("ix_alias_history", "model_id", "alias", "id"),
)

events = Table(
    "model_events",
    metadata,
    Column("sequence", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("project", String(64), nullable=False),
    Column("type", String(48), nullable=False),
    Column("resource", String(512), nullable=False),
    Column("model", String(256), nullable=False, default=""),
    Column("actor", String(256), nullable=False, default=""),
    Column("details", JSON, nullable=False, default=dict),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Index("ix_events_project_seq", "project", "sequence"),
    Index("ix_events_model_seq", "model", "sequence"),
    # ListModelEvents / WatchModelEvents filters: a page of matches newest (or oldest) first reads only its rows.
    Index("ix_events_project_type_seq", "project", "type", "sequence"),
    Index("ix_events_project_actor_seq", "project", "actor", "sequence"),
    Index("ix_events_project_resource_seq", "project", "resource", "sequence"),
)

judges = Table(
    "judges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("project", String(64), nullable=False),
    Column("display_name", String(200), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("latest_version", Integer, nullable=False, default=0),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

judge_versions = Table(
    "judge_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("judge_id", Integer, ForeignKey("judges.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("config", JSON, nullable=False),
    Column("creator", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("judge_id", "version", name="uq_judge_version"),
)

idempotency_keys = idempotency_table(metadata)
