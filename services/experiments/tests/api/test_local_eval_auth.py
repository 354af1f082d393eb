"""Local evaluation RPCs with auth on: a project's configs and exposures are its own (WRONG_PROJECT, no existence
oracle), and writing exposures needs the operator role."""

from __future__ import annotations

import tempfile

import grpc
import pytest

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_experiments.app import ExperimentsConfig, build
from neuroweaver_runtime.assignment import PhasedPlan
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import free_port

TOKENS = "a-op=a:operator,a-viewer=a:viewer,b-op=b:operator"


def auth(token: str):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
async def secured(deployer, registry):
    service = build(
        ExperimentsConfig(
            port=free_port(),
            metrics_port=-1,
            database_url=f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='nw-exp-auth-')}/experiments.db",
            deployer_target=deployer.target,
            registry_target=registry.target,
            auth_tokens=TOKENS,
            page_token_secret="s",
        )
    )
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield svc_grpc.ExperimentsServiceStub(channel)
    await channel.close()
    await service.stop()


async def _denied(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_configs_and_exposures_stay_in_their_project(secured):
    stub = secured
    exp = pb.Experiment(
        variants=[
            pb.Variant(id=v, model_version=f"projects/a/models/m/versions/1.0.{i}", weight=0.5) for i, v in enumerate(["c", "t"])
        ],
        primary_metric=pb.MetricSpec(name="score", kind=pb.METRIC_KIND_MEAN),
    )
    created = await stub.CreateExperiment(
        svc.CreateExperimentRequest(parent="projects/a", experiment_id="e1", experiment=exp), metadata=auth("a-op")
    )
    await stub.StartExperiment(svc.StartExperimentRequest(name=created.name), metadata=auth("a-op"))

    # another project's watch: refused; its own project's snapshot does not hold project a's experiment
    async def first(token, parent):
        async for resp in stub.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent=parent), metadata=auth(token)):
            return resp

    err = await _denied(first("b-op", "projects/a"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(err).reason == "WRONG_PROJECT"
    own = await first("a-viewer", "projects/a")
    assert [c.experiment for c in own.configs] == [created.name]
    watch_b = stub.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent="projects/b"), metadata=auth("b-op"))
    stream = aiter(watch_b)
    b_first = await anext(stream)
    assert b_first.snapshot and not b_first.configs
    watch_b.cancel()

    plan = PhasedPlan(created.hash_seed, [[0.5, 0.5]], 1.0)
    exposure = pb.Exposure(experiment=created.name, unit_id="u1", variant=["c", "t"][plan.evaluate("u1")[1]], epoch=0)

    async def ingest(token):
        async def requests():
            yield svc.IngestEventsRequest(batch_id=1, exposures=[exposure])

        return [r async for r in stub.IngestEvents(requests(), metadata=auth(token))]

    err = await _denied(ingest("b-op"))  # another project's experiment, named inside a batch
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(err).reason == "WRONG_PROJECT"
    err = await _denied(ingest("a-viewer"))  # writing exposures needs the operator role
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(err).reason == "ROLE_TOO_LOW"
    (ack,) = await ingest("a-op")
    assert ack.exposures_accepted == 1
