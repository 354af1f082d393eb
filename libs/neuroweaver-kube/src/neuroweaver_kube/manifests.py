"""Pure functions that build Kubernetes manifests (plain dicts) from small dataclass specs.

Nothing here talks to a cluster. The model server workload is a Deployment + Service (+ HPA,
ServiceMonitor, PrometheusRule); a training run is a batch/v1 Job. :func:`to_yaml` renders any list
of objects as multi-document YAML in apply order.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from neuroweaver_kube.metrics import DEFAULT_METRICS, ModelServerMetrics

GRPC_PORT = 50051
HTTP_PORT = 8080
METRICS_PORT = 9460  # the model server's ops port: /metrics and /healthz, apart from inference
INFERENCE_SERVICE = "neuroweaver.inference.v1.InferenceService"
PART_OF = "neuroweaver"
DEPLOYER_MANAGER = "neuroweaver-deployer"
TRAINER_MANAGER = "neuroweaver-trainer"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
MODEL_SERVER_MODULE = "neuroweaver_model_server"
TRAINER_WORKER_MODULE = "neuroweaver_trainer.worker"
NON_ROOT_UID = 10001

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# Kinds in the order they are applied (dependencies first; monitoring CRDs last).
# Namespaces, identities and their permissions, policies and config before the workloads that use them (kubectl's
# order): a pod never starts before its Role binding or the NetworkPolicy that should confine it.
APPLY_ORDER = (
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "NetworkPolicy",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "Endpoints",
    "Deployment",
    "StatefulSet",
    "Job",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "ServiceMonitor",
    "PrometheusRule",
)


# --------------------------------------------------------------------------- names


def _short_hash(value: str, n: int = 8) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def is_dns1123_label(value: str) -> bool:
    """True when ``value`` is a valid RFC 1123 label (lowercase alnum and '-', <= 63 chars)."""
    return len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def dns1123_name(value: str, *, prefix: str = "nw", max_len: int = 63) -> str:
    """Derive a DNS-1123 label from any id (e.g. ``projects/p/deployments/My_Dep``).

    Lowercases, maps invalid characters to '-', prefixes ``prefix-`` (so the name also starts with
    a letter, as Service names require), and when the result is too long or had to be altered in a
    lossy way keeps it unique by truncating and appending an 8-hex sha256 of the original id.
    """
    if max_len < 20:
        raise ValueError("max_len must leave room for a hash suffix")
    raw = value.rsplit("/", 1)[-1]
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", raw.lower())).strip("-")
    base = "-".join(p for p in (prefix, cleaned) if p)
    if cleaned == value and len(base) <= max_len and is_dns1123_label(base):
        return base
    # Lossy (case, characters, path dropped) or too long: keep it unique with a hash of the id.
    suffix = _short_hash(value)
    head = base[: max_len - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}" if head else f"x-{suffix}"


def label_value(value: str) -> str:
    """Make ``value`` a valid label value (<= 63 chars, alnum at both ends; hash when truncated)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    if len(cleaned) > 63:
        cleaned = f"{cleaned[:54].rstrip('-_.')}-{_short_hash(value)}"
    assert _LABEL_VALUE.match(cleaned), cleaned
    return cleaned


def recommended_labels(
    *, name: str, instance: str, component: str, managed_by: str, version: str | None = None
) -> dict[str, str]:
    """Kubernetes recommended labels (``app.kubernetes.io/*``)."""
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": managed_by,
    }
    if version:
        labels["app.kubernetes.io/version"] = label_value(version)
    return labels


# --------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class Resources:
    """CPU/memory requests and limits (Kubernetes quantity strings); ``None`` leaves one out."""

    cpu_request: str | None = "1"
    memory_request: str | None = "4Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = "8Gi"
    ephemeral_storage_request: str | None = None


def _resources(res: Resources, gpus: int, gpu_resource: str) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu_request:
        requests["cpu"] = res.cpu_request
    if res.memory_request:
        requests["memory"] = res.memory_request
    if res.ephemeral_storage_request:
        requests["ephemeral-storage"] = res.ephemeral_storage_request
    if res.cpu_limit:
        limits["cpu"] = res.cpu_limit
    if res.memory_limit:
        limits["memory"] = res.memory_limit
    if gpus:
        # Extended resources must have request == limit; both are set explicitly.
        requests[gpu_resource] = str(gpus)
        limits[gpu_resource] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _tolerations(tolerations: Sequence[Mapping[str, Any]], gpus: int) -> list[dict[str, Any]]:
    out = [dict(t) for t in tolerations]
    if gpus and not any(t.get("key") == GPU_RESOURCE for t in out):
        out.append(dict(GPU_TOLERATION))
    return out


def _env(env: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": str(v)} for k, v in env.items()]


#: Never copied into a pod: its own service name, no parent span, and no inlined credentials (headers come from a
#: Secret: ``tracing_headers_secret``).
_NOT_FOR_PODS = (
    "OTEL_SERVICE_NAME",
    "TRACEPARENT",
    "TRACESTATE",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
)


def _tracing_env(
    tracing: Mapping[str, str], pod_name_var: str, namespace: str, headers_secret: tuple[str, str] | None
) -> list[dict[str, Any]]:
    """OTEL_* entries of a pod that exports traces where its creator does; nothing without an OTLP endpoint.

    Goes after ``pod_name_var`` in the env list: ``$(VAR)`` only expands variables defined earlier.
    """
    if not any(tracing.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return []
    plain = {k: v for k, v in tracing.items() if k.startswith("OTEL_") and k not in _NOT_FOR_PODS}
    extra = [a for a in plain.pop("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if a.strip()]
    pod = f"$({pod_name_var})"
    attributes = [f"service.instance.id={pod}", f"k8s.pod.name={pod}", f"k8s.namespace.name={namespace}", *extra]
    out = _env(plain) + [{"name": "OTEL_RESOURCE_ATTRIBUTES", "value": ",".join(attributes)}]
    if headers_secret:
        ref = {"name": headers_secret[0], "key": headers_secret[1]}
        out.append({"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": ref}})
    return out


def _metadata(
    name: str, namespace: str, labels: Mapping[str, str], annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if annotations:
        md["annotations"] = dict(annotations)
    return md


# --------------------------------------------------------------------------- shared volumes


@dataclass(frozen=True)
class ClaimMount:
    """A PersistentVolumeClaim mounted read-only into model-server pods at ``mount_path``.

    Mount it at the path the trainer writes to, so the ``file://`` URIs it registers resolve unchanged.
    """

    claim: str
    mount_path: str
    sub_path: str | None = None

    def __post_init__(self) -> None:
        if not is_dns1123_label(self.claim):
            raise ValueError(f"claim {self.claim!r} is not a DNS-1123 name")
        if not posixpath.isabs(self.mount_path) or posixpath.normpath(self.mount_path) in ("/", "/tmp", "/cache"):
            raise ValueError(f"mount path {self.mount_path!r} must be an absolute path other than /, /tmp and /cache")


class UnmountedPathError(ValueError):
    """A ``file://`` (or absolute path) model input lies on no volume the pod mounts: the pod could never load it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field  # which input: adapter_uri or base_model_uri


def local_path(uri: str) -> str | None:
    """The filesystem path of a ``file://`` URI or absolute path; None for names (hub ids, ``builtin:``, ``s3://``)."""
    if uri.startswith("file://"):
        return posixpath.normpath(uri.removeprefix("file://") or "/")
    return posixpath.normpath(uri) if uri.startswith("/") else None


def _is_under(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


# --------------------------------------------------------------------------- model server


@dataclass(frozen=True)
class ModelServerSpec:
    """Desired model-server workload for one NeuroWeaver deployment.

    ``name`` is the deployment id (or its resource name); Kubernetes object names derive from it via
    :func:`dns1123_name`. Autoscaling is on when ``max_replicas`` is greater than ``min_replicas``;
    then the Deployment omits ``spec.replicas`` so server-side apply never fights the HPA.

    Credentials come from Secrets that already exist in the namespace, mounted read-only; the manifests
    only reference them, so rendered YAML never carries a token or a key:

    - ``auth_secret``: its key ``auth_secret_key`` is the platform's token table (JSON), mounted at
      ``auth_mount_path`` and named by ``NW_MODEL_SERVER_AUTH_TOKENS``; inference then needs a token
      of ``project`` (``--project``).
    - ``tls_secret``: keys ``tls.crt``, ``tls.key`` and, with ``tls_client_auth`` (mTLS), ``ca.crt``
      (as cert-manager writes them), mounted at ``tls_mount_path`` and named by
      ``NW_MODEL_SERVER_TLS_CERT/_KEY/_CLIENT_CA``. The kubelet cannot probe gRPC over TLS, so the
      probes then read ``/healthz`` over HTTPS on the ops port (which asks no client certificate),
      and the ServiceMonitor scrapes it over HTTPS, checking the certificate against ``ca.crt`` and
      the Service's DNS name (``<object_name>.<namespace>.svc``): the certificate must carry it.
    """

    name: str
    namespace: str
    image: str
    model_version: str
    served_model_name: str
    base_model_uri: str
    adapter_uri: str | None = None
    adapter_sha256: str | None = None
    load_in_4bit: bool = False
    engine: str = ""  # the model server's --engine (transformers, llama.cpp, vllm); "" = its auto
    #: Several versions on one base (multi-LoRA): the model server's ``--extra-versions``, one mapping per
    #: additional version (served_model_name, model_version, model_names, adapter_uri, adapter_sha256); each
    #: adapter must lie on a mounted volume.
    extra_versions: Sequence[Mapping[str, Any]] = ()
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_cpu_utilization: int = 70
    #: In-flight (decoding + waiting) requests per replica the HPA aims at, through the custom-metrics API
    #: (``metrics.custom_inflight_metric``, served by prometheus-adapter); CPU stays as the fallback metric.
    target_inflight_requests: int | None = None
    resources: Resources = field(default_factory=Resources)
    gpus: int = 0
    gpu_resource: str = GPU_RESOURCE
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    grpc_port: int = GRPC_PORT
    http_port: int = HTTP_PORT
    metrics_port: int = METRICS_PORT
    project: str | None = None
    auth_secret: str | None = None
    auth_secret_key: str = "auth-tokens.json"
    auth_mount_path: str = "/var/run/secrets/neuroweaver-auth"
    tls_secret: str | None = None
    tls_client_auth: bool = False
    tls_mount_path: str = "/var/run/secrets/neuroweaver-tls"
    #: ``grpc`` is what Istio/Linkerd and most ingresses key on; ``kubernetes.io/h2c`` is the
    #: standard (Gateway API) value for cleartext HTTP/2. Pick per mesh.
    grpc_app_protocol: str = "grpc"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    cache_size_limit: str = "20Gi"
    #: Claims holding adapters and path base models (read-only); a ``file://`` input must lie under one.
    data_volumes: Sequence[ClaimMount] = ()
    #: The deployer's tracing settings (its OTEL_* variables; other keys are ignored): pods export traces there too.
    tracing: Mapping[str, str] = field(default_factory=dict)
    #: (Secret, key) holding OTEL_EXPORTER_OTLP_HEADERS (collector credentials), never inlined.
    tracing_headers_secret: tuple[str, str] | None = None
    startup_timeout_seconds: int = 600
    monitoring: bool = True
    scrape_interval: str = "15s"
    alert_latency_p95_seconds: float = 2.0
    alert_error_ratio: float = 0.05
    alert_for: str = "5m"
    metrics: ModelServerMetrics = DEFAULT_METRICS

    def __post_init__(self) -> None:
        if not is_dns1123_label(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS-1123 label")
        if self.replicas < 0 or self.gpus < 0:
            raise ValueError("replicas and gpus must be >= 0")
        if self.adapter_uri and not self.adapter_sha256:
            raise ValueError("adapter_uri needs adapter_sha256")
        if self.adapter_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.adapter_sha256):
            raise ValueError("adapter_sha256 must be 64 lowercase hex characters")
        if self.max_replicas is not None:
            lo = self.min_replicas if self.min_replicas is not None else 1
            if lo < 1 or self.max_replicas < lo:
                raise ValueError("need 1 <= min_replicas <= max_replicas")
        if not 1 <= self.target_cpu_utilization <= 100:
            raise ValueError("target_cpu_utilization must be in 1..100")
        if self.target_inflight_requests is not None and self.target_inflight_requests < 1:
            raise ValueError("target_inflight_requests must be >= 1 (None = CPU only)")
        for what, secret in (("auth_secret", self.auth_secret), ("tls_secret", self.tls_secret)):
            if secret is not None and not is_dns1123_label(secret):
                raise ValueError(f"{what} must be a DNS-1123 name")
        if self.tls_client_auth and not self.tls_secret:
            raise ValueError("tls_client_auth needs tls_secret")
        if len({self.grpc_port, self.http_port, self.metrics_port}) != 3:
            raise ValueError("grpc_port, http_port and metrics_port must differ")
        if len({posixpath.normpath(m.mount_path) for m in self.data_volumes}) != len(self.data_volumes):
            raise ValueError("data_volumes must have distinct mount paths")
        self._check_mounted("adapter_uri", self.adapter_uri)
        for extra in self.extra_versions:
            self._check_mounted("adapter_uri", str(extra.get("adapter_uri", "")))
        self._check_mounted("base_model_uri", self.base_model_uri)

    def _check_mounted(self, what: str, uri: str | None) -> None:
        path = local_path(uri) if uri else None
        if path is None or any(_is_under(path, m.mount_path) for m in self.data_volumes):
            return
        mounted = ", ".join(f"{m.claim} at {m.mount_path}" for m in self.data_volumes) or "none"
        raise UnmountedPathError(
            what,
            f"{what} {uri} is on no volume model-server pods mount (mounted: {mounted}); "
            "mount the claim holding it at the path the trainer wrote it under",
        )

    @property
    def object_name(self) -> str:
        """Name shared by the Deployment, Service, HPA, ServiceMonitor and PrometheusRule."""
        return dns1123_name(self.name)

    @property
    def autoscaling(self) -> bool:
        lo = self.min_replicas if self.min_replicas is not None else 1
        return self.max_replicas is not None and self.max_replicas > lo

    @property
    def scheme(self) -> str:
        """``https`` when the model server speaks TLS (its HTTP API and ops port)."""
        return "https" if self.tls_secret else "http"

    @property
    def service_host(self) -> str:
        return f"{self.object_name}.{self.namespace}.svc"

    @property
    def version_label(self) -> str:
        return label_value(self.model_version.rsplit("/", 1)[-1])

    def selector_labels(self) -> dict[str, str]:
        """Immutable selector: never includes the version, so a new model version rolls in place."""
        return {
            "app.kubernetes.io/name": "neuroweaver-model-server",
            "app.kubernetes.io/instance": self.object_name,
        }

    def labels_all(self) -> dict[str, str]:
        labels = recommended_labels(
            name="neuroweaver-model-server",
            instance=self.object_name,
            component="model-server",
            managed_by=DEPLOYER_MANAGER,
            version=self.version_label,
        )
        labels.update(self.labels)
        labels.update(self.selector_labels())
        return labels


def model_server_args(spec: ModelServerSpec) -> list[str]:
    """Command-line contract of ``python -m neuroweaver_model_server``."""
    args = [
        "--grpc-port", str(spec.grpc_port),
        "--http-port", str(spec.http_port),
        "--metrics-port", str(spec.metrics_port),
        "--base-model", spec.base_model_uri,
        "--served-model-name", spec.served_model_name,
        "--model-version", spec.model_version,
    ]  # fmt: skip
    if spec.project:
        args += ["--project", spec.project]
    if spec.adapter_uri:
        args += ["--adapter-uri", spec.adapter_uri, "--adapter-sha256", str(spec.adapter_sha256)]
    if spec.load_in_4bit:
        args.append("--load-in-4bit")
    if spec.engine:
        args += ["--engine", spec.engine]
    if spec.extra_versions:
        args += ["--extra-versions", json.dumps([dict(e) for e in spec.extra_versions], separators=(",", ":"))]
    return args


def _grpc_probe(port: int, service: str | None, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    grpc: dict[str, Any] = {"port": port}
    if service is not None:
        grpc["service"] = service
    return {"grpc": grpc, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": timeout}


def _http_probe(port: int, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    get = {"path": "/healthz", "port": port, "scheme": "HTTPS"}
    return {"httpGet": get, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": timeout}


def _probes(spec: ModelServerSpec) -> dict[str, Any]:
    """Startup covers model loading; liveness checks the process; readiness that the inference service is SERVING.

    gRPC probes (overall health ``""`` for liveness, the inference service for readiness) unless the server
    speaks TLS, which the kubelet's gRPC probe cannot: then ``/healthz`` on the ops port over HTTPS (SERVING
    only once the model is loaded; the kubelet does not verify the certificate).
    """
    startup_failures = max(1, spec.startup_timeout_seconds // 10)
    if spec.tls_secret:
        return {
            "startupProbe": _http_probe(spec.metrics_port, 10, startup_failures),
            "livenessProbe": _http_probe(spec.metrics_port, 10, 3),
            "readinessProbe": _http_probe(spec.metrics_port, 5, 3),
        }
    return {
        "startupProbe": _grpc_probe(spec.grpc_port, "", 10, startup_failures),
        "livenessProbe": _grpc_probe(spec.grpc_port, "", 10, 3),
        "readinessProbe": _grpc_probe(spec.grpc_port, INFERENCE_SERVICE, 5, 3),
    }


def _credential_volumes(spec: ModelServerSpec) -> tuple[dict[str, str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, volumeMounts, volumes) that hand the model server its token table and TLS files from Secrets."""
    env: dict[str, str] = {}
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if spec.auth_secret:
        env["NW_MODEL_SERVER_AUTH_TOKENS"] = f"{spec.auth_mount_path}/auth-tokens.json"
        mounts.append({"name": "auth-tokens", "mountPath": spec.auth_mount_path, "readOnly": True})
        # Only the table: the Secret may hold other keys (the services' own tokens) this pod must not see.
        items = [{"key": spec.auth_secret_key, "path": "auth-tokens.json"}]
        volumes.append(
            {"name": "auth-tokens", "secret": {"secretName": spec.auth_secret, "items": items, "defaultMode": 0o440}}
        )
    if spec.tls_secret:
        keys = {"CERT": "tls.crt", "KEY": "tls.key", **({"CLIENT_CA": "ca.crt"} if spec.tls_client_auth else {})}
        env.update({f"NW_MODEL_SERVER_TLS_{setting}": f"{spec.tls_mount_path}/{key}" for setting, key in keys.items()})
        mounts.append({"name": "tls", "mountPath": spec.tls_mount_path, "readOnly": True})
        items = [{"key": key, "path": key} for key in keys.values()]
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls_secret, "items": items, "defaultMode": 0o440}})
    return env, mounts, volumes


def _data_volumes(claims: Sequence[ClaimMount]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumeMounts, volumes) of the read-only data claims (volume names data-0, data-1, ...)."""
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    for i, m in enumerate(claims):
        mount: dict[str, Any] = {"name": f"data-{i}", "mountPath": m.mount_path, "readOnly": True}
        if m.sub_path:
            mount["subPath"] = m.sub_path
        mounts.append(mount)
        volumes.append({"name": f"data-{i}", "persistentVolumeClaim": {"claimName": m.claim, "readOnly": True}})
    return mounts, volumes


def model_server_deployment(spec: ModelServerSpec) -> dict[str, Any]:
    """apps/v1 Deployment running the model server with health probes and a zero-downtime rollout."""
    labels = spec.labels_all()
    credential_env, credential_mounts, credential_volumes = _credential_volumes(spec)
    data_mounts, data_vols = _data_volumes(spec.data_volumes)
    env = {
        "HF_HOME": "/cache/huggingface",
        "HOME": "/tmp",
        "NW_MODEL_SERVER_POD_NAMESPACE": spec.namespace,
        **spec.env,
        **credential_env,  # last: a spec's plain env never overrides where the credentials come from
    }
    env_list = _env(env)
    env_list.append({"name": "NW_MODEL_SERVER_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    env_list += _tracing_env(spec.tracing, "NW_MODEL_SERVER_POD_NAME", spec.namespace, spec.tracing_headers_secret)
    if "NW_MODEL_SERVER_HOST" not in env:
        # Bind the pod IP (gRPC, HTTP and ops ports), not 0.0.0.0: probes, Services and meshes reach pods there.
        env_list.append({"name": "NW_MODEL_SERVER_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    container: dict[str, Any] = {
        "name": "model-server",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", MODEL_SERVER_MODULE],
        "args": model_server_args(spec),
        "env": env_list,
        "ports": [
            {"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"},
            {"name": "http", "containerPort": spec.http_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"},
        ],
        **_probes(spec),
        "resources": _resources(spec.resources, spec.gpus, spec.gpu_resource),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            *data_mounts,
            *credential_mounts,
        ],
    }
    pod_annotations = {"neuroweaver.ai/model-version": spec.model_version}
    if spec.adapter_sha256:
        pod_annotations["neuroweaver.ai/adapter-sha256"] = spec.adapter_sha256
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": 45,  # above the model server's drain (5 s) + grace (30 s) on SIGTERM
        "enableServiceLinks": False,
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {"sizeLimit": spec.cache_size_limit}},
            *data_vols,
            *credential_volumes,
        ],
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    tolerations = _tolerations(spec.tolerations, spec.gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    dep_spec: dict[str, Any] = {
        "revisionHistoryLimit": 5,
        "selector": {"matchLabels": spec.selector_labels()},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "minReadySeconds": 5,
        "progressDeadlineSeconds": max(600, spec.startup_timeout_seconds + 120),
        "template": {
            "metadata": {"labels": labels, "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if not spec.autoscaling:
        dep_spec = {"replicas": spec.replicas, **dep_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec.object_name, spec.namespace, labels, spec.annotations),
        "spec": dep_spec,
    }


def model_server_service(spec: ModelServerSpec) -> dict[str, Any]:
    """v1 Service exposing the gRPC port (appProtocol grpc), the HTTP port (OpenAI API) and the ops port (/metrics)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec.object_name, spec.namespace, spec.labels_all(), spec.annotations),
        "spec": {
            "type": "ClusterIP",
            "selector": spec.selector_labels(),
            "ports": [
                {
                    "name": "grpc",
                    "port": spec.grpc_port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": spec.grpc_app_protocol,
                },
                {
                    "name": "http",
                    "port": spec.http_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": spec.scheme,
                },
                {
                    "name": "metrics",
                    "port": spec.metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                    "appProtocol": spec.scheme,
                },
            ],
        },
    }


def model_server_hpa(spec: ModelServerSpec) -> dict[str, Any]:
    """autoscaling/v2 HorizontalPodAutoscaler on in-flight requests per replica (when a target is set) and CPU.

    The HPA takes the largest replica count any metric asks for, and when one metric cannot be read (no
    custom-metrics adapter, no samples yet) it still scales up on the others but never down: CPU is the fallback.
    """
    lo = spec.min_replicas if spec.min_replicas is not None else 1
    utilization = {"type": "Utilization", "averageUtilization": spec.target_cpu_utilization}
    cpu = {"type": "Resource", "resource": {"name": "cpu", "target": utilization}}
    metrics: list[dict[str, Any]] = [cpu]
    if spec.target_inflight_requests:
        inflight = {
            "type": "Pods",
            "pods": {
                "metric": {"name": spec.metrics.custom_inflight_metric},
                "target": {"type": "AverageValue", "averageValue": str(spec.target_inflight_requests)},
            },
        }
        metrics = [inflight, cpu]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec.object_name, spec.namespace, spec.labels_all()),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.object_name},
            "minReplicas": lo,
            "maxReplicas": spec.max_replicas,
            "metrics": metrics,
            # Model servers are slow to start: scale up promptly, scale down cautiously.
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                },
            },
        },
    }


def model_server_pdb(spec: ModelServerSpec) -> dict[str, Any]:
    """policy/v1 PodDisruptionBudget: voluntary disruptions (node drains) take one replica at a time.

    ``maxUnavailable: 1`` rather than ``minAvailable``: with one replica it still lets a drain through (a
    ``minAvailable: 1`` budget would block it forever), and it keeps holding when the deployer or the HPA scales
    through the scale subresource without re-applying. Unhealthy pods may always be evicted.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec.object_name, spec.namespace, spec.labels_all()),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": spec.selector_labels()},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def prometheus_adapter_rule(metrics: ModelServerMetrics = DEFAULT_METRICS) -> dict[str, Any]:
    """The prometheus-adapter rule that serves ``metrics.custom_inflight_metric`` per pod (custom.metrics.k8s.io).

    Requests in flight = being decoded + waiting for the generation worker, from the model server's two gauges as
    Prometheus scraped them through the ServiceMonitor (``namespace`` and ``pod`` target labels).
    """
    matchers = "<<.LabelMatchers>>"
    return {
        "seriesQuery": f'{metrics.inflight_requests}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{metrics.inflight_requests}$", "as": metrics.custom_inflight_metric},
        "metricsQuery": (
            f"sum by (<<.GroupBy>>) ({metrics.inflight_requests}{{{matchers}}})"
            f" + sum by (<<.GroupBy>>) ({metrics.queue_depth}{{{matchers}}})"
        ),
    }


def model_server_service_monitor(spec: ModelServerSpec) -> dict[str, Any]:
    """monitoring.coreos.com/v1 ServiceMonitor scraping ``/metrics`` on the ops port (HTTPS with TLS on)."""
    endpoint: dict[str, Any] = {
        "port": "metrics",
        "path": "/metrics",
        "scheme": spec.scheme,
        "interval": spec.scrape_interval,
    }
    if spec.tls_secret:
        ca = {"secret": {"name": spec.tls_secret, "key": "ca.crt"}}
        endpoint["tlsConfig"] = {"ca": ca, "serverName": spec.service_host}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(spec.object_name, spec.namespace, spec.labels_all()),
        "spec": {
            "selector": {"matchLabels": spec.selector_labels()},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [endpoint],
        },
    }


def alert_expressions(spec: ModelServerSpec) -> dict[str, str]:
    """PromQL of the latency-p95 and error-ratio alerts; only uses ``spec.metrics`` names."""
    m = spec.metrics
    sel = f'namespace="{spec.namespace}",service="{spec.object_name}"'
    latency = (
        f"histogram_quantile(0.95, sum by (le) (rate({m.request_duration_seconds}_bucket{{{sel}}}[5m])))"
        f" > {spec.alert_latency_p95_seconds:g}"
    )
    errors = (
        f'sum(rate({m.requests_total}{{{sel},{m.code_label}=~"{m.server_error_codes_regex}"}}[5m]))'
        f" / sum(rate({m.requests_total}{{{sel}}}[5m])) > {spec.alert_error_ratio:g}"
    )
    return {"latency_p95": latency, "error_ratio": errors}


def model_server_prometheus_rule(spec: ModelServerSpec) -> dict[str, Any]:
    """monitoring.coreos.com/v1 PrometheusRule with latency-p95 and error-ratio alerts."""
    exprs = alert_expressions(spec)
    common = {"namespace": spec.namespace, "deployment": spec.object_name, "model_version": spec.model_version}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(spec.object_name, spec.namespace, spec.labels_all()),
        "spec": {
            "groups": [
                {
                    "name": f"{spec.object_name}.model-server",
                    "rules": [
                        {
                            "alert": "NeuroWeaverModelServerHighLatencyP95",
                            "expr": exprs["latency_p95"],
                            "for": spec.alert_for,
                            "labels": {"severity": "warning", **common},
                            "annotations": {
                                "summary": (
                                    f"p95 latency of {spec.served_model_name} above {spec.alert_latency_p95_seconds:g}s"
                                ),
                                "description": (
                                    "95th percentile request latency over 5m is {{ $value | humanizeDuration }}."
                                ),
                            },
                        },
                        {
                            "alert": "NeuroWeaverModelServerHighErrorRate",
                            "expr": exprs["error_ratio"],
                            "for": spec.alert_for,
                            "labels": {"severity": "critical", **common},
                            "annotations": {
                                "summary": (
                                    f"error ratio of {spec.served_model_name} above {spec.alert_error_ratio:.0%}"
                                ),
                                "description": "Server-error ratio over 5m is {{ $value | humanizePercentage }}.",
                            },
                        },
                    ],
                }
            ]
        },
    }


def model_server_manifests(spec: ModelServerSpec) -> list[dict[str, Any]]:
    """All objects of a model-server deployment, in apply order."""
    objs = [model_server_service(spec), model_server_deployment(spec), model_server_pdb(spec)]
    if spec.autoscaling:
        objs.append(model_server_hpa(spec))
    if spec.monitoring:
        objs += [model_server_service_monitor(spec), model_server_prometheus_rule(spec)]
    return sort_for_apply(objs)


# --------------------------------------------------------------------------- training job


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable read from a key of a Secret (``secretKeyRef``)."""

    env: str
    key: str
    optional: bool = False


DEFAULT_TRAINER_SECRET_ENV = (
    SecretEnv("NW_TRAINER_DATABASE_URL", "database-url"),
    SecretEnv("NW_TRAINER_AUTH_TOKEN", "auth-token", optional=True),
    SecretEnv("NW_TRAINER_REGISTRY_TOKEN", "registry-token", optional=True),
    # experiment trackers: MLflow reads its credentials from the environment (never from the job's tracking URI)
    SecretEnv("MLFLOW_TRACKING_USERNAME", "mlflow-tracking-username", optional=True),
    SecretEnv("MLFLOW_TRACKING_PASSWORD", "mlflow-tracking-password", optional=True),
    SecretEnv("MLFLOW_TRACKING_TOKEN", "mlflow-tracking-token", optional=True),
)


@dataclass(frozen=True)
class TrainingJobSpec:
    """Desired batch/v1 Job running one training job's worker.

    ``job`` is the trainer's job id / resource name passed as ``--job``; the Job object name derives
    from it. With ``checkpoint_pvc`` set that claim (the shared artifact store) is mounted at
    ``checkpoint_mount_path``, the same path the trainer, deployer and model servers mount it at, and it
    becomes the worker's data directory: checkpoints go to ``<mount>/checkpoints/<job object name>`` (a
    retried or rescheduled pod resumes from there) and adapters to ``<mount>/artifacts`` (unless ``env``
    names another ``NW_TRAINER_ARTIFACTS_DIR``), so the ``file://`` URIs it registers resolve everywhere. With
    ``tls_secret`` set (keys ``ca.crt``, ``tls.crt``, ``tls.key``, as cert-manager writes them) it is
    mounted read-only at ``tls_mount_path`` and the worker's client TLS settings point at it.
    """

    job: str
    namespace: str
    image: str
    gpus: int = 0
    #: Training processes (torch.distributed.run ranks); 0 = one per GPU, or 1.
    processes: int = 0
    gpu_resource: str = GPU_RESOURCE
    resources: Resources = field(
        default_factory=lambda: Resources(cpu_request="2", memory_request="8Gi", memory_limit="16Gi")
    )
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    secret_name: str | None = "neuroweaver-trainer"
    secret_env: Sequence[SecretEnv] = DEFAULT_TRAINER_SECRET_ENV
    checkpoint_pvc: str | None = None
    checkpoint_mount_path: str = "/var/lib/neuroweaver"
    tls_secret: str | None = None
    tls_mount_path: str = "/var/run/secrets/neuroweaver-tls"
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = 86400
    shm_size_limit: str = "8Gi"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    extra_args: Sequence[str] = ()
    #: As :attr:`ModelServerSpec.tracing`: the worker exports traces where the trainer does.
    tracing: Mapping[str, str] = field(default_factory=dict)
    tracing_headers_secret: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if not is_dns1123_label(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS-1123 label")
        if self.gpus < 0 or self.processes < 0 or self.backoff_limit < 0:
            raise ValueError("gpus, processes and backoff_limit must be >= 0")
        if self.checkpoint_pvc is not None and not is_dns1123_label(self.checkpoint_pvc):
            raise ValueError("checkpoint_pvc must be a DNS-1123 name")
        if self.tls_secret is not None and not is_dns1123_label(self.tls_secret):
            raise ValueError("tls_secret must be a DNS-1123 name")

    @property
    def object_name(self) -> str:
        return dns1123_name(self.job, prefix="nw-train")

    def labels_all(self) -> dict[str, str]:
        labels = recommended_labels(
            name="neuroweaver-trainer-worker",
            instance=self.object_name,
            component="training-job",
            managed_by=TRAINER_MANAGER,
        )
        labels.update(self.labels)
        labels["neuroweaver.ai/training-job"] = label_value(self.job.rsplit("/", 1)[-1])
        return labels


def training_command(spec: TrainingJobSpec) -> list[str]:
    """Worker entrypoint: plain python for one process, ``torch.distributed.run`` (torchrun) for several: the same
    launcher a local trainer uses, one rank per GPU."""
    worker = ["--job", spec.job, *spec.extra_args]
    processes = spec.processes or max(1, spec.gpus)
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        return ["python", *launcher, "-m", TRAINER_WORKER_MODULE, *worker]
    return ["python", "-m", TRAINER_WORKER_MODULE, *worker]


def training_job(spec: TrainingJobSpec) -> dict[str, Any]:
    """batch/v1 Job for one training run (restartPolicy Never; retries via backoffLimit)."""
    labels = spec.labels_all()
    env = {"HF_HOME": "/cache/huggingface", "HOME": "/tmp", "NW_TRAINER_JOB": spec.job, **spec.env}
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/cache"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    if spec.checkpoint_pvc:
        root = spec.checkpoint_mount_path
        env["NW_DATA_DIR"] = root
        env.setdefault("NW_TRAINER_ARTIFACTS_DIR", f"{root}/artifacts")
        env["NW_TRAINER_CHECKPOINT_DIR"] = f"{root}/checkpoints/{spec.object_name}"
        mounts.append({"name": "checkpoints", "mountPath": root})
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint_pvc}})
    if spec.tls_secret:
        for setting, key in (("CA", "ca.crt"), ("CERT", "tls.crt"), ("KEY", "tls.key")):
            env[f"NW_TRAINER_CLIENT_TLS_{setting}"] = f"{spec.tls_mount_path}/{key}"
        mounts.append({"name": "tls", "mountPath": spec.tls_mount_path, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls_secret, "defaultMode": 0o440}})
    if spec.gpus > 1 or spec.processes > 1:
        # NCCL (and gloo across CPU processes) need a large /dev/shm; the default 64Mi breaks collectives.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size_limit}})
    env_list = _env(env)
    traced = _tracing_env(spec.tracing, "POD_NAME", spec.namespace, spec.tracing_headers_secret)
    if traced:
        env_list += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, *traced]
    if spec.secret_name:
        for se in spec.secret_env:
            ref: dict[str, Any] = {"name": spec.secret_name, "key": se.key}
            if se.optional:
                ref["optional"] = True
            env_list.append({"name": se.env, "valueFrom": {"secretKeyRef": ref}})
    command = training_command(spec)
    container = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command[:1],
        "args": command[1:],
        "env": env_list,
        "resources": _resources(spec.resources, spec.gpus, spec.gpu_resource),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "securityContext": _pod_security(),
        "enableServiceLinks": False,
        "volumes": volumes,
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    tolerations = _tolerations(spec.tolerations, spec.gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        # A replacement pod starts only once the old one has stopped (Kubernetes >= 1.29): with the default, a pod
        # deleted or evicted mid-step would still be writing the checkpoint directory its replacement resumes from.
        "podReplacementPolicy": "Failed",
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec.object_name, spec.namespace, labels, spec.annotations),
        "spec": job_spec,
    }


# --------------------------------------------------------------------------- YAML


def sort_for_apply(objects: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stable sort by :data:`APPLY_ORDER` (unknown kinds go last)."""
    rank = {k: i for i, k in enumerate(APPLY_ORDER)}
    return sorted((dict(o) for o in objects), key=lambda o: rank.get(o.get("kind", ""), len(rank)))


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """Multi-document YAML of ``objects`` in apply order (``kubectl apply -f -`` ready)."""
    return yaml.safe_dump_all(sort_for_apply(objects), sort_keys=False, default_flow_style=False, width=1 << 20)
