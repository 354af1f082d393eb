"""Deployment screens and the playground in a real browser against the real deployer on its LOCAL backend: one
deployment of a tiny Llama + LoRA adapter (a real model-server process) for the module. The list and the page with
its revision history, state that follows WatchDeployment live (scaled from the console and from outside), live
performance, a rollback; the playground streaming a greedy answer token by token, equal to what GenerateStream
returns, and two panes at once; bad input shown as errors a person can act on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver_runtime.client import open_channel

pytestmark = pytest.mark.slow  # model-server processes

MODEL = "projects/default/models/playground-bot"
DEPLOYMENT_ID = "pg-advisor"
NAME = f"projects/default/deployments/{DEPLOYMENT_ID}"
AVAILABLE = dpb.Deployment.STATE_AVAILABLE
PROMPT = "Can I book a service for Tuesday?"  # the tiny model answers it with visible text (not only newlines)
MAX_TOKENS = 48  # long enough that the answer reaches the browser over several reads, not in one burst


async def watch_until(deployer, predicate, timeout: float = 120.0) -> dpb.Deployment:
    call = deployer.stub.WatchDeployment(dsvc.WatchDeploymentRequest(name=NAME))
    try:
        async with asyncio.timeout(timeout):
            async for msg in call:
                if predicate(msg.deployment):
                    return msg.deployment
    finally:
        call.cancel()
    raise AssertionError(f"the watch of {NAME} ended first")


@pytest.fixture(scope="module")
async def versions(registry, tiny_model, tmp_path_factory) -> list[str]:
    """Two versions of a model on the tiny base: two LoRA adapters with different weights."""
    from neuroweaver_ml.testing import make_lora_adapter

    root = tmp_path_factory.mktemp("console-adapters")
    adapters = [await asyncio.to_thread(make_lora_adapter, Path(tiny_model), root / f"adapter-{i}", i) for i in (1, 2)]
    await registry.stub.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="playground-bot", model=rpb.Model(base_model=tiny_model))
    )
    names = []
    for i, (path, sha) in enumerate(adapters):
        mv = await registry.stub.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=MODEL,
                version=f"1.{i}.0",
                model_version=rpb.ModelVersion(
                    artifact=rpb.Artifact(uri=path.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                    lineage=rpb.Lineage(base_model=tiny_model, method="sft-lora"),
                ),
            )
        )
        names.append(mv.name)
    return names


@pytest.fixture(scope="module")
async def deployment(deployer, versions):
    """Deployed at 1.0.0, then updated to 1.1.0 (two revisions), one replica; deleted at the end."""
    from google.protobuf import field_mask_pb2

    await deployer.stub.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id=DEPLOYMENT_ID,
            deployment=dpb.Deployment(
                model_version=versions[0],
                replicas=1,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(max_new_tokens_limit=64),
            ),
        )
    )
    # One rollout at a time: an update accepted while the create's rollout runs can read AVAILABLE (revision 2,
    # served_version 1.1.0) for a moment while the replica still serves 1.0.0, and then roll again.
    await watch_until(deployer, lambda d: d.state == AVAILABLE and d.ready_replicas == 1)
    await deployer.stub.UpdateDeployment(
        dsvc.UpdateDeploymentRequest(
            deployment=dpb.Deployment(name=NAME, model_version=versions[1]),
            update_mask=field_mask_pb2.FieldMask(paths=["model_version"]),
        )
    )
    d = await watch_until(deployer, lambda d: d.state == AVAILABLE and d.served_version == versions[1] and d.ready_replicas == 1)
    yield d
    await deployer.stub.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))


async def until(page, h, expression: str, timeout: float = 60.0, what: str = "") -> None:
    """Polls a page expression (evaluated over the devtools protocol: wait_for_function's eval breaks the CSP)."""
    await h.wait_for(lambda: page.evaluate(expression), timeout=timeout, interval=0.2, what=what or expression)


async def greedy_stream(endpoint: str) -> list[str]:
    """The deltas a direct GenerateStream call returns for the playground's request."""
    channel = open_channel(endpoint)
    try:
        call = igrpc.InferenceServiceStub(channel).GenerateStream(
            isvc.GenerateStreamRequest(
                model=NAME,
                messages=[ipb.ChatMessage(role="user", content=PROMPT)],
                sampling=ipb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            )
        )
        return [chunk.delta async for chunk in call if chunk.delta]
    finally:
        await channel.close()


async def test_list_and_page_show_state_revisions_and_performance(page, console, deployment, h):
    await page.goto(f"{console.url}/deployments")
    row = page.locator("#deployments tr", has_text=DEPLOYMENT_ID)
    cells = await row.locator("td").all_inner_texts()
    assert cells[:6] == [DEPLOYMENT_ID, "available", "1/1", "playground-bot 1.1.0", "fixed version", "local"]
    assert cells[6] == deployment.endpoint
    await h.check_screen(page, "deployments")

    await row.get_by_role("link", name=DEPLOYMENT_ID).click()
    await page.wait_for_url(f"**/deployments/{DEPLOYMENT_ID}")
    await until(page, h, "document.body.dataset.liveUpdates >= 1")  # WatchDeployment's first message
    assert await page.locator("#dep-state").inner_text() == "available"
    assert await page.locator("#dep-replicas").inner_text() == "1/1"
    revisions = [await tr.locator("td").all_inner_texts() for tr in await page.locator("#revisions tbody tr").all()]
    assert [(r[0], r[1], r[2], r[5]) for r in revisions] == [
        ("2", "playground-bot 1.1.0", "update", "current"),
        ("1", "playground-bot 1.0.0", "create", "Roll back…"),
    ]
    # The local backend's replicas report their /metrics through the deployer: the table, not the "not available".
    assert await page.locator("#metrics-live").is_visible()
    assert not await page.locator("#metrics-unavailable").is_visible()
    assert await page.locator("#metrics-rows th").first.inner_text() == "all replicas"
    await h.check_screen(page, "deployment")


async def test_scale_from_the_console_shows_live_without_reload(page, console, deployment, deployer, h):
    await page.goto(f"{console.url}/deployments/{DEPLOYMENT_ID}")
    await page.get_by_role("spinbutton", name="Replicas").fill("2")
    await page.get_by_role("button", name="Review…").click()
    await page.wait_for_url("**/scale?replicas=2")
    assert "has 1 desired replicas (1 ready) now; it will have 2" in await page.locator("#action-change").inner_text()
    await h.check_screen(page, "deployment-confirm")
    await page.get_by_role("button", name="Scale to 2").click()
    await page.wait_for_url("**?done=scale")
    # From here on the page is not reloaded (the marker would be gone): the new replica's start arrives as events.
    await page.evaluate("window.notReloaded = true")
    assert await page.locator("#dep-replicas").inner_text() == "1/2"  # the new replica is still loading its model
    await until(
        page,
        h,
        "document.getElementById('dep-replicas').textContent === '2/2' && "
        "document.getElementById('dep-state').textContent === 'available'",
        timeout=120,
    )
    # A change made elsewhere (the nw CLI, another console) shows up the same way.
    await deployer.stub.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=NAME, replicas=1))
    await until(page, h, "document.getElementById('dep-replicas').textContent === '1/1'")
    assert await page.evaluate("window.notReloaded === true")
    assert await page.locator("#dep-state").inner_text() == "available"


async def test_playground_streams_the_answer_token_by_token(page, console, deployment, h):
    expected = await greedy_stream(deployment.endpoint)
    assert len(expected) >= 2, expected  # the comparison below needs an answer of several chunks

    await page.goto(f"{console.url}/playground?a={DEPLOYMENT_ID}")
    assert await page.locator("#pane-b").is_hidden()
    await page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    await page.get_by_label("Temperature").fill("0")
    await page.get_by_role("textbox", name="Message").fill(PROMPT)
    # Every text the answer shows, as the DOM changes: it must grow through partial answers before it completes.
    await page.evaluate(
        """() => {
          window.seen = [];
          new MutationObserver(() => {
            const answer = document.querySelector('#pane-a .msg-assistant .text');
            if (answer) window.seen.push(answer.textContent);
          }).observe(document.getElementById('pane-a'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    await page.get_by_role("button", name="Send").click()
    pane = page.locator("#pane-a")
    await until(page, h, "document.getElementById('pane-a').dataset.state !== 'streaming'")
    assert await pane.get_attribute("data-state") == "done", await pane.locator(".pane-status").inner_text()
    answer = await pane.locator(".msg-assistant .text").text_content()
    assert answer == "".join(expected)
    assert int(await pane.get_attribute("data-chunks") or 0) == len(expected)
    seen = [s for s in await page.evaluate("window.seen") if s]
    partial = [s for s in seen if s != answer]
    assert partial and all(answer.startswith(s) for s in seen), seen
    status = await pane.locator(".pane-status").inner_text()
    assert f"{MAX_TOKENS} tokens" in status or "tokens (stop)" in status, status
    assert "playground-bot 1.1.0" in status
    assert await page.locator("#pane-a .msg-user .text").inner_text() == PROMPT
    await h.check_screen(page, "playground")


async def test_playground_side_by_side_streams_both_at_once(page, console, deployment, h):
    await page.goto(f"{console.url}/playground?a={DEPLOYMENT_ID}&b={DEPLOYMENT_ID}")
    assert await page.locator("#pane-b").is_visible()
    await page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    await page.get_by_label("Temperature").fill("0")
    await page.get_by_role("textbox", name="Message").fill(PROMPT)
    await page.keyboard.press("Control+Enter")
    await until(page, h, "['a', 'b'].every(k => ['done', 'failed'].includes(document.getElementById('pane-' + k).dataset.state))")
    panes = {}
    for key in ("a", "b"):
        pane = page.locator(f"#pane-{key}")
        assert await pane.get_attribute("data-state") == "done", await pane.locator(".pane-status").inner_text()
        panes[key] = {
            "text": await pane.locator(".msg-assistant .text").text_content(),
            "started": float(await pane.get_attribute("data-started") or 0),
            "finished": float(await pane.get_attribute("data-finished") or 0),
        }
    # Both requests were in flight at once (not one pane after the other), and greedy answers agree.
    assert panes["a"]["started"] < panes["b"]["finished"] and panes["b"]["started"] < panes["a"]["finished"], panes
    assert panes["a"]["text"] and panes["a"]["text"] == panes["b"]["text"], panes
    await h.check_screen(page, "playground-side-by-side")


async def test_bad_input_is_shown_not_a_server_error(page, console, deployment):
    # A link to a deployment that does not exist: 404, said on the page, the pickers still usable.
    response = await page.goto(f"{console.url}/playground?a=no-such-deployment")
    assert response.status == 404
    assert "There is no deployment no-such-deployment" in await page.locator("#playground-error").inner_text()
    assert await page.locator("#deployment-a").input_value() != ""

    async with aiohttp.ClientSession() as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        async with http.post(f"{console.url}/playground/stream", json={**body, "deployment": "no-such-deployment"}) as r:
            assert r.status == 404 and (await r.json())["code"] == "NOT_FOUND"
        async with http.post(
            f"{console.url}/playground/stream", json={**body, "deployment": DEPLOYMENT_ID, "max_tokens": 0}
        ) as r:
            assert r.status == 400 and "max tokens" in (await r.json())["message"]
        # A cross-site form can only send form encodings or text/plain: refused before anything is called.
        data = json.dumps({**body, "deployment": DEPLOYMENT_ID})
        async with http.post(f"{console.url}/playground/stream", data=data, headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415

    # replicas=-1 reaches the deployer, whose INVALID_ARGUMENT is the page.
    await page.goto(f"{console.url}/deployments/{DEPLOYMENT_ID}/scale?replicas=-1")
    await page.get_by_role("button", name="Scale to -1").click()
    assert (await page.locator("h1").inner_text()).startswith("The service said INVALID_ARGUMENT")
    assert "replicas" in await page.locator("p.error").inner_text()
    # Not a number: the console's own 400, the same kind of page.
    response = await page.goto(f"{console.url}/deployments/{DEPLOYMENT_ID}/scale?replicas=many")
    assert response.status == 400 and "replicas must be a whole number" in await page.locator("p.error").inner_text()
    # A deployment that does not exist: the deployer's NOT_FOUND.
    response = await page.goto(f"{console.url}/deployments/no-such-deployment")
    assert response.status == 404
    assert (await page.locator("h1").inner_text()).startswith("The service said NOT_FOUND")
    expected = [e for e in page.errors if "status of 404" in e or "status of 400" in e]
    assert expected and len(expected) == len(page.errors), page.errors
    page.errors.clear()  # the 404 and 400 pages' own status lines, expected


async def test_performance_then_rollback_from_the_console(page, console, deployment, deployer, h):
    await page.goto(f"{console.url}/deployments/{DEPLOYMENT_ID}")
    # The playground's requests (earlier tests) show in the refreshed performance table within a sample or two.
    await until(page, h, "parseFloat(document.querySelector('#metrics-rows tr td')?.textContent) > 0", timeout=30)
    await page.get_by_role("link", name="Roll back to revision 1").click()
    await page.wait_for_url("**/rollback?revision=1")
    change = await page.locator("#action-change").inner_text()
    assert "Revision 2 serves playground-bot 1.1.0 now; a new revision will serve playground-bot 1.0.0" in change
    await page.get_by_role("button", name="Roll back to revision 1").click()
    await page.wait_for_url("**?done=rollback")
    first = await page.locator("#revisions tbody tr").first.locator("td").all_inner_texts()
    assert (first[0], first[1], first[2], first[5]) == ("3", "playground-bot 1.0.0", "rollback", "current")
    d = await deployer.stub.GetDeployment(dsvc.GetDeploymentRequest(name=NAME))
    assert d.revision == 3 and d.model_version.endswith("/versions/1.0.0")


async def test_sse_closes_its_upstream_when_the_browser_leaves(monkeypatch):
    """A quiet upstream (a deployment that does not change) still ends soon after the browser left: the keepalive's
    write fails and the source is closed, which cancels its gRPC call. A gRPC error ends the stream as `failure`."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from neuroweaver_console import web as common
    from neuroweaver_console.web import Event

    monkeypatch.setattr(common, "KEEPALIVE_SECONDS", 0.1)
    closed = asyncio.Event()

    async def quiet():
        try:
            yield Event("deployment", {"state": "available"})
            await asyncio.Event().wait()  # nothing more until the deployment changes
        finally:
            closed.set()

    async def failing():
        yield Event("deployment", {"state": "available"}, 7)
        raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    app = web.Application()
    app.router.add_get("/quiet", lambda request: common.sse(request, "test", quiet()))
    app.router.add_get("/failing", lambda request: common.sse(request, "test", failing()))
    async with TestServer(app) as server, aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/quiet")) as r:
            assert await r.content.readuntil(b"\n\n") == b'event: deployment\ndata: {"state":"available"}\n\n'
            assert await r.content.readuntil(b"\n\n") == b": keepalive\n\n"
        await asyncio.wait_for(closed.wait(), 5)  # the connection closed above
        async with http.get(server.make_url("/failing")) as r:
            body = await r.text()
        assert body.startswith("id: 7\nevent: deployment\n"), body  # an id: the browser's Last-Event-ID
        assert body.endswith('event: failure\ndata: {"code":"NOT_FOUND","reason":"","message":"gone"}\n\n'), body
