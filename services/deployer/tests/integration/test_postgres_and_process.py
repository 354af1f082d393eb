"""The deployer on PostgreSQL (migrations, writes, listing, revisions) and `python -m neuroweaver_deployer` as a process."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver_runtime.testing import create_postgres_database, free_port, postgres_available

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_ok():
    if not postgres_available():
        pytest.fail("PostgreSQL is not reachable at NW_TEST_POSTGRES_URL")


async def test_deployer_on_postgres(stack, kube_standin, tmp_path, pg_ok):
    from neuroweaver_deployer.app import DeployerConfig, build

    url, drop = await create_postgres_database("nwdeployer")
    deployer = build(
        DeployerConfig(
            port=free_port(),
            metrics_port=-1,
            data_dir=str(tmp_path),
            database_url=url,
            registry_target=f"127.0.0.1:{stack.registry.port}",
            kubernetes=True,
            kube_api_url=kube_standin.url,
            kube_poll_seconds=0.2,
            kube_artifacts_mount_path=str(stack.root.parent),  # the adapters' directory, as the stack's deployer
        )  # fmt: skip
    )
    await deployer.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{deployer.port}") as channel:
            dep = dgrpc.DeployerServiceStub(channel)
            for i in range(3):
                await dep.CreateDeployment(
                    dsvc.CreateDeploymentRequest(
                        parent="projects/default",
                        deployment_id=f"pg-{i}",
                        request_id=f"00000000-0000-4000-8000-00000000000{i}",
                        deployment=dpb.Deployment(
                            model_version=stack.versions[0],
                            backend=dpb.BACKEND_KUBERNETES,
                            namespace="pg",
                            labels={"team": "a" if i else "b"},
                        ),
                    )  # fmt: skip
                )
            again = await dep.CreateDeployment(  # idempotent retry returns the same deployment
                dsvc.CreateDeploymentRequest(
                    parent="projects/default",
                    deployment_id="pg-0",
                    request_id="00000000-0000-4000-8000-000000000000",
                    deployment=dpb.Deployment(
                        model_version=stack.versions[0], backend=dpb.BACKEND_KUBERNETES, namespace="pg", labels={"team": "b"}
                    ),
                )  # fmt: skip
            )
            assert again.name == "projects/default/deployments/pg-0"
            await watch_until(
                dep, "projects/default/deployments/pg-1", lambda d: d.state == dpb.Deployment.STATE_AVAILABLE, timeout=30
            )
            page1 = await dep.ListDeployments(
                dsvc.ListDeploymentsRequest(parent="projects/default", page_size=1, filter='labels.team = "a"')
            )
            page2 = await dep.ListDeployments(
                dsvc.ListDeploymentsRequest(
                    parent="projects/default", page_size=1, filter='labels.team = "a"', page_token=page1.next_page_token
                )
            )
            assert [d.name for d in [*page1.deployments, *page2.deployments]] == [
                "projects/default/deployments/pg-1",
                "projects/default/deployments/pg-2",
            ]
            assert page2.next_page_token == ""
            revs = await dep.ListDeploymentRevisions(
                dsvc.ListDeploymentRevisionsRequest(parent="projects/default/deployments/pg-1")
            )
            assert [r.cause for r in revs.revisions] == ["create"]
            for i in range(3):
                await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=f"projects/default/deployments/pg-{i}"))
            assert (await dep.ListDeployments(dsvc.ListDeploymentsRequest(parent="projects/default"))).deployments == []
    finally:
        await deployer.stop()
        await drop()


async def test_python_m_neuroweaver_deployer_serves_health(tmp_path):
    port = free_port()
    env = {**os.environ, "NW_DEPLOYER_PORT": str(port), "NW_DEPLOYER_METRICS_PORT": "-1", "NW_DEPLOYER_DATA_DIR": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "neuroweaver_deployer", env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="neuroweaver.deployer.v1.DeployerService"), wait_for_ready=True, timeout=60
            )
            async for msg in watch:
                if msg.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            listed = await dgrpc.DeployerServiceStub(channel).ListDeployments(
                dsvc.ListDeploymentsRequest(parent="projects/default")
            )
            assert listed.deployments == []
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
