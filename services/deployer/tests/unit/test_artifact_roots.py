"""The deployer refuses to serve versions whose local artifacts or base-model checkpoints lie outside its configured
artifact roots, through the shared path resolver: one message whether the path exists or not, no path in it."""

from __future__ import annotations

import pytest

from neuroweaver_deployer.adapters.registry import RegistryGateway
from neuroweaver_runtime.errors import FailedPrecondition


@pytest.fixture
async def gateway(tmp_path):
    root = tmp_path / "artifacts"
    (root / "adapters" / "v1").mkdir(parents=True)
    (root / "models" / "base").mkdir(parents=True)
    gw = RegistryGateway("127.0.0.1:1", artifact_roots=[str(root)])
    yield gw, root
    await gw.close()


def _refusal(gw, uri: str, base_model: str = "") -> FailedPrecondition:
    with pytest.raises(FailedPrecondition) as err:
        gw._check_confined("projects/p/models/m/versions/1.0.0", uri, base_model)
    return err.value


async def test_artifacts_inside_the_roots_are_allowed(gateway):
    gw, root = gateway
    gw._check_confined("v", (root / "adapters" / "v1").as_uri())
    gw._check_confined("v", str(root / "adapters" / "v1"), str(root / "models" / "base"))
    gw._check_confined("v", (root / "adapters" / "not-yet-copied").as_uri())  # the model server's host may differ
    gw._check_confined("v", "s3://bucket/adapters/v1")  # object storage is not a host path
    gw._check_confined("v", (root / "adapters" / "v1").as_uri(), "builtin:smollm2-135m-instruct")  # names, not paths
    gw._check_confined("v", (root / "adapters" / "v1").as_uri(), "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "uri", ["file:///etc/passwd", "/etc", "/proc/1/root", "ESCAPE", "relative/adapter", "file:///x%00", "FILE:///etc"]
)
async def test_escapes_are_refused(gateway, uri, tmp_path):
    gw, root = gateway
    if uri == "ESCAPE":
        uri = "file://" + str(root) + "/../../.."
    err = _refusal(gw, uri)
    assert err.reason == "ARTIFACT_PATH_NOT_ALLOWED"
    assert str(tmp_path) not in err.message and str(root) not in err.message


async def test_base_model_paths_outside_the_roots_are_refused(gateway, tmp_path):
    gw, root = gateway
    adapter = (root / "adapters" / "v1").as_uri()
    for base in ("/etc", "file:///etc/passwd", str(tmp_path), str(root / ".." / "elsewhere"), "./base", "~/base"):
        err = _refusal(gw, adapter, base)
        assert err.reason == "BASE_MODEL_PATH_NOT_ALLOWED", base
        assert str(tmp_path) not in err.message


async def test_existing_and_missing_outside_paths_get_the_same_error(gateway, tmp_path):
    gw, root = gateway
    (tmp_path / "outside").mkdir()
    existing, missing = _refusal(gw, (tmp_path / "outside").as_uri()), _refusal(gw, (tmp_path / "nope").as_uri())
    assert (existing.message, existing.reason, existing.metadata) == (missing.message, missing.reason, missing.metadata)


async def test_symlinks_out_of_the_roots_are_refused(gateway, tmp_path):
    gw, root = gateway
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "adapters" / "link").symlink_to(outside)
    err = _refusal(gw, (root / "adapters" / "link").as_uri())
    assert str(outside) not in err.message and "link" not in err.message


async def test_no_roots_means_no_restriction(tmp_path):
    gw = RegistryGateway("127.0.0.1:1")
    try:
        gw._check_confined("v", "file:///etc", "/etc")
    finally:
        await gw.close()
