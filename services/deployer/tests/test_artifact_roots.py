"""The deployer refuses to serve versions whose local artifacts lie outside its configured artifact roots."""

from __future__ import annotations

import pytest

from neuroweaver_deployer.adapters.registry import RegistryGateway
from neuroweaver_runtime.errors import FailedPrecondition


@pytest.fixture
async def gateway(tmp_path):
    root = tmp_path / "artifacts"
    (root / "adapters" / "v1").mkdir(parents=True)
    gw = RegistryGateway("127.0.0.1:1", artifact_roots=[str(root)])
    yield gw, root
    await gw.close()


async def test_artifacts_inside_the_roots_are_allowed(gateway):
    gw, root = gateway
    gw._check_confined("v", (root / "adapters" / "v1").as_uri())
    gw._check_confined("v", "s3://bucket/adapters/v1")  # object storage is not a host path


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "/etc", "ESCAPE"])
async def test_escapes_are_refused(gateway, uri, tmp_path):
    gw, root = gateway
    if uri == "ESCAPE":
        uri = "file://" + str(root) + "/../../.."
    with pytest.raises(FailedPrecondition) as err:
        gw._check_confined("projects/p/models/m/versions/1.0.0", uri)
    assert err.value.reason == "ARTIFACT_PATH_NOT_ALLOWED"


async def test_symlinks_out_of_the_roots_are_refused(gateway, tmp_path):
    gw, root = gateway
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "adapters" / "link").symlink_to(outside)
    with pytest.raises(FailedPrecondition):
        gw._check_confined("v", (root / "adapters" / "link").as_uri())


async def test_no_roots_means_no_restriction(tmp_path):
    gw = RegistryGateway("127.0.0.1:1")
    try:
        gw._check_confined("v", "file:///etc")
    finally:
        await gw.close()
