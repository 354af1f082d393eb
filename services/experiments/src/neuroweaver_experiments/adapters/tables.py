"""SQLAlchemy Core tables of the experiments service (one schema for SQLite and PostgreSQL).

Hot tables are keyed for their access paths: `assignments` (sticky store and exposure log) by
(experiment, unit); `metric_events` (raw events; its unique (experiment, idempotency key) index is the
duplicate check); `unit_metrics` (per-unit aggregates) by (experiment, metric, unit); `variant_stats`
(sufficient statistics) by (experiment, metric, variant).

The high-volume tables (assignments, metric_events, unit_metrics) carry no foreign key to
`experiments`: the per-row FK check cost about 40% of ingest time on PostgreSQL, experiments are never
deleted, and every writer resolves the experiment row in the same transaction anyway.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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
)

from neuroweaver_runtime.idempotency import idempotency_table

metadata = MetaData()

experiments = Table(
    "experiments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("project", String(64), nullable=False),
    Column("display_name", String(200), nullable=False, default=""),
    Column("description", Text, nullable=False, default=""),
    Column("variants", JSON, nullable=False),
    # Weights of every assignment epoch (a new epoch starts when weights change); SRM weighs them by exposures.
    Column("weights_history", JSON, nullable=False),
    Column("hash_seed", String(256), nullable=False),
    Column("coverage", Float, nullable=False),
    Column("primary_metric", JSON, nullable=False),
    Column("guardrail_metrics", JSON, nullable=False),
    Column("secondary_metrics", JSON, nullable=False),
    Column("min_sample_size", BigInteger, nullable=False),
    Column("significance_level", Float, nullable=False),
    Column("analysis", String(32), nullable=False),
    Column("auto_conclude", Boolean, nullable=False, default=False),
    Column("promote_alias", String(64), nullable=False, default=""),
    Column("labels", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("winner", String(64), nullable=False, default=""),
    Column("conclusion", Text, nullable=False, default=""),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("start_time", DateTime(timezone=True), nullable=True),
    Column("end_time", DateTime(timezone=True), nullable=True),
    Column("revision", Integer, nullable=False, default=1),
    # domain.judging.AnswerJudging as JSON; NULL = answers are not judged (migration 0007)
    Column("answer_judging", JSON(none_as_null=True), nullable=True),
    Index("ix_experiments_project_name", "project", "name"),
)

# Sticky assignments of in-coverage units; a row is the unit's first exposure.
assignments = Table(
    "assignments",
    metadata,
    Column("experiment_id", Integer, primary_key=True),
    Column("unit_id", String(256), primary_key=True),
    Column("variant", String(64), nullable=False),
    Column("bucket", Integer, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

# First exposures per weights epoch, bucket class and variant (domain.assignment.BucketClasses: the sample-ratio
# test's strata), maintained with each batch of new assignments. bucket_class -1: counted before classes were recorded.
exposure_counts = Table(
    "exposure_counts",
    metadata,
    Column("experiment_id", Integer, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("epoch", Integer, primary_key=True),
    Column("bucket_class", Integer, primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("units", BigInteger, nullable=False, default=0),
)

# Raw metric events (audit trail; statistics never read them). The unique index on (experiment, key) is the
# idempotency check: an event whose key is already there is a duplicate (events without a key, NULL, never are).
metric_events = Table(
    "metric_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, nullable=False),
    Column("unit_id", String(256), nullable=False),
    Column("metric", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("idempotency_key", String(256), nullable=True),
    Column("covariate", Float, nullable=True),  # the event's pre-experiment covariate (CUPED), if it had one
    # lineage of a judge score (RecordAnswers): the judge version that produced the value; NULL for callers' events
    Column("judge_version", String(256), nullable=True),
    Index("uq_metric_events_key", "experiment_id", "idempotency_key", unique=True),
)

# Per-unit aggregates: count, sum and number of positive values of the unit's events of one metric, and the unit's
# CUPED covariate (the first one recorded; NULL = none yet). covariate_since is `count` as of the batch that set it,
# so a batch's updated row tells whether that batch set it (covariate_since = count) without reading the row first.
unit_metrics = Table(
    "unit_metrics",
    metadata,
    Column("experiment_id", Integer, primary_key=True),
    Column("metric", String(64), primary_key=True),
    Column("unit_id", String(256), primary_key=True),
    Column("variant", String(64), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("total", Float, nullable=False),
    Column("positives", BigInteger, nullable=False),
    Column("covariate", Float, nullable=True),
    Column("covariate_since", BigInteger, nullable=True),
    postgresql_with={"fillfactor": 70},  # room for in-place (HOT) updates: every batch updates its units' rows
)

# Sufficient statistics of unit values per variant and metric: n, mean and M2 = Σ(x − mean)² (centred, so the
# variance does not cancel when |mean| ≫ sd; merged per batch by domain.aggregation.StatsDelta's arithmetic).
variant_stats = Table(
    "variant_stats",
    metadata,
    Column("experiment_id", Integer, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("metric", String(64), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("mean", Float, nullable=False),
    Column("m2", Float, nullable=False),
    # CUPED co-moments with the units' covariates x (domain.cuped.PairedStats; x = 0 for a unit without one):
    # units with a covariate, mean of x, M2 of x and Σ(x − mean_x)(value − mean). NULL: the row was written before
    # covariates were tracked (migration 0006), and stays NULL (its units' covariates are unknown): no CUPED.
    Column("covariate_units", BigInteger, nullable=True),
    Column("covariate_mean", Float, nullable=True),
    Column("covariate_m2", Float, nullable=True),
    Column("comoment", Float, nullable=True),
)

# Running state of the sequential test per comparison (running minimum p, intersected confidence sequences).
sequential_states = Table(
    "sequential_states",
    metadata,
    Column("experiment_id", Integer, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("metric", String(64), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("p_value", Float, nullable=False),
    Column("diff_lower", Float, nullable=False),
    Column("diff_upper", Float, nullable=False),
    Column("lift_lower", Float, nullable=False),
    Column("lift_upper", Float, nullable=False),
    Column("looks", Integer, nullable=False, default=0),
)

# The one decision of a fixed-horizon experiment, taken at the first look with the planned sample size; every later
# look reports it (statistics.decide): re-deciding at each look would be peeking.
horizon_decisions = Table(
    "horizon_decisions",
    metadata,
    Column("experiment_id", Integer, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("decision", String(32), nullable=False),
    Column("variant", String(64), nullable=True),
    Column("reason", Text, nullable=False),
    Column("progress", Float, nullable=False),
    Column("power", Float, nullable=True),  # NULL = NaN (SQLite has no NaN)
    Column("decide_time", DateTime(timezone=True), nullable=False),
)

# Live answers recorded for judging (RecordAnswers; service.judging), durable so that a restart resumes them. A row
# per answer key: SKIPPED (outside the sample: counted, texts not kept), PENDING (waiting for the judge; claimed by a
# replica through lease_owner/lease_expires_at), SCORED (score = the metric event `judge:<key>`) or FAILED (error).
judged_answers = Table(
    "judged_answers",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, nullable=False),
    Column("idempotency_key", String(256), nullable=False),
    Column("unit_id", String(256), nullable=False),
    Column("variant", String(64), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("reference", Text, nullable=False),
    Column("judge_version", String(256), nullable=False),
    Column("metric", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("score", Float, nullable=True),
    Column("error", Text, nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64), nullable=False, default=""),
    Column("lease_expires_at", Float, nullable=False, default=0.0),
    Column("answer_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Index("uq_judged_answers_key", "experiment_id", "idempotency_key", unique=True),
    Index("ix_judged_answers_state", "state", "experiment_id", "id"),
)

idempotency_keys = idempotency_table(metadata)
