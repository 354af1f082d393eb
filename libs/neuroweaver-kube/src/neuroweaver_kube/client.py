"""Thin async wrapper over the official ``kubernetes`` client.

Requests go through ``ApiClient.param_serialize`` / ``call_api`` (the installed client's generic
request path, which keeps auth, TLS and proxies from the loaded configuration) so one code path
serves every kind, including CRDs such as ServiceMonitor. Blocking calls run in a thread executor;
the event loop never waits on the network.

Server-side apply is a ``PATCH`` with ``Content-Type: application/apply-patch+yaml`` and
``?fieldManager=neuroweaver&force=true`` (the same request ``DynamicClient.server_side_apply`` and
``kubectl apply --server-side --force-conflicts`` send); the JSON body is valid YAML.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from neuroweaver_kube.manifests import sort_for_apply

FIELD_MANAGER = "neuroweaver"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """REST mapping of one kind: ``/api{s}/<group>/<version>/namespaces/<ns>/<plural>/<name>``."""

    plural: str
    namespaced: bool = True


#: Kinds this client knows how to address (no discovery round trip needed).
KINDS: dict[str, Kind] = {
    "Namespace": Kind("namespaces", namespaced=False),
    "ServiceAccount": Kind("serviceaccounts"),
    "Secret": Kind("secrets"),
    "ConfigMap": Kind("configmaps"),
    "PersistentVolumeClaim": Kind("persistentvolumeclaims"),
    "Service": Kind("services"),
    "Pod": Kind("pods"),
    "Deployment": Kind("deployments"),
    "Job": Kind("jobs"),
    "StatefulSet": Kind("statefulsets"),
    "Endpoints": Kind("endpoints"),
    "HorizontalPodAutoscaler": Kind("horizontalpodautoscalers"),
    "PodDisruptionBudget": Kind("poddisruptionbudgets"),
    "ServiceMonitor": Kind("servicemonitors"),
    "PrometheusRule": Kind("prometheusrules"),
    # the rest of what deploy/kubernetes ships, so the package applies through this client (kubectl apply --server-side)
    "Role": Kind("roles"),
    "RoleBinding": Kind("rolebindings"),
    "NetworkPolicy": Kind("networkpolicies"),
}


def resource_path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None) -> str:
    """REST path of a collection (``name=None``) or an object."""
    try:
        k = KINDS[kind]
    except KeyError:
        raise ValueError(f"unsupported kind {kind!r}; add it to neuroweaver_kube.client.KINDS") from None
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if k.namespaced:
        if not namespace:
            raise ValueError(f"{kind} is namespaced: namespace required")
        prefix += f"/namespaces/{namespace}"
    path = f"{prefix}/{k.plural}"
    return f"{path}/{name}" if name else path


def object_path(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata") or {}
    return resource_path(obj["apiVersion"], obj["kind"], md.get("namespace"), md["name"])


class KubeApiError(Exception):
    """A non-2xx answer of the API server; ``status``/``reason`` come from its ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, body: Any = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.body = body


class KubeNotFound(KubeApiError):
    """404 NotFound."""


class KubeConflict(KubeApiError):
    """409 AlreadyExists / Conflict."""


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Condition:
        return cls(
            type=raw.get("type", ""),
            status=raw.get("status", "Unknown"),
            reason=raw.get("reason"),
            message=raw.get("message"),
            last_transition_time=raw.get("lastTransitionTime"),
        )


def _conditions(status: Mapping[str, Any]) -> tuple[Condition, ...]:
    return tuple(Condition.parse(c) for c in status.get("conditions") or ())


@dataclass(frozen=True)
class DeploymentStatus:
    """Rollout state of a Deployment (``kubectl rollout status`` semantics in :attr:`rolled_out`)."""

    name: str
    namespace: str
    generation: int
    observed_generation: int
    desired_replicas: int
    replicas: int
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    conditions: tuple[Condition, ...]

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def available(self) -> bool:
        c = self.condition("Available")
        return c is not None and c.status == "True" and self.available_replicas > 0

    @property
    def rolled_out(self) -> bool:
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas >= self.desired_replicas
            and self.replicas <= self.updated_replicas
            and self.available_replicas >= self.updated_replicas
        )

    @property
    def progress_deadline_exceeded(self) -> bool:
        c = self.condition("Progressing")
        return c is not None and c.reason == "ProgressDeadlineExceeded"

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> DeploymentStatus:
        md, spec, st = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
        return cls(
            name=md.get("name", ""),
            namespace=md.get("namespace", ""),
            generation=int(md.get("generation", 0)),
            observed_generation=int(st.get("observedGeneration", 0)),
            desired_replicas=int(spec.get("replicas", 1)),
            replicas=int(st.get("replicas", 0)),
            updated_replicas=int(st.get("updatedReplicas", 0)),
            ready_replicas=int(st.get("readyReplicas", 0)),
            available_replicas=int(st.get("availableReplicas", 0)),
            conditions=_conditions(st),
        )


@dataclass(frozen=True)
class JobStatus:
    """State of a batch/v1 Job; :attr:`phase` is one of Pending, Running, Succeeded, Failed."""

    name: str
    namespace: str
    active: int
    succeeded: int
    failed: int
    start_time: str | None
    completion_time: str | None
    conditions: tuple[Condition, ...]

    def _true(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_ and c.status == "True"), None)

    @property
    def phase(self) -> str:
        if self._true("Complete") or self._true("SuccessCriteriaMet"):
            return "Succeeded"
        if self._true("Failed") or self._true("FailureTarget"):
            return "Failed"
        return "Running" if self.active > 0 else "Pending"

    @property
    def failure_reason(self) -> str | None:
        c = self._true("Failed") or self._true("FailureTarget")
        return c.reason if c else None

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> JobStatus:
        md, st = obj.get("metadata", {}), obj.get("status") or {}
        return cls(
            name=md.get("name", ""),
            namespace=md.get("namespace", ""),
            active=int(st.get("active", 0)),
            succeeded=int(st.get("succeeded", 0)),
            failed=int(st.get("failed", 0)),
            start_time=st.get("startTime"),
            completion_time=st.get("completionTime"),
            conditions=_conditions(st),
        )


def load_api_client(
    *,
    host: str | None = None,
    token: str | None = None,
    verify_ssl: bool = True,
    kubeconfig: str | None = None,
    context: str | None = None,
) -> k8s.ApiClient:
    """An ``ApiClient`` from an explicit host, else in-cluster config, else kubeconfig."""
    cfg = k8s.Configuration()
    if host is not None:
        cfg.host = host
        cfg.verify_ssl = verify_ssl
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return k8s.ApiClient(cfg)
    if kubeconfig is None and context is None:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
            return k8s.ApiClient(cfg)
        except k8s_config.ConfigException:
            pass
    k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return k8s.ApiClient(cfg)


class KubeClient:
    """Async facade: apply/delete objects, Deployment status and scale, batch Jobs.

    All methods are coroutines; the blocking ``kubernetes`` client runs in ``executor`` (the
    loop's default executor when ``None``).
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        field_manager: str = FIELD_MANAGER,
        executor: Executor | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self.api = api_client
        self.field_manager = field_manager
        self._executor = executor
        self._timeout = request_timeout

    @classmethod
    def from_config(cls, **kwargs: Any) -> KubeClient:
        """Build from :func:`load_api_client` arguments (host/token, kubeconfig/context or in-cluster)."""
        client_kwargs = {k: kwargs.pop(k) for k in ("field_manager", "executor", "request_timeout") if k in kwargs}
        return cls(load_api_client(**kwargs), **client_kwargs)

    def close(self) -> None:
        self.api.close()

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """Blocking request; returns the decoded JSON answer or raises :class:`KubeApiError`."""
        raw = self.request_raw(method, path, query=query, body=body, content_type=content_type)
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {"message": raw.decode(errors="replace")}

    def request_raw(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> bytes:
        """Blocking request; the answer's bytes (a pod log is text, not JSON), or :class:`KubeApiError`."""
        headers = {"Accept": accept, "Content-Type": content_type}
        req = self.api.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        resp = self.api.call_api(*req, _request_timeout=self._timeout)
        raw = resp.read() or b""
        if 200 <= resp.status < 300:
            return raw
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw.decode(errors="replace")}
        reason = data.get("reason") or resp.reason or ""
        message = data.get("message") or ""
        err = {404: KubeNotFound, 409: KubeConflict}.get(resp.status, KubeApiError)
        raise err(resp.status, reason, message, data)

    # ------------------------------------------------------------------ generic objects

    def apply_sync(self, objects: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Server-side apply each object in apply order; returns the objects the server stored."""
        query = [("fieldManager", self.field_manager), ("force", "true")]
        return [
            self.request("PATCH", object_path(o), query=query, body=o, content_type=APPLY_PATCH)
            for o in sort_for_apply(objects)
        ]

    async def apply(self, objects: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return await self._run(self.apply_sync, list(objects))

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self._run(self.request, "GET", resource_path(api_version, kind, namespace, name))

    def _delete_sync(self, path: str, propagation: str) -> bool:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.request("DELETE", path, body=body)
        except KubeNotFound:
            return False
        return True

    async def delete(self, objects: Iterable[Mapping[str, Any]], *, propagation: str = "Foreground") -> list[bool]:
        """Delete objects in reverse apply order; ``False`` for each one that was already gone."""
        ordered = list(reversed(sort_for_apply(objects)))
        return [await self._run(self._delete_sync, object_path(o), propagation) for o in ordered]

    # ------------------------------------------------------------------ deployments

    async def read_deployment_status(self, namespace: str, name: str) -> DeploymentStatus:
        obj = await self.get("apps/v1", "Deployment", namespace, name)
        return DeploymentStatus.parse(obj)

    async def scale(self, namespace: str, name: str, replicas: int) -> int:
        """Set replicas through the ``scale`` subresource; returns ``spec.replicas`` of the answer."""
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        path = resource_path("apps/v1", "Deployment", namespace, name) + "/scale"
        body = {"spec": {"replicas": replicas}}
        out = await self._run(partial(self.request, "PATCH", path, body=body, content_type=MERGE_PATCH))
        return int(out.get("spec", {}).get("replicas", 0))

    # ------------------------------------------------------------------ jobs

    async def create_job(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """POST a batch/v1 Job; raises :class:`KubeConflict` when the name is taken."""
        path = resource_path("batch/v1", "Job", job["metadata"]["namespace"])
        return await self._run(partial(self.request, "POST", path, body=dict(job)))

    async def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        return await self.get("batch/v1", "Job", namespace, name)

    async def read_job_status(self, namespace: str, name: str) -> JobStatus:
        return JobStatus.parse(await self.read_job(namespace, name))

    async def delete_job(self, namespace: str, name: str, *, propagation: str = "Foreground") -> bool:
        """Delete a Job and its pods (the API's default for Jobs would orphan the pods)."""
        return await self._run(self._delete_sync, resource_path("batch/v1", "Job", namespace, name), propagation)

    # ------------------------------------------------------------------ pods

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        path = resource_path("v1", "Pod", namespace)
        out = await self._run(partial(self.request, "GET", path, query=[("labelSelector", label_selector)]))
        return list(out.get("items") or [])

    async def read_pod_log(
        self,
        namespace: str,
        name: str,
        *,
        container: str | None = None,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
        since_time: str | None = None,
        timestamps: bool = False,
    ) -> bytes:
        """``GET pods/{name}/log`` (what ``read_namespaced_pod_log`` sends, plus ``sinceTime``, which that method
        lacks): the current container's output, each line prefixed with its RFC 3339 time when ``timestamps``."""
        query: list[tuple[str, Any]] = [
            (key, value)
            for key, value in (
                ("container", container), ("tailLines", tail_lines), ("limitBytes", limit_bytes),
                ("sinceTime", since_time), ("timestamps", "true" if timestamps else None),
            )
            if value is not None
        ]  # fmt: skip
        path = resource_path("v1", "Pod", namespace, name) + "/log"
        accept = "text/plain, application/json"
        return await self._run(partial(self.request_raw, "GET", path, query=query, accept=accept))
