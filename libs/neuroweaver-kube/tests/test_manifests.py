import re

import jsonschema
import kubernetes_validate
import prometheus_client
import pytest
import yaml
from crd_schemas import PROMETHEUS_RULE, SERVICE_MONITOR
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver_kube import metrics
from neuroweaver_kube.manifests import (
    INFERENCE_SERVICE,
    ClaimMount,
    ModelServerSpec,
    Resources,
    TrainingJobSpec,
    UnmountedPathError,
    alert_expressions,
    dns1123_name,
    is_dns1123_label,
    model_server_manifests,
    prometheus_adapter_rule,
    to_yaml,
    training_job,
)

K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
SHA = "a" * 64
# The Kustomize package's layout: one shared claim at the trainer's data directory (adapters under artifacts/,
# the model cache under models/).
STORE = (ClaimMount("neuroweaver-artifacts", "/var/lib/neuroweaver"),)


def gpu_spec(**kw):
    base = dict(
        name="projects/default/deployments/Service_Advisor-Canary",
        namespace="neuroweaver",
        image="ghcr.io/neuroweaver/model-server:0.1.0",
        model_version="projects/default/models/service-advisor/versions/1.4.0",
        served_model_name="service-advisor-1.4.0",
        base_model_uri="file:///var/lib/neuroweaver/models/smollm2-135m",
        adapter_uri="file:///var/lib/neuroweaver/artifacts/adapters/sa-1.4.0",
        data_volumes=STORE,
        adapter_sha256=SHA,
        load_in_4bit=True,
        min_replicas=2,
        max_replicas=6,
        target_cpu_utilization=65,
        resources=Resources(cpu_request="4", memory_request="24Gi", cpu_limit="8", memory_limit="32Gi"),
        gpus=1,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-A10G"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}],
        labels={"neuroweaver.ai/project": "default"},
    )
    base.update(kw)
    return ModelServerSpec(**base)


def cpu_spec(**kw):
    base = dict(
        name="chat-demo",
        namespace="neuroweaver",
        image="ghcr.io/neuroweaver/model-server:0.1.0",
        model_version="projects/default/models/chat/versions/0.1.0",
        served_model_name="chat-0.1.0",
        base_model_uri="builtin:smollm2-135m",
        replicas=2,
    )
    base.update(kw)
    return ModelServerSpec(**base)


def multi_gpu_job(**kw):
    base = dict(
        job="projects/default/trainingJobs/sft-service-advisor-20250101",
        namespace="neuroweaver",
        image="ghcr.io/neuroweaver/trainer:0.1.0",
        gpus=4,
        checkpoint_pvc="nw-checkpoints",
        active_deadline_seconds=6 * 3600,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    )
    base.update(kw)
    return TrainingJobSpec(**base)


def validate_all(objs, version):
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            schema = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}[obj["kind"]]
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: model_server_manifests(gpu_spec()),
        lambda: model_server_manifests(cpu_spec()),
        lambda: [training_job(multi_gpu_job())],
        lambda: [training_job(multi_gpu_job(gpus=1))],
        lambda: [training_job(multi_gpu_job(gpus=1, tls_secret="neuroweaver-trainer-tls"))],
        lambda: model_server_manifests(secured_spec()),
        lambda: model_server_manifests(
            gpu_spec(target_inflight_requests=8, tracing=TRACING, tracing_headers_secret=("otel-auth", "headers"))
        ),
    ],
    ids=[
        "gpu-deployment-hpa",
        "cpu-deployment",
        "multi-gpu-job",
        "single-gpu-job",
        "tls-job",
        "auth-mtls-deployment",
        "inflight-hpa",
    ],
)
def test_manifests_validate_against_official_schemas(make, version):
    validate_all(make(), version)


def test_validator_rejects_a_broken_manifest():
    dep = model_server_manifests(cpu_spec())[1]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # must be int
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    rule = model_server_manifests(cpu_spec())[-1]
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUS_RULE)
    sm = model_server_manifests(cpu_spec())[-2]
    sm["spec"]["endpoints"][0]["prot"] = "http"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, SERVICE_MONITOR)


def test_gpu_deployment_shape():
    objs = model_server_manifests(gpu_spec())
    assert [o["kind"] for o in objs] == [
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    ]
    svc, dep, hpa, pdb, sm, rule = objs
    name = dep["metadata"]["name"]
    assert all(o["metadata"]["name"] == name and o["metadata"]["namespace"] == "neuroweaver" for o in objs)
    assert "replicas" not in dep["spec"], "HPA owns replicas; SSA must not fight it"
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 6
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert hpa["spec"]["metrics"] == [  # no in-flight target: CPU only
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 65}}}
    ]
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "neuroweaver_model_server"]
    env = {e["name"]: e for e in c["env"]}  # every port binds the pod IP, not 0.0.0.0
    assert env["NW_MODEL_SERVER_HOST"] == {
        "name": "NW_MODEL_SERVER_HOST",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    args = c["args"]
    assert args[args.index("--adapter-sha256") + 1] == SHA and "--load-in-4bit" in args
    assert args[args.index("--grpc-port") + 1] == "50051" and args[args.index("--http-port") + 1] == "8080"
    assert args[args.index("--metrics-port") + 1] == "9460"
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": INFERENCE_SERVICE}
    assert c["livenessProbe"]["grpc"]["port"] == 50051 and c["startupProbe"]["grpc"]["port"] == 50051
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1" == c["resources"]["limits"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"} in pod["tolerations"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert pod["securityContext"]["runAsNonRoot"]
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"]["port"] == 8080 and ports["metrics"]["port"] == 9460
    # Scrapes go to the ops port, never to the port that serves inference.
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s"}]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "http": 8080, "metrics": 9460}
    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "neuroweaver-deployer"
    assert labels["app.kubernetes.io/part-of"] == "neuroweaver"
    assert labels["app.kubernetes.io/version"] == "1.4.0"
    assert labels["app.kubernetes.io/component"] == "model-server"
    assert labels["app.kubernetes.io/instance"] == name
    # The selector is immutable in apps/v1: it must not carry the version, and must select the pods.
    sel = dep["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in sel
    assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == sel == sm["spec"]["selector"]["matchLabels"]


def secured_spec(**kw):
    base = dict(
        name="projects/team-a/deployments/chat",
        project="team-a",
        auth_secret="neuroweaver-auth",
        tls_secret="chat-model-server-tls",
        tls_client_auth=True,
        env={"NW_MODEL_SERVER_AUTH_TOKENS": "", "NW_MODEL_SERVER_MAX_QUEUE": "8"},
    )
    return cpu_spec(**{**base, **kw})


def _secret_volume_files(pod, container, env_value):
    """The Secret and key a file path in the container's env comes from (through its volume mount)."""
    mount = next(m for m in container["volumeMounts"] if env_value.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    item = next(i for i in volume["items"] if mount["mountPath"] + "/" + i["path"] == env_value)
    return volume["secretName"], item["key"], volume


def test_credentials_and_tls_come_from_secrets_never_from_the_manifest():
    svc, dep, _pdb, sm, _rule = model_server_manifests(secured_spec())
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    secret_files = {
        name: _secret_volume_files(pod, c, env[name]["value"])[:2]
        for name in (
            "NW_MODEL_SERVER_AUTH_TOKENS",
            "NW_MODEL_SERVER_TLS_CERT",
            "NW_MODEL_SERVER_TLS_KEY",
            "NW_MODEL_SERVER_TLS_CLIENT_CA",
        )
    }
    assert secret_files == {
        "NW_MODEL_SERVER_AUTH_TOKENS": ("neuroweaver-auth", "auth-tokens.json"),
        "NW_MODEL_SERVER_TLS_CERT": ("chat-model-server-tls", "tls.crt"),
        "NW_MODEL_SERVER_TLS_KEY": ("chat-model-server-tls", "tls.key"),
        "NW_MODEL_SERVER_TLS_CLIENT_CA": ("chat-model-server-tls", "ca.crt"),
    }
    # Only the token table is projected from the shared auth Secret (it also holds the services' own tokens).
    _, _, auth_volume = _secret_volume_files(pod, c, env["NW_MODEL_SERVER_AUTH_TOKENS"]["value"])
    assert auth_volume["items"] == [{"key": "auth-tokens.json", "path": "auth-tokens.json"}]
    assert auth_volume["defaultMode"] == 0o440
    assert env["NW_MODEL_SERVER_MAX_QUEUE"]["value"] == "8"  # the spec's own env stays; it cannot blank the table
    args = c["args"]
    assert args[args.index("--project") + 1] == "team-a"
    # Nothing secret on the command line or in plain values: only paths.
    assert all(not e.get("value", "").startswith("{") for e in c["env"]) and "--auth-tokens" not in args
    # The kubelet cannot probe gRPC over TLS: HTTPS /healthz on the ops port, which asks no client certificate.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": 9460, "scheme": "HTTPS"}, probe
    assert {p["name"]: p["appProtocol"] for p in svc["spec"]["ports"]} == {
        "grpc": "grpc",
        "http": "https",
        "metrics": "https",
    }
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "chat-model-server-tls", "key": "ca.crt"}},
        "serverName": f"{dep['metadata']['name']}.neuroweaver.svc",
    }


def test_tls_without_client_auth_mounts_no_client_ca_and_plain_specs_mount_nothing():
    pod = model_server_manifests(secured_spec(tls_client_auth=False))[1]["spec"]["template"]["spec"]
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert {"NW_MODEL_SERVER_TLS_CERT", "NW_MODEL_SERVER_TLS_KEY"} <= env and "NW_MODEL_SERVER_TLS_CLIENT_CA" not in env
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]
    assert [i["key"] for i in tls["items"]] == ["tls.crt", "tls.key"]

    plain = model_server_manifests(cpu_spec())[1]["spec"]["template"]["spec"]
    (c,) = plain["containers"]
    assert not [e for e in c["env"] if "AUTH" in e["name"] or "_TLS_" in e["name"]]
    assert not [v for v in plain["volumes"] if "secret" in v]
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": INFERENCE_SERVICE}
    with pytest.raises(ValueError, match="tls_secret"):
        cpu_spec(tls_client_auth=True)
    with pytest.raises(ValueError, match="auth_secret"):
        cpu_spec(auth_secret="Not_A_Name")
    with pytest.raises(ValueError, match="must differ"):
        cpu_spec(metrics_port=8080)


def test_cpu_deployment_has_no_gpu_and_fixed_replicas():
    objs = model_server_manifests(cpu_spec(monitoring=False))
    assert [o["kind"] for o in objs] == ["Service", "Deployment", "PodDisruptionBudget"]
    dep = objs[1]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in res.get("requests", {}) and "tolerations" not in pod
    assert "--adapter-uri" not in pod["containers"][0]["args"]


def test_model_servers_mount_the_artifact_store_read_only_where_the_trainer_wrote():
    spec = gpu_spec(data_volumes=(*STORE, ClaimMount("nw-models", "/srv/models")), base_model_uri="/srv/models/base")
    pod = model_server_manifests(spec)[1]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    # file:///var/lib/neuroweaver/artifacts/... and /srv/models/base resolve to paths on these read-only claims.
    store, models = mounts["/var/lib/neuroweaver"], mounts["/srv/models"]
    assert store["readOnly"] and models["readOnly"]
    assert claims[store["name"]] == {"claimName": "neuroweaver-artifacts", "readOnly": True}
    assert claims[models["name"]] == {"claimName": "nw-models", "readOnly": True}
    args = c["args"]
    assert args[args.index("--adapter-uri") + 1].startswith("file:///var/lib/neuroweaver/")


@pytest.mark.parametrize(
    "field, uri",
    [
        ("adapter_uri", "file:///checkpoints/artifacts/sa"),  # the old Job layout: on no mounted path
        ("adapter_uri", "file:///var/lib/neuroweaver-other/sa"),  # a sibling, not a child, of the mount
        ("adapter_uri", "file:///var/lib/neuroweaver/../etc/sa"),
        ("base_model_uri", "/models/base"),
    ],
)
def test_inputs_on_no_mounted_claim_are_refused_at_render_time(field, uri):
    with pytest.raises(UnmountedPathError, match=field) as exc:
        gpu_spec(**{field: uri})
    assert exc.value.field == field
    with pytest.raises(UnmountedPathError):
        gpu_spec(data_volumes=(), **{field: uri})
    gpu_spec(base_model_uri="HuggingFaceTB/SmolLM2-135M")  # hub ids and builtin: names are not paths


def test_claim_mount_validation():
    for claim, path in [("Bad_Claim", "/data"), ("ok", "relative"), ("ok", "/tmp"), ("ok", "/")]:
        with pytest.raises(ValueError):
            ClaimMount(claim, path)
    with pytest.raises(ValueError, match="distinct"):
        gpu_spec(data_volumes=(*STORE, ClaimMount("other", "/var/lib/neuroweaver/")))


def test_hpa_scales_on_inflight_requests_per_replica_with_cpu_as_the_fallback():
    hpa = next(
        o
        for o in model_server_manifests(gpu_spec(target_inflight_requests=4))
        if o["kind"] == "HorizontalPodAutoscaler"
    )
    inflight, cpu = hpa["spec"]["metrics"]
    assert inflight == {
        "type": "Pods",
        "pods": {
            "metric": {"name": "neuroweaver_model_server_inflight_requests"},
            "target": {"type": "AverageValue", "averageValue": "4"},
        },
    }
    assert cpu["resource"]["target"]["averageUtilization"] == 65
    with pytest.raises(ValueError, match="target_inflight_requests"):
        gpu_spec(target_inflight_requests=0)


def test_prometheus_adapter_serves_the_hpas_metric_from_series_the_server_exports():
    """The custom metric the HPA names is what the adapter rule exposes, computed from exported series only."""
    m = metrics.DEFAULT_METRICS
    rule = prometheus_adapter_rule(m)
    assert rule["name"]["as"] == m.custom_inflight_metric
    assert re.fullmatch(rule["name"]["matches"], m.inflight_requests)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # per-pod values: a Pods metric
    queried = _promql_metric_names(rule["metricsQuery"].replace("<<.LabelMatchers>>", 'pod="p"'))
    assert queried == {m.inflight_requests, m.queue_depth} and queried <= _exported_by_a_real_registry(m)
    renamed = prometheus_adapter_rule(metrics.ModelServerMetrics(custom_inflight_metric="x_inflight"))
    assert renamed["name"]["as"] == "x_inflight"


TRACING = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability.svc:4317",
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_SERVICE_NAME": "neuroweaver-deployer",  # the creator's: the pod reports its own
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret",  # never inlined
    "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod",
    "TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


@pytest.mark.parametrize(
    "pod_of, pod_name_var",
    [
        (
            lambda **kw: model_server_manifests(gpu_spec(**kw))[1]["spec"]["template"]["spec"],
            "NW_MODEL_SERVER_POD_NAME",
        ),
        (lambda **kw: training_job(multi_gpu_job(**kw))["spec"]["template"]["spec"], "POD_NAME"),
    ],
    ids=["model-server", "training-job"],
)
def test_pods_export_traces_where_their_creator_does(pod_of, pod_name_var):
    env = pod_of(tracing=TRACING, tracing_headers_secret=("otel-collector-auth", "headers"))["containers"][0]["env"]
    names = [e["name"] for e in env]
    by_name = {e["name"]: e for e in env}
    assert by_name["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == TRACING["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert by_name["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
    assert not {"OTEL_SERVICE_NAME", "TRACEPARENT"} & set(names)
    assert by_name["OTEL_EXPORTER_OTLP_HEADERS"] == {
        "name": "OTEL_EXPORTER_OTLP_HEADERS",
        "valueFrom": {"secretKeyRef": {"name": "otel-collector-auth", "key": "headers"}},
    }
    assert "s3cret" not in str(env)
    attributes = by_name["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(",")
    assert f"service.instance.id=$({pod_name_var})" in attributes and "deployment.environment=prod" in attributes
    # $(VAR) expands only variables defined earlier in the list.
    assert by_name[pod_name_var]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert names.index(pod_name_var) < names.index("OTEL_RESOURCE_ATTRIBUTES")
    untraced = pod_of(tracing={"OTEL_TRACES_SAMPLER": "always_on"})["containers"][0]["env"]
    assert not [e for e in untraced if e["name"].startswith("OTEL_")]  # no endpoint: no export, nothing set


def test_version_change_keeps_selector_and_changes_template():
    a = model_server_manifests(gpu_spec())[1]
    b = model_server_manifests(
        gpu_spec(model_version="projects/default/models/service-advisor/versions/1.5.0", adapter_sha256="b" * 64)
    )[1]
    assert a["spec"]["selector"] == b["spec"]["selector"]
    assert a["spec"]["template"] != b["spec"]["template"]


def test_multi_gpu_training_job():
    spec = multi_gpu_job()
    job = training_job(spec)
    assert job["kind"] == "Job" and is_dns1123_label(job["metadata"]["name"])
    js = job["spec"]
    assert js["backoffLimit"] == 3 and js["activeDeadlineSeconds"] == 21600 and js["ttlSecondsAfterFinished"] == 86400
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["command"] + c["args"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "neuroweaver_trainer.worker",
        "--job",
        spec.job,
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e for e in c["env"]}
    assert env["NW_TRAINER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "neuroweaver-trainer",
        "key": "database-url",
    }
    assert env["NW_TRAINER_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # The claim is the shared store, mounted where the trainer, deployer and model servers mount it: checkpoints
    # (a killed pod resumes from them) and adapters (file:// URIs the model servers resolve) both live on it.
    assert env["NW_DATA_DIR"]["value"] == "/var/lib/neuroweaver"
    assert env["NW_TRAINER_CHECKPOINT_DIR"]["value"] == f"/var/lib/neuroweaver/checkpoints/{job['metadata']['name']}"
    assert env["NW_TRAINER_ARTIFACTS_DIR"]["value"] == "/var/lib/neuroweaver/artifacts"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "nw-checkpoints"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "checkpoints", "mountPath": "/var/lib/neuroweaver"} in c["volumeMounts"]
    named = training_job(multi_gpu_job(env={"NW_TRAINER_ARTIFACTS_DIR": "/var/lib/neuroweaver/adapters"}))
    named_env = {e["name"]: e.get("value") for e in named["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert named_env["NW_TRAINER_ARTIFACTS_DIR"] == "/var/lib/neuroweaver/adapters"
    # Same job id -> same checkpoint dir on a retried pod.
    assert training_job(multi_gpu_job())["spec"]["template"]["spec"]["containers"][0]["env"] == c["env"]


def test_tls_secret_is_mounted_read_only_and_the_worker_points_at_it():
    pod = training_job(multi_gpu_job(gpus=1, tls_secret="neuroweaver-trainer-tls"))["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert {"name": "tls", "mountPath": "/var/run/secrets/neuroweaver-tls", "readOnly": True} in c["volumeMounts"]
    assert {"name": "tls", "secret": {"secretName": "neuroweaver-trainer-tls", "defaultMode": 0o440}} in pod["volumes"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert {k: v for k, v in env.items() if "_TLS_" in k} == {
        "NW_TRAINER_CLIENT_TLS_CA": "/var/run/secrets/neuroweaver-tls/ca.crt",
        "NW_TRAINER_CLIENT_TLS_CERT": "/var/run/secrets/neuroweaver-tls/tls.crt",
        "NW_TRAINER_CLIENT_TLS_KEY": "/var/run/secrets/neuroweaver-tls/tls.key",
    }
    plain = training_job(multi_gpu_job(gpus=1))["spec"]["template"]["spec"]
    assert not any("_TLS_" in e["name"] for e in plain["containers"][0]["env"])
    assert all(v["name"] != "tls" for v in plain["volumes"])
    with pytest.raises(ValueError, match="tls_secret"):
        multi_gpu_job(tls_secret="Not_A_Name")


def test_single_gpu_job_uses_plain_python():
    c = training_job(multi_gpu_job(gpus=1, checkpoint_pvc=None))["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] + c["args"][:2] == ["python", "-m", "neuroweaver_trainer.worker"]
    assert not any(e["name"] == "NW_TRAINER_CHECKPOINT_DIR" for e in c["env"])


@pytest.mark.parametrize(
    "value",
    [
        "chat",
        "projects/default/deployments/Chat_Bot",
        "x" * 200,
        "UPPER",
        "--a--",
        "projects/p/deployments/" + "é" * 40,
        "9lives",
        "a.b.c",
    ],
)
def test_names_are_dns1123(value):
    name = dns1123_name(value)
    assert is_dns1123_label(name) and name[0].isalpha() and len(name) <= 63


def test_names_stay_distinct_after_truncation_and_lossy_mapping():
    assert dns1123_name("a" * 100 + "1") != dns1123_name("a" * 100 + "2")
    assert dns1123_name("Chat") != dns1123_name("chat")
    assert dns1123_name("projects/a/deployments/x") != dns1123_name("projects/b/deployments/x")
    assert dns1123_name("chat") == "nw-chat"
    assert dns1123_name("projects/a/deployments/x") == dns1123_name("projects/a/deployments/x")
    assert not is_dns1123_label("Bad_Name") and not is_dns1123_label("a" * 64)


def test_to_yaml_is_multidoc_in_apply_order():
    objs = list(reversed(model_server_manifests(gpu_spec()))) + [training_job(multi_gpu_job())]
    docs = list(yaml.safe_load_all(to_yaml(objs)))
    assert [d["kind"] for d in docs] == [
        "Service",
        "Deployment",
        "Job",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    ]
    assert docs[1] == model_server_manifests(gpu_spec())[1]


def _exported_by_a_real_registry(m: metrics.ModelServerMetrics) -> set[str]:
    """Series names prometheus_client exposes for metrics registered the way the server must."""
    reg = prometheus_client.CollectorRegistry()
    h = prometheus_client.Histogram(m.request_duration_seconds, "latency", ["method", m.code_label], registry=reg)
    c = prometheus_client.Counter(
        m.requests_total.removesuffix("_total"), "requests", ["method", m.code_label], registry=reg
    )
    h.labels("Generate", "OK").observe(0.1)
    c.labels("Generate", "OK").inc()
    for gauge in (m.inflight_requests, m.queue_depth):
        prometheus_client.Gauge(gauge, "requests", registry=reg).set(1)
    text = prometheus_client.generate_latest(reg).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _promql_metric_names(expr: str) -> set[str]:
    # A metric selector is an identifier followed by '{' (every selector in our rules has matchers).
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))


def test_alert_rules_only_query_series_the_server_exports():
    exported = _exported_by_a_real_registry(metrics.DEFAULT_METRICS)
    assert exported >= metrics.DEFAULT_METRICS.exported_series()
    rule = model_server_manifests(gpu_spec())[-1]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(exprs) == 2
    used = set().union(*(_promql_metric_names(e) for e in exprs))
    assert used and used <= exported, used - exported
    assert all(not tok.startswith("nw_") or tok in exported for e in exprs for tok in re.findall(r"\bnw_\w+", e))
    ex = alert_expressions(gpu_spec(alert_latency_p95_seconds=1.5))
    assert "histogram_quantile(0.95" in ex["latency_p95"] and ex["latency_p95"].endswith("> 1.5")
    assert 'code=~"' in ex["error_ratio"]


def test_alert_rules_follow_renamed_metrics():
    m = metrics.ModelServerMetrics(request_duration_seconds="x_latency_seconds", requests_total="x_requests_total")
    rule = model_server_manifests(gpu_spec(metrics=m))[-1]
    used = set().union(*(_promql_metric_names(r["expr"]) for r in rule["spec"]["groups"][0]["rules"]))
    assert used == {"x_latency_seconds_bucket", "x_requests_total"}


def test_spec_validation_errors():
    with pytest.raises(ValueError):
        cpu_spec(adapter_uri="file:///a")  # no sha256
    with pytest.raises(ValueError):
        cpu_spec(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        cpu_spec(namespace="Bad_NS")
