"""Client-side load balancing: `open_channel` spreads calls over every address of its target (round_robin).

Two real registry processes share one PostgreSQL database, bound to 127.0.0.1 and 127.0.0.2 on the same port
(the shape of a headless Service: one name, one port, one address per pod). The client dials the static
multi-address target `ipv4:127.0.0.1:P,127.0.0.2:P`, which takes the same resolver-result path as a DNS answer
with several A records; each replica's own `grpc_server_handled_total` shows it served a share of the calls.
With gRPC's default pick_first every call would land on the first address.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_runtime.client import open_channel
from neuroweaver_runtime.testing import create_postgres_database, free_port, postgres_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
from nwstack import SERVICES, ServiceProcess, start_service, wait_for  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CALLS = 40
_HANDLED = re.compile(r"^grpc_server_handled_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)


def _bindable(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def _serving(replica: ServiceProcess, host: str, port: int) -> bool:
    if replica.proc.poll() is not None:
        raise AssertionError(f"registry exited with {replica.proc.returncode}:\n{replica.log_text()[-4000:]}")
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=SERVICES["registry"][2])
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
    return status == health_pb2.HealthCheckResponse.SERVING


def _handled_list_models(host: str, metrics_port: int) -> int:
    """ListModels calls this replica answered OK, from its own Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        int(float(value))
        for labels, value in _HANDLED.findall(text)
        if 'grpc_method="ListModels"' in labels and 'grpc_code="OK"' in labels
    )


@pytest.fixture
def database_url():
    """A fresh PostgreSQL database for both replicas (a sync fixture: the helpers run their own event loop)."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable at NW_TEST_POSTGRES_URL")
    url, drop = asyncio.run(create_postgres_database("nwlb"))
    yield url
    asyncio.run(drop())


async def test_round_robin_spreads_calls_over_both_registry_replicas(database_url, tmp_path):
    # Same port on two loopback addresses where Linux routes 127/8 (it does); else two ports on 127.0.0.1.
    hosts = ["127.0.0.1", "127.0.0.2"] if _bindable("127.0.0.2") else ["127.0.0.1", "127.0.0.1"]
    port = free_port()
    ports = [port, port] if hosts[0] != hosts[1] else [port, free_port()]
    metrics_ports = [free_port(), free_port()]
    replicas = []
    try:
        # One after the other: the second finds the schema the first migrated (concurrent first starts are
        # the migration lock's business, not this test's).
        for i, (host, p, mp) in enumerate(zip(hosts, ports, metrics_ports, strict=True)):
            replica = start_service(
                "registry", tmp_path / f"r{i}", "--host", host, "--metrics-port", str(mp),
                "--database-url", database_url, port=p,
            )  # fmt: skip
            replicas.append(replica)
            # Health on this replica's own address (nwstack's wait_serving dials 127.0.0.1, the other replica).
            wait_for(functools.partial(_serving, replica, host, p), 90, f"registry replica on {host}")
        assert {_handled_list_models(h, mp) for h, mp in zip(hosts, metrics_ports, strict=True)} == {0}

        target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
        channel = open_channel(target)
        try:
            stub = rgrpc.RegistryServiceStub(channel)
            for _ in range(CALLS):
                await stub.ListModels(rsvc.ListModelsRequest(parent="projects/default"))
        finally:
            await channel.close()

        served = [_handled_list_models(h, mp) for h, mp in zip(hosts, metrics_ports, strict=True)]
        assert sum(served) == CALLS, served
        # round_robin alternates over READY subchannels; allow for the second connecting a little later.
        assert min(served) >= CALLS // 4, f"calls not spread over both replicas: {served}"
    finally:
        for r in replicas:
            r.stop()
