"""The console as a deployable component, without a browser: health and metrics on the ops port, the login's token
forwarded to a registry with auth on, over TLS verified with the console's client CA."""

from __future__ import annotations

import aiohttp
import pytest

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_runtime.client import ClientTLS, open_channel
from neuroweaver_runtime.testing import TestCA


async def test_unknown_job_and_model_are_404_pages(console):
    async with aiohttp.ClientSession() as http:
        for path in ("/jobs/tj-nope", "/jobs/tj-nope/events", "/models/nope", "/models/nope/compare?base=1.0.0&candidate=1.1.0"):
            async with http.get(f"{console.url}{path}") as resp:
                assert resp.status == 404, path
                assert "The service said NOT_FOUND" in await resp.text()


async def test_actions_from_another_site_are_refused(console, trainer):
    """A form on another site posting to the console would act with the console's default token: refused by the
    browser's Sec-Fetch-Site (or, without it, Origin) before any call reaches a service."""
    from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc

    before = await trainer.stub.ListTrainingJobs(tsvc.ListTrainingJobsRequest(parent="projects/default", page_size=100))
    form = {"method": "TRAINING_METHOD_SFT", "base_model": "x", "dataset_uri": "x", "action": "create"}
    async with aiohttp.ClientSession() as http:
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"}):
            async with http.post(f"{console.url}/jobs/new", data=form, headers=headers, allow_redirects=False) as resp:
                assert resp.status == 403, headers
            async with http.post(f"{console.url}/jobs/tj-nope/cancel", headers=headers, allow_redirects=False) as resp:
                assert resp.status == 403, headers
        # The console's own pages (same origin) reach the service: its NOT_FOUND, not the console's 403.
        host = console.url.removeprefix("http://")
        for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Origin": f"http://{host}"}, {}):
            async with http.post(f"{console.url}/jobs/tj-nope/cancel", headers=headers, allow_redirects=False) as resp:
                assert resp.status == 404, headers
    after = await trainer.stub.ListTrainingJobs(tsvc.ListTrainingJobsRequest(parent="projects/default", page_size=100))
    assert len(after.training_jobs) == len(before.training_jobs)


async def test_health_and_metrics(console):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{console.url}/jobs") as resp:
            assert resp.status == 200
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(f"{console.metrics_url}/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with http.get(f"{console.metrics_url}/metrics") as resp:
            text = await resp.text()
    assert 'console_http_requests_total{code="200",route="/jobs"}' in text
    assert "console_http_request_seconds_bucket" in text


@pytest.fixture
async def secured_registry(tmp_path):
    """A registry with auth on, serving TLS with a test CA's certificate."""
    from neuroweaver_registry.app import RegistryConfig, build

    ca = TestCA(tmp_path / "pki")
    cert, key = ca.issue("registry")
    service = build(
        RegistryConfig(
            port=0,
            metrics_port=-1,
            data_dir=str(tmp_path / "registry"),
            shutdown_grace_seconds=1,
            auth_tokens="viewer-token=default:viewer,admin-token=default:admin",
            page_token_secret="s3cret",
            tls_cert=str(cert),
            tls_key=str(key),
        )  # fmt: skip
    )
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}", token="admin-token", tls=ClientTLS(ca=str(ca.cert)))
    await rgrpc.RegistryServiceStub(channel).CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="secured", model=rpb.Model(display_name="Secured bot"))
    )
    await channel.close()
    yield f"127.0.0.1:{port}", ca
    await service.stop()


async def test_login_token_is_forwarded_over_tls(secured_registry):
    from neuroweaver_console.app import Console
    from neuroweaver_console.config import ConsoleConfig

    target, ca = secured_registry
    console = Console(
        ConsoleConfig(port=0, metrics_port=-1, registry_target=target, trainer_target="127.0.0.1:1", client_tls_ca=str(ca.cert))
    )
    await console.start()
    url = f"http://127.0.0.1:{console.port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # unsafe: an IP host
            # No token: the registry says UNAUTHENTICATED and the console asks for a login.
            async with http.get(f"{url}/models", allow_redirects=False) as resp:
                assert resp.status == 303
                assert resp.headers["Location"].startswith("/login?next=/models")
            async with http.post(f"{url}/login", data={"token": "wrong", "next": "/models"}, allow_redirects=False) as resp:
                assert resp.status == 303 and "HttpOnly" in resp.headers["Set-Cookie"]
                assert "Secure" not in resp.headers["Set-Cookie"]  # plain HTTP: a Secure cookie would never come back
            async with http.post(
                f"{url}/login", data={"token": "t"}, headers={"X-Forwarded-Proto": "https"}, allow_redirects=False
            ) as resp:
                assert "Secure" in resp.headers["Set-Cookie"]  # HTTPS ended at an Ingress in front of the console
            async with http.get(f"{url}/models", allow_redirects=False) as resp:
                assert resp.status == 303  # a token the registry does not know is no login
            async with http.post(f"{url}/login", data={"token": "viewer-token", "next": "//evil.example/"}) as resp:
                assert resp.url.path == "/jobs"  # not the foreign `next`: no open redirect
            async with http.get(f"{url}/models") as resp:
                assert resp.status == 200
                assert "Secured bot" in await resp.text()
            # A viewer may look but not move aliases: the registry's PERMISSION_DENIED is the page's 403.
            async with http.post(
                f"{url}/models/secured/alias", data={"alias": "prod", "version": "1.0.0", "expected": "-", "reason": "x"}
            ) as resp:
                assert resp.status == 403
    finally:
        await console.stop()
