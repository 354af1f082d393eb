"""A local STAND-IN for the Kubernetes API server, for tests. It is not Kubernetes.

:class:`KubeApiStandIn` is a small threaded HTTP server that follows the API's semantics for the
calls :class:`neuroweaver_kube.client.KubeClient` makes, at the real REST paths
(``/api/v1/namespaces/{ns}/services/{name}``, ``/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}``):

- ``PATCH`` with ``application/apply-patch+yaml`` (server-side apply): requires ``fieldManager`` (422
  otherwise); creates (201) or updates (200) the object under the real field-ownership rules
  (:mod:`neuroweaver_kube.testing.apply`, a port of structured-merge-diff): ``metadata.managedFields``
  records a ``FieldsV1`` set per manager and operation; fields a manager applied before and no longer
  sends are removed unless another manager owns them; changing a field another manager owns is a 409
  ``Conflict`` (causes ``FieldManagerConflict``, the server's message) unless ``force=true``, which moves
  ownership; equal values are shared. Associative lists merge by their keys (containers/env/volumes by
  name, ports by port+protocol, ...), other lists are atomic. A no-op apply changes nothing (same
  ``resourceVersion``, ``generation``, managedFields).
- Every other write is an ``Update`` for field ownership (the manager is ``fieldManager`` or the
  User-Agent's first segment, as the server derives it): ``POST`` creates (409 AlreadyExists when
  taken), ``PUT`` replaces, ``PATCH`` with merge / strategic-merge patch is an RFC 7386 merge (strategic
  list merging is not modelled). None of them change ``status`` (the status subresource does).
  ``metadata.resourceVersion`` in a body is a precondition (409 Conflict when stale).
- ``GET`` reads an object or lists a collection; ``DELETE`` removes the object at once (real foreground
  deletion first sets ``deletionTimestamp`` and waits for dependents) and answers a ``Status`` with
  ``Success``.
- ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` (global counter, bumped on change) and
  ``generation`` (bumped when anything outside metadata/status changes) are server-set; the only default
  applied is a Deployment's ``spec.replicas: 1`` (so a count nobody owns any more falls back to 1).
- Deployments: ``/scale`` subresource (GET/PATCH/PUT, autoscaling/v1 Scale), an ``Update`` of
  ``spec.replicas`` recorded with ``subresource: scale`` (how an HPA or ``kubectl scale`` owns the count).
- Status without pods: the stand-in writes what the controllers write on a cluster with no kubelet (a
  status-subresource ``Update`` by ``kube-controller-manager``): a Deployment's pods exist but are never
  ready (``observedGeneration``, ``replicas``/``updatedReplicas``/``unavailableReplicas``, Available False
  unless the strategy tolerates it, Progressing True ``ReplicaSetUpdated``; no progress deadline); a Job
  gets ``startTime`` and ``active``. :meth:`set_status` / :meth:`finish_job` set any other state and win
  from then on. ``auto_ready=True`` is an explicit opt-in for tests that run no pods: every Deployment
  then reads as fully rolled out and Available.
- Errors are ``Status`` objects (404 NotFound, 409 AlreadyExists/Conflict, 400 BadRequest, 415, 422
  Invalid).
- Discovery: ``/version``, ``/api``, ``/apis`` answer minimal documents.

- With ``pods=PodRunner()`` (:mod:`neuroweaver_kube.testing.pods`) the pods of Deployments, Jobs and
  StatefulSets run as local sandboxed processes, Services route to ready pods and the runner writes the
  statuses; ``GET pods/{name}/log`` and ``labelSelector`` on lists are served.

Every request is recorded in :attr:`KubeApiStandIn.requests` for assertions.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import math
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml

from neuroweaver_kube.client import KINDS
from neuroweaver_kube.testing import apply as ssa

if TYPE_CHECKING:
    from neuroweaver_kube.testing.pods import PodRunner

_PLURAL_TO_KIND = {k.plural: kind for kind, k in KINDS.items()}
_CLUSTER_SCOPED = {k.plural for k in KINDS.values() if not k.namespaced}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass
class _Route:
    group: str  # "" for the core group
    version: str
    namespace: str | None
    plural: str
    name: str | None
    sub: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def kind(self) -> str:
        return _PLURAL_TO_KIND[self.plural]

    def key(self) -> tuple[str, str, str, str | None]:
        assert self.name is not None
        return (self.group, self.plural, self.namespace or "", self.name)


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        out["details"] = details
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_PATCH_OPTIONS = 'PatchOptions.meta.k8s.io "" is invalid: '


def _manager(query: dict[str, list[str]], headers: dict[str, str]) -> str:
    """The field manager of a write: ``?fieldManager=``, else the User-Agent up to its first ``/`` (as the API
    server derives it: ``OpenAPI-Generator`` for the Python client, ``kubectl`` for kubectl)."""
    return (query.get("fieldManager") or [""])[0] or headers.get("user-agent", "").split("/")[0] or "unknown"


@contextlib.contextmanager
def _invalid_as_422() -> Iterator[None]:
    try:
        yield
    except ssa.ApplyInvalid as e:
        raise _ApiError(422, "Invalid", str(e)) from None


def _scaled(value: Any, total: int, *, round_up: bool) -> int:
    """An int-or-percent of a Deployment's rolling update, scaled to ``total`` replicas."""
    if isinstance(value, str) and value.endswith("%"):
        exact = int(value[:-1]) * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def _condition(
    prev: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str, now: str
) -> dict[str, Any]:
    old = next((c for c in prev if c.get("type") == type_), {})
    value = "True" if status else "False"
    same = old.get("status") == value
    unchanged = same and old.get("reason") == reason and old.get("message") == message
    return {
        "type": type_,
        "status": value,
        "lastUpdateTime": old["lastUpdateTime"] if unchanged and "lastUpdateTime" in old else now,
        "lastTransitionTime": old["lastTransitionTime"] if same and "lastTransitionTime" in old else now,
        "reason": reason,
        "message": message,
    }


def _pending_deployment_status(obj: dict[str, Any]) -> dict[str, Any]:
    """The deployment controller's status when its pods exist but never run (no kubelet): none ready, so not
    Available unless the rollout strategy tolerates every replica unavailable."""
    spec, md, now = obj.get("spec") or {}, obj["metadata"], _now()
    desired = int(spec.get("replicas", 1))
    strategy = spec.get("strategy") or {}
    max_unavailable = 0
    if strategy.get("type", "RollingUpdate") == "RollingUpdate" and desired > 0:
        rolling = strategy.get("rollingUpdate") or {}
        max_unavailable = min(_scaled(rolling.get("maxUnavailable", "25%"), desired, round_up=False), desired)
        if max_unavailable == 0 and _scaled(rolling.get("maxSurge", "25%"), desired, round_up=True) == 0:
            max_unavailable = 1  # ResolveFenceposts
    available = desired - max_unavailable <= 0
    template = json.dumps(spec.get("template") or {}, sort_keys=True)
    replica_set = f"{md['name']}-{hashlib.sha256(template.encode()).hexdigest()[:10]}"
    prev = (obj.get("status") or {}).get("conditions") or []
    status: dict[str, Any] = {"observedGeneration": md["generation"]}
    if desired:
        status.update(replicas=desired, updatedReplicas=desired, unavailableReplicas=desired)
    if available:
        reason, message = "MinimumReplicasAvailable", "Deployment has minimum availability."
    else:
        reason, message = "MinimumReplicasUnavailable", "Deployment does not have minimum availability."
    status["conditions"] = [
        _condition(prev, "Available", available, reason, message, now),
        _condition(prev, "Progressing", True, "ReplicaSetUpdated", f'ReplicaSet "{replica_set}" is progressing.', now),
    ]
    return status


def _pending_job_status(obj: dict[str, Any]) -> dict[str, Any]:
    """The job controller's status once it created the pods (they stay Pending: active, none ready)."""
    spec, prev = obj.get("spec") or {}, obj.get("status") or {}
    if spec.get("suspend"):
        return prev
    parallelism = int(spec.get("parallelism", 1))
    if spec.get("completions") is not None:
        parallelism = min(parallelism, int(spec["completions"]))
    return {"startTime": prev.get("startTime") or _now(), "active": parallelism, "ready": 0}


class KubeApiStandIn:
    """Threaded HTTP stand-in of the Kubernetes API (see the module docstring for its semantics)."""

    def __init__(self, *, auto_ready: bool = False, host: str = "127.0.0.1", pods: PodRunner | None = None) -> None:
        # With a pod runner (neuroweaver_kube.testing.pods) pods really run and controllers write the statuses.
        self.pods = pods
        self.auto_ready = auto_ready and pods is None
        self.requests: list[RecordedRequest] = []
        self._objects: dict[tuple[str, str, str, str | None], dict[str, Any]] = {}
        self._manual_status: set[tuple[str, str, str, str | None]] = set()  # set_status wins over the controller
        # The built-in no-kubelet Deployment/Job controller (see _run_controller); a pod runner turns it off.
        self.status_controller = True
        self._rv = 0
        self._lock = threading.RLock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                standin._dispatch(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        # typeshed types the host as str | bytes (any socket family); a TCP server's is a str
        assert isinstance(host, str)
        return f"http://{host}:{port}"

    def start(self) -> KubeApiStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-standin", daemon=True)
        self._thread.start()
        if self.pods:
            self.pods.start(self)
        return self

    def stop(self) -> None:
        if self.pods:
            self.pods.stop()
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> KubeApiStandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def get_object(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        group = api_version.rpartition("/")[0]
        with self._lock:
            obj = self._objects.get((group, KINDS[kind].plural, namespace or "", name))
            return copy.deepcopy(obj) if obj else None

    def set_status(self, api_version: str, kind: str, namespace: str | None, name: str, status: dict[str, Any]) -> None:
        """Replace an object's status as its controller would (a status-subresource write by
        ``kube-controller-manager``); from then on neither ``auto_ready`` nor the built-in controller touch it."""
        group = api_version.rpartition("/")[0]
        key = (group, KINDS[kind].plural, namespace or "", name)
        with self._lock:
            self._manual_status.add(key)
            self._write_status(key, status)

    def finish_job(self, namespace: str, name: str, *, succeeded: bool = True, reason: str | None = None) -> None:
        """Mark a Job Complete (or Failed with ``reason``, default BackoffLimitExceeded)."""
        now = _now()
        if succeeded:
            status = {
                "startTime": now,
                "completionTime": now,
                "succeeded": 1,
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                    {"type": "Complete", "status": "True", "lastTransitionTime": now},
                ],
            }
        else:
            status = {
                "startTime": now,
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": reason or "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                        "lastTransitionTime": now,
                    }
                ],
            }
        self.set_status("batch/v1", "Job", namespace, name, status)

    def requests_to(self, method: str, path_suffix: str = "") -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    # ------------------------------------------------------------------ controller hooks (the pod runner's store)

    @property
    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        """The request handler, for another listener of the same API (the pod runner's HTTPS one)."""
        return self._server.RequestHandlerClass  # type: ignore[return-value]

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Copies of every stored object of ``kind`` (in ``namespace``)."""
        plural = KINDS[kind].plural
        with self._lock:
            return [
                copy.deepcopy(o)
                for (_g, p, ns, _n), o in sorted(self._objects.items(), key=lambda kv: str(kv[0]))
                if p == plural and (namespace is None or ns == namespace)
            ]

    def put(self, obj: dict[str, Any], manager: str = "standin-controller") -> dict[str, Any]:
        """Create ``obj``, or replace all but the status and server-set metadata of the stored one (as a controller)."""
        md, kind = obj["metadata"], KINDS[obj["kind"]]
        group, _, version = obj["apiVersion"].rpartition("/")
        r = _Route(group, version, md.get("namespace") if kind.namespaced else None, kind.plural, md["name"])
        with self._lock:
            existing = self._objects.get(r.key())
            if existing is None:
                self._new_object(r, obj, manager, "Update")
            else:
                updated = copy.deepcopy(obj)
                updated["metadata"] = {**existing["metadata"], **copy.deepcopy(md)}
                if "status" in existing:
                    updated["status"] = existing["status"]
                self._store_update(r, existing, updated)
            return copy.deepcopy(self._objects[r.key()])

    def put_status(self, kind: str, namespace: str | None, name: str, status: dict[str, Any]) -> bool:
        """Set an object's status as its controller does; False when the object is gone or nothing changed."""
        key = (self._group_of(kind), KINDS[kind].plural, namespace or "", name)
        with self._lock:
            obj = self._objects.get(key)
            if obj is None or obj.get("status") == status:
                return False
            obj["status"] = copy.deepcopy(status)
            self._bump(obj)
            return True

    def remove(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete an object (a controller's or the garbage collector's delete)."""
        with self._lock:
            key = (self._group_of(kind), KINDS[kind].plural, namespace or "", name)
            return self._objects.pop(key, None) is not None

    @staticmethod
    def _group_of(kind: str) -> str:
        return {"Deployment": "apps", "StatefulSet": "apps", "Job": "batch"}.get(kind, "")

    # ------------------------------------------------------------------ HTTP

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        body: Any = None
        code: int
        payload: dict[str, Any]
        code, payload = 200, {}
        try:
            if raw:
                try:
                    body = yaml.safe_load(raw) if "yaml" in headers.get("content-type", "") else json.loads(raw)
                except (ValueError, yaml.YAMLError) as e:
                    raise _ApiError(400, "BadRequest", f"cannot decode body: {e}") from None
            query = parse_qs(parts.query)
            with self._lock:
                self.requests.append(RecordedRequest(h.command, parts.path, query, headers, copy.deepcopy(body)))
                code, payload = self._route(h.command, parts.path, query, headers, body)
            if self.pods and h.command != "GET":
                self.pods.changed()
        except _ApiError as e:
            code, payload = e.code, _status(e.code, e.reason, e.message, e.details)
        text = isinstance(payload, bytes)  # pods/{name}/log
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("Content-Type", "text/plain" if text else "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _parse(self, path: str) -> _Route | None:
        seg = [s for s in path.split("/") if s]
        if seg[:1] == ["api"] and len(seg) >= 3:
            group, version, rest = "", seg[1], seg[2:]
        elif seg[:1] == ["apis"] and len(seg) >= 4:
            group, version, rest = seg[1], seg[2], seg[3:]
        else:
            return None
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        plural = rest[0]
        if plural not in _PLURAL_TO_KIND or len(rest) > 3:
            raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if (plural in _CLUSTER_SCOPED) == (ns is not None):
            raise _ApiError(404, "NotFound", f"wrong scope for {plural}")
        return _Route(
            group, version, ns, plural, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
        )

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-neuroweaver-standin"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = sorted({"apps", "batch", "autoscaling", "monitoring.coreos.com"})
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": g} for g in groups]}
        r = self._parse(path)
        if r is None:
            raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if r.name is None:
            if method == "GET":
                return 200, self._list(r, (query.get("labelSelector") or [""])[0])
            if method == "POST":
                return 201, self._create(r, body, _manager(query, headers))
            raise _ApiError(405, "MethodNotAllowed", f"{method} not allowed on a collection")
        if r.sub == "scale":
            return self._scale(r, method, _manager(query, headers), body)
        if r.sub is not None:
            served = self.pods.subresource(method, r.kind, r.namespace, r.name, r.sub, query) if self.pods else None
            if served is not None:
                return served
            raise _ApiError(404, "NotFound", f"subresource {r.sub} not served by the stand-in")
        if method == "GET":
            return 200, self._read(r)
        if method == "PATCH":
            return self._patch(r, query, headers, body)
        if method == "PUT":
            return 200, self._replace(r, _manager(query, headers), body)
        if method == "DELETE":
            self._manual_status.discard(r.key())
            obj = self._objects.pop(r.key(), None)
            if obj is None:
                raise self._not_found(r)
            details = {"name": r.name, "group": r.group, "kind": r.plural, "uid": obj["metadata"]["uid"]}
            return 200, _status(200, "", "", details)
        raise _ApiError(405, "MethodNotAllowed", f"{method} not allowed")

    # ------------------------------------------------------------------ semantics

    def _not_found(self, r: _Route) -> _ApiError:
        res = f"{r.plural}.{r.group}" if r.group else r.plural
        return _ApiError(
            404, "NotFound", f'{res} "{r.name}" not found', {"name": r.name, "group": r.group, "kind": r.plural}
        )

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _check_body(self, r: _Route, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _ApiError(400, "BadRequest", "body must be an object")
        if body.get("apiVersion") != r.api_version or body.get("kind") != r.kind:
            raise _ApiError(
                400, "BadRequest", f"apiVersion/kind {body.get('apiVersion')}/{body.get('kind')} do not match the path"
            )
        md = body.get("metadata") or {}
        if r.name is not None and md.get("name") != r.name:
            raise _ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if md.get("namespace") not in (None, r.namespace):
            raise _ApiError(400, "BadRequest", "the namespace of the object does not match the namespace on the URL")
        return body

    def _new_object(
        self, r: _Route, body: dict[str, Any], manager: str, operation: str, *, force: bool = False
    ) -> dict[str, Any]:
        now = _now()
        body = copy.deepcopy(body)
        md = body.setdefault("metadata", {})
        for k in ssa.SERVER_METADATA:
            md.pop(k, None)
        if r.namespace:
            md["namespace"] = r.namespace
        if operation == ssa.APPLY:
            obj = ssa.apply(r.kind, None, body, manager=manager, api_version=r.api_version, force=force, now=now)
        else:
            body.pop("status", None)
            obj = ssa.record_update(r.kind, None, body, manager=manager, api_version=r.api_version, now=now)
        ssa.apply_defaults(r.kind, obj)
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now, generation=1)
        self._bump(obj)
        self._objects[r.key()] = obj
        self._run_controller(r)
        return self._objects[r.key()]

    def _create(self, r: _Route, body: Any, manager: str) -> dict[str, Any]:
        body = self._check_body(r, body)
        r.name = body["metadata"].get("name")
        if not r.name:
            raise _ApiError(422, "Invalid", "metadata.name: Required value")
        if r.key() in self._objects:
            raise _ApiError(409, "AlreadyExists", f'{r.plural} "{r.name}" already exists', {"name": r.name})
        with _invalid_as_422():
            return self._view(r, self._new_object(r, body, manager, ssa.UPDATE))

    def _read(self, r: _Route) -> dict[str, Any]:
        obj = self._objects.get(r.key())
        if obj is None:
            raise self._not_found(r)
        return self._view(r, obj)

    def _list(self, r: _Route, label_selector: str = "") -> dict[str, Any]:
        from neuroweaver_kube.testing.pods import selector_matches

        items = [
            self._view(_Route(r.group, r.version, ns or None, p, n), o)
            for (g, p, ns, n), o in sorted(self._objects.items(), key=lambda kv: str(kv[0]))
            if g == r.group
            and p == r.plural
            and (r.namespace is None or ns == r.namespace)
            and selector_matches(label_selector, o["metadata"].get("labels") or {})
        ]
        return {
            "apiVersion": r.api_version,
            "kind": f"{r.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _view(self, r: _Route, obj: dict[str, Any]) -> dict[str, Any]:
        # auto_ready (explicit opt-in): every Deployment reads as rolled out, as if its pods were Ready.
        if r.kind == "Deployment" and self.auto_ready and r.key() not in self._manual_status:
            n = int(obj["spec"].get("replicas", 1))
            now = _now()
            obj["status"] = {
                "observedGeneration": obj["metadata"]["generation"],
                "replicas": n,
                "updatedReplicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
                "conditions": [
                    {
                        "type": "Available",
                        "status": "True",
                        "reason": "MinimumReplicasAvailable",
                        "lastTransitionTime": now,
                    },
                    {
                        "type": "Progressing",
                        "status": "True",
                        "reason": "NewReplicaSetAvailable",
                        "lastTransitionTime": now,
                    },
                ],
            }
        return copy.deepcopy(obj)

    def _patch(self, r: _Route, query: dict[str, list[str]], headers: dict[str, str], body: Any) -> tuple[int, Any]:
        ctype = headers.get("content-type", "").split(";")[0].strip()
        existing = self._objects.get(r.key())
        force = (query.get("force") or [""])[0]
        if ctype == "application/apply-patch+yaml":
            manager = (query.get("fieldManager") or [""])[0]
            if not manager:
                raise _ApiError(
                    422, "Invalid", _PATCH_OPTIONS + "fieldManager: Required value: is required for apply patch"
                )
            if force not in ("", "true", "false"):
                raise _ApiError(400, "BadRequest", f"invalid value for force: {force!r}")
            body = self._check_body(r, body)
            self._check_resource_version(r, existing, body)
            with _invalid_as_422():
                if existing is None:
                    return 201, self._view(r, self._new_object(r, body, manager, ssa.APPLY, force=force == "true"))
                try:
                    updated = ssa.apply(
                        r.kind, existing, body, manager=manager, api_version=r.api_version, force=force == "true",
                        now=_now(),
                    )  # fmt: skip
                except ssa.ApplyConflict as e:
                    raise _ApiError(409, "Conflict", e.message, {"causes": e.causes}) from None
            ssa.apply_defaults(r.kind, updated)
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if force:
                raise _ApiError(
                    422, "Invalid", _PATCH_OPTIONS + "force: Forbidden: may not be specified for non-apply patch"
                )
            if existing is None:
                raise self._not_found(r)
            self._check_resource_version(r, existing, body if isinstance(body, dict) else {})
            updated = merge_patch(existing, body)
            updated = self._as_update(r, existing, updated, _manager(query, headers))
        else:
            raise _ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format ({ctype})")
        self._store_update(r, existing, updated)
        return 200, self._view(r, self._objects[r.key()])

    def _replace(self, r: _Route, manager: str, body: Any) -> dict[str, Any]:
        """PUT: the body replaces everything but status and server-set metadata (an Update for field ownership)."""
        body = self._check_body(r, body)
        existing = self._objects.get(r.key())
        if existing is None:
            raise self._not_found(r)
        self._check_resource_version(r, existing, body)
        self._store_update(r, existing, self._as_update(r, existing, copy.deepcopy(body), manager))
        return self._view(r, self._objects[r.key()])

    def _as_update(self, r: _Route, existing: dict[str, Any], updated: dict[str, Any], manager: str) -> dict[str, Any]:
        """A non-apply write of the main resource: status stays (the status subresource owns it), defaults apply,
        and the fields it changed move to ``manager``'s Update entry."""
        updated.pop("status", None)
        if "status" in existing:
            updated["status"] = copy.deepcopy(existing["status"])
        updated.setdefault("metadata", {})["namespace"] = existing["metadata"].get("namespace")
        if updated["metadata"]["namespace"] is None:
            del updated["metadata"]["namespace"]
        ssa.apply_defaults(r.kind, updated)
        with _invalid_as_422():
            return ssa.record_update(r.kind, existing, updated, manager=manager, api_version=r.api_version, now=_now())

    def _check_resource_version(self, r: _Route, existing: dict[str, Any] | None, body: dict[str, Any]) -> None:
        """``metadata.resourceVersion`` in a write is a precondition (optimistic concurrency)."""
        want = (body.get("metadata") or {}).get("resourceVersion")
        if want and (existing is None or existing["metadata"]["resourceVersion"] != want):
            res = f"{r.plural}.{r.group}" if r.group else r.plural
            raise _ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res} "{r.name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": r.name, "group": r.group, "kind": r.plural},
            )

    def _store_update(self, r: _Route, existing: dict[str, Any], updated: dict[str, Any]) -> None:
        def spec_part(o: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if updated == existing:
            return
        if spec_part(updated) != spec_part(existing):
            updated["metadata"]["generation"] = int(existing["metadata"]["generation"]) + 1
        self._bump(updated)
        self._objects[r.key()] = updated
        self._run_controller(r)

    def _write_status(
        self, key: tuple[str, str, str, str | None], status: dict[str, Any], *, manager: str = "kube-controller-manager"
    ) -> bool:
        """A status-subresource write (recorded in managedFields); False when nothing changed."""
        obj = self._objects[key]
        new = copy.deepcopy(obj)
        new["status"] = copy.deepcopy(status)
        new = ssa.record_update(
            obj["kind"], obj, new, manager=manager, api_version=obj["apiVersion"], now=_now(), subresource="status"
        )
        if new == obj:
            return False
        self._bump(new)
        self._objects[key] = new
        return True

    def _run_controller(self, r: _Route) -> None:
        """What the Deployment and Job controllers write on a cluster with no kubelet: pods are created (counted,
        not stored) and never become ready. Off with a pod runner, with ``auto_ready``, after :meth:`set_status`."""
        key = r.key()
        obj = self._objects.get(key)
        if obj is None or not self.status_controller or self.pods is not None or self.auto_ready:
            return
        if key in self._manual_status:
            return
        if r.kind == "Deployment":
            self._write_status(key, _pending_deployment_status(obj))
        elif r.kind == "Job":
            self._write_status(key, _pending_job_status(obj))

    def _scale(self, r: _Route, method: str, manager: str, body: Any) -> tuple[int, Any]:
        if r.kind != "Deployment":
            raise _ApiError(404, "NotFound", "scale is served for deployments only")
        existing = self._objects.get(r.key())
        if existing is None:
            raise self._not_found(r)
        if method in ("PATCH", "PUT"):
            scale = self._scale_view(existing)
            new = merge_patch(scale, body) if method == "PATCH" else body
            replicas = (new or {}).get("spec", {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise _ApiError(422, "Invalid", "spec.replicas: must be a non-negative integer")
            updated = copy.deepcopy(existing)
            updated["spec"]["replicas"] = replicas
            # The scale subresource is an Update of the parent's spec.replicas, recorded with subresource "scale".
            updated = ssa.record_update(
                r.kind, existing, updated, manager=manager, api_version=r.api_version, now=_now(), subresource="scale"
            )
            self._store_update(r, existing, updated)
        elif method != "GET":
            raise _ApiError(405, "MethodNotAllowed", f"{method} not allowed on scale")
        return 200, self._scale_view(self._objects[r.key()])

    def _scale_view(self, obj: dict[str, Any]) -> dict[str, Any]:
        md = obj["metadata"]
        sel = ",".join(f"{k}={v}" for k, v in obj["spec"].get("selector", {}).get("matchLabels", {}).items())
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": md["name"],
                "namespace": md.get("namespace"),
                "uid": md["uid"],
                "resourceVersion": md["resourceVersion"],
            },
            "spec": {"replicas": obj["spec"].get("replicas", 1)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0), "selector": sel},
        }
