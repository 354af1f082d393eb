"""Authorization matrix: every RPC of every service, walked from the generated descriptors, against real
processes with auth on. For each RPC: no token → UNAUTHENTICATED/MISSING_TOKEN; a token of another project →
PERMISSION_DENIED/WRONG_PROJECT; a token one role too low → PERMISSION_DENIED/ROLE_TOO_LOW; the right token gets
past auth. Health and reflection stay open. Tokens never reach the logs; judge API keys are never stored.
"""

from __future__ import annotations

import secrets
import sqlite3

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nwstack import SERVICES, call, minimal_request, reason_of, service_descriptor, start_service

from neuroweaver_runtime.auth import Role

TOK = {name: "nwtok-" + name + "-" + secrets.token_hex(16) for name in ("viewer", "operator", "admin", "other", "service")}
TOKENS = ",".join(
    [
        f"{TOK['viewer']}=default:viewer:alice",
        f"{TOK['operator']}=default:operator:bob",
        f"{TOK['admin']}=default:admin:carol",
        f"{TOK['other']}=other:admin:mallory",
        f"{TOK['service']}=*:service:service",
    ]
)
JUDGE_SECRET = "sk-judge-" + secrets.token_hex(16)
ROLE_TOKEN = {Role.VIEWER: TOK["viewer"], Role.OPERATOR: TOK["operator"], Role.ADMIN: TOK["admin"]}


def method_roles(svc: str) -> dict:
    import importlib

    return importlib.import_module(f"{SERVICES[svc][0]}.api.servicer").METHOD_ROLES


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("authz")
    common = ("--auth-tokens", TOKENS, "--page-token-secret", secrets.token_hex(16), "--log-level", "DEBUG")
    registry = start_service("registry", work, *common, env={"NW_TEST_JUDGE_KEY": JUDGE_SECRET})
    procs = {"registry": registry}
    procs["deployer"] = start_service(
        "deployer", work, *common, "--registry-target", registry.target, "--registry-token", TOK["service"]
    )
    procs["trainer"] = start_service(
        "trainer", work, *common, "--no-run-jobs", "--registry-target", registry.target, "--registry-token", TOK["service"]
    )
    procs["experiments"] = start_service(
        "experiments", work, *common, "--registry-target", registry.target, "--deployer-target", procs["deployer"].target,
        "--service-token", TOK["service"],
    )  # fmt: skip
    try:
        for p in procs.values():
            p.wait_serving()
        channels = {svc: grpc.insecure_channel(p.target) for svc, p in procs.items()}
        yield procs, channels, work
        for ch in channels.values():
            ch.close()
    finally:
        for p in procs.values():
            p.stop()


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


CASES = [(svc, m.name) for svc in SERVICES for m in service_descriptor(svc).methods]


@pytest.mark.parametrize(("svc", "method_name"), CASES, ids=[f"{s}.{m}" for s, m in CASES])
def test_rpc_authz(stack, svc, method_name):
    _, channels, _ = stack
    ch = channels[svc]
    method = service_descriptor(svc).methods_by_name[method_name]
    roles = method_roles(svc)
    assert method_name in roles, f"{svc}.{method_name} is not declared in METHOD_ROLES"
    required = roles[method_name]
    request = minimal_request(svc, method)
    timeout = 2.0 if method.server_streaming else 10.0

    code, err = call(ch, svc, method, request, timeout=timeout)
    assert (code, reason_of(err)) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")

    code, err = call(ch, svc, method, request, metadata=_bearer("not-a-token"), timeout=timeout)
    assert (code, reason_of(err)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")

    code, err = call(ch, svc, method, request, metadata=_bearer(TOK["other"]), timeout=timeout)
    assert (code, reason_of(err)) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PROJECT"), err

    if required > Role.VIEWER:
        code, err = call(ch, svc, method, request, metadata=_bearer(ROLE_TOKEN[Role(required - 1)]), timeout=timeout)
        assert (code, reason_of(err)) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_TOO_LOW"), err

    code, err = call(ch, svc, method, request, metadata=_bearer(ROLE_TOKEN[required]), timeout=timeout)
    assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), err
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err


def test_client_streaming_checks_every_message_project(stack):
    """StreamMetricEvents: the interceptor cannot see the messages, so the servicer checks each one's project."""
    from neuroweaver.experiments.v1 import experiments_service_pb2 as es

    _, channels, _ = stack
    stub = channels["experiments"].stream_unary(
        "/neuroweaver.experiments.v1.ExperimentsService/StreamMetricEvents",
        request_serializer=es.StreamMetricEventsRequest.SerializeToString,
        response_deserializer=es.StreamMetricEventsResponse.FromString,
    )
    # A `default` operator token must not write into project `other`, even after a first message of its own project.
    msgs = [es.StreamMetricEventsRequest(experiment="projects/other/experiments/e1")]
    with pytest.raises(grpc.RpcError) as exc:
        stub(iter(msgs), metadata=_bearer(TOK["operator"]), timeout=10)
    assert (exc.value.code(), reason_of(exc.value)) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PROJECT")
    with pytest.raises(grpc.RpcError) as exc:
        stub(iter([es.StreamMetricEventsRequest(experiment="projects/default/experiments/e1"), *msgs]),
             metadata=_bearer(TOK["operator"]), timeout=10)  # fmt: skip
    assert exc.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
    if exc.value.code() == grpc.StatusCode.PERMISSION_DENIED:
        assert reason_of(exc.value) == "WRONG_PROJECT"


def test_health_and_reflection_are_open(stack):
    procs, channels, _ = stack
    for svc, ch in channels.items():
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=SERVICES[svc][2]), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in responses[0].list_services_response.service}
        assert SERVICES[svc][2] in names


def test_judge_api_keys_are_never_stored_or_returned(stack):
    from neuroweaver.registry.v1 import registry_pb2 as pb
    from neuroweaver.registry.v1 import registry_service_pb2 as rs
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rg

    procs, channels, work = stack
    # The contract has no field that could carry a key: only the name of an environment variable.
    key_fields = [f.full_name for f in pb.OpenAICompatibleJudge.DESCRIPTOR.fields if "key" in f.name or "secret" in f.name]
    assert key_fields == ["neuroweaver.registry.v1.OpenAICompatibleJudge.api_key_env"]
    stub = rg.RegistryServiceStub(channels["registry"])
    version = pb.JudgeVersion(
        kind=pb.JUDGE_KIND_OPENAI_COMPATIBLE, mode=pb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10,
        prompt_template="Rate: {response}", openai=pb.OpenAICompatibleJudge(base_url="http://127.0.0.1:9/v1", model="j", api_key_env="NW_TEST_JUDGE_KEY"),
    )  # fmt: skip
    judge = stub.CreateJudge(
        rs.CreateJudgeRequest(parent="projects/default", judge_id="secret-check", judge_version=version),
        metadata=_bearer(TOK["operator"]),
        timeout=10,
    )
    got = stub.GetJudgeVersion(
        rs.GetJudgeVersionRequest(name=judge.name + "/versions/1"), metadata=_bearer(TOK["viewer"]), timeout=10
    )
    assert got.openai.api_key_env == "NW_TEST_JUDGE_KEY"
    assert JUDGE_SECRET.encode() not in got.SerializeToString() + judge.SerializeToString()
    db = work / "registry" / "registry.db"
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert "NW_TEST_JUDGE_KEY" in dump  # the variable's name is stored ...
    assert JUDGE_SECRET not in dump  # ... never its value
    assert JUDGE_SECRET not in procs["registry"].log_text()


def test_tokens_never_appear_in_logs(stack):
    """Runs last in this module (pytest keeps file order): every call above has been logged by now."""
    procs, _, _ = stack
    for svc, p in procs.items():
        text = p.log_text()
        assert text, f"{svc} wrote no log"
        for name, token in TOK.items():
            assert token not in text, f"{svc} logged the {name} token"
            assert token[-16:] not in text, f"{svc} logged part of the {name} token"
