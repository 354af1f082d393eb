"""What the interceptor checks in every request: every resource name at any depth (unary and client-streamed),
service delegation (on-behalf-of), project grants, invalid UTF-8 and NUL characters, stream caps, bounded errors."""

from __future__ import annotations

import asyncio
from datetime import datetime

import grpc
import pytest

from neuroweaver.experiments.v1 import experiment_pb2, experiments_service_pb2
from neuroweaver_runtime.auth import ProjectGrants, Role, TokenAuthenticator, acting_as, current_actor, parse_principal
from neuroweaver_runtime.client import open_channel
from neuroweaver_runtime.errors import NotFound
from neuroweaver_runtime.grpc_errors import error_info, field_violations
from neuroweaver_runtime.interceptors import ServiceInterceptor

SERVICE = "test.Checks"
Request = experiments_service_pb2.RecordMetricEventsRequest
Response = experiments_service_pb2.RecordMetricEventsResponse
TOKENS = "ta=a:operator:alice,tv=a:viewer:victor,tb=b:admin:bob,svc=*:service:experiments"


class Recorder:
    """Handlers that remember what reached them and who the caller was."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (actor, first event's experiment)
        self.stream_gate = asyncio.Event()

    async def record(self, request, context):
        self.seen.append((current_actor(), request.events[0].experiment if request.events else ""))
        return Response(accepted=len(request.events))

    async def ingest(self, requests, context):
        accepted = 0
        async for request in requests:
            accepted += len(request.events)
        self.seen.append((current_actor(), "stream"))
        return Response(accepted=accepted)

    async def watch(self, request, context):
        yield Response()
        await self.stream_gate.wait()

    async def huge_error(self, request, context):
        raise NotFound(
            f"model {request.experiment!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"name": request.experiment}
        )

    def handlers(self):
        codec = dict(request_deserializer=Request.FromString, response_serializer=Response.SerializeToString)
        return {
            "Record": grpc.unary_unary_rpc_method_handler(self.record, **codec),
            "Ingest": grpc.stream_unary_rpc_method_handler(self.ingest, **codec),
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch, **codec),
            "HugeError": grpc.unary_unary_rpc_method_handler(self.huge_error, **codec),
            "Read": grpc.unary_unary_rpc_method_handler(self.record, **codec),
        }


ROLES = {"Record": Role.OPERATOR, "Ingest": Role.OPERATOR, "Watch": Role.VIEWER, "HugeError": Role.VIEWER, "Read": Role.VIEWER}


@pytest.fixture
async def server():
    recorder = Recorder()
    interceptor = ServiceInterceptor(
        error_domain="test.neuroweaver.v1",
        method_roles=ROLES,
        authenticator=TokenAuthenticator.from_setting(TOKENS),
        grants=ProjectGrants.from_setting("shared=>a"),
        max_streams_per_principal=3,
    )
    srv = grpc.aio.server(interceptors=[interceptor], options=[("grpc.max_receive_message_length", 8 << 20)])
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, recorder.handlers())])
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
    yield recorder, channel, port
    recorder.stream_gate.set()
    await channel.close()
    await srv.stop(None)


def _unary(channel, name, raw=False):
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=(lambda b: b) if raw else Request.SerializeToString,
        response_deserializer=Response.FromString,
    )


def _events(*experiments: str, unit: str = "u1"):
    return [experiment_pb2.MetricEvent(experiment=e, unit_id=unit, metric="m", value=1.0) for e in experiments]


def _md(token: str, *extra: tuple[str, str]):
    return (("authorization", f"Bearer {token}"), *extra)


async def test_a_name_nested_in_a_repeated_message_is_authorized(server):
    recorder, channel, _ = server
    record = _unary(channel, "Record")
    # Empty top-level experiment, the event names project a's experiment: project b's admin is refused.
    request = Request(events=_events("projects/b/experiments/e", "projects/a/experiments/e1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(request, metadata=_md("tb"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "WRONG_PROJECT"
    assert recorder.seen == []
    # Its own project's names pass.
    await record(Request(events=_events("projects/b/experiments/e")), metadata=_md("tb"))
    assert recorder.seen == [("bob", "projects/b/experiments/e")]


async def test_refusal_does_not_depend_on_whether_the_name_exists(server):
    _, channel, _ = server
    record = _unary(channel, "Record")
    answers = []
    for name in ("projects/a/experiments/exists", "projects/a/experiments/never-was"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await record(Request(events=_events(name)), metadata=_md("tb"))
        answers.append((caught.value.code(), caught.value.details(), error_info(caught.value).metadata["project"]))
    assert answers[0] == answers[1]


async def test_every_client_streamed_message_is_authorized(server):
    recorder, channel, _ = server
    ingest = channel.stream_unary(
        f"/{SERVICE}/Ingest", request_serializer=Request.SerializeToString, response_deserializer=Response.FromString
    )

    async def messages():
        yield Request(experiment="projects/b/experiments/e", events=_events("projects/b/experiments/e"))
        yield Request(experiment="projects/b/experiments/e", events=_events("projects/a/experiments/e1"))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest(messages(), metadata=_md("tb"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert recorder.seen == []


async def test_invalid_utf8_is_invalid_argument_after_authentication(server):
    recorder, channel, _ = server
    record = _unary(channel, "Record", raw=True)
    bad = bytes.fromhex("0a04fffefdfc")  # field 1 (experiment) holding bytes that are not UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(bad)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # no token: refused before anything else
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(bad, metadata=_md("ta"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "MALFORMED_REQUEST"
    assert recorder.seen == []


async def test_nul_characters_anywhere_are_invalid_argument_with_the_field_path(server):
    recorder, channel, _ = server
    request = Request(experiment="projects/a/experiments/e1", events=_events("projects/a/experiments/e1", unit="u\x00x"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel, "Record")(request, metadata=_md("ta"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_CHARACTERS"
    assert [v.field for v in field_violations(caught.value)] == ["events[0].unit_id"]
    assert recorder.seen == []


async def test_a_service_identity_acts_only_on_behalf_of_a_caller(server):
    recorder, channel, _ = server
    record = _unary(channel, "Record")
    request = Request(experiment="projects/a/experiments/e1", events=_events("projects/a/experiments/e1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(request, metadata=_md("svc"))
    assert error_info(caught.value).reason == "ON_BEHALF_OF_REQUIRED"
    # On behalf of bob (project b), the service cannot touch project a.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(request, metadata=_md("svc", ("x-nw-on-behalf-of", "b:admin:bob")))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A viewer's identity keeps its role through the service.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(request, metadata=_md("svc", ("x-nw-on-behalf-of", "a:viewer:victor")))
    assert error_info(caught.value).reason == "ROLE_TOO_LOW"
    # A person's token cannot claim to act for someone else.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record(request, metadata=_md("ta", ("x-nw-on-behalf-of", "a:admin:mallory")))
    assert error_info(caught.value).reason == "DELEGATION_NOT_ALLOWED"
    await record(request, metadata=_md("svc", ("x-nw-on-behalf-of", "a:operator:alice")))
    assert recorder.seen == [("alice", "projects/a/experiments/e1")]  # audit names the real caller


async def test_the_runtime_client_sends_the_callers_identity(server):
    recorder, _, port = server
    channel = open_channel(f"127.0.0.1:{port}", token="svc")
    try:
        request = Request(experiment="projects/a/experiments/e1", events=_events("projects/a/experiments/e1"))
        with acting_as(parse_principal("a:operator:alice")):
            await _unary(channel, "Record")(request)
        assert recorder.seen == [("alice", "projects/a/experiments/e1")]
    finally:
        await channel.close()


async def test_project_grants_allow_reading_models_but_never_writing(server):
    recorder, channel, _ = server
    shared_version = "projects/shared/models/m/versions/1.0.0"
    # A write in project a may reference a granted model version...
    await _unary(channel, "Record")(
        Request(experiment="projects/a/experiments/e1", events=_events(shared_version)), metadata=_md("ta")
    )
    # ...and a read may act on it directly...
    await _unary(channel, "Read")(Request(experiment=shared_version), metadata=_md("tv"))
    assert len(recorder.seen) == 2
    # ...but a write may not target it, and a project without the grant may not even reference it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel, "Record")(Request(experiment=shared_version), metadata=_md("ta"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel, "Record")(Request(events=_events(shared_version)), metadata=_md("tb"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # grants cover models and judges, not experiments
        await _unary(channel, "Read")(Request(experiment="projects/shared/experiments/x"), metadata=_md("tv"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_open_streams_per_caller_are_capped(server):
    recorder, channel, _ = server
    watch = channel.unary_stream(
        f"/{SERVICE}/Watch", request_serializer=Request.SerializeToString, response_deserializer=Response.FromString
    )
    calls = [watch(Request(), metadata=_md("tv")) for _ in range(3)]
    for call in calls:
        await call.read()
    over = watch(Request(), metadata=_md("tv"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await over.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = watch(Request(), metadata=_md("ta"))  # another caller is not affected
    await other.read()
    calls[0].cancel()
    for _ in range(100):  # the cancelled stream's slot frees when its handler ends
        again = watch(Request(), metadata=_md("tv"))
        try:
            await again.read()
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.02)
    else:
        pytest.fail("a closed stream never freed its slot")
    for call in [*calls, other, again]:
        call.cancel()


async def test_errors_carry_bounded_details(server):
    _, channel, _ = server
    name = "projects/a/experiments/" + "é" * 3_000_000  # just under the 8 MiB request limit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel, "HugeError")(Request(experiment=name), metadata=_md("ta"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # the real error, not RESOURCE_EXHAUSTED on trailers
    assert len(caught.value.details()) <= 200
    assert all(len(v) <= 120 for v in error_info(caught.value).metadata.values())


async def test_client_certificates_identify_callers_when_mapped(tmp_path):
    """With mTLS, a verified client certificate's common name can stand for a caller (a service's identity);
    a bearer token, when sent, wins; an unmapped certificate is no credential."""
    from neuroweaver_runtime.client import ClientTLS
    from neuroweaver_runtime.testing import TestCA

    ca = TestCA(tmp_path / "pki")
    server_cert, server_key = ca.issue("server")
    recorder = Recorder()
    interceptor = ServiceInterceptor(
        error_domain="test.neuroweaver.v1",
        method_roles=ROLES,
        authenticator=TokenAuthenticator.from_setting(TOKENS, "gateway=a:operator:relaycore-gw,trainer=*:service:trainer"),
    )
    srv = grpc.aio.server(interceptors=[interceptor])
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, recorder.handlers())])
    credentials = grpc.ssl_server_credentials(
        [(server_key.read_bytes(), server_cert.read_bytes())], root_certificates=ca.cert.read_bytes(), require_client_auth=True
    )
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    await srv.start()
    request = Request(experiment="projects/a/experiments/e1", events=_events("projects/a/experiments/e1"))

    async def call_as(common_name: str, token: str | None = None, principal=None):
        cert, key = ca.issue(common_name, server=False)
        channel = open_channel(f"127.0.0.1:{port}", token=token, tls=ClientTLS(ca=str(ca.cert), cert=str(cert), key=str(key)))
        try:
            if principal is None:
                return await _unary(channel, "Record")(request)
            with acting_as(principal):
                return await _unary(channel, "Record")(request)
        finally:
            await channel.close()

    try:
        await call_as("gateway")
        assert recorder.seen == [("relaycore-gw", "projects/a/experiments/e1")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # the viewer token wins over the operator certificate
            await call_as("gateway", token="tv")
        assert error_info(caught.value).reason == "ROLE_TOO_LOW"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_as("stranger")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A service's certificate works only on behalf of a caller, and the caller is what gets recorded.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_as("trainer")
        assert error_info(caught.value).reason == "ON_BEHALF_OF_REQUIRED"
        await call_as("trainer", principal=parse_principal("a:operator:alice"))
        assert recorder.seen[-1] == ("alice", "projects/a/experiments/e1")
    finally:
        await srv.stop(None)


@pytest.mark.parametrize(
    "cursor",
    [[], ["x"], [1, 2], ["not a time", 3], ["2026-01-01T00:00:00", "3"], [None, 1], [{"a": 1}, 1], [True, 1], [2**70, 1]],
)
def test_a_validly_signed_page_token_of_the_wrong_shape_is_invalid_argument(cursor):
    from neuroweaver_runtime.errors import InvalidArgument
    from neuroweaver_runtime.pagination import PageTokens

    tokens = PageTokens("known-key")  # as if the key had leaked: the shape is still checked
    query = ["projects/a", "", ""]
    with pytest.raises(InvalidArgument) as caught:
        tokens.decode(tokens.encode(cursor, query), query, datetime, int)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert tokens.decode(tokens.encode(["2026-01-01T00:00:00+00:00", 3], query), query, datetime, int)[1] == 3


def test_auth_without_a_page_token_secret_refuses_to_start():
    from neuroweaver_runtime.config import ServiceConfig

    with pytest.raises(SystemExit, match="page_token_secret"):
        ServiceConfig(auth_tokens="t=a:viewer").page_token_key("registry")
    assert ServiceConfig(auth_tokens="t=a:viewer", page_token_secret="s").page_token_key("registry") == b"s"


async def test_the_runtime_client_authenticates_streaming_calls_too(server):
    """grpc.aio applies an interceptor only to the first call kind it implements: every kind needs its own."""
    recorder, _, port = server
    channel = open_channel(f"127.0.0.1:{port}", token="svc")
    try:
        watch = channel.unary_stream(
            f"/{SERVICE}/Watch", request_serializer=Request.SerializeToString, response_deserializer=Response.FromString
        )
        ingest = channel.stream_unary(
            f"/{SERVICE}/Ingest", request_serializer=Request.SerializeToString, response_deserializer=Response.FromString
        )

        async def messages():
            yield Request(experiment="projects/a/experiments/e1", events=_events("projects/a/experiments/e1"))

        with acting_as(parse_principal("a:viewer:victor")):
            call = watch(Request())
            assert await call.read() == Response()
            call.cancel()
        with acting_as(parse_principal("a:operator:alice")):
            assert (await ingest(messages())).accepted == 1
        assert recorder.seen == [("alice", "stream")]
    finally:
        await channel.close()


def test_what_a_call_writes_is_a_target_never_a_grantable_reference():
    """`model` at the top level and the `name` of a top-level resource message are what the call writes into."""
    from neuroweaver.registry.v1 import registry_pb2, registry_service_pb2
    from neuroweaver_runtime.inspection import inspect, lenient_deserializer

    def findings(message):
        raw = message.SerializeToString()
        return inspect(lenient_deserializer(type(message).FromString, "x")(raw))

    g = "projects/g/models/m"
    alias = findings(
        registry_service_pb2.SetModelAliasRequest(model=g, alias="prod", version="projects/a/models/m/versions/1.0.0")
    )
    assert alias.targets == {g}
    update = findings(registry_service_pb2.UpdateModelRequest(model=registry_pb2.Model(name=g, description="x")))
    assert update.targets == {g}
    version = findings(
        registry_service_pb2.CreateModelVersionRequest(
            parent="projects/a/models/m",
            model_version=registry_pb2.ModelVersion(lineage=registry_pb2.Lineage(parent_version=g + "/versions/1.0.0")),
        )
    )
    assert version.targets == {"projects/a/models/m"} and version.references == {g + "/versions/1.0.0"}


def test_a_platform_admin_can_be_relayed_only_by_a_platform_wide_service():
    from neuroweaver_runtime.errors import PermissionDenied

    auth = TokenAuthenticator.from_setting("svc=*:service:deployer,proj-svc=a:service:deployer-a")
    admin = auth.authenticate("Bearer svc", "*:admin:root")
    assert (admin.subject, admin.project, admin.role, admin.via) == ("root", "*", Role.ADMIN, "deployer")
    with pytest.raises(PermissionDenied):
        auth.authenticate("Bearer proj-svc", "*:admin:root")
    assert auth.authenticate("Bearer proj-svc", "a:operator:alice").project == "a"
