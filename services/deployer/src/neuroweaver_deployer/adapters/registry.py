"""The registry, seen from the deployer: resolve versions (and aliases) and follow model events (gRPC stubs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_runtime.client import ClientTLS, ServiceClient
from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

from ..domain.model import ResolvedVersion

ALIAS_EVENTS = {rpb.ModelEvent.TYPE_ALIAS_SET, rpb.ModelEvent.TYPE_ALIAS_ROLLED_BACK, rpb.ModelEvent.TYPE_ALIAS_DELETED}
# lineage.method of the versions a reward-model training job registers (a LoRA adapter with a score head):
# they score texts and cannot generate, so they are never deployed.
REWARD_MODEL_METHOD = "reward-model"


@dataclass(frozen=True)
class AliasEvent:
    sequence: int
    alias_name: str  # projects/p/models/m/aliases/a
    from_version: str
    to_version: str


class RegistryGateway(ServiceClient):
    """Look-ups and the event stream of the registry, on one channel for the deployer's lifetime."""

    def __init__(
        self,
        target: str,
        token: str = "",
        deadline: float = 10.0,
        artifact_roots: list[str] | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        from neuroweaver_ml import PathRoots

        super().__init__(target, token, deadline, tls)
        # None = no restriction (embedded mode); otherwise every local file a model server is handed lies inside
        self.artifact_roots = PathRoots(artifact_roots) if artifact_roots else None

    @property
    def _stub(self) -> rgrpc.RegistryServiceStub:
        return self.stub(rgrpc.RegistryServiceStub)

    async def resolve(self, version_name: str, field: str = "model_version") -> ResolvedVersion:
        """A version name (`.../versions/1.2.0` or `.../versions/<alias>`) → the version and its artifact."""
        try:
            mv = await self._stub.GetModelVersion(rsvc.GetModelVersionRequest(name=version_name))
        except grpc.aio.AioRpcError as exc:
            raise _map(exc, version_name, field) from None
        if mv.state == rpb.ModelVersion.STATE_DEPRECATED:
            raise FailedPrecondition(
                f"{mv.name} is deprecated and must not be deployed", reason="VERSION_DEPRECATED", metadata={"version": mv.name}
            )
        self._check_confined(mv.name, mv.artifact.uri, mv.lineage.base_model)
        if mv.lineage.method == REWARD_MODEL_METHOD:
            raise FailedPrecondition(
                f"{mv.name} is a reward model (a scoring head, not a text generator); the model server cannot serve it",
                reason="NOT_A_GENERATIVE_MODEL",
                metadata={"model_version": mv.name, "method": mv.lineage.method},
            )
        gguf = _pick(mv.artifacts, rpb.ARTIFACT_FORMAT_GGUF, GGUF_PREFERENCE)
        lora = _pick(mv.artifacts, rpb.ARTIFACT_FORMAT_GGUF_LORA, GGUF_LORA_PREFERENCE)
        for export in (gguf, lora):
            if export is not None:
                self._check_confined(mv.name, export.uri)
        exports: tuple[str, str, str, str] = (  # gguf_uri, gguf_sha256, gguf_lora_uri, gguf_lora_sha256
            gguf.uri if gguf else "",
            gguf.sha256 if gguf else "",
            lora.uri if lora else "",
            lora.sha256 if lora else "",
        )
        if mv.artifact.format == rpb.ARTIFACT_FORMAT_MERGED:
            return ResolvedVersion(mv.name, mv.version, "", "", mv.artifact.uri, *exports)
        if not mv.lineage.base_model:
            raise FailedPrecondition(
                f"{mv.name} has no lineage.base_model; the adapter cannot be loaded", reason="BASE_MODEL_UNKNOWN"
            )
        return ResolvedVersion(mv.name, mv.version, mv.artifact.uri, mv.artifact.sha256, mv.lineage.base_model, *exports)

    def _check_confined(self, version: str, uri: str, base_model: str = "") -> None:
        """With artifact roots configured, a version whose local artifact or base-model checkpoint (a path in its
        lineage) lies elsewhere is never served: no `../` escapes or host files through a registered URI. Decided
        by the shared resolver without looking outside the roots; the error names neither the path nor the roots.
        Object-storage URIs (s3://...) and builtin/hub base models are names, not host paths."""
        if self.artifact_roots is None:
            return
        from neuroweaver_ml import PathError, reference_kind
        from neuroweaver_ml.paths import URI_SCHEME

        checks = []
        if uri and (not URI_SCHEME.match(uri) or uri.lower().startswith("file:")):
            checks.append(("artifact", uri, "ARTIFACT_PATH_NOT_ALLOWED"))
        if base_model and reference_kind(base_model) == "path":
            checks.append(("base model", base_model, "BASE_MODEL_PATH_NOT_ALLOWED"))
        for what, value, reason in checks:
            try:
                self.artifact_roots.resolve(value, must_exist=False)
            except PathError as exc:
                raise FailedPrecondition(
                    f"{version}: its {what} {exc.detail} (the deployer's artifact roots)",
                    reason=reason,
                    metadata={"model_version": version},
                ) from None

    async def alias_events(self, project: str, model: str, after: int) -> AsyncIterator[AliasEvent]:
        """Alias moves of `model` after the cursor, then live; runs until cancelled or the stream breaks."""
        call = self._stub.WatchModelEvents(
            rsvc.WatchModelEventsRequest(parent=f"projects/{project}", model=model, after_sequence=after)
        )
        async for msg in call:
            e = msg.event
            if e.type in ALIAS_EVENTS:
                yield AliasEvent(e.sequence, e.resource, e.details.get("from_version", ""), e.details.get("to_version", ""))

    async def latest_sequence(self, project: str, model: str) -> int:
        """The newest event sequence of a model (the cursor to start following from)."""
        last, token = 0, ""
        while True:
            page = await self._stub.ListModelEvents(
                rsvc.ListModelEventsRequest(parent=f"projects/{project}", model=model, page_size=1000, page_token=token)
            )
            if page.events:
                last = max(last, max(e.sequence for e in page.events))
            token = page.next_page_token
            if not token:
                return last


# Which export the llama.cpp engine gets when a version has several: the fastest merged GGUF on a CPU first; the
# GGUF LoRA closest to the trained weights first.
GGUF_PREFERENCE = ("q4_k_m", "q8_0", "f16", "bf16", "f32")
GGUF_LORA_PREFERENCE = ("f16", "bf16", "f32", "q8_0")


def _pick(artifacts, fmt: int, preference: tuple[str, ...]):
    found = [a for a in artifacts if a.format == fmt and a.uri]
    if not found:
        return None
    rank = {q: i for i, q in enumerate(preference)}
    return min(found, key=lambda a: rank.get(a.quantization, len(rank)))


def _map(exc: grpc.aio.AioRpcError, name: str, field: str):
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(
            f"{name} was not found in the registry: {exc.details()}",
            reason="MODEL_VERSION_NOT_FOUND",
            metadata={"model_version": name},
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{name}: {exc.details()}", field=field, reason="INVALID_MODEL_VERSION")
    return Unavailable(f"the registry could not be reached ({code.name}: {exc.details()}); retry", reason="REGISTRY_UNAVAILABLE")
