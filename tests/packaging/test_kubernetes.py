"""Kustomize packaging: render, validate against the Kubernetes 1.30 OpenAPI schemas, and check the
properties that matter (probes, ports, RBAC, security, secrets, network policies)."""

from __future__ import annotations

import subprocess
from collections import Counter

import jsonschema
import kubernetes_validate
import pytest
import yaml
from nwpack import (
    K8S,
    KUSTOMIZATIONS,
    METRICS_PORTS,
    ROOT,
    SERVICES,
    config_fields,
    console_ports,
    default_ports,
    grpc_service_names,
    kubectl,
    load_module,
)

CRD_SCHEMAS = load_module(ROOT / "libs/neuroweaver-kube/tests/crd_schemas.py", "nw_crd_schemas")


def _key(obj):
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def _deployments(objs):
    """Every Deployment of the package by component: the four gRPC services and the web console."""
    return {o["metadata"]["name"].removeprefix("neuroweaver-"): o for o in objs if o["kind"] == "Deployment"}


def _grpc_deployments(objs):
    """The four gRPC services' Deployments (their probes, databases and TLS serving are checked alike)."""
    return {svc: dep for svc, dep in _deployments(objs).items() if svc in SERVICES}


def _container(dep):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


def _probed(probe) -> dict:
    """What a probe checks: a native gRPC probe, or (TLS on) the image's nw-grpc-health run as an exec probe."""
    if "grpc" in probe:
        return probe["grpc"]
    cmd = probe["exec"]["command"]
    assert cmd[:2] == ["/opt/venv/bin/python", "/usr/local/bin/nw-grpc-health"], cmd
    return {"port": int(cmd[cmd.index("--port") + 1]), "service": cmd[2]}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_python_renderer_agrees_with_kubectl_kustomize(name, rendered):
    """The tests read the Python rendering; kubectl's built-in kustomize must produce the same objects."""
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed here; the Python renderer is used alone")
    out = subprocess.run([binary, "kustomize", str(K8S / name)], check=True, capture_output=True, text=True).stdout
    theirs = {_key(o): o for o in yaml.safe_load_all(out) if o}
    ours = {_key(o): o for o in rendered[name]}
    assert theirs == ours


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_is_valid_kubernetes_1_30(name, rendered):
    keys = [_key(o) for o in rendered[name]]
    assert not [k for k, n in Counter(keys).items() if n > 1], "duplicate objects"
    for obj in rendered[name]:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            schema = {"ServiceMonitor": CRD_SCHEMAS.SERVICE_MONITOR, "PrometheusRule": CRD_SCHEMAS.PROMETHEUS_RULE}[obj["kind"]]
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, "1.30.0", strict=True)


def test_validation_is_not_vacuous():
    """A misspelt field must fail strict validation (guards against a validator that accepts anything)."""
    docs = yaml.safe_load_all((K8S / "base/registry.yaml").read_text())
    dep = next(d for d in docs if d and d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.30.0", strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_deployments_have_grpc_probes_on_the_real_service_names(name, rendered):
    names = grpc_service_names()
    ports = default_ports()
    deps = _deployments(rendered[name])
    assert set(deps) == {*SERVICES, "console"}
    for svc, dep in _grpc_deployments(rendered[name]).items():
        c = _container(dep)
        container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert container_ports == {"grpc": ports[svc], "http-metrics": METRICS_PORTS[svc]}
        env = _env(c)
        assert env[f"NW_{svc.upper()}_PORT"]["value"] == str(ports[svc])
        assert env[f"NW_{svc.upper()}_METRICS_PORT"]["value"] == str(METRICS_PORTS[svc])
        host = f"NW_{svc.upper()}_HOST"
        # Pod-IP binding (dev: 0.0.0.0, for kubectl port-forward); the flag names the variable, as the image's CMD
        # passes --host 0.0.0.0 and a flag wins over the env.
        if name == "overlays/dev":
            assert env[host] == {"name": host, "value": "0.0.0.0"}
        else:
            assert env[host] == {"name": host, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        assert c["args"] == ["--host", f"$({host})"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in c[probe]:  # exec probes run inside the pod: they dial the address the server binds
                cmd = c[probe]["exec"]["command"]
                assert cmd[cmd.index("--host-env") + 1] == host, (svc, probe)
        for probe in ("startupProbe", "readinessProbe"):
            assert _probed(c[probe]) == {"port": ports[svc], "service": names[svc]}, (svc, probe)
        # Liveness asks for the server as a whole ("" is set SERVING together with the service).
        assert _probed(c["livenessProbe"]) == {"port": ports[svc], "service": ""}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_console_probes_its_ops_port_and_calls_the_four_services(name, rendered):
    """The web console: its own ports (its config's defaults), bound like the services (pod IP; dev: 0.0.0.0),
    readiness and liveness as GET /healthz on the ops port (plain HTTP, also with TLS on), a client of each of the
    four services, and no Secret of its own: users log in with their own tokens, so no default token is set."""
    c = _container(_deployments(rendered[name])["console"])
    ports = console_ports()
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == ports
    env = _env(c)
    assert env["NW_CONSOLE_PORT"]["value"] == str(ports["http"])
    assert env["NW_CONSOLE_METRICS_PORT"]["value"] == str(ports["http-metrics"])
    host = "NW_CONSOLE_HOST"
    if name == "overlays/dev":
        assert env[host] == {"name": host, "value": "0.0.0.0"}
    else:
        assert env[host] == {"name": host, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert c["args"] == ["--host", f"$({host})"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}, probe
    targets = {var.removeprefix("NW_CONSOLE_").removesuffix("_TARGET").lower() for var in env if var.endswith("_TARGET")}
    assert targets == set(SERVICES)  # each dials the peer's headless Service: test_internal_targets_dial_...
    assert "NW_CONSOLE_TOKEN" not in env
    assert not [e for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})]
    secret_volumes = [v for v in _deployments(rendered[name])["console"]["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secret_volumes] == (["neuroweaver-console-tls"] if name == "overlays/mtls" else [])


def test_registry_default_ports_match_its_code():
    from neuroweaver_registry.app import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVICE_NAME

    assert (DEFAULT_PORT, DEFAULT_METRICS_PORT) == (default_ports()["registry"], METRICS_PORTS["registry"])
    assert SERVICE_NAME == grpc_service_names()["registry"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_are_non_root_read_only_and_bounded(name, rendered):
    for svc, dep in _deployments(rendered[name]).items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        c = _container(dep)
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        _assert_bounded(pod)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, "read-only root needs a writable /tmp"
        assert pod["serviceAccountName"] == f"neuroweaver-{svc}"
        assert pod["automountServiceAccountToken"] is (svc in ("trainer", "deployer"))


def _assert_bounded(pod: dict) -> None:
    """Every container, init containers included, requests CPU and memory and has a memory limit."""
    for c in pod.get("initContainers", []) + pod["containers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], c["name"]


def test_objects_the_platform_creates_are_bounded_too():
    """Model-server pods (the deployer's defaults and a request's resources) and training Job pods."""
    from neuroweaver_deployer.adapters.kube import KubeDefaults, model_server_spec
    from neuroweaver_deployer.domain.model import Autoscaling, ResolvedVersion, Resources, Serving, Target
    from neuroweaver_kube.manifests import TrainingJobSpec, model_server_manifests, training_job

    version = ResolvedVersion("projects/p/models/m/versions/1", "1", "", "", "builtin:tiny")
    for resources in (Resources(), Resources(cpu="2", memory="6Gi", gpus=1)):
        target = Target("projects/p/deployments/d", version, "m-1", 1, Serving(), resources, Autoscaling(), "", {})
        spec = model_server_spec(target, KubeDefaults(image="m", namespace="neuroweaver"))
        deployment = next(o for o in model_server_manifests(spec) if o["kind"] == "Deployment")
        _assert_bounded(deployment["spec"]["template"]["spec"])
    job = training_job(TrainingJobSpec(job="projects/p/trainingJobs/j", namespace="neuroweaver", image="t", gpus=2))
    _assert_bounded(job["spec"]["template"]["spec"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_deployment_has_a_disruption_budget_that_lets_drains_through(name, rendered):
    objs = rendered[name]
    budgets = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    for svc, dep in _deployments(objs).items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        # maxUnavailable 1: a drain takes one replica at a time and is never blocked (minAvailable 1 with one replica
        # would block it forever).
        assert pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1} and "minAvailable" not in pdb["spec"], svc
    replicas = {svc: dep["spec"]["replicas"] for svc, dep in _deployments(objs).items()}
    assert replicas["registry"] >= 2 and replicas["experiments"] >= 2 and replicas["deployer"] >= 2, replicas


def test_prometheus_adapter_example_serves_the_metric_the_hpa_names():
    from neuroweaver_kube.manifests import prometheus_adapter_rule

    (cm,) = yaml.safe_load_all((K8S / "extras" / "prometheus-adapter-config.yaml").read_text())
    kubernetes_validate.validate(cm, "1.30.0", strict=True)
    assert yaml.safe_load(cm["data"]["config.yaml"]) == {"rules": [prometheus_adapter_rule()]}


def test_the_model_server_exports_the_series_the_adapter_reads():
    import prometheus_client

    import neuroweaver_model_server.metrics  # noqa: F401  (registers the server's metrics)
    from neuroweaver_kube.metrics import DEFAULT_METRICS

    text = prometheus_client.generate_latest().decode()
    for series in (DEFAULT_METRICS.inflight_requests, DEFAULT_METRICS.queue_depth):
        assert f"\n{series} " in text, series


def _services(objs, headless: bool) -> dict:
    return {
        o["metadata"]["name"].removeprefix("neuroweaver-").removesuffix("-headless"): o
        for o in objs
        if o["kind"] == "Service" and (o["spec"].get("clusterIP") == "None") is headless
    }


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_select_their_pods_and_declare_grpc(name, rendered):
    """Per service a ClusterIP Service (gRPC + metrics: one address for outside callers, the scrape target) and a
    headless one (gRPC only: DNS answers every ready pod, for the platform's round_robin clients). Port names carry
    the protocol the way meshes read it (`grpc`, `http-*`), and every port declares its appProtocol."""
    objs = rendered[name]
    deps = _deployments(objs)
    clusterip, headless = _services(objs, False), _services(objs, True)
    assert set(clusterip) == {*SERVICES, "console"} and set(headless) == set(SERVICES)
    for svc in SERVICES:
        pod_labels = deps[svc]["spec"]["template"]["metadata"]["labels"]
        assert deps[svc]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        named = {p["name"] for p in _container(deps[svc])["ports"]}
        for s in (clusterip[svc], headless[svc]):
            assert s["spec"]["selector"].items() <= pod_labels.items()
            grpc = next(p for p in s["spec"]["ports"] if p["name"] == "grpc")
            assert grpc["appProtocol"] == "grpc" and grpc["port"] == default_ports()[svc]
            assert {p["targetPort"] for p in s["spec"]["ports"]} <= named
            for p in s["spec"]["ports"]:
                assert p["name"] == "grpc" or p["name"].startswith("http-"), p
                assert p["appProtocol"] == ("grpc" if p["name"] == "grpc" else "http"), p
        assert clusterip[svc]["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert headless[svc]["metadata"]["name"] == f"neuroweaver-{svc}-headless"
        assert [p["name"] for p in headless[svc]["spec"]["ports"]] == ["grpc"]
        assert not headless[svc]["spec"].get("publishNotReadyAddresses"), "only ready pods take calls"
    # The console: HTTP only (no gRPC, no headless twin: browsers and the ingress controller call it, not the platform).
    console = clusterip["console"]["spec"]
    assert console["selector"].items() <= deps["console"]["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: (p["port"], p["targetPort"], p["appProtocol"]) for p in console["ports"]} == {
        port: (number, port, "http") for port, number in console_ports().items()
    }


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_internal_targets_dial_headless_services_through_dns(name, rendered):
    """Every NW_<SVC>_<PEER>_TARGET is dns:///neuroweaver-<peer>-headless:<its gRPC port>, a headless Service of this
    package: the runtime client's round_robin then spreads calls over every ready replica of the peer."""
    objs = rendered[name]
    headless = {s["metadata"]["name"]: s for s in _services(objs, True).values()}
    targets = 0
    for svc, dep in _deployments(objs).items():
        for var, e in _env(_container(dep)).items():
            if not var.endswith("_TARGET"):
                continue
            peer = var.removeprefix(f"NW_{svc.upper()}_").removesuffix("_TARGET").lower()
            assert e["value"] == f"dns:///neuroweaver-{peer}-headless:{default_ports()[peer]}", var
            host, port = e["value"].removeprefix("dns:///").rsplit(":", 1)
            assert int(port) in {p["port"] for p in headless[host]["spec"]["ports"]}
            targets += 1
    assert targets >= 8  # trainer, deployer, experiments → registry; experiments → deployer; the console → all four


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_service_monitors_scrape_every_service_metrics_port(name, rendered):
    objs = rendered[name]
    services = [o for o in objs if o["kind"] == "Service"]
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    covered = set()

    def selects(selector, labels) -> bool:
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "DoesNotExist", expr  # the only operator these selectors use
            if expr["key"] in labels:
                return False
        return selector["matchLabels"].items() <= labels.items()

    for m in monitors:
        # One Service per monitor: the headless twin (same pods) is left out, or each pod would be scraped twice.
        (target,) = [s for s in services if selects(m["spec"]["selector"], s["metadata"]["labels"])]
        ports = {p["name"] for p in target["spec"]["ports"]}
        assert all(e["port"] in ports for e in m["spec"]["endpoints"])
        covered.add(target["metadata"]["name"])
    assert covered == {f"neuroweaver-{s}" for s in [*SERVICES, "console"]}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rbac_is_least_privilege(name, rendered):
    objs = rendered[name]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Role"}
    assert set(roles) == {"neuroweaver-deployer", "neuroweaver-trainer"}
    allowed_verbs = {"get", "list", "watch", "create", "patch", "delete"}
    for role in roles.values():
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
            assert set(rule["verbs"]) <= allowed_verbs
            assert not {"secrets", "configmaps", "roles", "rolebindings", "pods/exec"} & set(rule["resources"])
    grants = {
        (r["metadata"]["name"], g, res): set(rule["verbs"])
        for r in roles.values()
        for rule in r["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
    }
    assert set(grants) == {
        ("neuroweaver-deployer", "apps", "deployments"),
        ("neuroweaver-deployer", "apps", "deployments/scale"),
        ("neuroweaver-deployer", "", "services"),
        ("neuroweaver-deployer", "", "pods"),
        ("neuroweaver-deployer", "autoscaling", "horizontalpodautoscalers"),
        ("neuroweaver-deployer", "policy", "poddisruptionbudgets"),
        ("neuroweaver-deployer", "monitoring.coreos.com", "servicemonitors"),
        ("neuroweaver-deployer", "monitoring.coreos.com", "prometheusrules"),
        ("neuroweaver-trainer", "batch", "jobs"),
        ("neuroweaver-trainer", "", "pods"),
        ("neuroweaver-trainer", "", "pods/log"),
    }
    assert grants[("neuroweaver-trainer", "", "pods/log")] == {"get"}
    # Whatever the deployer's backend applies and deletes, its Role allows.
    from neuroweaver_kube.manifests import ModelServerSpec, model_server_manifests

    spec = ModelServerSpec(
        name="d", namespace="neuroweaver", image="m", model_version="projects/p/models/m/versions/1",
        served_model_name="m-1", base_model_uri="builtin:tiny", min_replicas=1, max_replicas=3, target_inflight_requests=4,
    )  # fmt: skip
    for obj in model_server_manifests(spec):
        group = obj["apiVersion"].rpartition("/")[0]
        plural = {"PodDisruptionBudget": "poddisruptionbudgets"}.get(obj["kind"], obj["kind"].lower() + "s")
        assert {"create", "patch", "delete"} <= grants[("neuroweaver-deployer", group, plural)], obj["kind"]
    assert grants[("neuroweaver-trainer", "", "pods")] == {"get", "list", "watch"}
    accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        assert binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
            assert subject["namespace"] == binding["metadata"]["namespace"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_auth_and_database_come_from_secrets(name, rendered):
    objs = rendered[name]
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    if name == "overlays/dev":
        assert set(secrets) == {"neuroweaver-auth", "neuroweaver-database", "neuroweaver-trainer"}
        for s in secrets.values():
            assert s["metadata"]["annotations"]["neuroweaver.ai/example-values"] == "true"
            assert all("example" in v for v in s["stringData"].values())
    else:
        assert not secrets, "real Secrets are never part of the base or the production overlay"
    config = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    for svc, dep in _grpc_deployments(objs).items():  # the console reads no Secret (its own test)
        env = _env(_container(dep))
        up = svc.upper()
        for var in (f"NW_{up}_DATABASE_URL", f"NW_{up}_PAGE_TOKEN_SECRET"):
            assert "secretKeyRef" in env[var]["valueFrom"], (svc, var)
        # The token table is a file mounted from the Secret (auth is on: the path is never empty).
        tokens_path = env[f"NW_{up}_AUTH_TOKENS"]["value"]
        pod = dep["spec"]["template"]["spec"]
        mount = next(m for m in _container(dep)["volumeMounts"] if tokens_path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "neuroweaver-auth"
        (item,) = volume["secret"]["items"]
        assert mount["mountPath"] + "/" + item["path"] == tokens_path
        if secrets:
            assert item["key"] in secrets["neuroweaver-auth"]["stringData"]
        for e in env.values():
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref and secrets:
                assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]]["stringData"], e
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in config[ref["configMapKeyRef"]["name"]]["data"], e
            if e["name"].endswith("_TOKEN") and e["name"] != f"NW_{up}_AUTH_TOKENS":
                assert "secretKeyRef" in ref, f"{e['name']} must come from a Secret"


def test_example_service_tokens_are_in_the_example_token_table(rendered, tmp_path):
    from neuroweaver_runtime.auth import Role, TokenAuthenticator
    from neuroweaver_runtime.errors import PermissionDenied

    secrets = {o["metadata"]["name"]: o for o in rendered["overlays/dev"] if o["kind"] == "Secret"}
    auth = secrets["neuroweaver-auth"]["stringData"]
    (tmp_path / "auth-tokens.json").write_text(auth["auth-tokens.json"])
    table = TokenAuthenticator.from_setting(str(tmp_path / "auth-tokens.json"))
    assert table.enabled
    for caller in ("trainer", "deployer", "experiments"):
        token = f"Bearer {auth[f'{caller}-service-token']}"
        # A service identity: accepted only on behalf of a caller, whose identity is what the callee authorizes.
        with pytest.raises(PermissionDenied):
            table.authenticate(token)
        principal = table.authenticate(token, "default:operator:alice")
        assert (principal.subject, principal.project, principal.role) == ("alice", "default", Role.OPERATOR)
        assert principal.via == f"svc-{caller}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policies_deny_by_default_and_open_exactly_the_ports_in_use(name, rendered):
    objs = rendered[name]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]

    def allowed_ports(pod_labels, source):
        ports = set()
        for p in policies:
            ps = p["spec"]["podSelector"]
            if ps.get("matchLabels") and not ps["matchLabels"].items() <= pod_labels.items():
                continue
            if any(pod_labels.get(e["key"]) not in e["values"] for e in ps.get("matchExpressions", [])):
                continue
            for rule in p["spec"].get("ingress", []):
                if any(source in f for f in rule["from"]):
                    ports |= {x["port"] for x in rule["ports"]}
        return ports

    for svc, dep in _deployments(objs).items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for p in _container(dep)["ports"]}
        if svc == "console":  # browsers reach it through the ingress controller's namespace
            assert ports["http"] in allowed_ports(labels, "namespaceSelector"), svc
        else:
            assert ports["grpc"] in allowed_ports(labels, "podSelector"), svc
        assert ports["http-metrics"] in allowed_ports(labels, "namespaceSelector"), svc


def test_mtls_overlay_serves_and_calls_with_each_service_certificate(rendered):
    """Each service mounts its own Secret (cert-manager's ca.crt/tls.crt/tls.key), serves mTLS with it, calls the
    others and probes itself with it, and verifies peers by the Service names its targets dial; the trainer's
    Job pods get the same Secret, the deployer's model-server pods neuroweaver-model-server-tls. The plain base keeps
    TLS off."""
    objs = rendered["overlays/mtls"]
    deps = _deployments(objs)
    services = {o["metadata"]["name"] for o in objs if o["kind"] == "Service"}
    for svc, dep in _grpc_deployments(objs).items():
        up, c = svc.upper(), _container(dep)
        pod = dep["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"] == {"secretName": f"neuroweaver-{svc}-tls", "defaultMode": 0o440}
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        files = {k: v["value"] for k, v in _env(c).items() if k.startswith((f"NW_{up}_TLS_", f"NW_{up}_CLIENT_TLS_"))}
        expected = {"TLS_CERT": "tls.crt", "TLS_KEY": "tls.key", "TLS_CLIENT_CA": "ca.crt"}
        expected |= {"CLIENT_TLS_CA": "ca.crt", "CLIENT_TLS_CERT": "tls.crt", "CLIENT_TLS_KEY": "tls.key"}
        assert files == {f"NW_{up}_{k}": f"{mount['mountPath']}/{f}" for k, f in expected.items()}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = c[probe]["exec"]["command"]
            assert cmd[cmd.index("--tls-env-prefix") + 1] == f"NW_{up}_CLIENT_"
            assert cmd[cmd.index("--tls-server-name") + 1] == f"neuroweaver-{svc}" in services
        for var, e in _env(c).items():
            if var.endswith("_TARGET"):  # the name its peers' certificates must carry is the Service it dials
                assert e["value"].removeprefix("dns:///").rsplit(":", 1)[0] in services, var
    trainer = _env(_container(deps["trainer"]))
    assert trainer["NW_TRAINER_KUBE_TLS_SECRET"]["value"] == "neuroweaver-trainer-tls"
    # ... and the model-server pods the deployer creates get their certificate (mTLS: the deployer has a client CA).
    deployer = _env(_container(deps["deployer"]))
    assert deployer["NW_DEPLOYER_KUBE_MODEL_SERVER_TLS_SECRET"]["value"] == "neuroweaver-model-server-tls"
    # The console calls the four with its own certificate (client TLS only: its pages stay HTTP behind the ingress).
    console = deps["console"]
    c = _container(console)
    (volume,) = [v for v in console["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert volume["secret"] == {"secretName": "neuroweaver-console-tls", "defaultMode": 0o440}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    files = {k: v["value"] for k, v in _env(c).items() if "_TLS_" in k}
    expected = {"CLIENT_TLS_CA": "ca.crt", "CLIENT_TLS_CERT": "tls.crt", "CLIENT_TLS_KEY": "tls.key"}
    assert files == {f"NW_CONSOLE_{k}": f"{mount['mountPath']}/{f}" for k, f in expected.items()}
    for var, e in _env(c).items():
        if var.endswith("_TARGET"):
            assert e["value"].removeprefix("dns:///").rsplit(":", 1)[0] in services, var
    for dep in _deployments(rendered["base"]).values():
        assert not [k for k in _env(_container(dep)) if "_TLS_" in k]


def test_gpu_overlay_puts_the_trainer_on_a_gpu_node(rendered):
    trainer = _deployments(rendered["overlays/gpu"])["trainer"]
    pod = trainer["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    c = _container(trainer)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert _env(c)["NW_TRAINER_KUBE_API"]["value"] == ""  # empty: no Kubernetes executor, local workers
    base_trainer = _deployments(rendered["base"])["trainer"]
    assert _env(_container(base_trainer))["NW_TRAINER_KUBE_API"]["value"] == "in-cluster"
    assert "nodeSelector" not in base_trainer["spec"]["template"]["spec"]


def test_configured_images_match_the_dockerfiles(rendered):
    config = next(o for o in rendered["base"] if o["kind"] == "ConfigMap")["data"]
    assert config["model-server-image"].startswith("neuroweaver/model-server:")
    assert config["trainer-image"].startswith("neuroweaver/trainer:")
    for svc, dep in _deployments(rendered["base"]).items():
        assert _container(dep)["image"].startswith(f"neuroweaver/{svc}:")
        assert (ROOT / f"deploy/docker/{svc}.Dockerfile").is_file()


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_nw_variable_is_a_real_setting_of_its_service(name, rendered):
    """load_config silently ignores unknown NW_<SVC>_* variables, so a misspelt one would be lost."""
    fields = config_fields()
    for svc, dep in _deployments(rendered[name]).items():
        for var in _env(_container(dep)):
            if var.startswith(f"NW_{svc.upper()}_"):
                assert var.removeprefix(f"NW_{svc.upper()}_").lower() in fields[svc], var
            else:  # besides the runtime's own, the standard OpenTelemetry variables (overlays/tracing)
                assert var in ("NW_DATA_DIR", "HOME", "POD_NAME") or var.startswith("OTEL_"), var


def test_tracing_overlay_exports_every_service_with_its_pod_identity(rendered):
    deps = _deployments(rendered["overlays/tracing"])
    assert not [v for v in _env(_container(deps["console"])) if v.startswith("OTEL_")], "the console exports no spans"
    for svc, dep in _grpc_deployments(rendered["overlays/tracing"]).items():
        env = _env(_container(dep))
        names = list(env)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http://"), svc
        assert "$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")  # $(VAR) needs it defined first
        assert not any(n in env for n in ("OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_HEADERS")), svc


def test_trainer_job_secret_has_the_keys_the_job_pods_read(rendered):
    from neuroweaver_kube.manifests import DEFAULT_TRAINER_SECRET_ENV

    trainer_env = _env(_container(_deployments(rendered["base"])["trainer"]))
    secret_name = trainer_env["NW_TRAINER_KUBE_SECRET"]["value"]
    secret = next(o for o in rendered["overlays/dev"] if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name)
    required = {se.key for se in DEFAULT_TRAINER_SECRET_ENV if not se.optional}
    assert required <= set(secret["stringData"])
    pvc = trainer_env["NW_TRAINER_KUBE_CHECKPOINT_PVC"]["value"]
    assert any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == pvc for o in rendered["base"])


def test_trained_adapters_resolve_in_model_server_pods(rendered):
    """One claim, one path: the trainer (and its Jobs) write adapters under the data dir on the artifacts claim; the
    deployer's model-server pods mount that claim read-only at that same path, so the file:// URI resolves unchanged."""
    from neuroweaver_kube.manifests import ClaimMount, ModelServerSpec, TrainingJobSpec, model_server_manifests, training_job

    deps = _deployments(rendered["base"])
    trainer_pod, deployer_pod = (deps[svc]["spec"]["template"]["spec"] for svc in ("trainer", "deployer"))
    trainer_env, deployer_env = _env(_container(deps["trainer"])), _env(_container(deps["deployer"]))
    claim = deployer_env["NW_DEPLOYER_KUBE_ARTIFACTS_CLAIM"]["value"]
    root = deployer_env["NW_DEPLOYER_KUBE_ARTIFACTS_MOUNT_PATH"]["value"]
    assert trainer_env["NW_TRAINER_KUBE_CHECKPOINT_PVC"]["value"] == claim and trainer_env["NW_DATA_DIR"]["value"] == root
    for pod in (trainer_pod, deployer_pod):
        (mount,) = [m for m in _container({"spec": {"template": {"spec": pod}}})["volumeMounts"] if m["mountPath"] == root]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
    # The deployer only serves artifacts from under the mounted store.
    assert all(r.startswith(root + "/") for r in deployer_env["NW_DEPLOYER_ARTIFACT_ROOTS"]["value"].split(","))
    job = training_job(
        TrainingJobSpec(job="projects/p/trainingJobs/sft", namespace="neuroweaver", image="t", checkpoint_pvc=claim)
    )
    job_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env["NW_TRAINER_ARTIFACTS_DIR"].startswith(root + "/")
    assert job_env["NW_TRAINER_CHECKPOINT_DIR"].startswith(root + "/")  # a rescheduled pod resumes from the claim
    adapter = f"file://{job_env['NW_TRAINER_ARTIFACTS_DIR']}/projects/p/adapter"
    spec = ModelServerSpec(
        name="projects/p/deployments/d", namespace="neuroweaver", image="m", model_version="projects/p/models/m/versions/1",
        served_model_name="m-1", base_model_uri=f"{root}/models/base", adapter_uri=adapter, adapter_sha256="a" * 64,
        data_volumes=[ClaimMount(claim, root)],
    )  # fmt: skip
    deployment = next(o for o in model_server_manifests(spec) if o["kind"] == "Deployment")
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "data-0", "mountPath": root, "readOnly": True} in _container(deployment)["volumeMounts"]
    assert {"name": "data-0", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} in pod["volumes"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_model_server_pods_get_the_token_table_and_tls_from_secrets(name, rendered):
    """With auth on (it is, in every overlay) the deployer's model-server pods mount the token table from the Secret
    the deployer names (NW_DEPLOYER_KUBE_MODEL_SERVER_AUTH_SECRET), and with a TLS Secret its certificate; never a value."""
    from neuroweaver_kube.manifests import METRICS_PORT, ModelServerSpec, model_server_manifests

    objs = rendered[name]
    env = _env(_container(_deployments(objs)["deployer"]))
    assert env["NW_DEPLOYER_AUTH_TOKENS"]["value"], "auth is on"
    auth_secret = env["NW_DEPLOYER_KUBE_MODEL_SERVER_AUTH_SECRET"]["value"]
    spec = ModelServerSpec(
        name="projects/default/deployments/chat", namespace="neuroweaver", image="neuroweaver/model-server:0.1.0",
        model_version="projects/default/models/chat/versions/1.0.0", served_model_name="chat-1-0-0",
        base_model_uri="builtin:smollm2-135m-instruct", project="default", auth_secret=auth_secret,
        tls_secret="chat-model-server-tls", tls_client_auth=True,
    )  # fmt: skip
    deployment = next(o for o in model_server_manifests(spec) if o["kind"] == "Deployment")
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ms_env = _env(container)
    secret_volumes = {v["secret"]["secretName"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert set(secret_volumes) == {"neuroweaver-auth", "chat-model-server-tls"}
    assert [i["key"] for i in secret_volumes["neuroweaver-auth"]["items"]] == ["auth-tokens.json"]
    assert {i["key"] for i in secret_volumes["chat-model-server-tls"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    for var in (
        "NW_MODEL_SERVER_AUTH_TOKENS",
        "NW_MODEL_SERVER_TLS_CERT",
        "NW_MODEL_SERVER_TLS_KEY",
        "NW_MODEL_SERVER_TLS_CLIENT_CA",
    ):
        assert ms_env[var]["value"].startswith("/var/run/secrets/"), var  # a path into a mounted Secret
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    if secrets:  # the dev overlay's example Secret has the key the pods mount
        assert "auth-tokens.json" in secrets[auth_secret]["stringData"]

    # Prometheus reaches the model servers' ops port; inference stays for the gateway and the platform's pods.
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    scrape = next(p for p in policies if p["metadata"]["name"] == "allow-prometheus-scrape")
    assert METRICS_PORT in {port["port"] for rule in scrape["spec"]["ingress"] for port in rule["ports"]}
