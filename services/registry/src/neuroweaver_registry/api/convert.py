"""Protobuf ⇄ domain conversions for the registry API."""

from __future__ import annotations

from google.protobuf import json_format

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver_runtime.etag import etag_for
from neuroweaver_runtime.timestamps import to_timestamp

from ..domain import model as d

_MODEL_STATE = {d.ModelState.ACTIVE: pb.Model.STATE_ACTIVE, d.ModelState.ARCHIVED: pb.Model.STATE_ARCHIVED}
_VERSION_STATE = {
    d.VersionState.REGISTERED: pb.ModelVersion.STATE_REGISTERED,
    d.VersionState.VALIDATED: pb.ModelVersion.STATE_VALIDATED,
    d.VersionState.DEPRECATED: pb.ModelVersion.STATE_DEPRECATED,
}
VERSION_STATE_FROM_PB = {v: k for k, v in _VERSION_STATE.items()}
_FORMAT = {
    d.ArtifactFormat.LORA_ADAPTER: pb.ARTIFACT_FORMAT_LORA_ADAPTER, d.ArtifactFormat.MERGED: pb.ARTIFACT_FORMAT_MERGED,
    d.ArtifactFormat.GGUF: pb.ARTIFACT_FORMAT_GGUF, d.ArtifactFormat.GGUF_LORA: pb.ARTIFACT_FORMAT_GGUF_LORA,
}  # fmt: skip
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT.items()}
_DIRECTION = {
    d.Direction.UNSPECIFIED: cpb.METRIC_DIRECTION_UNSPECIFIED,
    d.Direction.HIGHER: cpb.METRIC_DIRECTION_HIGHER_IS_BETTER,
    d.Direction.LOWER: cpb.METRIC_DIRECTION_LOWER_IS_BETTER,
}
_DIRECTION_FROM_PB = {v: k for k, v in _DIRECTION.items()}
_ALIAS_ACTION = {
    d.AliasAction.SET: pb.AliasHistoryEntry.ACTION_SET,
    d.AliasAction.DELETE: pb.AliasHistoryEntry.ACTION_DELETE,
    d.AliasAction.ROLLBACK: pb.AliasHistoryEntry.ACTION_ROLLBACK,
}


def model_to_pb(m: d.Model) -> pb.Model:
    return pb.Model(
        name=m.name,
        display_name=m.display_name,
        description=m.description,
        specialization=m.specialization,
        base_model=m.base_model,
        labels=m.labels,
        state=_MODEL_STATE[m.state],
        latest_version=m.latest_version,
        version_count=m.version_count,
        aliases=m.aliases,
        creator=m.creator,
        create_time=to_timestamp(m.create_time),
        update_time=to_timestamp(m.update_time),
        etag=etag_for(m.name, m.revision),
    )


def model_from_pb(m: pb.Model) -> d.Model:
    return d.Model(
        name=m.name,
        display_name=m.display_name,
        description=m.description,
        specialization=m.specialization,
        base_model=m.base_model,
        labels=dict(m.labels),
    )


def metric_to_pb(m: d.Metric) -> pb.Metric:
    return pb.Metric(
        name=m.name, value=m.value, direction=_DIRECTION[m.direction], source=m.source, record_time=to_timestamp(m.record_time)
    )


def metric_from_pb(m: pb.Metric) -> d.Metric:
    return d.Metric(m.name, m.value, _DIRECTION_FROM_PB.get(m.direction, d.Direction.UNSPECIFIED), m.source)


def export_to_pb(a: d.Artifact) -> pb.Artifact:
    return pb.Artifact(
        uri=a.uri, sha256=a.sha256, size_bytes=a.size_bytes, format=_FORMAT[a.format], quantization=a.quantization,
        produced_by=a.produced_by, create_time=to_timestamp(a.create_time),
    )  # fmt: skip


def export_from_pb(a: pb.Artifact) -> d.Artifact:
    """An unspecified format reads as LORA_ADAPTER, which the use case refuses for an export (a field violation)."""
    fmt = _FORMAT_FROM_PB.get(a.format, d.ArtifactFormat.LORA_ADAPTER)
    return d.Artifact(a.uri, a.sha256, a.size_bytes, fmt, a.quantization, a.produced_by)


def version_to_pb(v: d.ModelVersion) -> pb.ModelVersion:
    lin = v.lineage
    return pb.ModelVersion(
        name=v.name,
        version=v.version,
        state=_VERSION_STATE[v.state],
        artifact=pb.Artifact(
            uri=v.artifact.uri, sha256=v.artifact.sha256, size_bytes=v.artifact.size_bytes, format=_FORMAT[v.artifact.format]
        ),
        lineage=pb.Lineage(
            base_model=lin.base_model,
            training_job=lin.training_job,
            dataset_uri=lin.dataset_uri,
            dataset_digest=lin.dataset_digest,
            eval_dataset_uri=lin.eval_dataset_uri,
            eval_dataset_digest=lin.eval_dataset_digest,
            hyperparameters=lin.hyperparameters,
            parent_version=lin.parent_version,
            judge_version=lin.judge_version,
            method=lin.method,
        ),
        metrics=[metric_to_pb(m) for m in v.metrics],
        labels=v.labels,
        notes=v.notes,
        aliases=v.aliases,
        creator=v.creator,
        create_time=to_timestamp(v.create_time),
        update_time=to_timestamp(v.update_time),
        etag=etag_for(v.name, v.revision),
        artifacts=[export_to_pb(a) for a in v.artifacts],
    )


def version_from_pb(v: pb.ModelVersion) -> d.ModelVersion:
    lin = v.lineage
    return d.ModelVersion(
        name="",
        version="",
        artifact=d.Artifact(
            v.artifact.uri,
            v.artifact.sha256,
            v.artifact.size_bytes,
            _FORMAT_FROM_PB.get(v.artifact.format, d.ArtifactFormat.LORA_ADAPTER),
        ),
        lineage=d.Lineage(
            base_model=lin.base_model,
            training_job=lin.training_job,
            dataset_uri=lin.dataset_uri,
            dataset_digest=lin.dataset_digest,
            eval_dataset_uri=lin.eval_dataset_uri,
            eval_dataset_digest=lin.eval_dataset_digest,
            hyperparameters=dict(lin.hyperparameters),
            parent_version=lin.parent_version,
            judge_version=lin.judge_version,
            method=lin.method,
        ),
        metrics=[metric_from_pb(m) for m in v.metrics],
        labels=dict(v.labels),
        notes=v.notes,
    )


def alias_to_pb(a: d.ModelAlias) -> pb.ModelAlias:
    return pb.ModelAlias(name=a.name, version=a.version, actor=a.actor, reason=a.reason, update_time=to_timestamp(a.update_time))


def history_to_pb(e: d.AliasHistoryEntry) -> pb.AliasHistoryEntry:
    return pb.AliasHistoryEntry(
        alias=e.alias,
        action=_ALIAS_ACTION[e.action],
        from_version=e.from_version,
        to_version=e.to_version,
        actor=e.actor,
        reason=e.reason,
        create_time=to_timestamp(e.create_time),
        sequence=e.sequence,
    )


def event_to_pb(e: d.ModelEvent) -> pb.ModelEvent:
    return pb.ModelEvent(
        sequence=e.sequence,
        type=pb.ModelEvent.Type.Value("TYPE_" + e.type),
        resource=e.resource,
        model=e.model,
        actor=e.actor,
        details=e.details,
        create_time=to_timestamp(e.create_time),
    )


def judge_to_pb(j: d.Judge) -> pb.Judge:
    return pb.Judge(
        name=j.name,
        display_name=j.display_name,
        description=j.description,
        latest_version=j.latest_version,
        create_time=to_timestamp(j.create_time),
        creator=j.creator,
    )


def judge_from_pb(j: pb.Judge) -> d.Judge:
    return d.Judge(name="", display_name=j.display_name, description=j.description)


def judge_config_from_pb(v: pb.JudgeVersion) -> dict:
    """The stored config: the JudgeVersion's configuration fields as JSON (enum names without prefixes)."""
    clean = pb.JudgeVersion()
    clean.CopyFrom(v)
    for output_only in ("name", "version", "creator", "create_time", "notes"):
        clean.ClearField(output_only)  # before the JSON conversion: a bogus create_time must not fail it
    config = json_format.MessageToDict(clean, preserving_proto_field_name=True)
    config["kind"] = pb.JudgeKind.Name(v.kind).removeprefix("JUDGE_KIND_")
    config["mode"] = pb.JudgeMode.Name(v.mode).removeprefix("JUDGE_MODE_")
    config["score_min"], config["score_max"] = v.score_min, v.score_max
    return config


def judge_version_to_pb(j: d.JudgeVersion) -> pb.JudgeVersion:
    config = dict(j.config)
    kind, mode = config.pop("kind", "UNSPECIFIED"), config.pop("mode", "UNSPECIFIED")
    msg = json_format.ParseDict(config, pb.JudgeVersion(), ignore_unknown_fields=True)
    msg.kind = pb.JudgeKind.Value("JUDGE_KIND_" + kind)
    msg.mode = pb.JudgeMode.Value("JUDGE_MODE_" + mode)
    msg.name, msg.version, msg.creator = j.name, j.version, j.creator
    if (created := to_timestamp(j.create_time)) is not None:
        msg.create_time.CopyFrom(created)
    return msg
