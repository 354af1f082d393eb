"""The stand-in's POD RUNNER: pods of Deployments, Jobs and StatefulSets start as local processes in sandboxes.

Attach it to the API stand-in (``KubeApiStandIn(pods=PodRunner())``); without it the stand-in only stores objects.
It is not a kubelet: it models what the platform's tests need, on one machine, and says below what it does not.

Pods. Each container runs as ``bwrap`` (bubblewrap) sandbox with its own mount, PID, IPC and UTS namespaces
(``--die-with-parent``; killing a pod kills its process group, and the PID namespace takes the rest) that sees only
its image's filesystem (:mod:`neuroweaver_kube.testing.images`), its volumes, a generated ``/etc/hosts``, and the
service-account files. Command and args follow Kubernetes' rules over the image's ENTRYPOINT/CMD, with ``$(VAR)``
expansion. Env: the image's ENV, ``envFrom`` and ``env`` with ``value``, ``secretKeyRef``, ``configMapKeyRef``
(``optional`` honoured; a missing required key leaves the container Waiting in ``CreateContainerConfigError``
and is retried), ``fieldRef`` (``metadata.name/namespace/uid/labels[...]/annotations[...]``, ``spec.nodeName``,
``spec.serviceAccountName``, ``status.podIP(s)``, ``status.hostIP(s)``) and ``resourceFieldRef``; service links
and ``KUBERNETES_SERVICE_HOST``/``PORT`` (the stand-in's HTTPS listener). ``runAsUser``/``runAsGroup`` (or the
image's USER) become the uid/gid inside a user namespace that maps them to the runner's own uid, so the sandbox
owns the files the runner writes. ``readOnlyRootFilesystem`` remounts the sandbox's root read-only.

Volumes: ``persistentVolumeClaim`` → a host directory per claim under the runner's state directory, shared by
every pod that mounts the claim (the pod stays Pending while the claim does not exist; claims are marked Bound);
``emptyDir`` → a per-pod directory (shared by the pod's containers, removed with the pod; ``medium: Memory`` is a
directory too); ``secret``/``configMap`` (and ``projected`` sources of both) → files, with ``items``,
``defaultMode``/``mode`` and ``optional``, written when a container starts (later changes are not propagated);
``hostPath`` → that host path; ``readOnly`` and ``subPath`` honoured. Service-account token files
(``token``, ``ca.crt``, ``namespace``) at ``/var/run/secrets/kubernetes.io/serviceaccount`` unless
``automountServiceAccountToken`` is false on the pod or its ServiceAccount.

Probes: ``exec`` (a fresh sandbox of the same container: same image, volumes and env), ``httpGet`` (HTTP or HTTPS,
unverified), ``tcpSocket`` and ``grpc`` (``grpc.health.v1`` Check with the probe's ``service``), against the
pod's address; ``failureThreshold``, ``successThreshold`` and ``timeoutSeconds`` honoured, ``periodSeconds`` and
``initialDelaySeconds`` capped at ``period_cap`` (1 s by default) to keep tests fast. A startup probe holds the
others back; a failed liveness probe kills the container, which restarts by the pod's ``restartPolicy``;
readiness gates the pod's Ready condition, Service routing and the controllers' ready counts. Restarts back off
exponentially from 0.2 s, capped at 5 s (a kubelet: 10 s to 5 min). Termination: SIGTERM to the container's
processes, SIGKILL to its process group after ``terminationGracePeriodSeconds`` capped at ``grace_cap`` (5 s).

Controllers. Deployments: pods named ``<deployment>-<template hash>-<suffix>`` (owned by the Deployment itself;
ReplicaSets are not modelled), ``spec.replicas`` as the API holds it (``/scale`` and other managers' changes
apply; no HPA controller runs), RollingUpdate with ``maxSurge``/``maxUnavailable`` (new pods first, old ones
removed only while enough pods are available, so a rollout keeps serving through its Service) and Recreate,
``minReadySeconds`` (capped like the periods), status ``replicas``/``updatedReplicas``/``readyReplicas``/
``availableReplicas``/``unavailableReplicas``, conditions Available and Progressing (including
``ProgressDeadlineExceeded``). Jobs: ``parallelism``/``completions``, ``backoffLimit`` (pod failures with
``restartPolicy: Never``, container restarts with ``OnFailure``; a deleted pod that had not succeeded counts as
failed), ``activeDeadlineSeconds``, ``ttlSecondsAfterFinished`` (honoured; ``ttl_cap`` shortens it);
status ``active``/``ready``/``succeeded``/``failed``, ``startTime``/
``completionTime``, conditions Complete/SuccessCriteriaMet or Failed/FailureTarget; the container's exit code is
in the pod's status. StatefulSets: pods ``<name>-<ordinal>`` with ``hostname``/``subdomain`` (so
``<pod>.<serviceName>.<ns>.svc.cluster.local`` resolves), PVCs from ``volumeClaimTemplates``
(``<template>-<pod>``, kept on scale-down), OrderedReady or Parallel, rolling updates from the highest ordinal.
Pods whose owner is gone are deleted. Deleting a pod removes it from the API at once (no ``deletionTimestamp``
phase), takes it out of every Service at once, and terminates it; its controller replaces it.

Networking and DNS: :mod:`neuroweaver_kube.testing.network` (own loopback address per pod and per ClusterIP
Service, a TCP proxy per Service port, ``/etc/hosts`` for DNS; Endpoints objects are written per Service).

Logs: a container's stdout and stderr are read line by line and kept with the time each line was read (RFC 3339,
nanoseconds), as a container runtime's log file keeps them; ``GET pods/{name}/log`` serves them with ``container``,
``sinceTime``, ``sinceSeconds``, ``tailLines``, ``timestamps`` and ``limitBytes`` in the kubelet's order (since, tail,
stamps, then the byte limit), and a container that has not started yet is a 400 ``waiting to start``.

Init containers run one after another before the containers (retried on failure unless ``restartPolicy`` is
Never, which fails the pod); sidecar init containers (their own ``restartPolicy: Always``) are not modelled.

Not modelled: nodes, scheduling, resource limits (requests/limits are read by ``resourceFieldRef`` only),
sidecar and ephemeral containers, network policies (every pod reaches every address), pod
security admission, image pulls (unknown images wait in ``ErrImagePull``), ReplicaSet and ControllerRevision
objects, EndpointSlices, ExternalName Services, ``hostNetwork``, the HPA controller, preStop/postStart hooks,
secret/configMap updates after start, and watch streams.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import re
import secrets as pysecrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroweaver_kube.testing.images import Image, default_images, image_key
from neuroweaver_kube.testing.network import (
    AddressBlock,
    ServiceProxy,
    hosts_text,
    serve_tls,
    write_in_place,
)

if TYPE_CHECKING:
    from neuroweaver_kube.testing import KubeApiStandIn

BWRAP = "bwrap"
NODE_NAME = "standin-node"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CLUSTER_DOMAIN = "cluster.local"


def bwrap_path() -> str | None:
    return shutil.which(BWRAP)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_stamp_lock = threading.Lock()
_last_stamp = 0


def _stamp() -> bytes:
    """The time a log line was read, RFC 3339 with nanoseconds; strictly increasing, so a reader's `sinceTime` cursor
    (the time of the last line it read) never skips or repeats a line."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        ns = _last_stamp
    seconds = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{seconds}.{ns % 1_000_000_000:09d}Z".encode()


def _stamp_ns(stamp: bytes) -> int:
    seconds = dt.datetime.strptime(stamp[:19].decode(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    fraction = stamp[20:-1] if stamp[19:20] == b"." else b""
    return int(seconds.timestamp()) * 1_000_000_000 + int(fraction.ljust(9, b"0") or b"0")


def _unstamped(log: str) -> str:
    """A kept log as the container wrote it (the stamp and its space off every line)."""
    return "".join(line.split(" ", 1)[-1] for line in log.splitlines(keepends=True))


# --------------------------------------------------------------------------- label selectors


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """A ``labelSelector`` query (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x)``)."""
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        term = term.strip()
        if not term:
            continue
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            present = m.group(1) in labels and labels[m.group(1)] in values
            if present != (m.group(2) == "in"):
                return False
        elif "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_labels(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector object (``matchLabels`` and ``matchExpressions``)."""
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or ())
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --------------------------------------------------------------------------- quantities


_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


def quantity(value: Any) -> float:
    m = re.fullmatch(r"([0-9.eE+-]+)([a-zA-Z]*)", str(value).strip())
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


# --------------------------------------------------------------------------- errors


class _ConfigError(Exception):
    """The container cannot be created yet (a missing Secret key, an unknown image, ...): it waits and retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


# --------------------------------------------------------------------------- one container


@dataclass
class _ContainerState:
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    running_since: str | None = None
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    started: bool = False
    ready: bool = False
    restarts: int = 0
    ever_ran: bool = False
    done: bool = False  # finished for good (no restart will follow)


class _Container:
    def __init__(self, pod: _Pod, spec: dict[str, Any], *, init: bool = False) -> None:
        self.pod = pod
        self.spec = spec
        self.init = init
        self.name: str = spec["name"]
        self.state = _ContainerState()
        self.log_path = pod.dir / "logs" / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._killed_for_liveness = False
        # Started from this long-lived thread: bwrap's PDEATHSIG follows the thread that forked it.
        self.thread = threading.Thread(target=self._run, name=f"pod-{pod.name}-{self.name}", daemon=True)

    # ---------------------------------------------------------------- lifecycle

    def _run(self) -> None:
        runner = self.pod.runner
        policy = self.pod.spec.get("restartPolicy", "Always")
        if self.init and policy == "Always":  # an init container is retried until it succeeds, never restarted after
            policy = "OnFailure"
        failures_in_a_row = 0
        while not self._stop.is_set():
            try:
                argv, env, sandbox = self.pod.prepare(self)
            except (_ConfigError, OSError, ValueError) as e:
                reason, message = (
                    (e.reason, e.message) if isinstance(e, _ConfigError) else ("CreateContainerError", str(e))
                )
                self.state.waiting = (reason, message)
                self._stop.wait(min(0.2 * 2 ** min(failures_in_a_row, 5), 2.0))
                failures_in_a_row += 1
                continue
            self.proc = subprocess.Popen(
                [*sandbox, "--", *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            capture = threading.Thread(target=self._capture, args=(self.proc.stdout,), daemon=True)
            capture.start()
            st = self.state
            st.waiting, st.terminated, st.ever_ran = None, None, True
            st.running_since = _now()
            st.started = "startupProbe" not in self.spec
            st.ready = False
            self._killed_for_liveness = False
            code = self._probe_until_exit()
            capture.join(timeout=5)  # its last lines are in the log before the container reads as terminated
            finished = _now()
            reason = "Completed" if code == 0 else ("Error" if code > 0 else "Error")
            if self._killed_for_liveness:
                reason = "Error"
            term = {
                "exitCode": code if code >= 0 else 128 - code,
                "reason": reason,
                "startedAt": st.running_since,
                "finishedAt": finished,
            }
            if code < 0:
                term["signal"] = -code
            st.ready, st.started, st.running_since = False, False, None
            restart = not self._stop.is_set() and (policy == "Always" or (policy == "OnFailure" and code != 0))
            if not restart:
                st.terminated, st.done = term, True
                break
            st.last_terminated = term
            st.restarts += 1
            st.waiting = ("CrashLoopBackOff", f"back-off restarting failed container {self.name}")
            self._stop.wait(min(0.2 * 2 ** min(st.restarts - 1, 5), 5.0))
            runner.wake()
        self.state.done = True
        runner.wake()

    def _probe_until_exit(self) -> int:
        """Run the probes on their schedule until the process exits; its exit code (negative: the signal)."""
        runner = self.pod.runner
        assert self.proc is not None
        started_at = time.monotonic()
        probes = {
            kind: _ProbeSchedule(self.spec[kind], runner.period_cap, started_at)
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if self.spec.get(kind)
        }
        if "readinessProbe" not in probes and "startupProbe" not in probes:
            self.state.ready = True
            runner.wake()
        while True:
            code = self.proc.poll()
            if code is not None:
                return code
            if self._stop.is_set():
                self.terminate()
                return self.proc.wait()
            now = time.monotonic()
            for kind, sched in probes.items():
                if not sched.due(now):
                    continue
                if kind != "startupProbe" and not self.state.started:
                    continue
                if kind == "startupProbe" and self.state.started:
                    continue
                ok = self.pod.run_probe(self, sched.probe)
                if self.proc.poll() is not None:
                    break
                verdict = sched.record(ok, time.monotonic())
                if kind == "startupProbe":
                    if verdict is True:
                        self.state.started = True
                        if "readinessProbe" not in probes:
                            self.state.ready = True
                        runner.wake()
                    elif verdict is False:
                        self._kill_for_liveness("startup")
                elif kind == "livenessProbe" and verdict is False:
                    self._kill_for_liveness("liveness")
                elif kind == "readinessProbe" and verdict is not None and verdict != self.state.ready:
                    self.state.ready = verdict
                    runner.wake()
            self._stop.wait(0.05)

    def _capture(self, out: Any) -> None:
        """Appends the container's output to its log, each line with the time it was read (a last line without a
        line end gets one)."""
        with out, open(self.log_path, "ab") as log:
            for line in iter(out.readline, b""):
                log.write(_stamp() + b" " + line + (b"" if line.endswith(b"\n") else b"\n"))
                log.flush()

    def _kill_for_liveness(self, which: str) -> None:
        with open(self.log_path, "ab") as log:
            log.write(_stamp() + f" [standin] {which} probe failed: killing the container\n".encode())
        self._killed_for_liveness = True
        self.state.ready = False
        self.pod.runner.wake()
        self.terminate()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the container's processes. SIGKILL goes to the whole process group (bwrap included, whose
        death takes the PID namespace with it); any other signal spares the outer bwrap, which would die of it at
        once and take the sandbox down before the program could handle the signal (a graceful SIGTERM)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            return
        for pid in _process_group(proc.pid):
            if pid != proc.pid:  # the sandbox's init (bwrap) ignores signals it has no handler for
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the container's processes, SIGKILL after the (capped) grace period."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        grace = min(float(self.pod.spec.get("terminationGracePeriodSeconds", 30)), self.pod.runner.grace_cap)
        self.signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- status

    def status(self, image: str) -> dict[str, Any]:
        st = self.state
        out: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": f"standin://{image_key(image)}",
            "ready": st.ready,
            "started": st.started,
            "restartCount": st.restarts,
        }
        if st.running_since:
            out["state"] = {"running": {"startedAt": st.running_since}}
        elif st.terminated:
            out["state"] = {"terminated": dict(st.terminated)}
        else:
            reason, message = st.waiting or ("ContainerCreating", "")
            out["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        if st.last_terminated:
            out["lastState"] = {"terminated": dict(st.last_terminated)}
        return out


@dataclass
class _ProbeSchedule:
    probe: dict[str, Any]
    cap: float
    start: float
    successes: int = 0
    failures: int = 0
    next_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.period = min(float(self.probe.get("periodSeconds", 10)), self.cap)
        self.next_at = self.start + min(float(self.probe.get("initialDelaySeconds", 0)), self.cap)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, now: float) -> bool | None:
        """True/False when the success/failure threshold is reached, None while undecided."""
        self.next_at = now + self.period
        if ok:
            self.failures = 0
            self.successes += 1
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.failures = 0
                return False
        return None


# --------------------------------------------------------------------------- one pod


class _Pod:
    def __init__(self, runner: PodRunner, obj: dict[str, Any], ip: str) -> None:
        md = obj["metadata"]
        self.runner = runner
        self.obj = obj
        self.namespace: str = md.get("namespace", "default")
        self.name: str = md["name"]
        self.uid: str = md["uid"]
        self.spec: dict[str, Any] = obj.get("spec") or {}
        self.ip = ip
        self.start_time = _now()
        self.created = time.monotonic()
        self.dir = runner.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "volumes").mkdir(exist_ok=True)
        self.hosts_path = self.dir / "hosts"
        (self.dir / "hostname").write_text((self.spec.get("hostname") or self.name)[:63] + "\n")
        write_in_place(self.hosts_path, runner.hosts_for(self))
        self.init_containers = [_Container(self, c, init=True) for c in self.spec.get("initContainers") or ()]
        self.containers = [_Container(self, c) for c in self.spec.get("containers") or ()]
        self.pending_reason: str | None = None
        self.ready_since: float | None = None
        self.deleted = False
        self._starter = threading.Thread(target=self._start, name=f"pod-{self.name}", daemon=True)

    def start(self) -> None:
        self._starter.start()

    def _start(self) -> None:
        """Init containers one after another (each to a successful exit), then the containers."""
        for c in self.init_containers:
            c.thread.start()
            c.thread.join()
            if self.deleted or not (c.state.terminated and c.state.terminated["exitCode"] == 0):
                self.runner.wake()
                return  # failed for good (restartPolicy Never) or deleted: the containers never start
        for c in self.containers:
            c.thread.start()

    @property
    def initialized(self) -> bool:
        return all(
            c.state.done and c.state.terminated and c.state.terminated["exitCode"] == 0 for c in self.init_containers
        )

    def stop(self) -> None:
        """Terminate every container (in parallel) and wait for them."""
        self.deleted = True
        for c in self.init_containers + self.containers:
            c.stop()
        self._starter.join(timeout=self.runner.grace_cap + 10)
        for c in self.init_containers + self.containers:
            if c.thread.is_alive():
                c.thread.join(timeout=self.runner.grace_cap + 10)

    # ---------------------------------------------------------------- state

    @property
    def ready(self) -> bool:
        return (
            not self.deleted
            and bool(self.containers)
            and all(c.state.ready and c.state.running_since for c in self.containers)
        )

    def available(self, min_ready_seconds: float) -> bool:
        self._track_ready()
        return self.ready_since is not None and time.monotonic() - self.ready_since >= min_ready_seconds

    def _track_ready(self) -> None:
        if not self.ready:
            self.ready_since = None
        elif self.ready_since is None:
            self.ready_since = time.monotonic()

    @property
    def phase(self) -> str:
        states = [c.state for c in self.containers]
        if not states:
            return "Pending"
        if any(c.state.done and c.state.terminated and c.state.terminated["exitCode"] for c in self.init_containers):
            return "Failed"  # an init container failed and restartPolicy is Never
        if all(s.done and s.terminated for s in states):
            return "Succeeded" if all(s.terminated and s.terminated["exitCode"] == 0 for s in states) else "Failed"
        if any(s.ever_ran for s in states):
            return "Running"
        return "Pending"

    def status(self) -> dict[str, Any]:
        self._track_ready()
        phase = self.phase
        ready = self.ready
        containers = [c.status(c.spec.get("image", "")) for c in self.containers]
        all_ready = all(c["ready"] for c in containers)
        initialized = self.initialized
        cond = self.runner.conditions_for(
            ("pod", self.namespace, self.name),
            [
                ("PodScheduled", True, None),
                ("Initialized", initialized, None if initialized else "ContainersNotInitialized"),
                ("ContainersReady", all_ready, None if all_ready else "ContainersNotReady"),
                ("Ready", ready, None if ready else "ContainersNotReady"),
            ],
        )
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": cond,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": containers,
            "qosClass": "BestEffort",
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status(c.spec.get("image", "")) for c in self.init_containers]
        if self.pending_reason:
            status["message"] = self.pending_reason
        return status

    # ---------------------------------------------------------------- sandbox

    def prepare(self, container: _Container) -> tuple[list[str], dict[str, str], list[str]]:
        """(argv, env, bwrap prefix) for one start of ``container``; raises _ConfigError while it cannot start."""
        spec = container.spec
        image = self.runner.image(spec.get("image", ""))
        env = self.env(spec, image)
        argv = self.argv(spec, image, env)
        return argv, env, self.sandbox(spec, image, container.name)

    def argv(self, spec: Mapping[str, Any], image: Image, env: Mapping[str, str]) -> list[str]:
        if spec.get("command"):
            argv = [*spec["command"], *(spec.get("args") or [])]
        elif spec.get("args") is not None:
            argv = [*image.entrypoint, *spec["args"]]
        else:
            argv = [*image.entrypoint, *image.cmd]
        argv = [_expand(a, env) for a in argv]
        if not argv:
            raise _ConfigError("CreateContainerError", "no command specified")
        return argv

    def env(self, spec: Mapping[str, Any], image: Image) -> dict[str, str]:
        runner = self.runner
        env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        env.update(image.env)
        env["HOSTNAME"] = self.spec.get("hostname") or self.name
        if runner.api_host:
            env["KUBERNETES_SERVICE_HOST"] = runner.api_host
            env["KUBERNETES_SERVICE_PORT"] = str(runner.api_port)
            env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(runner.api_port)
        if self.spec.get("enableServiceLinks", True):
            env.update(runner.service_links(self.namespace))
        for src in spec.get("envFrom") or ():
            prefix = src.get("prefix", "")
            ref = src.get("configMapRef") or src.get("secretRef")
            if ref is None:
                continue
            data = runner.data_of("Secret" if "secretRef" in src else "ConfigMap", self.namespace, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise _ConfigError("CreateContainerConfigError", f"{ref['name']} not found")
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for item in spec.get("env") or ():
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = _expand(str(item.get("value", "")), env)
                continue
            value = self.value_from(item["valueFrom"], spec)
            if value is not None:
                env[name] = value
        return env

    def value_from(self, source: Mapping[str, Any], spec: Mapping[str, Any]) -> str | None:
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if key in source:
                ref = source[key]
                data = self.runner.data_of(kind, self.namespace, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    what = f'{kind.lower()} "{ref["name"]}"' + ("" if data is None else f' key "{ref["key"]}"')
                    raise _ConfigError("CreateContainerConfigError", f"{what} not found")
                return data[ref["key"]].decode(errors="replace")
        if "fieldRef" in source:
            return self.field(source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            section, _, resource = ref["resource"].partition(".")
            raw = ((spec.get("resources") or {}).get(section) or {}).get(resource)
            if raw is None:  # a limit that is not set reads as the node's allocatable
                raw = os.cpu_count() if resource == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            divisor = quantity(ref.get("divisor", "1"))
            return str(math.ceil(quantity(raw) / divisor))
        raise _ConfigError("CreateContainerConfigError", f"unsupported valueFrom {sorted(source)}")

    def field(self, path: str) -> str:
        md = self.obj["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path not in simple:
            raise _ConfigError("CreateContainerConfigError", f"unsupported fieldPath {path}")
        return simple[path]

    def volume_sources(self) -> dict[str, tuple[Path, bool]]:
        """Volume name → (host path, read-only by nature); raises _ConfigError for a missing claim or Secret."""
        out: dict[str, tuple[Path, bool]] = {}
        runner = self.runner
        for vol in self.spec.get("volumes") or ():
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if not runner.claim_exists(self.namespace, claim):
                    raise _ConfigError("ContainerCreating", f'persistentvolumeclaim "{claim}" not found')
                path = runner.claim_dir(self.namespace, claim)
                out[name] = (path, bool(vol["persistentVolumeClaim"].get("readOnly")))
            elif "emptyDir" in vol:
                path = self.dir / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                out[name] = (path, False)
            elif "hostPath" in vol:
                out[name] = (Path(vol["hostPath"]["path"]), False)
            elif "secret" in vol or "configMap" in vol or "projected" in vol or "downwardAPI" in vol:
                path = self.dir / "volumes" / name
                if path.exists():
                    shutil.rmtree(path)
                path.mkdir(parents=True)
                self._write_projection(vol, path)
                out[name] = (path, True)
            else:
                raise _ConfigError("CreateContainerConfigError", f"volume {name}: unsupported source {sorted(vol)}")
        return out

    def _write_projection(self, vol: Mapping[str, Any], path: Path) -> None:
        default_mode = 0o644
        sources: list[tuple[str, Mapping[str, Any]]] = []
        if "projected" in vol:
            default_mode = vol["projected"].get("defaultMode", default_mode)
            for src in vol["projected"].get("sources") or ():
                sources += [(k, v) for k, v in src.items()]
        else:
            for k in ("secret", "configMap", "downwardAPI"):
                if k in vol:
                    sources.append((k, vol[k]))
                    default_mode = vol[k].get("defaultMode", default_mode)
        for kind, src in sources:
            files: dict[str, tuple[bytes, int | None]] = {}
            if kind in ("secret", "configMap"):
                name = str(src.get("secretName") or src.get("name"))
                data = self.runner.data_of("Secret" if kind == "secret" else "ConfigMap", self.namespace, name)
                if data is None:
                    if src.get("optional"):
                        continue
                    raise _ConfigError("ContainerCreating", f'{kind} "{name}" not found')
                if src.get("items"):
                    for item in src["items"]:
                        if item["key"] not in data:
                            if src.get("optional"):
                                continue
                            raise _ConfigError("ContainerCreating", f'{kind} "{name}" has no key "{item["key"]}"')
                        files[item["path"]] = (data[item["key"]], item.get("mode"))
                else:
                    files = {k: (v, None) for k, v in data.items()}
            elif kind == "downwardAPI":
                for item in src.get("items") or ():
                    if "fieldRef" in item:
                        files[item["path"]] = (self.field(item["fieldRef"]["fieldPath"]).encode(), item.get("mode"))
            for rel, (content, mode) in files.items():
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                target.chmod(mode if mode is not None else default_mode)

    def sandbox(self, spec: Mapping[str, Any], image: Image, container_name: str) -> list[str]:
        runner = self.runner
        args = [
            runner.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--hostname", (self.spec.get("hostname") or self.name)[:63],
        ]  # fmt: skip
        pod_sc = self.spec.get("securityContext") or {}
        sc = spec.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", image.user[0] if image.user else 0))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", image.user[1] if image.user else uid))
        if runner.userns and (uid, gid) != (0, 0):
            args += ["--unshare-user", "--uid", str(uid), "--gid", str(gid)]
        for b in image.binds:
            if b.kind == "symlink":
                args += ["--symlink", b.source, b.dest]
            elif b.kind in ("tmpfs", "remount-ro"):
                args += [f"--{b.kind}", b.dest]
            elif Path(b.source).exists():
                args += ["--ro-bind", b.source, b.dest]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--ro-bind", str(runner.etc_dir / "passwd"), "/etc/passwd"]
        args += ["--ro-bind", str(runner.etc_dir / "group"), "/etc/group"]
        args += ["--ro-bind", str(runner.etc_dir / "host.conf"), "/etc/host.conf"]
        args += ["--ro-bind", str(self.hosts_path), "/etc/hosts"]
        args += ["--ro-bind", str(self.dir / "hostname"), "/etc/hostname"]
        volumes = self.volume_sources()
        mounts = sorted(spec.get("volumeMounts") or (), key=lambda m: m["mountPath"].count("/"))
        for m in mounts:
            if m["name"] not in volumes:
                raise _ConfigError("CreateContainerConfigError", f'volumeMount "{m["name"]}" has no volume')
            source, ro = volumes[m["name"]]
            if m.get("subPath"):
                source = source / m["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            ro = ro or bool(m.get("readOnly"))
            args += ["--ro-bind" if ro else "--bind", str(source), m["mountPath"]]
        # The install stays visible where a volume covers its host path (a checkout under /tmp, an emptyDir at /tmp):
        # in an image the install never lies under a volume, so a pod must not lose it to one.
        covered = [m["mountPath"].rstrip("/") + "/" for m in mounts]
        for b in image.binds:
            if b.kind == "ro-bind" and any(b.dest.startswith(c) for c in covered) and Path(b.source).exists():
                args += ["--ro-bind", b.source, b.dest]
        if runner.automount(self.namespace, self.spec) and not any(
            m["mountPath"].rstrip("/") == SA_DIR for m in mounts
        ):
            args += ["--ro-bind", str(runner.service_account_dir(self.namespace, self.spec)), SA_DIR]
        workdir = spec.get("workingDir") or image.workdir or "/"
        args += ["--dir", workdir, "--chdir", workdir]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--remount-ro", "/"]
        return args

    # ---------------------------------------------------------------- probes

    def resolve_port(self, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for c in self.spec.get("containers") or ():
            for p in c.get("ports") or ():
                if p.get("name") == port:
                    return int(p["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    def run_probe(self, container: _Container, probe: Mapping[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "tcpSocket" in probe:
                t = probe["tcpSocket"]
                with socket.create_connection((t.get("host") or self.ip, self.resolve_port(t["port"])), timeout):
                    return True
            if "httpGet" in probe:
                return self._http_probe(probe["httpGet"], timeout)
            if "grpc" in probe:
                return self._grpc_probe(probe["grpc"], timeout)
            if "exec" in probe:
                return self._exec_probe(container, probe["exec"]["command"], timeout)
        except Exception:  # noqa: BLE001 - any failure of a probe is a failed probe
            return False
        return False

    def _http_probe(self, get: Mapping[str, Any], timeout: float) -> bool:
        host, port = get.get("host") or self.ip, self.resolve_port(get["port"])
        conn: http.client.HTTPConnection
        if get.get("scheme", "HTTP").upper() == "HTTPS":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or ()}
            headers.setdefault("User-Agent", "kube-probe/1.33")
            conn.request("GET", get.get("path", "/"), headers=headers)
            return 200 <= conn.getresponse().status < 400
        finally:
            conn.close()

    def _grpc_probe(self, probe: Mapping[str, Any], timeout: float) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"{self.ip}:{int(probe['port'])}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe.get("service", "")), timeout=timeout
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _exec_probe(self, container: _Container, command: list[str], timeout: float) -> bool:
        image = self.runner.image(container.spec.get("image", ""))
        env = self.env(container.spec, image)
        sandbox = self.sandbox(container.spec, image, container.name)
        try:
            proc = subprocess.run(
                [*sandbox, "--", *command], env=env, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def _process_group(pgid: int) -> list[int]:
    """Every process whose process group is ``pgid`` (read from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables replaced, ``$$(VAR)`` escapes, unknown ones kept."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$\(\w+\)|\$\((\w+)\)", sub, value)


def _template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _suffix() -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(pysecrets.choice(alphabet) for _ in range(5))


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


# --------------------------------------------------------------------------- the runner


class PodRunner:
    """Runs the pods the stand-in's objects call for (see the module docstring)."""

    def __init__(
        self,
        *,
        images: Mapping[str, Image] | None = None,
        repo_root: Path | None = None,
        state_dir: Path | None = None,
        period_cap: float = 1.0,
        grace_cap: float = 5.0,
        ttl_cap: float | None = None,
        tls: bool = True,
    ) -> None:
        bwrap = bwrap_path()
        if bwrap is None:
            raise RuntimeError("the pod runner needs bubblewrap (Debian package bubblewrap): bwrap is not on PATH")
        self.bwrap = bwrap
        self.repo_root = repo_root or Path(__file__).resolve().parents[5]
        self.images: dict[str, Image] = dict(default_images(self.repo_root))
        self.images.update(images or {})
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="nw-standin-pods-"))
        self.period_cap = period_cap
        self.grace_cap = grace_cap
        self.ttl_cap = ttl_cap
        self.tls = tls
        self.api_host: str | None = None
        self.api_port = 0
        self.ca_cert: Path | None = None
        self.errors: list[str] = []
        self._standin: KubeApiStandIn | None = None
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._dying: list[threading.Thread] = []
        # owner uid → threads stopping its deleted pods (a Job's podReplacementPolicy Failed waits for them)
        self._terminating: dict[str, list[threading.Thread]] = {}
        self._service_ips: dict[tuple[str, str], str] = {}
        self._conditions: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
        self._job_state: dict[str, dict[str, Any]] = {}
        self._progress: dict[str, tuple[str, float]] = {}
        self._files_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_pass = time.monotonic()
        self._tls_server: Any = None
        self.net: AddressBlock | None = None
        self.proxy: ServiceProxy | None = None
        self.userns = False
        self.etc_dir = self.state_dir / "etc"

    # ---------------------------------------------------------------- lifecycle (called by the stand-in)

    def start(self, standin: KubeApiStandIn) -> None:
        self._standin = standin
        standin.status_controller = False  # the stand-in's own no-kubelet status writer steps aside (H1a's hook)
        self.net = AddressBlock()
        self.proxy = ServiceProxy()
        self.userns = self._userns_works()
        self._write_etc()
        if self.tls:
            self._tls_server, self.ca_cert = serve_tls(standin.handler_class, self.state_dir / "api-tls")
            self.api_host, self.api_port = self._tls_server.server_address[:2]
        self._thread = threading.Thread(target=self._loop, name="standin-pod-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)
        pods = list(self._pods.values())
        self._pods.clear()
        threads = [threading.Thread(target=p.stop, daemon=True) for p in pods]
        for t in threads + self._dying:
            if not t.is_alive() and t not in self._dying:
                t.start()
        for t in threads + self._dying:
            t.join(timeout=self.grace_cap + 15)
        if self.proxy:
            self.proxy.close()
        if self._tls_server:
            self._tls_server.shutdown()
            self._tls_server.server_close()
        if self.net:
            self.net.close()
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def changed(self) -> None:
        """The stand-in's write hook: an object changed through the API, reconcile soon."""
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def _userns_works(self) -> bool:
        probe = [self.bwrap, "--unshare-user", "--uid", "10001", "--ro-bind", "/", "/", "true"]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0

    def _write_etc(self) -> None:
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        passwd = Path("/etc/passwd").read_text() if Path("/etc/passwd").exists() else "root:x:0:0::/root:/bin/sh\n"
        group = Path("/etc/group").read_text() if Path("/etc/group").exists() else "root:x:0:\n"
        # the images' own user (useradd in every Dockerfile)
        if ":10001:" not in passwd:
            passwd += "neuroweaver:x:10001:10001::/home/neuroweaver:/usr/sbin/nologin\n"
        if ":10001:" not in group:
            group += "neuroweaver:x:10001:\n"
        (self.etc_dir / "passwd").write_text(passwd)
        (self.etc_dir / "group").write_text(group)
        (self.etc_dir / "host.conf").write_text("multi on\n")

    # ---------------------------------------------------------------- test helpers

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        assert self._standin is not None
        return self._standin.objects("Pod", namespace)

    def pod_log(self, namespace: str, name: str, container: str | None = None, *, timestamps: bool = False) -> str:
        """The container's output (every container's, without ``container``); ``timestamps``: each line prefixed
        with the time it was read."""
        log = self._kept_log(namespace, name, container)
        return log if timestamps else _unstamped(log)

    def _kept_log(self, namespace: str, name: str, container: str | None) -> str:
        pod = self._pods.get((namespace, name))
        if pod is None:
            matches = sorted(self.state_dir.glob(f"pods/{namespace}_{name}_*/logs"))
            if not matches:
                raise KeyError(f"no pod {namespace}/{name}")
            logs = matches[-1]
        else:
            logs = pod.dir / "logs"
        files = sorted(logs.glob(f"{container or '*'}.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    def kill_container(self, namespace: str, pod: str, container: str | None = None, sig: int = signal.SIGKILL) -> None:
        """Signal a container's process group, as the OOM killer or a node failure would; the container then ends
        (SIGKILL: exit code 137) and restarts or not by the pod's ``restartPolicy``."""
        runtime = self._pods[(namespace, pod)]
        for c in runtime.init_containers + runtime.containers:
            if container is None or c.name == container:
                c.signal(sig)

    def service_ip(self, namespace: str, name: str) -> str | None:
        return self._service_ips.get((namespace, name))

    def describe(self, tail: int = 30) -> str:
        """Every pod's phase, readiness, restarts and the tail of its logs (for test failure messages)."""
        out = []
        for d in sorted(self.state_dir.glob("pods/*")):
            key = tuple(d.name.split("_")[:2])
            pod = self._pods.get((key[0], key[1])) if len(key) == 2 else None
            head = f"== pod {d.name}"
            if pod:
                restarts = [c.state.restarts for c in pod.containers]
                head += f" ip={pod.ip} phase={pod.phase} ready={pod.ready} restarts={restarts}"
                if pod.pending_reason:
                    head += f" pending={pod.pending_reason}"
                waiting = [c.state.waiting for c in pod.containers if c.state.waiting]
                if waiting:
                    head += f" waiting={waiting}"
            else:
                head += " (gone)"
            out.append(head)
            for log in sorted((d / "logs").glob("*.log")):
                lines = _unstamped(log.read_text(errors="replace")).splitlines()[-tail:]
                out += [f"   [{log.stem}] {line}" for line in lines]
        if self.errors:
            out.append("== runner errors:")
            out += self.errors[-10:]
        since = time.monotonic() - self._last_pass
        if since > 2 and self._thread is not None:  # a stuck controller loop: where it is
            frame = sys._current_frames().get(self._thread.ident or 0)
            where = "".join(traceback.format_stack(frame)) if frame else "(loop thread gone)"
            out.append(f"== controller loop: last pass {since:.1f} s ago, now at:\n{where}")
        return "\n".join(out)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.describe()}")
            time.sleep(0.1)

    # ---------------------------------------------------------------- subresources

    def subresource(
        self, method: str, kind: str, namespace: str | None, name: str, sub: str, query: Mapping[str, list[str]]
    ) -> tuple[int, Any] | None:
        """``GET pods/{name}/log`` (``container``, ``sinceTime``, ``sinceSeconds``, ``tailLines``, ``timestamps``,
        ``limitBytes``); None for anything else."""
        if kind != "Pod" or sub != "log" or method != "GET" or namespace is None:
            return None

        def arg(key: str) -> str:
            return (query.get(key) or [""])[0]

        container = arg("container") or None
        waiting = self._waiting_to_start(namespace, name, container)
        if waiting is not None:
            return 400, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": waiting,
                         "reason": "BadRequest", "code": 400}  # fmt: skip
        try:
            lines = self._kept_log(namespace, name, container).splitlines(keepends=True)
        except KeyError:
            return None
        since = 0
        if arg("sinceTime"):
            since = _stamp_ns(arg("sinceTime").encode())
        elif arg("sinceSeconds"):
            since = time.time_ns() - int(arg("sinceSeconds")) * 1_000_000_000
        if since:
            lines = [line for line in lines if _stamp_ns(line.split(" ", 1)[0].encode()) >= since]
        if arg("tailLines"):
            lines = lines[-int(arg("tailLines")) :] if int(arg("tailLines")) > 0 else []
        data = "".join(lines if arg("timestamps") == "true" else (line.split(" ", 1)[-1] for line in lines)).encode()
        if arg("limitBytes"):
            data = data[: int(arg("limitBytes"))]
        return 200, data

    def _waiting_to_start(self, namespace: str, name: str, container: str | None) -> str | None:
        """The API's message for a container that has never run (its log cannot be read yet), else None."""
        pod = self._pods.get((namespace, name))
        if pod is None:  # the API has it but the runner has not taken it up yet
            assert self._standin is not None
            exists = self._standin.get_object("v1", "Pod", namespace, name) is not None
            return f'container in pod "{name}" is waiting to start: ContainerCreating' if exists else None
        for c in pod.containers:
            if (container is None or c.name == container) and not c.state.ever_ran and c.state.waiting:
                return f'container "{c.name}" in pod "{name}" is waiting to start: {c.state.waiting[0]}'
        return None

    # ---------------------------------------------------------------- lookups used by pods

    def image(self, reference: str) -> Image:
        image = self.images.get(image_key(reference)) or self.images.get(reference)
        if image is None:
            raise _ConfigError("ErrImagePull", f"image {reference!r} is not known to the stand-in")
        return image

    def data_of(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        assert self._standin is not None
        obj = self._standin.get_object("v1", kind, namespace, name)
        if obj is None:
            return None
        out: dict[str, bytes] = {}
        if kind == "Secret":
            out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
            out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
        else:
            out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
            out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def claim_exists(self, namespace: str, claim: str) -> bool:
        assert self._standin is not None
        return self._standin.get_object("v1", "PersistentVolumeClaim", namespace, claim) is not None

    def claim_dir(self, namespace: str, claim: str) -> Path:
        path = self.state_dir / "claims" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def automount(self, namespace: str, pod_spec: Mapping[str, Any]) -> bool:
        if "automountServiceAccountToken" in pod_spec:
            return bool(pod_spec["automountServiceAccountToken"])
        assert self._standin is not None
        sa = self._standin.get_object("v1", "ServiceAccount", namespace, pod_spec.get("serviceAccountName", "default"))
        return bool((sa or {}).get("automountServiceAccountToken", True))

    def service_account_dir(self, namespace: str, pod_spec: Mapping[str, Any]) -> Path:
        account = pod_spec.get("serviceAccountName", "default")
        path = self.state_dir / "serviceaccounts" / namespace / account
        with self._files_lock:  # containers of several pods start at once
            if not (path / "token").exists():
                path.mkdir(parents=True, exist_ok=True)
                (path / "namespace").write_text(namespace)
                (path / "ca.crt").write_bytes(self.ca_cert.read_bytes() if self.ca_cert else b"")
                (path / "token").write_text(pysecrets.token_urlsafe(32))
        return path

    def service_links(self, namespace: str) -> dict[str, str]:
        assert self._standin is not None
        env: dict[str, str] = {}
        for svc in self._standin.objects("Service", namespace):
            ip = self._service_ips.get((namespace, svc["metadata"]["name"]))
            ports = (svc.get("spec") or {}).get("ports") or []
            if not ip or not ports:
                continue
            name = svc["metadata"]["name"].upper().replace("-", "_")
            env[f"{name}_SERVICE_HOST"] = ip
            env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
            for p in ports:
                if p.get("name"):
                    env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        return env

    def conditions_for(
        self,
        key: tuple[str, str, str],
        wanted: Iterable[tuple[str, bool, str | None]],
        messages: Mapping[str, str] = {},
    ) -> list[dict[str, Any]]:
        """Conditions whose ``lastTransitionTime`` moves only when their status or reason does."""
        previous = self._conditions.setdefault(key, {})
        out = []
        for ctype, status, reason in wanted:
            value = "True" if status else "False"
            old = previous.get(ctype)
            if old and old["status"] == value and old.get("reason") == reason:
                cond = old
            else:
                cond = {"type": ctype, "status": value, "lastTransitionTime": _now()}
                if reason:
                    cond["reason"] = reason
                previous[ctype] = cond
            if ctype in messages:
                cond = {**cond, "message": messages[ctype]}
            out.append(dict(cond))
        return out

    # ---------------------------------------------------------------- the control loop

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._reconcile()
            except Exception as e:  # noqa: BLE001 - a controller bug must not stop every pod; the tests read errors
                self.errors.append(f"{type(e).__name__}: {e}")
                if len(self.errors) > 200:
                    del self.errors[:100]
            self._last_pass = time.monotonic()
            time.sleep(0.05)

    def _reconcile(self) -> None:
        standin = self._standin
        assert standin is not None and self.net is not None
        self._sync_pod_runtimes()
        for dep in standin.objects("Deployment"):
            self._sync_deployment(dep)
        for job in standin.objects("Job"):
            self._sync_job(job)
        for sts in standin.objects("StatefulSet"):
            self._sync_statefulset(sts)
        self._collect_garbage()
        self._sync_pod_runtimes()
        for key, pod in list(self._pods.items()):
            standin.put_status("Pod", key[0], key[1], pod.status())
        for pvc in standin.objects("PersistentVolumeClaim"):
            md = pvc["metadata"]
            if (pvc.get("status") or {}).get("phase") != "Bound":
                access = (pvc.get("spec") or {}).get("accessModes") or ["ReadWriteOnce"]
                storage = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
                status = {
                    "phase": "Bound",
                    "accessModes": access,
                    **({"capacity": {"storage": storage}} if storage else {}),
                }
                standin.put_status("PersistentVolumeClaim", md.get("namespace"), md["name"], status)
        self._sync_services()

    def _sync_pod_runtimes(self) -> None:
        standin = self._standin
        assert standin is not None and self.net is not None
        live = {(p["metadata"].get("namespace", "default"), p["metadata"]["name"]): p for p in standin.objects("Pod")}
        for key in set(self._pods) - set(live):
            self._kill(key)
        for key, obj in live.items():
            pod = self._pods.get(key)
            if pod is not None and pod.uid != obj["metadata"]["uid"]:
                self._kill(key)
                pod = None
            if pod is None:
                pod = _Pod(self, obj, self.net.pod_ip())
                self._pods[key] = pod
                pod.start()
            else:
                pod.obj = obj

    def _kill(self, key: tuple[str, str]) -> None:
        pod = self._pods.pop(key)
        pod.deleted = True  # out of every Service now; the processes get SIGTERM next
        if self.proxy:
            self.proxy.drop_endpoint(pod.ip)

        def stop() -> None:
            pod.stop()
            if self.net:
                self.net.release_pod_ip(pod.ip)
            shutil.rmtree(pod.dir / "volumes", ignore_errors=True)
            self.wake()  # a Job with podReplacementPolicy Failed waits for this

        t = threading.Thread(target=stop, name=f"kill-{key[1]}", daemon=True)
        self._dying = [d for d in self._dying if d.is_alive()] + [t]
        for ref in pod.obj["metadata"].get("ownerReferences") or ():
            alive = [d for d in self._terminating.get(ref.get("uid", ""), []) if d.is_alive()]
            self._terminating[ref.get("uid", "")] = [*alive, t]
        t.start()

    def _owned(self, owner: Mapping[str, Any]) -> list[_Pod]:
        uid = owner["metadata"]["uid"]
        return [
            p
            for p in self._pods.values()
            if any(ref.get("uid") == uid for ref in p.obj["metadata"].get("ownerReferences") or ())
        ]

    def _create_pod(
        self,
        owner: Mapping[str, Any],
        name: str,
        template: Mapping[str, Any],
        labels: Mapping[str, str],
        spec_extra: Mapping[str, Any] | None = None,
    ) -> None:
        assert self._standin is not None
        md = owner["metadata"]
        pod_md = copy.deepcopy(template.get("metadata") or {})
        pod_md["name"] = name
        pod_md["namespace"] = md.get("namespace", "default")
        pod_md["labels"] = {**(pod_md.get("labels") or {}), **labels}
        pod_md["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": md["name"],
                "uid": md["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        spec = copy.deepcopy(template.get("spec") or {})
        spec.setdefault("restartPolicy", "Always")
        spec["nodeName"] = NODE_NAME
        spec.update(spec_extra or {})
        self._standin.put({"apiVersion": "v1", "kind": "Pod", "metadata": pod_md, "spec": spec})

    def _delete_pod(self, pod: _Pod) -> None:
        assert self._standin is not None
        pod.deleted = True
        if self.proxy:
            self.proxy.drop_endpoint(pod.ip)
        self._standin.remove("Pod", pod.namespace, pod.name)

    def _collect_garbage(self) -> None:
        assert self._standin is not None
        uids = set()
        for kind in ("Deployment", "Job", "StatefulSet"):
            uids |= {o["metadata"]["uid"] for o in self._standin.objects(kind)}
        for pod in list(self._pods.values()):
            refs = pod.obj["metadata"].get("ownerReferences") or ()
            if refs and not any(ref.get("uid") in uids for ref in refs):
                self._delete_pod(pod)

    # ---------------------------------------------------------------- Deployments

    def _sync_deployment(self, dep: dict[str, Any]) -> None:
        assert self._standin is not None
        md, spec = dep["metadata"], dep.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        h = _template_hash(template)
        owned = self._owned(dep)
        new = [p for p in owned if p.obj["metadata"].get("labels", {}).get("pod-template-hash") == h]
        old = [p for p in owned if p not in new]
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        surge = _int_or_percent(rolling.get("maxSurge", "25%"), desired, True)
        unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), desired, False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        min_ready = min(float(spec.get("minReadySeconds", 0)), self.period_cap)

        def available(p: _Pod) -> bool:
            return p.available(min_ready)

        def create() -> None:
            name = f"{md['name']}-{h}-{_suffix()}"
            self._create_pod(dep, name, template, {"pod-template-hash": h})

        if strategy.get("type") == "Recreate":
            for p in old:
                self._delete_pod(p)
            if not old:
                for _ in range(desired - len(new)):
                    create()
        else:
            # surge: new pods first, up to desired + maxSurge pods in all
            to_create = max(0, min(desired - len(new), desired + surge - len(new) - len(old)))
            for _ in range(to_create):
                create()
            # then old pods go: unavailable ones at once, available ones while enough pods stay available
            for p in [p for p in old if not available(p)]:
                self._delete_pod(p)
            old = [p for p in old if available(p)]
            can_remove = sum(1 for p in new + old if available(p)) - (desired - unavailable)
            for p in sorted(old, key=lambda p: p.created):
                if can_remove <= 0:
                    break
                self._delete_pod(p)
                can_remove -= 1
            if not old and len(new) > desired:  # scaled down: not-ready pods first, then the newest
                for p in sorted(new, key=lambda p: (p.ready, -p.created))[: len(new) - desired]:
                    self._delete_pod(p)
        self._deployment_status(dep, desired, h, unavailable)

    def _deployment_status(self, dep: dict[str, Any], desired: int, h: str, max_unavailable: int) -> None:
        assert self._standin is not None
        md, spec = dep["metadata"], dep.get("spec") or {}
        owned = [p for p in self._owned(dep) if not p.deleted]
        new = [p for p in owned if p.obj["metadata"].get("labels", {}).get("pod-template-hash") == h]
        min_ready = min(float(spec.get("minReadySeconds", 0)), self.period_cap)
        ready = sum(1 for p in owned if p.ready)
        available = sum(1 for p in owned if p.available(min_ready))
        new_available = sum(1 for p in new if p.available(min_ready))
        complete = len(new) == desired and len(owned) == desired and new_available == desired
        key = md["uid"]
        snapshot = f"{len(new)}/{new_available}/{len(owned)}/{h}"
        last, since = self._progress.get(key, ("", time.monotonic()))
        if snapshot != last:
            since = time.monotonic()
            self._progress[key] = (snapshot, since)
        deadline = float(spec.get("progressDeadlineSeconds", 600))
        if complete:
            progressing = (True, "NewReplicaSetAvailable")
        elif time.monotonic() - since > deadline:
            progressing = (False, "ProgressDeadlineExceeded")
        else:
            progressing = (True, "ReplicaSetUpdated")
        is_available = available >= desired - max_unavailable
        conditions = self.conditions_for(
            ("deployment", md.get("namespace", ""), md["name"]),
            [
                (
                    "Available",
                    is_available,
                    "MinimumReplicasAvailable" if is_available else "MinimumReplicasUnavailable",
                ),
                ("Progressing", progressing[0], progressing[1]),
            ],
        )
        status: dict[str, Any] = {
            "observedGeneration": md.get("generation", 1),
            "replicas": len(owned),
            "updatedReplicas": len(new),
            "readyReplicas": ready,
            "availableReplicas": available,
            "conditions": conditions,
        }
        if desired - available > 0:
            status["unavailableReplicas"] = desired - available
        status = {k: v for k, v in status.items() if v != 0 or k == "observedGeneration"}
        self._standin.put_status("Deployment", md.get("namespace"), md["name"], status)

    # ---------------------------------------------------------------- Jobs

    def _sync_job(self, job: dict[str, Any]) -> None:
        assert self._standin is not None
        md, spec = job["metadata"], job.get("spec") or {}
        state = self._job_state.setdefault(
            md["uid"], {"start": _now(), "t0": time.monotonic(), "finished": None, "last_failure": 0.0}
        )
        template = spec.get("template") or {}
        policy = (template.get("spec") or {}).get("restartPolicy", "Never")
        owned = self._owned(job)
        # Pods that are gone (deleted through the API, or by this controller) still count, by their last phase: a
        # deleted pod that had not succeeded is a failure, as the Job controller's pod tracking counts it.
        phases = {p.uid: p.phase for p in owned}
        for uid, phase in state.get("phases", {}).items():
            if uid not in phases:
                key = "succeeded_gone" if phase == "Succeeded" else "failed_gone"
                state[key] = state.get(key, 0) + 1
        state["phases"] = phases
        succeeded = sum(1 for p in owned if p.phase == "Succeeded") + state.get("succeeded_gone", 0)
        failed_pods = [p for p in owned if p.phase == "Failed"]
        failed = len(failed_pods) + state.get("failed_gone", 0)
        restarts = sum(c.state.restarts for p in owned for c in p.containers) if policy == "OnFailure" else 0
        active = [p for p in owned if p.phase in ("Pending", "Running")]
        completions = int(spec.get("completions", 1))
        parallelism = int(spec.get("parallelism", 1))
        backoff = int(spec.get("backoffLimit", 6))
        now = _now()
        finished = state["finished"]
        if finished is None:
            if succeeded >= completions:
                finished = state["finished"] = ("Complete", now, None)
            elif failed + restarts > backoff:
                finished = state["finished"] = ("Failed", now, "BackoffLimitExceeded")
            elif spec.get("activeDeadlineSeconds") is not None and (
                time.monotonic() - state["t0"] > float(spec["activeDeadlineSeconds"])
            ):
                finished = state["finished"] = ("Failed", now, "DeadlineExceeded")
            if finished is not None:
                state["t_finished"] = time.monotonic()
                for p in active:
                    self._delete_pod(p)
                active = []
        terminating = [t for t in self._terminating.get(md["uid"], []) if t.is_alive()]
        # Default TerminatingOrFailed replaces a deleted pod at once; Failed waits until it has stopped, so two
        # pods of one Job never run side by side.
        waits_for_terminating = spec.get("podReplacementPolicy") == "Failed" and bool(terminating)
        if finished is None and not spec.get("suspend") and not waits_for_terminating:
            want = min(parallelism, completions - succeeded)
            delay = min(0.2 * 2 ** max(failed - 1, 0), 5.0) if failed else 0.0
            if len(active) < want and time.monotonic() - state["last_failure"] >= delay:
                for _ in range(want - len(active)):
                    labels = {
                        "job-name": md["name"],
                        "batch.kubernetes.io/job-name": md["name"],
                        "controller-uid": md["uid"],
                        "batch.kubernetes.io/controller-uid": md["uid"],
                    }
                    self._create_pod(job, f"{md['name']}-{_suffix()}", template, labels)
            if failed != state.get("seen_failed", 0):
                state["seen_failed"] = failed
                state["last_failure"] = time.monotonic()
        status: dict[str, Any] = {"startTime": state["start"]}
        if terminating:
            status["terminating"] = len(terminating)
        if active:
            status["active"] = len(active)
            status["ready"] = sum(1 for p in active if p.ready)
        if succeeded:
            status["succeeded"] = succeeded
        if failed:
            status["failed"] = failed
        if finished is not None:
            kind, when, reason = finished
            if kind == "Complete":
                status["completionTime"] = when
                conds = [("SuccessCriteriaMet", True, None), ("Complete", True, None)]
                messages: dict[str, str] = {}
            else:
                conds = [("FailureTarget", True, reason), ("Failed", True, reason)]
                text = (
                    "Job has reached the specified backoff limit"
                    if reason == "BackoffLimitExceeded"
                    else "Job was active longer than specified deadline"
                )
                messages = {"Failed": text, "FailureTarget": text}
            status["conditions"] = self.conditions_for(("job", md.get("namespace", ""), md["name"]), conds, messages)
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and self.ttl_cap is not None:
                ttl = min(float(ttl), self.ttl_cap)
            if ttl is not None and time.monotonic() - state["t_finished"] >= float(ttl):
                self._standin.remove("Job", md.get("namespace"), md["name"])
                return
        self._standin.put_status("Job", md.get("namespace"), md["name"], status)

    # ---------------------------------------------------------------- StatefulSets

    def _sync_statefulset(self, sts: dict[str, Any]) -> None:
        assert self._standin is not None
        md, spec = sts["metadata"], sts.get("spec") or {}
        ns = md.get("namespace", "default")
        desired = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        h = _template_hash(template)
        revision = f"{md['name']}-{h}"
        pods = {p.name: p for p in self._owned(sts) if not p.deleted}
        ordered = spec.get("podManagementPolicy", "OrderedReady") != "Parallel"
        for i in range(desired):
            name = f"{md['name']}-{i}"
            pod = pods.get(name)
            if pod is None:
                if name in {k[1] for k, p in self._pods.items() if k[0] == ns and p.deleted}:
                    break  # the previous pod of this name is still terminating
                for tmpl in spec.get("volumeClaimTemplates") or ():
                    claim = f"{tmpl['metadata']['name']}-{name}"
                    if self._standin.get_object("v1", "PersistentVolumeClaim", ns, claim) is None:
                        labels = dict((spec.get("selector") or {}).get("matchLabels") or {})
                        self._standin.put(
                            {
                                "apiVersion": "v1",
                                "kind": "PersistentVolumeClaim",
                                "metadata": {"name": claim, "namespace": ns, "labels": labels},
                                "spec": copy.deepcopy(tmpl.get("spec") or {}),
                            }
                        )
                claims = [
                    {
                        "name": t["metadata"]["name"],
                        "persistentVolumeClaim": {"claimName": f"{t['metadata']['name']}-{name}"},
                    }
                    for t in spec.get("volumeClaimTemplates") or ()
                ]
                tmpl_spec = template.get("spec") or {}
                extra = {
                    "hostname": name,
                    "subdomain": spec.get("serviceName", ""),
                    "volumes": [*(tmpl_spec.get("volumes") or []), *claims],
                }
                labels = {
                    "statefulset.kubernetes.io/pod-name": name,
                    "apps.kubernetes.io/pod-index": str(i),
                    "controller-revision-hash": revision,
                }
                self._create_pod(sts, name, template, labels, extra)
                if ordered:
                    break
            elif ordered and not pod.ready:
                break
        for name, pod in pods.items():
            ordinal = name.rsplit("-", 1)[-1]
            if ordinal.isdigit() and int(ordinal) >= desired:
                self._delete_pod(pod)
                if ordered:
                    break
        current = [
            p for p in pods.values() if p.obj["metadata"].get("labels", {}).get("controller-revision-hash") == revision
        ]
        in_range = [
            p for n, p in pods.items() if n.rsplit("-", 1)[-1].isdigit() and int(n.rsplit("-", 1)[-1]) < desired
        ]
        if len(in_range) == desired and all(p.ready for p in in_range):
            stale = [p for p in in_range if p not in current]
            if stale and (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate":
                self._delete_pod(max(stale, key=lambda p: int(p.name.rsplit("-", 1)[-1])))
        ready = sum(1 for p in pods.values() if p.ready)
        status = {
            "observedGeneration": md.get("generation", 1),
            "replicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": len(current),
            "updatedReplicas": len(current),
            "currentRevision": revision,
            "updateRevision": revision,
            "collisionCount": 0,
        }
        self._standin.put_status("StatefulSet", ns, md["name"], status)

    # ---------------------------------------------------------------- Services, endpoints, DNS

    def _sync_services(self) -> None:
        standin = self._standin
        assert standin is not None and self.net is not None and self.proxy is not None
        services = standin.objects("Service")
        keys = {(s["metadata"].get("namespace", "default"), s["metadata"]["name"]) for s in services}
        for key in set(self._service_ips) - keys:
            del self._service_ips[key]
        listeners: dict[tuple[str, int], list[tuple[str, int]]] = {}
        dns: list[tuple[str, str, str]] = []  # (ip, namespace, service-or-pod name parts)
        for svc in services:
            md, spec = svc["metadata"], svc.get("spec") or {}
            ns = md.get("namespace", "default")
            headless = spec.get("clusterIP") == "None"
            selector = spec.get("selector")
            backends = []
            if selector:
                backends = [
                    p
                    for p in self._pods.values()
                    if p.namespace == ns
                    and not p.deleted
                    and all((p.obj["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
                ]
            ready = [p for p in backends if p.ready or (spec.get("publishNotReadyAddresses") and p.phase == "Running")]
            # Without a selector the backends are whatever the user's Endpoints object of the same name lists (how a
            # cluster names an outside address, e.g. an external database); with one, the ready pods.
            manual = None if selector else self._manual_endpoints(ns, md["name"], spec.get("ports") or [])
            if headless:
                for p in ready:
                    dns.append((p.ip, ns, md["name"]))
                for address in sorted({a for ends in (manual or {}).values() for a, _ in ends}):
                    dns.append((address, ns, md["name"]))
            else:
                ip = self._service_ips.get((ns, md["name"]))
                if ip is None:
                    ip = self._service_ips[(ns, md["name"])] = self.net.service_ip()
                self._record_cluster_ip(ns, md["name"], ip)
                dns.append((ip, ns, md["name"]))
                for port in spec.get("ports") or ():
                    if port.get("protocol", "TCP") != "TCP":
                        continue
                    ends = []
                    if manual is not None:
                        ends = manual.get(int(port["port"]), [])
                    else:
                        target = port.get("targetPort", port["port"])
                        for p in ready:
                            with contextlib.suppress(ValueError):
                                ends.append((p.ip, p.resolve_port(target)))
                    listeners[(ip, int(port["port"]))] = ends
            if selector:
                self._write_endpoints(svc, backends)
        self.proxy.set_listeners(listeners)
        proxy_errors, self.proxy.errors = self.proxy.errors, []
        self.errors += proxy_errors
        self._dns = dns
        for pod in list(self._pods.values()):
            write_in_place(pod.hosts_path, self.hosts_for(pod))

    def _manual_endpoints(self, ns: str, name: str, ports: list[Mapping[str, Any]]) -> dict[int, list[tuple[str, int]]]:
        """Backends of a selectorless Service by its port: each subset's ready ``addresses`` x the subset port of the
        same ``name`` (an unnamed single port pairs with the subset's only port); ``notReadyAddresses`` are skipped."""
        assert self._standin is not None
        endpoints = self._standin.get_object("v1", "Endpoints", ns, name) or {}
        out: dict[int, list[tuple[str, int]]] = {}
        for subset in endpoints.get("subsets") or ():
            addresses = [a["ip"] for a in subset.get("addresses") or () if a.get("ip")]
            subset_ports = subset.get("ports") or []
            for port in ports:
                match = [sp for sp in subset_ports if sp.get("name", "") == port.get("name", "")]
                if not match and len(ports) == 1 and len(subset_ports) == 1:
                    match = subset_ports
                for sp in match[:1]:
                    out.setdefault(int(port["port"]), []).extend((a, int(sp["port"])) for a in addresses)
        return out

    def _record_cluster_ip(self, ns: str, name: str, ip: str) -> None:
        """Write the allocated address into ``spec.clusterIP``/``clusterIPs`` as the API server's allocator does, so
        clients read it from the Service (``kubectl get svc``); a Service that names an address keeps it."""
        standin = self._standin
        assert standin is not None
        with standin._lock:  # read-modify-write against concurrent applies
            svc = standin.get_object("v1", "Service", ns, name)
            if svc is None or (svc.get("spec") or {}).get("clusterIP"):
                return
            svc["spec"]["clusterIP"] = ip
            svc["spec"]["clusterIPs"] = [ip]
            standin.put(svc, manager="kube-apiserver")

    def hosts_for(self, pod: _Pod) -> str:
        entries: list[tuple[str, str]] = []
        if self.api_host:
            entries.append(
                (
                    self.api_host,
                    f"kubernetes kubernetes.default kubernetes.default.svc kubernetes.default.svc.{CLUSTER_DOMAIN}",
                )
            )
        for ip, ns, name in getattr(self, "_dns", []):
            names = [f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", f"{name}.{ns}.svc"]
            if ns == pod.namespace:
                names += [name, f"{name}.{ns}"]
            else:
                names.append(f"{name}.{ns}")
            entries.append((ip, " ".join(names)))
        for other in self._pods.values():
            sub = other.spec.get("subdomain")
            if sub and other.ready and other is not pod:
                host = other.spec.get("hostname") or other.name
                entries.append(
                    (
                        other.ip,
                        f"{host}.{sub}.{other.namespace}.svc.{CLUSTER_DOMAIN} {host}.{sub}.{other.namespace}.svc",
                    )
                )
        host = pod.spec.get("hostname") or pod.name
        own = [host]
        if pod.spec.get("subdomain"):
            own.insert(0, f"{host}.{pod.spec['subdomain']}.{pod.namespace}.svc.{CLUSTER_DOMAIN}")
        return hosts_text(pod.ip, own, entries)

    def _write_endpoints(self, svc: Mapping[str, Any], backends: list[_Pod]) -> None:
        assert self._standin is not None
        md, spec = svc["metadata"], svc.get("spec") or {}
        ns = md.get("namespace", "default")

        def address(p: _Pod) -> dict[str, Any]:
            ref = {"kind": "Pod", "namespace": p.namespace, "name": p.name, "uid": p.uid}
            return {"ip": p.ip, "nodeName": NODE_NAME, "targetRef": ref}

        ports = []
        for port in spec.get("ports") or ():
            target = port.get("targetPort", port["port"])
            resolved = int(target) if str(target).isdigit() else None
            for p in backends:
                with contextlib.suppress(ValueError):
                    resolved = p.resolve_port(target)
                    break
            if resolved is not None:
                entry = {"port": resolved, "protocol": port.get("protocol", "TCP")}
                if port.get("name"):
                    entry["name"] = port["name"]
                ports.append(entry)
        subset: dict[str, Any] = {}
        ready = sorted((p for p in backends if p.ready), key=lambda p: p.ip)
        not_ready = sorted((p for p in backends if not p.ready), key=lambda p: p.ip)
        if ready:
            subset["addresses"] = [address(p) for p in ready]
        if not_ready:
            subset["notReadyAddresses"] = [address(p) for p in not_ready]
        body = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": md["name"], "namespace": ns, "labels": dict(md.get("labels") or {})},
            "subsets": [{**subset, "ports": ports}] if subset and ports else [],
        }
        current = self._standin.get_object("v1", "Endpoints", ns, md["name"])
        if current is None or current.get("subsets") != body["subsets"]:
            self._standin.put(body)
