"""KUBERNETES backend: the model-server manifests of `neuroweaver_kube` applied with server-side apply into a
namespace, status read back from the Deployment, scale through the scale subresource, delete on undeploy.

Model-server pods get their credentials from Secrets that exist in the namespace (the deployer never writes a
Secret and holds no RBAC on them): with the platform's auth on, the token table (`auth_secret`, key
`auth-tokens.json`, as every service reads it) and `--project`; with TLS, `tls_secret` (cert-manager keys
`tls.crt`, `tls.key`, `ca.crt`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from neuroweaver_kube.client import DeploymentStatus, KubeClient, KubeNotFound
from neuroweaver_kube.manifests import ClaimMount, ModelServerSpec, UnmountedPathError, model_server_manifests, to_yaml
from neuroweaver_kube.manifests import Resources as KubeResources
from neuroweaver_runtime import telemetry
from neuroweaver_runtime.errors import FailedPrecondition
from neuroweaver_runtime.names import project_of

from ..domain.model import BackendStatus, Target, extra_versions_json, server_load
from .local import StatusCallback

log = logging.getLogger("neuroweaver.deployer.kube")


@dataclass(frozen=True)
class KubeDefaults:
    """What every model-server workload gets unless its deployment says otherwise."""

    image: str
    namespace: str
    auth_secret: str | None = None  # the token table's Secret; None = auth off (the deployer's own auth is off)
    tls_secret: str | None = None  # the model server's certificate; None = plaintext
    tls_client_auth: bool = False  # mTLS: callers must present certificates (ca.crt of tls_secret)
    # The trainer's artifact store (and, when separate, its base-model directory), mounted read-only at the path the
    # trainer writes under so a version's file:// adapter resolves unchanged in the pod; None = not mounted.
    artifacts_claim: str | None = "neuroweaver-artifacts"
    artifacts_mount_path: str = "/var/lib/neuroweaver"
    models_claim: str | None = None
    models_mount_path: str = "/var/lib/neuroweaver/models"
    otlp_headers_secret: str | None = None  # Secret (key otlp-headers) with the collector's headers for pods

    def data_volumes(self) -> list[ClaimMount]:
        pairs = ((self.artifacts_claim, self.artifacts_mount_path), (self.models_claim, self.models_mount_path))
        return [ClaimMount(claim, path) for claim, path in pairs if claim]


def model_server_spec(target: Target, defaults: KubeDefaults) -> ModelServerSpec:
    """Domain target → the kube library's model-server spec (also what RenderManifests renders); FAILED_PRECONDITION
    when the version's adapter (or path base model) lies on no volume the pod would mount."""
    try:
        return _model_server_spec(target, defaults)
    except UnmountedPathError as exc:
        # Like ARTIFACT_PATH_NOT_ALLOWED, the message names no server path (the mount layout is the operator's).
        what = "adapter" if exc.field == "adapter_uri" else "base model"
        raise FailedPrecondition(
            f"{target.version.name} cannot be served on Kubernetes: its {what} is on no volume model-server pods "
            "mount (deployer --kube-artifacts-claim/--kube-artifacts-mount-path, --kube-models-claim)",
            reason="ARTIFACT_NOT_MOUNTED",
            metadata={"model_version": target.version.name},
        ) from exc


def _model_server_spec(target: Target, defaults: KubeDefaults) -> ModelServerSpec:
    v, s, r, a = target.version, target.serving.with_defaults(), target.resources, target.autoscaling
    load = server_load(target)
    resources = KubeResources(
        cpu_request=r.cpu or "1",
        memory_request=r.memory or "4Gi",
        memory_limit=r.memory or "8Gi",
    )
    env = {
        "NW_MODEL_SERVER_MAX_QUEUE": str(s.max_queue),
        "NW_MODEL_SERVER_MAX_NEW_TOKENS_LIMIT": str(s.max_new_tokens_limit),
        "NW_MODEL_SERVER_MAX_BATCH_SIZE": str(s.max_batch_size),
        "NW_MODEL_SERVER_MODEL_NAMES": ",".join(target.model_names),  # the stable names, as --model-names on the local backend
    }
    return ModelServerSpec(
        name=target.deployment,
        namespace=target.namespace or defaults.namespace,
        image=s.image or defaults.image,
        project=project_of(target.deployment),
        auth_secret=defaults.auth_secret,
        tls_secret=defaults.tls_secret,
        tls_client_auth=defaults.tls_client_auth,
        model_version=v.name,
        served_model_name=target.served_model_name,
        base_model_uri=load.base_model,
        adapter_uri=load.adapter_uri or None,
        adapter_sha256=load.adapter_sha256 or None,
        load_in_4bit=s.load_in_4bit,
        engine=load.engine,
        extra_versions=json.loads(extra_versions_json(target)) if v.co_served else (),
        replicas=target.replicas,
        min_replicas=a.min_replicas if a.enabled else None,
        max_replicas=a.max_replicas if a.enabled else None,
        target_cpu_utilization=a.target_cpu_utilization or 70,
        target_inflight_requests=a.target_inflight_requests or None,
        resources=resources,
        gpus=r.gpus,
        node_selector=dict(r.node_selector),
        tolerations=[{k: val for k, val in vars(t).items() if val} for t in r.tolerations],
        labels={k: val for k, val in target.labels.items() if k.replace(".", "").replace("-", "").replace("_", "").isalnum()},
        env=env,
        data_volumes=defaults.data_volumes(),
        # Pods export traces where the deployer does (read now: --otlp-endpoint is known once tracing is set up).
        tracing=telemetry.child_environment(os.environ),
        tracing_headers_secret=(defaults.otlp_headers_secret, "otlp-headers") if defaults.otlp_headers_secret else None,
    )


def render_manifests(target: Target, defaults: KubeDefaults) -> tuple[str, list[str]]:
    """The model-server manifests of a target as YAML and their `Kind/name`s (RenderManifests); ValueError when the
    spec cannot be rendered."""
    objects = model_server_manifests(model_server_spec(target, defaults))
    return to_yaml(objects), [f"{o['kind']}/{o['metadata']['name']}" for o in objects]


class KubeBackend:
    """State lives in the cluster: the controller runs every apply inside its fenced transaction (`fenced_apply`), and
    a takeover by another replica only resumes polling. A poller that finds the Deployment missing never re-applies by
    itself: it asks `on_missing` (the controller), which re-applies only if this replica still holds the lease and
    the deployment is not being deleted, so a stale poller cannot resurrect a deleted deployment."""

    fenced_apply = True

    def __init__(
        self,
        client: KubeClient,
        on_status: StatusCallback,
        *,
        defaults: KubeDefaults,
        poll_seconds: float = 2.0,
        on_missing: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.on_status = on_status
        self.on_missing = on_missing
        self.defaults = defaults
        self.poll_seconds = poll_seconds
        self._specs: dict[str, ModelServerSpec] = {}
        self._fingerprints: dict[str, str] = {}
        self._rollout_keys: dict[str, str] = {}  # of the target last applied: what `_specs` renders
        self._pollers: dict[str, asyncio.Task] = {}

    def spec(self, target: Target) -> ModelServerSpec:
        return model_server_spec(target, self.defaults)

    def _names_of(self, target: Target) -> ModelServerSpec:
        """A spec that names the target's objects for deletion, even when its version could never be rendered for
        applying (an unmounted adapter): what an earlier version left must still go."""
        unloaded = dataclasses.replace(
            target.version, artifact_uri="", artifact_sha256="", base_model="", gguf_uri="", gguf_lora_uri=""
        )
        return self.spec(dataclasses.replace(target, version=unloaded))

    async def apply(self, target: Target) -> None:
        spec = self.spec(target)
        same = self._fingerprints.get(target.deployment) == target.fingerprint()
        if same and not spec.autoscaling and target.deployment in self._specs:
            await self.client.scale(spec.namespace, spec.object_name, spec.replicas)
        else:
            await self.client.apply(model_server_manifests(spec))
        self._specs[target.deployment] = spec
        self._fingerprints[target.deployment] = target.fingerprint()
        self._rollout_keys[target.deployment] = target.rollout_key()
        if target.deployment not in self._pollers:
            self._pollers[target.deployment] = asyncio.create_task(self._poll(target.deployment))

    async def _poll(self, name: str) -> None:
        while True:
            # Read together, before the object: a status read after an apply is about that apply's target, and one
            # read before says so (the controller then does not take it for a newer spec's).
            spec, key = self._specs[name], self._rollout_keys[name]
            try:
                obj = await self.client.get("apps/v1", "Deployment", spec.namespace, spec.object_name)
                st = DeploymentStatus.parse(obj)
                annotations = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
                current = annotations.get("neuroweaver.ai/model-version") == spec.model_version  # our latest apply landed
                host = f"{spec.object_name}.{spec.namespace}.svc.cluster.local"
                await self.on_status(
                    name,
                    BackendStatus(
                        desired=st.desired_replicas,
                        ready=st.ready_replicas,
                        observed=key if current else "",  # else the pods are of an earlier template
                        rolling_out=not current or (not st.rolled_out and not st.progress_deadline_exceeded),
                        failed=st.progress_deadline_exceeded,
                        message="progress deadline exceeded" if st.progress_deadline_exceeded else "",
                        endpoint=f"{host}:{spec.grpc_port}",
                        openai_base_url=f"{spec.scheme}://{host}:{spec.http_port}/v1",
                    ),
                )
            except KubeNotFound:
                log.warning("deployment %s/%s is missing", spec.namespace, spec.object_name)
                self._fingerprints.pop(name, None)  # the next apply is a full one, not a scale of nothing
                if self.on_missing is not None:
                    self.on_missing(name)
            except Exception:  # noqa: BLE001 - keep polling through API hiccups
                log.exception("reading status of %s failed", name)
            await asyncio.sleep(self.poll_seconds)  # status poll interval

    async def remove(self, name: str, target: Target | None = None) -> None:
        task = self._pollers.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        spec = self._specs.pop(name, None) or (self._names_of(target) if target is not None else None)
        self._fingerprints.pop(name, None)
        self._rollout_keys.pop(name, None)
        if spec is not None:
            await self.client.delete(model_server_manifests(spec))

    async def release(self, name: str) -> None:
        task = self._pollers.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._specs.pop(name, None)
        self._fingerprints.pop(name, None)
        self._rollout_keys.pop(name, None)

    async def close(self) -> None:
        for task in self._pollers.values():
            task.cancel()
        self._pollers.clear()
