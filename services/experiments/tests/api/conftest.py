"""In-process servers for API tests: experiments (SQLite and PostgreSQL), a real registry, a stand-in deployer.

The deployer stand-in implements `GetDeployment` and `WatchDeployment` (the RPCs the experiments service calls); it
answers from a dict the tests fill, so StartExperiment resolves endpoints through the real generated stub.
"""

from __future__ import annotations

import asyncio
import tempfile

import grpc
import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.deployer.v1 import deployer_service_pb2, deployment_pb2
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as registry_grpc
from neuroweaver_experiments.app import ExperimentsConfig, build
from neuroweaver_registry.app import RegistryConfig
from neuroweaver_registry.app import build as build_registry
from neuroweaver_runtime.testing import create_postgres_database, free_port


class FakeDeployer(deployer_grpc.DeployerServiceServicer):
    def __init__(self) -> None:
        self.deployments: dict[str, deployment_pb2.Deployment] = {}

    async def GetDeployment(self, request, context):
        d = self.deployments.get(request.name)
        if d is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name} not found")
        return d

    async def WatchDeployment(self, request, context):
        d = self.deployments.get(request.name)
        if d is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"deployment {request.name} not found")
        yield deployer_service_pb2.WatchDeploymentResponse(deployment=d)
        await asyncio.Event().wait()  # no later change: open until the watcher leaves


@pytest.fixture(scope="session")
async def deployer():
    fake = FakeDeployer()
    server = grpc.aio.server()
    deployer_grpc.add_DeployerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.target = f"127.0.0.1:{port}"
    yield fake
    await server.stop(None)


@pytest.fixture(scope="session")
async def registry():
    tmp = tempfile.mkdtemp(prefix="nw-exp-registry-")
    service = build_registry(
        RegistryConfig(port=free_port(), metrics_port=-1, database_url=f"sqlite+aiosqlite:///{tmp}/registry.db")
    )
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = registry_grpc.RegistryServiceStub(channel)
    stub.target = f"127.0.0.1:{port}"
    yield stub
    await channel.close()
    await service.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def backend(request, deployer, registry):
    drop = None
    if request.param == "postgres":
        url, drop = await create_postgres_database("nwexp")
    else:
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='nw-exp-')}/experiments.db"
    service = build(
        ExperimentsConfig(
            port=free_port(),
            metrics_port=-1,
            database_url=url,
            deployer_target=deployer.target,
            registry_target=registry.target,
            remote_deadline_seconds=5.0,
            auto_conclude_interval_seconds=0,  # no monitor: auto-conclude tests start replicas with one, or tick it
        )
    )
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Backend(request.param, svc_grpc.ExperimentsServiceStub(channel), service, url)
    await channel.close()
    await service.stop()
    if drop:
        await drop()


class Backend:
    def __init__(self, kind, stub, service, url) -> None:
        self.kind, self.stub, self.service, self.url = kind, stub, service, url


@pytest.fixture
def stub(backend):
    return backend.stub


@pytest.fixture
def make_experiment(stub):
    """Creates (and by default starts) an experiment; returns it."""
    import uuid

    from neuroweaver.experiments.v1 import experiment_pb2 as pb
    from neuroweaver.experiments.v1 import experiments_service_pb2 as svc

    async def make(
        *,
        start=True,
        weights=(0.5, 0.5),
        coverage=0.0,
        primary_kind=None,
        model="projects/default/models/m",
        guardrails=(),
        analysis=pb.ANALYSIS_METHOD_FIXED_HORIZON,
        min_sample_size=0,
        **fields,
    ):
        exp_id = "e-" + uuid.uuid4().hex[:10]
        names = ["control", "treatment", "t2", "t3"]
        variants = [pb.Variant(id=names[i], model_version=f"{model}/versions/1.0.{i}", weight=w) for i, w in enumerate(weights)]
        exp = pb.Experiment(
            display_name="test",
            variants=variants,
            coverage=coverage,
            primary_metric=pb.MetricSpec(
                name="score", kind=primary_kind or pb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
            ),
            guardrail_metrics=list(guardrails),
            secondary_metrics=[
                pb.MetricSpec(name="thumbs_up", kind=pb.METRIC_KIND_PROPORTION, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER)
            ],
            analysis=analysis,
            min_sample_size=min_sample_size,
            **fields,
        )
        created = await stub.CreateExperiment(
            svc.CreateExperimentRequest(parent="projects/default", experiment_id=exp_id, experiment=exp)
        )
        if start:
            return await stub.StartExperiment(svc.StartExperimentRequest(name=created.name))
        return created

    return make
