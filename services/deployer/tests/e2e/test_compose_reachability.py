"""Compose as written: the deployer runs with docker-compose.yml's local-backend settings (routers on 0.0.0.0, a
fixed published port range, an advertised host name), and the endpoint a LOCAL deployment reports is dialled from
another "container". No Docker engine here: 127.0.0.2 stands for the deployer container's address (what the name
`deployer` resolves to on the compose network) and 127.0.0.3 for the calling container's."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import Stack, model_server_processes, watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver_runtime.ports import free_port

pytestmark = pytest.mark.slow  # a model-server process

COMPOSE = Path(__file__).resolve().parents[4] / "docker-compose.yml"
CONTAINER_ADDRESS, CALLER_ADDRESS = "127.0.0.2", "127.0.0.3"


def compose_local_settings() -> tuple[dict[str, str], list[str]]:
    """The deployer's NW_DEPLOYER_LOCAL_* settings and published ports in docker-compose.yml."""
    deployer = yaml.safe_load(COMPOSE.read_text())["services"]["deployer"]
    env = {
        k.removeprefix("NW_DEPLOYER_").lower(): str(v)
        for k, v in deployer["environment"].items()
        if k.startswith("NW_DEPLOYER_LOCAL_")
    }
    return env, [str(p) for p in deployer["ports"]]


@pytest.fixture(scope="module")
async def compose_stack(tmp_path_factory, tiny_base, adapters, kube_standin):
    settings, _ = compose_local_settings()
    assert settings["local_advertise_host"] == "deployer"  # the compose service name other containers resolve
    lo, hi = map(int, settings["local_router_ports"].split("-"))
    base = free_port()  # the same number of ports, somewhere free on this shared host
    settings.update(local_advertise_host=CONTAINER_ADDRESS, local_router_ports=f"{base}-{base + hi - lo}")
    stack = Stack(tmp_path_factory.mktemp("compose-stack"), tiny_base, adapters[:1], kube_standin.url, deployer_extra=settings)
    await stack.start()
    yield stack, (base, base + hi - lo)
    await stack.stop()


async def test_the_endpoint_a_local_deployment_reports_is_reachable_from_another_container(compose_stack):
    stack, (lo, hi) = compose_stack
    name = "projects/default/deployments/compose-local"
    await stack.dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default", deployment_id="compose-local",
            deployment=dpb.Deployment(model_version=stack.versions[0], replicas=1, backend=dpb.BACKEND_LOCAL),
        )
    )  # fmt: skip
    d = await watch_until(stack.dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE)
    host, port = d.endpoint.rsplit(":", 1)
    assert host == CONTAINER_ADDRESS and lo <= int(port) <= hi  # the advertised name, a published port
    assert d.openai_base_url.startswith(f"http://{CONTAINER_ADDRESS}:")
    assert lo <= int(d.openai_base_url.rsplit(":", 1)[1].removesuffix("/v1")) <= hi
    # Replicas stay on the container's loopback: only the router is exposed.
    (replica,) = model_server_processes()
    cmd = replica.cmdline()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"

    async with grpc.aio.insecure_channel(d.endpoint) as channel:
        reply = await igrpc.InferenceServiceStub(channel).Generate(
            isvc.GenerateRequest(messages=[ipb.ChatMessage(role="user", content="Hi")], sampling=ipb.SamplingParams(max_tokens=2))
        )
    assert reply.usage.completion_tokens > 0

    def chat_from_another_address() -> tuple[int, dict]:
        url = d.openai_base_url.removeprefix("http://")
        addr, base_path = url.split("/", 1)
        conn = http.client.HTTPConnection(addr, timeout=60, source_address=(CALLER_ADDRESS, 0))
        body = json.dumps({"model": d.served_model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        conn.request("POST", f"/{base_path}/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        peer = conn.sock.getsockname()[0]
        out = resp.status, {**json.loads(resp.read()), "_from": peer}
        conn.close()
        return out

    status, chat = await asyncio.to_thread(chat_from_another_address)
    assert status == 200 and chat["_from"] == CALLER_ADDRESS and chat["usage"]["completion_tokens"] > 0
    await stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))


def test_wildcard_routers_without_an_advertised_host_are_refused(tmp_path):
    from neuroweaver_deployer.app import DeployerConfig, build

    base = {"data_dir": str(tmp_path), "database_url": f"sqlite:///{tmp_path / 'd.db'}"}
    with pytest.raises(SystemExit, match="--local-advertise-host"):
        build(DeployerConfig(**base, local_router_host="0.0.0.0"))
    with pytest.raises(SystemExit, match="lo-hi"):
        build(DeployerConfig(**base, local_router_ports="50100"))
