"""The registry, seen from the trainer: look-ups at create time, and the worker's registration of its result.

At create time the RLAIF judge version and the version an RLAIF job starts from are resolved. Judge versions
and model versions are immutable, so what is read there is stored on the job (spec) and the worker never
needs those calls. The API key of an OpenAI-compatible judge is never read here: only the *name* of its
environment variable travels (the worker's judge reads the variable).

The worker registers exactly one version per job (`register_version`): a deterministic request_id, retries
while the registry is unreachable, on behalf of the job's creator, under one client span.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from neuroweaver_runtime.auth import ANONYMOUS_ADMIN, Principal, Role, acting_as
from neuroweaver_runtime.client import ClientTLS, ServiceClient
from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

from ..domain.job import TrainingJob, hyperparameters_as_strings, lineage_method, registration_request_id

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# what registration keeps retrying (until --registry-retry-seconds): the registry may come back
_RETRYABLE = _UNREACHABLE | {grpc.StatusCode.RESOURCE_EXHAUSTED}
_DEADLINE = 10.0  # seconds per call

_tracer = trace.get_tracer("neuroweaver.trainer.registry")


def _registry(target: str, token: str | None, tls: ClientTLS | None) -> ServiceClient:
    """A registry client for one look-up or one registration (closed after it: `async with`)."""
    return ServiceClient(target, token, _DEADLINE, tls)


async def _call(target: str, token: str | None, tls: ClientTLS | None, method: str, request, what: str, field: str):
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc

    async with _registry(target, token, tls) as registry:
        return await _lookup(registry.stub(rgrpc.RegistryServiceStub), target, method, request, what, field)


async def _lookup(stub, target: str, method: str, request, what: str, field: str):
    try:
        return await getattr(stub, method)(request, timeout=_DEADLINE)
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
                for k in (
                    "max_tokens",
                    "requests_per_minute",
                    "tokens_per_minute",
                    "max_concurrency",
                    "timeout_seconds",
                    "price_per_1k_prompt_tokens",
                    "price_per_1k_completion_tokens",  # so judge_cost_usd is real
                )  # fmt: skip
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


async def fetch_start_version(
    target: str,
    token: str | None,
    name: str,
    *,
    tls: ClientTLS | None = None,
    field: str = "training_job.rlaif.start_from_version",
    needs: str = "RLAIF continues an adapter",
):
    """The version an RLAIF job starts from (or an EXPORT job exports, `field` and `needs` saying so): (full name,
    artifact uri, sha256, lineage.base_model)."""
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

    v = await _call(target, token, tls, "GetModelVersion", rsvc.GetModelVersionRequest(name=name), f"model version {name}", field)
    if v.artifact.format not in (rpb.ARTIFACT_FORMAT_LORA_ADAPTER, rpb.ARTIFACT_FORMAT_UNSPECIFIED) or not v.artifact.uri:
        raise FailedPrecondition(f"{field}: {v.name} is not a LoRA adapter version; {needs}", reason="START_VERSION_NOT_ADAPTER")
    if not v.lineage.base_model:
        raise FailedPrecondition(
            f"{field}: {v.name} records no lineage.base_model; cannot tell which base it applies to",
            reason="START_VERSION_NO_BASE",
        )
    return v.name, v.artifact.uri, v.artifact.sha256, v.lineage.base_model


# -- registration of a training job's result (the worker) ------------------------------------------

# Directions the trainer declares for the metrics it reports; an unlisted metric is registered without one, and the
# registry's compare then reports its change without a verdict.
HIGHER = (
    "reward_model_accuracy",
    "reward_model_mean_margin",
    "judge_win_rate_vs_parent",
    "judge_win_rate_vs_base",
    "dpo_reward_accuracy",
    "dpo_reward_margin",
    "policy_final_reward",
    "preference_pairs",
)
LOWER = ("train_loss", "eval_loss", "judge_cost_usd", "malformed", "policy_final_loss", "judge_errors")


def metric_direction(name: str) -> str:
    base = name.removesuffix("_ci_low").removesuffix("_ci_high")
    return "higher" if base in HIGHER else "lower" if base in LOWER else ""


def _as_creator(job: TrainingJob):
    """The registry authorizes the job's creator, not the trainer: a job can only register where its creator may
    (with auth off the creator is anonymous and the trainer's own token is used as it is)."""
    if not job.creator or job.creator == ANONYMOUS_ADMIN.subject:
        return contextlib.nullcontext()
    return acting_as(Principal(job.creator, job.name.split("/")[1], Role.OPERATOR))


@dataclass(frozen=True)
class NewVersion:
    """What a finished job registers: its stored adapter and what training measured and read."""

    uri: str
    sha256: str
    size_bytes: int
    summary: str  # the end of the version's notes
    metrics: dict[str, float]
    dataset_uri: str = ""
    dataset_digest: str = ""
    parent_version: str = ""
    judge_version: str = ""


class RegistrationFailed(Exception):
    """The registry refused the version, or stayed unreachable; the message says where the adapter is."""


def version_request(job: TrainingJob, new: NewVersion):
    """The CreateModelVersionRequest of a job's result; its request_id is the job's, so a retry never registers twice."""
    from neuroweaver.common.v1 import common_pb2 as cpb
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

    directions = {
        "higher": cpb.METRIC_DIRECTION_HIGHER_IS_BETTER,
        "lower": cpb.METRIC_DIRECTION_LOWER_IS_BETTER,
        "": cpb.METRIC_DIRECTION_UNSPECIFIED,
    }
    bump = {"major": cpb.VERSION_BUMP_MAJOR, "minor": cpb.VERSION_BUMP_MINOR, "patch": cpb.VERSION_BUMP_PATCH}[
        job.version_bump or "minor"
    ]
    return rsvc.CreateModelVersionRequest(
        parent=job.target_model,
        bump=bump,
        request_id=registration_request_id(job.name),
        model_version=rpb.ModelVersion(
            artifact=rpb.Artifact(uri=new.uri, sha256=new.sha256, size_bytes=new.size_bytes, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
            lineage=rpb.Lineage(
                base_model=job.base_model, training_job=job.name, dataset_uri=new.dataset_uri, dataset_digest=new.dataset_digest,
                eval_dataset_uri=job.eval_dataset_uri or job.rlaif.eval_prompts_uri,
                eval_dataset_digest=job.eval_dataset_digest or job.rlaif.eval_prompts_digest,
                hyperparameters=hyperparameters_as_strings(job), method=lineage_method(job),
                parent_version=new.parent_version, judge_version=new.judge_version,
            ),
            metrics=[rpb.Metric(name=k, value=v, direction=directions[metric_direction(k)], source="trainer") for k, v in sorted(new.metrics.items())],
            labels={k: v for k, v in job.labels.items()},
            notes=f"{lineage_method(job)} of {job.base_model} by {job.name}: {new.summary}",
        ),
    )  # fmt: skip


async def register_version(
    target: str,
    token: str | None,
    job: TrainingJob,
    new: NewVersion,
    *,
    tls: ClientTLS | None = None,
    retry_seconds: float = 120.0,
    on_retry: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """Registers `new` as the next version of the job's target model, on behalf of the job's creator; returns its
    name. An unreachable registry is retried (backoff 0.5 s doubling to 5 s) for `retry_seconds`, each retry
    announced to `on_retry`; anything else the registry answers, or the time running out, is RegistrationFailed."""
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc

    request = version_request(job, new)
    async with _registry(target, token, tls) as registry:
        # a client span around the registration (all retries): the client's channel injects it as the traceparent
        span = _tracer.start_span(
            "RegistryService/CreateModelVersion", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "neuroweaver.registry.v1.RegistryService", "rpc.method": "CreateModelVersion"},
        )  # fmt: skip
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False), _as_creator(job):
                stub = registry.stub(rgrpc.RegistryServiceStub)
                return await _create_with_retries(stub, request, target, job, new, retry_seconds, on_retry)
        except RegistrationFailed as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
        finally:
            span.end()


async def _create_with_retries(stub, request, target, job, new, retry_seconds, on_retry) -> str:
    version = await _with_retries(
        lambda: stub.CreateModelVersion(request, timeout=_DEADLINE), target, retry_seconds, on_retry,
        refused=lambda exc: (
            f"the registry refused the new version of {job.target_model}: {exc.code().name}: {exc.details()}; "
            f"the adapter is stored at {new.uri}"
        ),
        gone=lambda tries, exc: (
            f"the registry at {target} was unreachable for {retry_seconds:.0f}s "
            f"({tries} tries, last: {exc.code().name}); nothing was registered. The adapter is stored at {new.uri} "
            f"(sha256 {new.sha256}); re-run the job once the registry is back"
        ),
    )  # fmt: skip
    return version.name


async def _with_retries(call, target, retry_seconds, on_retry, *, refused, gone):
    """`call()` until it answers; an unreachable registry is retried (0.5 s doubling to 5 s) for `retry_seconds`,
    each retry announced to `on_retry`; a refusal or the time running out is RegistrationFailed(refused/gone text)."""
    deadline = time.monotonic() + retry_seconds
    delay, tries = 0.5, 0
    while True:
        tries += 1
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE:
                raise RegistrationFailed(refused(exc)) from None
            if time.monotonic() + delay > deadline:
                raise RegistrationFailed(gone(tries, exc)) from None
            if on_retry is not None:
                await on_retry(f"registry unreachable ({exc.code().name}), try {tries}; retrying in {delay:.1f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


@dataclass(frozen=True)
class NewExport:
    """What an EXPORT job adds to its version: the stored export and how it was made."""

    uri: str
    sha256: str
    size_bytes: int
    format: str  # merged | gguf | gguf-lora
    quantization: str
    produced_by: str


async def add_export_artifact(
    target: str,
    token: str | None,
    job: TrainingJob,
    new: NewExport,
    *,
    tls: ClientTLS | None = None,
    retry_seconds: float = 120.0,
    on_retry: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """AddModelVersionArtifact of an EXPORT job's result on behalf of the job's creator (a retry of the same bytes is
    answered as a success by the registry); returns the version's name. Retries as `register_version`."""
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc

    fmt = {"merged": rpb.ARTIFACT_FORMAT_MERGED, "gguf": rpb.ARTIFACT_FORMAT_GGUF, "gguf-lora": rpb.ARTIFACT_FORMAT_GGUF_LORA}
    request = rsvc.AddModelVersionArtifactRequest(
        name=job.export.model_version,
        artifact=rpb.Artifact(
            uri=new.uri, sha256=new.sha256, size_bytes=new.size_bytes, format=fmt[new.format], quantization=new.quantization,
            produced_by=new.produced_by,
        ),
    )  # fmt: skip
    async with _registry(target, token, tls) as registry:
        span = _tracer.start_span(
            "RegistryService/AddModelVersionArtifact", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "neuroweaver.registry.v1.RegistryService", "rpc.method": "AddModelVersionArtifact"},
        )  # fmt: skip
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False), _as_creator(job):
                stub = registry.stub(rgrpc.RegistryServiceStub)
                version = await _with_retries(
                    lambda: stub.AddModelVersionArtifact(request, timeout=_DEADLINE), target, retry_seconds, on_retry,
                    refused=lambda exc: (
                        f"the registry refused the export of {job.export.model_version}: {exc.code().name}: {exc.details()}; "
                        f"the export is stored at {new.uri}"
                    ),
                    gone=lambda tries, exc: (
                        f"the registry at {target} was unreachable for {retry_seconds:.0f}s ({tries} tries, last: "
                        f"{exc.code().name}); the export is stored at {new.uri} (sha256 {new.sha256}) but not recorded on "
                        f"{job.export.model_version}; re-run the job once the registry is back"
                    ),
                )  # fmt: skip
                return version.name
        except RegistrationFailed as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
        finally:
            span.end()
