"""The model server with auth on (the platform's token table) and with TLS/mTLS: the OpenAI-compatible HTTP API and
gRPC inference refuse a missing or unknown token and another project's token, accept this project's; health and
the ops port (`/metrics`, `/healthz`) stay open; `/metrics` is not on the API port."""

from __future__ import annotations

import dataclasses
import ssl

import aiohttp
import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.app import SERVICE_NAME, ModelServer, ModelServerConfig
from neuroweaver_runtime.client import ClientTLS, open_channel
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import TestCA

NAME = "tiny-a-1-0-0-abcdef12"
VERSION = "projects/a/models/tiny/versions/1.0.0"
VIEWER_A, OPERATOR_ANY, ADMIN_B = "viewer-a-token", "operator-any-token", "admin-b-token"
TOKENS = f"{VIEWER_A}=a:viewer:alice,{OPERATOR_ANY}=*:operator:ops,{ADMIN_B}=b:admin:bob"
MESSAGES = [{"role": "user", "content": "Hello!"}]


def config(tiny_base, adapter, **kw) -> ModelServerConfig:
    path, sha = adapter
    return ModelServerConfig(
        grpc_port=0, http_port=0, metrics_port=0, base_model=str(tiny_base), served_model_name=NAME,
        model_version=VERSION, adapter_uri=path.as_uri(), adapter_sha256=sha, shutdown_grace_seconds=1.0, shutdown_drain_seconds=0,
        auth_tokens=TOKENS, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
async def server(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[0]))
    await s.start()
    yield s
    await s.stop()


def generate(max_tokens: int = 3) -> svc.GenerateRequest:
    return svc.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Hello!")], sampling=pb.SamplingParams(max_tokens=max_tokens)
    )


async def test_http_api_refuses_missing_unknown_and_foreign_tokens(server):
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            async with http.request(method, base + path, json={"model": NAME, "messages": MESSAGES}) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                error = (await resp.json())["error"]
                assert error["code"] == "MISSING_TOKEN" and error["type"] == "authentication_error" and error["message"]
            for header in ("Basic dXNlcjpwdw==", "Bearer not-a-token"):
                async with http.request(method, base + path, headers={"Authorization": header}) as resp:
                    assert resp.status == 401 and (await resp.json())["error"]["code"] in ("MISSING_TOKEN", "INVALID_TOKEN")
        async with http.get(base + "/healthz") as resp:  # readiness stays open for probes
            assert resp.status == 200 and (await resp.json())["status"] == "SERVING"

    foreign = openai.AsyncOpenAI(base_url=base + "/v1", api_key=ADMIN_B, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await foreign.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
    assert err.value.status_code == 403 and err.value.body["code"] == "WRONG_PROJECT"
    with pytest.raises(openai.PermissionDeniedError):
        await foreign.models.list()
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=base + "/v1", api_key="unknown", max_retries=0).models.list()

    for token in (VIEWER_A, OPERATOR_ANY):  # this project's viewer, and a token for every project
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == [NAME]
        done = await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
        assert done.usage.completion_tokens > 0
        stream = await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, stream=True)
        assert [c async for c in stream][-1].choices[0].finish_reason in ("stop", "length")


async def test_grpc_inference_needs_a_token_of_this_project_and_health_stays_open(server):
    target = f"127.0.0.1:{server.grpc.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = svc_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(generate())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and error_info(err.value).reason == "MISSING_TOKEN"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(generate(), metadata=[("authorization", "Bearer not-a-token")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Metadata set per call: the runtime's client interceptor reaches unary calls only (grpc.aio files an
    # interceptor under its first matching kind).
    foreign, viewer = [("authorization", f"Bearer {ADMIN_B}")], [("authorization", f"Bearer {VIEWER_A}")]
    stream_request = svc.GenerateStreamRequest(messages=generate().messages)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = svc_grpc.InferenceServiceStub(channel)
        for call in (
            lambda: stub.Generate(generate(), metadata=foreign),
            lambda: stub.ListModels(svc.ListModelsRequest(), metadata=foreign),
            lambda: anext(aiter(stub.GenerateStream(stream_request, metadata=foreign))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(err.value)
            assert info.reason == "WRONG_PROJECT" and info.domain == "inference.neuroweaver.v1"
        assert (await stub.Generate(generate(), metadata=viewer)).usage.completion_tokens > 0
        assert [m.name for m in (await stub.ListModels(svc.ListModelsRequest(), metadata=viewer)).models] == [NAME]
        parts = [p async for p in stub.GenerateStream(stream_request, metadata=viewer)]
        assert parts[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def test_metrics_are_on_the_ops_port_only(server):
    assert server.metrics_port not in (server.http_port, server.grpc.port)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {VIEWER_A}"}
        async with http.get(f"http://127.0.0.1:{server.http_port}/metrics", headers=headers) as resp:
            assert resp.status == 404  # not on the API port, whoever asks
        async with http.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as resp:  # scrapers carry no token
            assert resp.status == 200 and "nw_inference_requests_total" in await resp.text()
        async with http.get(f"http://127.0.0.1:{server.metrics_port}/healthz") as resp:
            assert resp.status == 200
        async with http.post(f"http://127.0.0.1:{server.metrics_port}/v1/chat/completions", json={}) as resp:
            assert resp.status in (404, 405)  # and no inference on the ops port


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    other = TestCA(tmp_path_factory.mktemp("other-pki"), name="another CA")
    return ca, ca.issue("model-server", client=False), ca.issue("caller", server=False), other.issue("stranger")


async def test_tls_and_mtls_on_grpc_https_and_the_ops_port(tiny_base, adapters, pki):
    ca, (cert, key), (client_cert, client_key), (stranger_cert, stranger_key) = pki
    s = ModelServer(config(tiny_base, adapters[0], tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ca.cert)))
    await s.start()
    try:
        target = f"127.0.0.1:{s.grpc.port}"
        tls = ClientTLS(ca=str(ca.cert), cert=str(client_cert), key=str(client_key))
        async with open_channel(target, token=VIEWER_A, tls=tls) as channel:
            assert (await svc_grpc.InferenceServiceStub(channel).Generate(generate())).usage.completion_tokens > 0
        for refused in (
            ClientTLS(ca=str(ca.cert)),  # no client certificate
            ClientTLS(ca=str(ca.cert), cert=str(stranger_cert), key=str(stranger_key)),  # one from another CA
            None,  # plaintext
        ):
            async with open_channel(target, token=VIEWER_A, tls=refused, deadline=5) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await svc_grpc.InferenceServiceStub(channel).Generate(generate())
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, refused

        verify = ssl.create_default_context(cafile=str(ca.cert))
        mutual = ssl.create_default_context(cafile=str(ca.cert))
        mutual.load_cert_chain(str(client_cert), str(client_key))
        api = f"https://127.0.0.1:{s.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(api + "/v1/models", ssl=mutual) as resp:
                assert resp.status == 401  # TLS is no substitute for the token
            async with http.get(api + "/v1/models", ssl=mutual, headers={"Authorization": f"Bearer {VIEWER_A}"}) as resp:
                assert resp.status == 200 and (await resp.json())["data"][0]["id"] == NAME
            with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake fails
                async with http.get(api + "/v1/models", ssl=verify, headers={"Authorization": f"Bearer {VIEWER_A}"}):
                    pass
            with pytest.raises(aiohttp.ClientError):  # plaintext to the TLS port
                async with http.get(f"http://127.0.0.1:{s.http_port}/healthz"):
                    pass
            # The ops port speaks TLS too but asks no client certificate: probes and scrapers present none.
            async with http.get(f"https://127.0.0.1:{s.metrics_port}/metrics", ssl=verify) as resp:
                assert resp.status == 200 and "nw_inference_requests_total" in await resp.text()
    finally:
        await s.stop()


async def test_a_broken_token_table_stops_the_server_at_start(tiny_base, adapters, tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text('{"tokens": [{"token": "t"}]}')  # no project, no role
    with pytest.raises(SystemExit, match="configuration error"):
        ModelServer(dataclasses.replace(config(tiny_base, adapters[0]), auth_tokens=str(bad)))
