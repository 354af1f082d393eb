"""GetDeploymentMetrics' refusals on a real deployer with auth on (no model server needed): the window's bounds as a
field violation, unknown and malformed names, other projects' names (the same answer whether or not they exist),
no credentials."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver_runtime.grpc_errors import error_info, field_violations
from neuroweaver_runtime.testing import free_port

TOKENS = "viewer-token=default:viewer:val,other-token=b:admin:bob"
VIEWER = (("authorization", "Bearer viewer-token"),)
OTHER = (("authorization", "Bearer other-token"),)


@pytest.fixture
async def deployer(tmp_path):
    from neuroweaver_deployer.app import DeployerConfig, build

    service = build(
        DeployerConfig(
            port=free_port(), metrics_port=-1, data_dir=str(tmp_path), database_url=f"sqlite:///{tmp_path / 'd.db'}",
            registry_target=f"127.0.0.1:{free_port()}", auth_tokens=TOKENS, page_token_secret="s",
        )
    )  # fmt: skip
    await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield dgrpc.DeployerServiceStub(channel)
    await service.stop()


async def call(stub, name: str, metadata=VIEWER, window: duration_pb2.Duration | None = None):
    request = dsvc.GetDeploymentMetricsRequest(name=name)
    if window is not None:
        request.window.CopyFrom(window)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDeploymentMetrics(request, metadata=metadata)
    return err.value


async def test_refusals(deployer):
    missing = await call(deployer, "projects/default/deployments/nope")
    assert missing.code() == grpc.StatusCode.NOT_FOUND and error_info(missing).reason == "DEPLOYMENT_NOT_FOUND"

    for window in (duration_pb2.Duration(seconds=0), duration_pb2.Duration(seconds=3601),
                   duration_pb2.Duration(seconds=-5), duration_pb2.Duration(seconds=10, nanos=5)):  # fmt: skip
        bad = await call(deployer, "projects/default/deployments/nope", window=window)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(bad).reason == "INVALID_WINDOW"
        assert [v.field for v in field_violations(bad)] == ["window"]

    malformed = await call(deployer, "projects/default/nope")
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT

    # another project's deployment: refused before anything is looked up, existing or not
    foreign = await call(deployer, "projects/default/deployments/nope", metadata=OTHER)
    assert foreign.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(foreign).reason == "WRONG_PROJECT"
    unauthenticated = await call(deployer, "projects/default/deployments/nope", metadata=())
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"prometheus_url": "prometheus:9090"}, "--prometheus-url"), ({"metrics_sample_seconds": -1}, "--metrics-sample")],
)
def test_bad_metrics_settings_stop_the_start(tmp_path, setting, message):
    from neuroweaver_deployer.app import DeployerConfig, build

    with pytest.raises(SystemExit, match=message):
        build(DeployerConfig(port=free_port(), metrics_port=-1, data_dir=str(tmp_path), kubernetes=True, **setting))
