"""Deployments with the platform's auth and mTLS on: a real registry and deployer (auth tokens, server
certificates, client certificates from a test CA). LOCAL: real model-server processes; the deployer hands its
replicas the token table and TLS files through their environment (never the command line); its router serves TLS
and passes each caller's credentials through, so the replicas refuse unauthenticated and foreign callers on gRPC
and HTTP, and serve this project's; the router's merged /metrics is on its own port. KUBERNETES (against the API
stand-in): the pods mount the token table and the certificate from Secrets."""

from __future__ import annotations

import ssl

import aiohttp
import grpc
import openai
import pytest
from helpers import Stack, model_server_processes, watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver_deployer.domain.model import Backend
from neuroweaver_kube.manifests import dns1123_name
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import TestCA

ADMIN, VIEWER, FOREIGN, SERVICE = "admin-default-token", "viewer-default-token", "admin-b-token", "svc-deployer-token"
TOKENS = f"{ADMIN}=default:admin:alice,{VIEWER}=default:viewer:val,{FOREIGN}=b:admin:bob,{SERVICE}=*:service:deployer"
NAME = "projects/default/deployments/advisor-secure"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("deployer"), ca.issue("registry"), ca.issue("caller", server=False)


def credentials(ca: TestCA, cert, key, token: str | None) -> grpc.ChannelCredentials:
    """mTLS plus a bearer token on every call (streams included)."""
    tls = grpc.ssl_channel_credentials(ca.cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token)) if token else tls


def call_token(token: str) -> grpc.CallCredentials:
    return grpc.access_token_call_credentials(token)


@pytest.fixture(scope="module")
async def secure_stack(tmp_path_factory, tiny_base, adapters, kube_standin, pki):
    ca, (dep_cert, dep_key), (reg_cert, reg_key), (caller_cert, caller_key) = pki
    common = {"auth_tokens": TOKENS, "page_token_secret": "test-page-secret", "tls_client_ca": str(ca.cert)}
    stack = Stack(
        tmp_path_factory.mktemp("secure-stack"), tiny_base, adapters[:1], kube_standin.url,
        registry_extra={**common, "tls_cert": str(reg_cert), "tls_key": str(reg_key)},
        deployer_extra={
            **common, "tls_cert": str(dep_cert), "tls_key": str(dep_key), "registry_token": SERVICE,
            "client_tls_ca": str(ca.cert), "client_tls_cert": str(dep_cert), "client_tls_key": str(dep_key),
            "kube_model_server_tls_secret": "advisor-model-server-tls",
        },
        credentials=credentials(ca, caller_cert, caller_key, ADMIN),
    )  # fmt: skip
    await stack.start()
    yield stack
    await stack.stop()


def gen() -> isvc.GenerateRequest:
    return isvc.GenerateRequest(
        messages=[ipb.ChatMessage(role="user", content="Hello!")], sampling=ipb.SamplingParams(max_tokens=3)
    )


@pytest.mark.slow
async def test_a_local_deployment_with_auth_and_mtls_serves_only_its_projects_callers(secure_stack, pki):
    ca, _, _, (caller_cert, caller_key) = pki
    dep = secure_stack.dep
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default", deployment_id="advisor-secure",
            deployment=dpb.Deployment(model_version=secure_stack.versions[0], replicas=1, backend=dpb.BACKEND_LOCAL),
        )
    )  # fmt: skip
    try:
        d = await watch_until(dep, NAME, lambda d: d.ready_replicas == 1 and d.state == dpb.Deployment.STATE_AVAILABLE)
        assert d.openai_base_url.startswith("https://")

        # Nothing secret on a replica's command line (world-readable); the credentials are in its environment.
        (replica,) = model_server_processes()
        cmdline = " ".join(replica.cmdline())
        assert not [t for t in (ADMIN, VIEWER, FOREIGN, SERVICE) if t in cmdline]
        assert "--project default" in cmdline
        environ = replica.environ()
        assert environ["NW_MODEL_SERVER_AUTH_TOKENS"] == TOKENS
        assert environ["NW_MODEL_SERVER_TLS_CLIENT_CA"] == str(ca.cert)

        # gRPC through the router (mTLS): the caller's token reaches the replica, which decides.
        tls = credentials(ca, caller_cert, caller_key, None)
        async with grpc.aio.secure_channel(d.endpoint, tls) as channel:
            stub = igrpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(gen())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(gen(), credentials=call_token(FOREIGN))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(err.value).reason == "WRONG_PROJECT"
            reply = await stub.Generate(gen(), credentials=call_token(VIEWER))
            assert reply.model == NAME and reply.served_model == d.served_model_name and reply.usage.completion_tokens > 0
            parts = [p async for p in stub.GenerateStream(isvc.GenerateStreamRequest(messages=gen().messages),
                                                          credentials=call_token(VIEWER))]  # fmt: skip
            assert parts[-1].usage.completion_tokens > 0
        # A caller without a client certificate never reaches the router.
        async with grpc.aio.secure_channel(d.endpoint, grpc.ssl_channel_credentials(ca.cert.read_bytes())) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await igrpc.InferenceServiceStub(channel).Generate(gen(), credentials=call_token(VIEWER), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # The OpenAI-compatible API through the router (HTTPS, client certificate).
        client_ctx = ssl.create_default_context(cafile=str(ca.cert))
        client_ctx.load_cert_chain(str(caller_cert), str(caller_key))
        async with aiohttp.ClientSession() as http:
            url = d.openai_base_url + "/chat/completions"
            body = {"model": d.served_model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            async with http.post(url, json=body, ssl=client_ctx) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["code"] == "MISSING_TOKEN"
            async with http.get(
                d.openai_base_url + "/models", ssl=client_ctx, headers={"Authorization": f"Bearer {FOREIGN}"}
            ) as resp:
                assert resp.status == 403 and (await resp.json())["error"]["code"] == "WRONG_PROJECT"
            router = secure_stack.deployer.controller.backends[Backend.LOCAL].deployments[NAME].router
            # The merged scrape is on the router's metrics port (TLS, no client certificate asked), not the API port.
            scrape_ctx = ssl.create_default_context(cafile=str(ca.cert))
            async with http.get(router.metrics_url, ssl=scrape_ctx) as resp:
                assert resp.status == 200 and 'replica="' in await resp.text()
            async with http.get(d.openai_base_url.removesuffix("/v1") + "/metrics", ssl=client_ctx,
                                headers={"Authorization": f"Bearer {VIEWER}"}) as resp:  # fmt: skip
                assert resp.status == 404
        async with openai.DefaultAsyncHttpx2Client(verify=client_ctx) as http_client:
            client = openai.AsyncOpenAI(base_url=d.openai_base_url, api_key=VIEWER, http_client=http_client, max_retries=0)
            chat = await client.chat.completions.create(
                model=d.served_model_name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=2
            )
            assert chat.usage.completion_tokens > 0
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))
    assert model_server_processes() == []


async def test_kubernetes_pods_mount_the_token_table_and_certificate_from_secrets(secure_stack, kube_standin):
    dep, name = secure_stack.dep, "projects/default/deployments/advisor-k8s-secure"
    spec = dpb.Deployment(model_version=secure_stack.versions[0], backend=dpb.BACKEND_KUBERNETES, namespace="serving")
    to_render = dpb.Deployment(name=name)
    to_render.MergeFrom(spec)
    rendered = await dep.RenderManifests(dsvc.RenderManifestsRequest(deployment=to_render))
    assert not [t for t in (ADMIN, VIEWER, FOREIGN, SERVICE) if t in rendered.yaml]  # references only, never values
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(parent="projects/default", deployment_id="advisor-k8s-secure", deployment=spec)
    )
    try:
        d = await watch_until(dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE, timeout=30)
        assert d.openai_base_url.startswith("https://")
        applied = kube_standin.get_object("apps/v1", "Deployment", "serving", dns1123_name(name))
        pod = applied["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"][container["args"].index("--project") + 1] == "default"
        env = {e["name"]: e.get("value") for e in container["env"]}
        volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        assert volumes["auth-tokens"]["secretName"] == "neuroweaver-auth"
        assert volumes["auth-tokens"]["items"] == [{"key": "auth-tokens.json", "path": "auth-tokens.json"}]
        assert volumes["tls"]["secretName"] == "advisor-model-server-tls"
        assert env["NW_MODEL_SERVER_AUTH_TOKENS"].endswith("/auth-tokens.json")
        # The deployer requires client certificates (--tls-client-ca), so its model servers do too.
        assert env["NW_MODEL_SERVER_TLS_CLIENT_CA"].endswith("/ca.crt") and env["NW_MODEL_SERVER_TLS_CERT"].endswith("/tls.crt")
        assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))


def test_the_deployer_refuses_tls_settings_it_could_not_use(tmp_path, pki):
    from neuroweaver_deployer.app import DeployerConfig, build

    ca, (cert, key), _, _ = pki
    base = {"data_dir": str(tmp_path), "metrics_port": -1}
    with pytest.raises(SystemExit, match="client-tls-ca"):  # replicas would serve TLS the router cannot dial
        build(DeployerConfig(**base, tls_cert=str(cert), tls_key=str(key)))
    with pytest.raises(SystemExit, match="kube-model-server-auth-secret"):  # pods would serve without auth
        build(
            DeployerConfig(**base, auth_tokens=TOKENS, page_token_secret="s", kubernetes=True, kube_model_server_auth_secret="")
        )
