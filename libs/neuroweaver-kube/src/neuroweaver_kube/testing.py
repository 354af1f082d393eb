"""A local STAND-IN for the Kubernetes API server, for tests. It is not Kubernetes.

:class:`KubeApiStandIn` is a small threaded HTTP server that follows the API's semantics for the
calls :class:`neuroweaver_kube.client.KubeClient` makes, at the real REST paths
(``/api/v1/namespaces/{ns}/services/{name}``, ``/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}``):

- ``PATCH`` with ``application/apply-patch+yaml`` (server-side apply): requires ``fieldManager``;
  creates (201) or updates (200) the object. The applied config replaces ``metadata.labels``/
  ``annotations`` and every top-level field but ``status``, except that ``spec.replicas`` is kept
  when the config leaves it out (another manager, an HPA or the scale subresource, owns it) — a
  simplification of real field ownership that is exact for a single applier. A no-op apply changes
  nothing (same ``resourceVersion``).
- ``PATCH`` with merge / strategic-merge patch: RFC 7386 merge (strategic list merging is not
  modelled).
- ``POST`` to a collection creates (409 AlreadyExists when taken); ``GET`` reads an object or lists a
  collection; ``DELETE`` removes the object at once (real foreground deletion first sets
  ``deletionTimestamp`` and waits for dependents) and answers a ``Status`` with ``Success``.
- ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` (global counter, bumped on change) and
  ``generation`` (bumped when anything outside metadata/status changes) are server-set.
- Deployments: ``/scale`` subresource (GET/PATCH/PUT, autoscaling/v1 Scale). With
  ``auto_ready=True`` (default) the stand-in marks every Deployment fully rolled out and Available
  whenever it is read — there are no pods here; tests that need other states use :meth:`set_status`.
- Jobs get ``status.active=1`` and ``startTime`` on creation; :meth:`finish_job` marks them Complete or
  Failed.
- Errors are ``Status`` objects (404 NotFound, 409 AlreadyExists, 400 BadRequest, 415).
- Discovery: ``/version``, ``/api``, ``/apis`` answer minimal documents.

Every request is recorded in :attr:`KubeApiStandIn.requests` for assertions.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from neuroweaver_kube.client import KINDS

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


class KubeApiStandIn:
    """Threaded HTTP stand-in of the Kubernetes API (see the module docstring for its semantics)."""

    def __init__(self, *, auto_ready: bool = True, host: str = "127.0.0.1") -> None:
        self.auto_ready = auto_ready
        self.requests: list[RecordedRequest] = []
        self._objects: dict[tuple[str, str, str, str | None], dict[str, Any]] = {}
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
        return self

    def stop(self) -> None:
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
        """Replace an object's status (as a controller would); turns ``auto_ready`` off for it."""
        group = api_version.rpartition("/")[0]
        with self._lock:
            obj = self._objects[(group, KINDS[kind].plural, namespace or "", name)]
            obj["status"] = copy.deepcopy(status)
            obj["metadata"].setdefault("annotations", {})["standin.neuroweaver.ai/manual-status"] = "true"
            self._bump(obj)

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
        except _ApiError as e:
            code, payload = e.code, _status(e.code, e.reason, e.message, e.details)
        data = json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
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
                return 200, self._list(r)
            if method == "POST":
                return 201, self._create(r, body)
            raise _ApiError(405, "MethodNotAllowed", f"{method} not allowed on a collection")
        if r.sub == "scale":
            return self._scale(r, method, headers, body)
        if r.sub is not None:
            raise _ApiError(404, "NotFound", f"subresource {r.sub} not served by the stand-in")
        if method == "GET":
            return 200, self._read(r)
        if method == "PATCH":
            return self._patch(r, query, headers, body)
        if method == "DELETE":
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

    def _new_object(self, r: _Route, body: dict[str, Any], manager: str, operation: str) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        obj.pop("status", None)
        md = obj.setdefault("metadata", {})
        if r.namespace:
            md["namespace"] = r.namespace
        md.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            managedFields=[{"manager": manager, "operation": operation, "apiVersion": r.api_version}],
        )
        if r.kind == "Deployment":
            obj["spec"].setdefault("replicas", 1)
        if r.kind == "Job":
            obj["status"] = {"active": 1, "startTime": _now()}
        self._bump(obj)
        self._objects[r.key()] = obj
        return obj

    def _create(self, r: _Route, body: Any) -> dict[str, Any]:
        body = self._check_body(r, body)
        r.name = body["metadata"].get("name")
        if not r.name:
            raise _ApiError(422, "Invalid", "metadata.name: Required value")
        if r.key() in self._objects:
            raise _ApiError(409, "AlreadyExists", f'{r.plural} "{r.name}" already exists', {"name": r.name})
        return self._view(r, self._new_object(r, body, "unknown", "Update"))

    def _read(self, r: _Route) -> dict[str, Any]:
        obj = self._objects.get(r.key())
        if obj is None:
            raise self._not_found(r)
        return self._view(r, obj)

    def _list(self, r: _Route) -> dict[str, Any]:
        items = [
            self._view(_Route(r.group, r.version, ns or None, p, n), o)
            for (g, p, ns, n), o in sorted(self._objects.items(), key=lambda kv: str(kv[0]))
            if g == r.group and p == r.plural and (r.namespace is None or ns == r.namespace)
        ]
        return {
            "apiVersion": r.api_version,
            "kind": f"{r.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _view(self, r: _Route, obj: dict[str, Any]) -> dict[str, Any]:
        manual = obj["metadata"].get("annotations", {}).get("standin.neuroweaver.ai/manual-status")
        if r.kind == "Deployment" and self.auto_ready and not manual:
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
        if ctype == "application/apply-patch+yaml":
            manager = (query.get("fieldManager") or [""])[0]
            if not manager:
                raise _ApiError(400, "BadRequest", "fieldManager is required for apply patch")
            body = self._check_body(r, body)
            if existing is None:
                return 201, self._view(r, self._new_object(r, body, manager, "Apply"))
            updated = copy.deepcopy(existing)
            for k in list(updated):
                if k not in ("apiVersion", "kind", "metadata", "status"):
                    del updated[k]
            for k, v in body.items():
                if k not in ("metadata", "status"):
                    updated[k] = copy.deepcopy(v)
            if r.kind == "Deployment" and "replicas" not in updated.get("spec", {}):
                updated["spec"]["replicas"] = existing["spec"].get("replicas", 1)
            md_in = body.get("metadata") or {}
            for k in ("labels", "annotations"):
                if k in md_in:
                    updated["metadata"][k] = copy.deepcopy(md_in[k])
                elif k != "annotations":
                    updated["metadata"].pop(k, None)
            if not any(m["manager"] == manager for m in updated["metadata"]["managedFields"]):
                updated["metadata"]["managedFields"].append(
                    {"manager": manager, "operation": "Apply", "apiVersion": r.api_version}
                )
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if existing is None:
                raise self._not_found(r)
            updated = merge_patch(existing, body)
        else:
            raise _ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format ({ctype})")
        self._store_update(r, existing, updated)
        return 200, self._view(r, self._objects[r.key()])

    def _store_update(self, r: _Route, existing: dict[str, Any], updated: dict[str, Any]) -> None:
        def spec_part(o: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if updated == existing:
            return
        if spec_part(updated) != spec_part(existing):
            updated["metadata"]["generation"] = int(existing["metadata"]["generation"]) + 1
        self._bump(updated)
        self._objects[r.key()] = updated

    def _scale(self, r: _Route, method: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
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
