"""InferenceService servicer: protobuf in, use case, protobuf out."""

from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf.duration_pb2 import Duration

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.auth import Role, authorize, principal_var
from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.grpc_errors import status_code
from neuroweaver_runtime.telemetry import grpc_code_label

from .. import metrics
from ..domain import Completion, GenerationInput, Message, Sampling, ServedModel, TokenLogprob
from ..service import InferenceService

METHOD_ROLES = {"Generate": Role.VIEWER, "GenerateStream": Role.VIEWER, "ListModels": Role.VIEWER}
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
VERSION_METADATA = "x-neuroweaver-model-version"  # GenerateStream's initial metadata: the version serving it


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def input_from_pb(request) -> GenerationInput:
    s = request.sampling
    return GenerationInput(
        model=request.model,
        messages=[Message(m.role, m.content) for m in request.messages],
        prompt=request.prompt,
        sampling=Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop),
            seed=s.seed if s.HasField("seed") else None,
            logprobs=s.logprobs,
            top_logprobs=s.top_logprobs,
        ),
    )


def logprobs_to_pb(entries: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=e.token,
            logprob=e.logprob,
            token_bytes=e.raw,
            top_logprobs=[pb.TopLogprob(token=t.token, logprob=t.logprob, token_bytes=t.raw) for t in e.top],
            text_offset=e.offset,
        )
        for e in entries or ()
    ]


def completion_to_pb(c: Completion, served: ServedModel) -> svc.GenerateResponse:
    return svc.GenerateResponse(
        model=c.model,
        text=c.text,
        finish_reason=_FINISH[c.finish_reason],
        usage=pb.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
        latency=_duration(c.latency_s),
        time_to_first_token=_duration(c.ttft_s),
        model_version=served.model_version,
        served_model=served.name,
        system_fingerprint=served.fingerprint,
        logprobs=logprobs_to_pb(c.logprobs),
    )


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _code_of(deadline: float | None):
    """The `code` label of a failed call, as go-grpc-prometheus names gRPC codes (`NotFound`, `Canceled`...)."""

    def code(exc: BaseException) -> str:
        if isinstance(exc, DomainError):
            return grpc_code_label(status_code(exc.kind))
        if isinstance(exc, asyncio.CancelledError):
            expired = deadline is not None and time.monotonic() >= deadline
            return grpc_code_label(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
        return grpc_code_label(grpc.StatusCode.INTERNAL)

    return code


class InferenceServicer(svc_grpc.InferenceServiceServicer):
    def __init__(self, service: InferenceService, project: str) -> None:
        self.svc = service
        self.project = project

    def _check_project(self) -> None:
        """The shared interceptor authenticated the caller and checked the role; no inference request names a
        resource it could take the project from, so the server's own project is checked here."""
        authorize(principal_var.get(), Role.VIEWER, {self.project})

    async def Generate(self, request, context):
        self._check_project()
        deadline = _deadline(context)
        with metrics.observe("Generate", _code_of(deadline)):
            completion = await self.svc.generate(input_from_pb(request), deadline, "Generate")
        return completion_to_pb(completion, completion.served or self.svc.served)

    async def GenerateStream(self, request, context):
        self._check_project()
        deadline = _deadline(context)
        with metrics.observe("GenerateStream", _code_of(deadline)):
            # Which version serves the stream, known before its last message says so (the HTTP API's header).
            served, model = self.svc.route(request.model)
            await context.send_initial_metadata(((VERSION_METADATA, served.model_version or served.name),))
            async for d in self.svc.stream(input_from_pb(request), deadline, "GenerateStream"):
                if d.finish_reason is None:
                    yield svc.GenerateStreamResponse(delta=d.text, logprobs=logprobs_to_pb(d.logprobs))
                else:
                    yield svc.GenerateStreamResponse(
                        delta=d.text,
                        finish_reason=_FINISH[d.finish_reason],
                        usage=pb.Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens),
                        latency=_duration(d.latency_s),
                        time_to_first_token=_duration(d.ttft_s),
                        model=model,
                        model_version=served.model_version,
                        served_model=served.name,
                        system_fingerprint=served.fingerprint,
                        logprobs=logprobs_to_pb(d.logprobs),
                    )

    async def ListModels(self, request, context):
        self._check_project()
        return svc.ListModelsResponse(
            models=[
                svc.ServedModel(
                    name=m.name,
                    model_version=m.model_version,
                    base_model=m.base_model,
                    adapter_sha256=m.adapter_sha256,
                    quantized_4bit=m.quantized_4bit,
                    stable_names=m.stable_names,
                    system_fingerprint=m.fingerprint,
                    engine=m.engine,
                )
                for m in self.svc.models()
            ]
        )
