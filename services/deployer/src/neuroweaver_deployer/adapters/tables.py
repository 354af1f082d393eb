"""SQLAlchemy Core tables of the deployer (one schema for SQLite and PostgreSQL).

`deployments` also holds each deployment's ownership lease (see service/leases.py): `lease_owner` (a replica's
instance id, "" = free), `lease_expires_at` (epoch seconds on the database's clock) and `lease_epoch`, the fencing
token, incremented on every takeover; the owner's status writes and Kubernetes applies carry (owner, epoch)."""

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
    UniqueConstraint,
)

from neuroweaver_runtime.idempotency import idempotency_table

metadata = MetaData()

deployments = Table(
    "deployments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("project", String(64), nullable=False),
    Column("display_name", String(200), nullable=False, default=""),
    Column("model_version", String(512), nullable=False, default=""),
    Column("model_alias", String(512), nullable=False, default=""),
    Column("backend", String(16), nullable=False),
    Column("replicas", Integer, nullable=False),
    Column("autoscaling", JSON, nullable=False),
    Column("resources", JSON, nullable=False),
    Column("serving", JSON, nullable=False),
    Column("namespace", String(63), nullable=False, default=""),
    Column("labels", JSON, nullable=False),
    # status (written by the controller)
    Column("state", String(16), nullable=False),
    Column("served_version", String(512), nullable=False, default=""),
    Column("served_model_name", String(256), nullable=False, default=""),
    Column("target", JSON, nullable=True),  # the resolved version being served (artifact, digest, base model)
    Column("endpoint", String(256), nullable=False, default=""),
    Column("openai_base_url", String(256), nullable=False, default=""),
    Column("ready_replicas", Integer, nullable=False, default=0),
    Column("revision", BigInteger, nullable=False, default=0),
    Column("conditions", JSON, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("generation", Integer, nullable=False, default=1),
    # ownership lease (which replica converges it)
    Column("lease_owner", String(128), nullable=False, default="", server_default=""),
    Column("lease_expires_at", Float, nullable=False, default=0.0, server_default="0"),
    Column("lease_epoch", BigInteger, nullable=False, default=0, server_default="0"),
    Index("ix_deployments_project_name", "project", "name"),
)

revisions = Table(
    "deployment_revisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deployment_id", Integer, ForeignKey("deployments.id", ondelete="CASCADE"), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("model_version", String(512), nullable=False),
    Column("cause", String(600), nullable=False),
    Column("actor", String(256), nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("deployment_id", "revision", name="uq_deployment_revision"),
)

idempotency_keys = idempotency_table(metadata)
