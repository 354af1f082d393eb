"""Registry look-ups at create time: the RLAIF judge version and the version an RLAIF job starts from.

Judge versions and model versions are immutable, so what is read here is stored on the job (spec) and the
worker never needs these calls. The API key of an OpenAI-compatible judge is never read here: only the
*name* of its environment variable travels (the worker's judge reads the variable).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import grpc

from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def _call(target: str, token: str | None, tls: ClientTLS | None, method: str, request, what: str, field: str):
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
    from neuroweaver_runtime.client import open_channel

    channel = open_channel(target, token=token or None, deadline=10.0, tls=tls)
    try:
        return await getattr(rgrpc.RegistryServiceStub(channel), method)(request, timeout=10.0)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.NOT_FOUND:
            raise NotFound(
                f"{field}: {what} does not exist in the registry ({exc.details()})",
                reason=f"{field.rsplit('.', 1)[-1].upper()}_NOT_FOUND",
                metadata={"name": request.name},
            ) from None
        if code in _UNREACHABLE:
            raise Unavailable(
                f"the registry at {target} is unreachable ({code.name}); cannot resolve {what}. Retry later",
                reason="REGISTRY_UNAVAILABLE",
                metadata={"registry": target},
            ) from None
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidArgument(
                f"{field}: the registry refused {request.name!r}: {exc.details()}", field=field, reason="INVALID_NAME"
            ) from None
        raise FailedPrecondition(
            f"{field}: the registry answered {code.name} for {what}: {exc.details()}",
            reason="REGISTRY_REFUSED",
            metadata={"name": request.name},
        ) from None
    finally:
        await channel.close()


def judge_config_from_version(v) -> dict[str, Any]:
    """`neuroweaver.registry.v1.JudgeVersion` → `neuroweaver_ml.rlaif.JudgeConfig` fields (validated)."""
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver_ml.rlaif import JudgeConfig, JudgeConfigError

    kind = {rpb.JUDGE_KIND_LOCAL_EMBEDDING: "local_embedding", rpb.JUDGE_KIND_OPENAI_COMPATIBLE: "openai_compatible"}.get(v.kind)
    if kind is None:
        raise FailedPrecondition(f"judge version {v.name} has no kind; it cannot score", reason="JUDGE_VERSION_UNUSABLE")
    values: dict[str, Any] = dict(
        name=v.name,
        kind=kind,
        mode="pairwise" if v.mode == rpb.JUDGE_MODE_PAIRWISE else "pointwise",
        rubric=v.rubric,
        prompt_template=v.prompt_template,
        swap_positions=v.swap_positions,
    )
    if v.score_max > v.score_min:
        values.update(score_min=v.score_min, score_max=v.score_max)
    if kind == "openai_compatible":
        o = v.openai
        values.update(model=o.model, base_url=o.base_url, api_key_env=o.api_key_env, temperature=o.temperature)
        values.update(
            {
                k: getattr(o, k)
                for k in ("max_tokens", "requests_per_minute", "tokens_per_minute", "max_concurrency", "timeout_seconds")
                if getattr(o, k)
            }
        )
    else:
        values["model"] = v.local_embedding.model
    try:
        return asdict(JudgeConfig(**values))
    except (JudgeConfigError, TypeError, ValueError) as exc:
        raise FailedPrecondition(
            f"judge version {v.name} is not usable: {exc}", reason="JUDGE_VERSION_UNUSABLE", metadata={"judge_version": v.name}
        ) from None


async def fetch_judge(target: str, token: str | None, name: str, *, tls: ClientTLS | None = None) -> dict[str, Any]:
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

    version = await _call(
        target,
        token,
        tls,
        "GetJudgeVersion",
        rsvc.GetJudgeVersionRequest(name=name),
        f"judge version {name}",
        "training_job.rlaif.judge_version",
    )
    return judge_config_from_version(version)


async def fetch_start_version(target: str, token: str | None, name: str, *, tls: ClientTLS | None = None):
    """The version an RLAIF job starts from: (full name, artifact uri, sha256, lineage.base_model)."""
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

    field = "training_job.rlaif.start_from_version"
    v = await _call(target, token, tls, "GetModelVersion", rsvc.GetModelVersionRequest(name=name), f"model version {name}", field)
    if v.artifact.format not in (rpb.ARTIFACT_FORMAT_LORA_ADAPTER, rpb.ARTIFACT_FORMAT_UNSPECIFIED) or not v.artifact.uri:
        raise FailedPrecondition(
            f"{field}: {v.name} is not a LoRA adapter version; RLAIF continues an adapter", reason="START_VERSION_NOT_ADAPTER"
        )
    if not v.lineage.base_model:
        raise FailedPrecondition(
            f"{field}: {v.name} records no lineage.base_model; cannot tell which base it applies to",
            reason="START_VERSION_NO_BASE",
        )
    return v.name, v.artifact.uri, v.artifact.sha256, v.lineage.base_model
