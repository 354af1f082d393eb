"""AddModelVersionArtifact over gRPC on SQLite and PostgreSQL: exports listed on the version (oldest first, one per
(format, quantization)), idempotent retries, immutable bytes, validation, the audit event, reads through aliases."""

from __future__ import annotations

import grpc

from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver_runtime.grpc_errors import field_violations

INVALID, EXISTS, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND


def _gguf(quant: str, digest: str = "c") -> pb.Artifact:
    return pb.Artifact(
        uri=f"file:///store/exports/model-{quant}.gguf", sha256=digest * 64, size_bytes=1234, format=pb.ARTIFACT_FORMAT_GGUF,
        quantization=quant, produced_by="projects/default/trainingJobs/exp-1 (llama.cpp convert_hf_to_gguf)",
    )  # fmt: skip


async def test_exports_are_added_listed_and_immutable(registry, expect_error):
    stub = registry.stub
    m = await registry.model()
    v = await registry.version(m.name, version="1.1.0")
    assert list(v.artifacts) == []
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="production", version="1.1.0"))
    got = await stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=v.name, artifact=_gguf("q4_k_m")))
    assert [a.quantization for a in got.artifacts] == ["q4_k_m"] and got.etag != v.etag
    a = got.artifacts[0]
    assert (a.format, a.sha256, a.size_bytes, a.uri) == (pb.ARTIFACT_FORMAT_GGUF, "c" * 64, 1234, _gguf("q4_k_m").uri)
    assert a.produced_by.startswith("projects/default/trainingJobs/exp-1") and a.create_time.seconds > 0
    assert got.artifact.format == pb.ARTIFACT_FORMAT_LORA_ADAPTER and got.artifact.quantization == ""  # the trained one
    # a retry of the same export changes nothing; through an alias too
    again = await stub.AddModelVersionArtifact(
        rs.AddModelVersionArtifactRequest(name=f"{m.name}/versions/production", artifact=_gguf("q4_k_m"))
    )
    assert again.etag == got.etag and len(again.artifacts) == 1
    # other bytes for the same kind are refused
    await expect_error(
        stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=v.name, artifact=_gguf("q4_k_m", "d"))),
        EXISTS,
        "ARTIFACT_ALREADY_EXISTS",
    )
    lora = pb.Artifact(
        uri="file:///store/exports/adapter-f16.gguf", sha256="e" * 64, size_bytes=99, format=pb.ARTIFACT_FORMAT_GGUF_LORA,
        quantization="f16",
    )  # fmt: skip
    # a read now (cached on PostgreSQL) must not hide the next additions
    cached = await stub.GetModelVersion(rs.GetModelVersionRequest(name=f"{m.name}/versions/production"))
    assert len(cached.artifacts) == 1
    await stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=v.name, artifact=_gguf("f16")))
    await stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=v.name, artifact=lora))
    read = await stub.GetModelVersion(rs.GetModelVersionRequest(name=f"{m.name}/versions/production"))
    assert [(x.format, x.quantization) for x in read.artifacts] == [
        (pb.ARTIFACT_FORMAT_GGUF, "q4_k_m"), (pb.ARTIFACT_FORMAT_GGUF, "f16"), (pb.ARTIFACT_FORMAT_GGUF_LORA, "f16"),
    ]  # fmt: skip
    listed = await stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name))
    assert len(listed.model_versions[0].artifacts) == 3
    events = await stub.ListModelEvents(rs.ListModelEventsRequest(parent="projects/default", model=m.name, page_size=100))
    added = [e for e in events.events if e.type == pb.ModelEvent.TYPE_VERSION_ARTIFACT_ADDED]
    assert len(added) == 3 and added[0].details["quantization"] == "q4_k_m" and added[0].resource == v.name


async def test_bad_exports_are_refused(registry, expect_error):
    stub = registry.stub
    m = await registry.model()
    v = await registry.version(m.name, version="1.0.0")
    bad = pb.Artifact(uri="", sha256="XY", size_bytes=-1, format=pb.ARTIFACT_FORMAT_LORA_ADAPTER, quantization="Q4 K")
    err = await expect_error(
        stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=v.name, artifact=bad)), INVALID, "INVALID_ARGUMENT"
    )
    fields = {f.field for f in field_violations(err)}
    assert fields == {"artifact.uri", "artifact.sha256", "artifact.size_bytes", "artifact.format", "artifact.quantization"}
    await expect_error(
        stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=v.name, artifact=pb.Artifact(format=42))),
        INVALID,
        "INVALID_ENUM",
    )
    await expect_error(
        stub.AddModelVersionArtifact(rs.AddModelVersionArtifactRequest(name=f"{m.name}/versions/9.9.9", artifact=_gguf("f16"))),
        NOT_FOUND,
        "VERSION_NOT_FOUND",
    )
    # a GGUF is an export, never a version's own artifact
    mv = pb.ModelVersion(artifact=_gguf("f16"))
    await expect_error(
        stub.CreateModelVersion(rs.CreateModelVersionRequest(parent=m.name, version="2.0.0", model_version=mv)),
        INVALID,
        "INVALID_ARGUMENT",
    )
