"""The API stand-in's pod runner: pods really run (bubblewrap sandboxes), Services route to ready pods, controllers
write the statuses. Tiny ``python3 -c`` programs in the pods keep these fast; one test runs the registry image."""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing.pods import PodRunner, bwrap_path

REPO = Path(__file__).resolve().parents[3]
NS = "pods"

if bwrap_path() is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("bubblewrap (bwrap) is missing on CI: .ci/run installs the Debian package bubblewrap")
    pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap", allow_module_level=True)


@pytest.fixture
def standin():
    with KubeApiStandIn(pods=PodRunner()) as s:
        yield s


def api(s: KubeApiStandIn, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(s.url + path, method=method, data=data, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
        return json.loads(raw) if "json" in resp.headers["Content-Type"] else raw.decode()


def create(s: KubeApiStandIn, obj: dict[str, Any]) -> dict[str, Any]:
    kind, version = obj["kind"], obj["apiVersion"]
    plural = {"ConfigMap": "configmaps", "PersistentVolumeClaim": "persistentvolumeclaims"}.get(
        kind, kind.lower() + "s"
    )
    prefix = f"/api/{version}" if "/" not in version else f"/apis/{version}"
    obj.setdefault("metadata", {}).setdefault("namespace", NS)
    return api(s, "POST", f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}", obj)


def job(name: str, script: str, *, backoff: int = 0, **container: Any) -> dict[str, Any]:
    pod_spec = container.pop("pod_spec", {})
    c = {"name": "main", "image": "python:3.11-slim-bookworm", "command": ["python3", "-c", script], **container}
    spec = {"restartPolicy": "Never", "containers": [c], **pod_spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff, "template": {"spec": spec}},
    }


def job_status(s: KubeApiStandIn, name: str) -> dict[str, Any]:
    return (s.get_object("batch/v1", "Job", NS, name) or {}).get("status") or {}


def finished(s: KubeApiStandIn, name: str, timeout: float = 30) -> str:
    """The type of the Job's final condition (Complete or Failed)."""
    assert s.pods is not None

    def done() -> str | None:
        for c in job_status(s, name).get("conditions") or ():
            if c["type"] in ("Complete", "Failed") and c["status"] == "True":
                return str(c["type"])
        return None

    return str(s.pods.wait_for(done, timeout, f"job {name} to finish"))


def expect_complete(s: KubeApiStandIn, name: str) -> None:
    assert s.pods is not None
    assert finished(s, name) == "Complete", s.pods.describe()


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}


def pvc(name: str) -> dict[str, Any]:
    spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


# --------------------------------------------------------------------------- sandbox, env, volumes


def test_sandbox_sees_only_the_install_and_its_volumes(standin, tmp_path):
    host_file = tmp_path / "host-secret.txt"
    host_file.write_text("not for pods")
    script = f"""
import os, sys, neuroweaver_kube
checks = {{
    "host tmp file hidden": not os.path.exists({str(host_file)!r}),
    "host /tmp hidden": not os.path.exists({str(tmp_path)!r}),
    "repo data hidden": not os.path.exists({str(REPO / ".data")!r}) and not os.path.exists({str(REPO / "README.md")!r}),
    "venv source visible": neuroweaver_kube.__file__.startswith({str(REPO / "libs")!r}),
    "runs as 10001": os.getuid() == 10001,
    "root read-only": not os.access("/", os.W_OK),
    "emptyDir writable": open("/scratch/x", "w").write("1") == 1,
}}
print(checks)
sys.exit(0 if all(checks.values()) else 1)
"""
    spec = job(
        "sandbox",
        script,
        securityContext={"runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True},
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
        pod_spec={"volumes": [{"name": "scratch", "emptyDir": {}}]},
    )
    create(standin, spec)
    expect_complete(standin, "sandbox")


def test_env_and_files_from_secrets_configmaps_and_downward_api(standin):
    create(standin, secret("creds", {"password": "s3cret", "token.json": '{"t": 1}'}))
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"level": "debug", "x": "y"}}
    create(standin, cm)
    script = """
import os, stat, sys
e = os.environ
mode = stat.S_IMODE(os.stat("/etc/creds/auth.json").st_mode)
checks = {
    "secret env": e["PASSWORD"] == "s3cret",
    "configmap env": e["LEVEL"] == "debug",
    "envFrom prefix": e["CFG_x"] == "y",
    "pod name": e["POD_NAME"] == open("/etc/hostname").read().strip() == e["HOSTNAME"],
    "namespace": e["POD_NAMESPACE"] == "pods",
    "pod ip": e["POD_IP"].startswith("127.") and e["POD_IP"] != "127.0.0.1",
    "expansion": e["URL"] == "http://" + e["POD_IP"] + ":80",
    "optional missing": "MISSING" not in e,
    "secret item file": open("/etc/creds/auth.json").read() == '{"t": 1}',
    "only listed keys": os.listdir("/etc/creds") == ["auth.json"],
    "defaultMode": mode == 0o440,
    "service account": open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read() == "pods",
    "api server env": e["KUBERNETES_SERVICE_HOST"].startswith("127."),
}
print(checks)
sys.exit(0 if all(checks.values()) else 1)
"""
    env = [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}}},
        {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": True}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "URL", "value": "http://$(POD_IP):80"},
    ]
    volume = {
        "name": "creds",
        "secret": {"secretName": "creds", "defaultMode": 0o440, "items": [{"key": "token.json", "path": "auth.json"}]},
    }
    spec = job(
        "env",
        script,
        env=env,
        envFrom=[{"prefix": "CFG_", "configMapRef": {"name": "cfg"}}],
        volumeMounts=[{"name": "creds", "mountPath": "/etc/creds", "readOnly": True}],
        pod_spec={"volumes": [volume]},
    )
    create(standin, spec)
    expect_complete(standin, "env")


def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(standin):
    env = [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "later", "key": "p"}}}]
    create(standin, job("waits", "import os, sys; sys.exit(0 if os.environ['P'] == 'ok' else 1)", env=env))
    standin.pods.wait_for(
        lambda: any(
            (c.get("state") or {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
            for p in standin.objects("Pod", NS)
            for c in (p.get("status") or {}).get("containerStatuses") or ()
        ),
        20,
        "CreateContainerConfigError",
    )
    create(standin, secret("later", {"p": "ok"}))
    expect_complete(standin, "waits")


def test_a_claim_is_shared_between_pods(standin):
    create(standin, pvc("shared"))
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    volumes = {"pod_spec": {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]}}
    create(standin, job("writer", "open('/data/note', 'w').write('from the writer')", **mount, **volumes))
    expect_complete(standin, "writer")
    script = "import sys; sys.exit(0 if open('/data/note').read() == 'from the writer' else 1)"
    create(standin, job("reader", script, **mount, **volumes))
    expect_complete(standin, "reader")
    claim = standin.get_object("v1", "PersistentVolumeClaim", NS, "shared")
    assert claim["status"]["phase"] == "Bound"


# --------------------------------------------------------------------------- Jobs


def test_job_status_follows_the_exit_code(standin):
    create(standin, job("ok", "print('done')"))
    create(standin, job("bad", "import sys; sys.exit(3)", backoff=1))
    expect_complete(standin, "ok")
    assert job_status(standin, "ok")["succeeded"] == 1
    assert finished(standin, "bad") == "Failed"
    status = job_status(standin, "bad")
    assert status["failed"] == 2  # the first try and one retry (backoffLimit 1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    pods = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3Dbad")["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    log = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods/{pods[0]['metadata']['name']}/log")
    assert log == ""
    ok_pod = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3Dok")["items"][0]
    assert api(standin, "GET", f"/api/v1/namespaces/{NS}/pods/{ok_pod['metadata']['name']}/log") == "done\n"


def test_pod_logs_keep_line_times_and_serve_the_kubelets_query(standin):
    """Each line is kept with the time it was read; KubeClient reads it back as the kubelet serves it: `timestamps`,
    `sinceTime` (whole seconds), `tailLines`, then `limitBytes`; a container not started yet is a 400."""
    import asyncio

    from neuroweaver_kube import KubeClient

    create(standin, job("talk", "import sys, time\nfor i in range(3): print('line', i, flush=True); time.sleep(0.3)\n"
                                "sys.stdout.write('no line end')"))  # fmt: skip
    expect_complete(standin, "talk")
    client = KubeClient.from_config(host=standin.url)

    async def read(**kw):
        pod = (await client.list_pods(NS, "job-name=talk"))[0]["metadata"]["name"]
        return (await client.read_pod_log(NS, pod, container="main", **kw)).decode()

    try:
        assert asyncio.run(read()) == "line 0\nline 1\nline 2\nno line end\n"
        stamped = asyncio.run(read(timestamps=True)).splitlines()
        stamps = [line.split(" ", 1)[0] for line in stamped]
        assert [line.split(" ", 1)[1] for line in stamped] == ["line 0", "line 1", "line 2", "no line end"]
        assert stamps == sorted(stamps) and all(len(s) == 30 and s.endswith("Z") for s in stamps)
        assert asyncio.run(read(tail_lines=2)) == "line 2\nno line end\n"
        assert asyncio.run(read(tail_lines=2, limit_bytes=9)) == "line 2\nno"
        since = stamps[2][:19] + "Z"  # the lines of line 2's second and after
        assert asyncio.run(read(since_time=since)).endswith("line 2\nno line end\n")
        assert asyncio.run(read(since_time="2999-01-01T00:00:00Z")) == ""
    finally:
        client.close()
    create(standin, job("never", "print('x')", image="unknown.example/never:1"))
    runner = standin.pods
    pod = runner.wait_for(lambda: [p for p in runner.pods(NS) if "never" in p["metadata"]["name"]], 10, "a pod")
    with pytest.raises(urllib.error.HTTPError) as exc:
        api(standin, "GET", f"/api/v1/namespaces/{NS}/pods/{pod[0]['metadata']['name']}/log")
    body = json.loads(exc.value.read())
    assert exc.value.code == 400 and "is waiting to start" in body["message"]


def test_a_killed_job_pod_fails_with_137_and_is_replaced_until_the_backoff_limit(standin):
    create(standin, job("victim", "import time; time.sleep(600)", backoff=1))
    runner = standin.pods

    def running_pods() -> list[str]:
        return [
            p["metadata"]["name"]
            for p in standin.objects("Pod", NS)
            if (p.get("status") or {}).get("phase") == "Running"
        ]

    first = runner.wait_for(running_pods, 20, "the Job's pod to run")[0]
    runner.kill_container(NS, first)  # SIGKILL, as the OOM killer would
    second = runner.wait_for(lambda: [n for n in running_pods() if n != first], 20, "a replacement pod")[0]
    killed = standin.get_object("v1", "Pod", NS, first)
    assert killed["status"]["phase"] == "Failed"
    assert killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert job_status(standin, "victim")["failed"] == 1
    api(standin, "DELETE", f"/api/v1/namespaces/{NS}/pods/{second}")  # a deleted pod that had not succeeded fails
    assert finished(standin, "victim") == "Failed"
    assert job_status(standin, "victim")["failed"] == 2


_STOPS_SLOWLY = """
import os, signal, sys, time
name = os.environ["POD_NAME"]
log = lambda what: open("/data/log", "a").write(f"{what} {name}\\n")
def stop(*_):
    time.sleep(1.5)  # a training step finishing its checkpoint
    log("end")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
log("start")
time.sleep(600)
"""


@pytest.mark.parametrize("policy", ["Failed", "TerminatingOrFailed"])
def test_pod_replacement_policy_decides_whether_a_replacement_waits_for_the_deleted_pod(standin, policy):
    """podReplacementPolicy Failed (what training Jobs use): the replacement starts after the old pod has stopped;
    the default starts it while the old one is still terminating."""
    create(standin, pvc(f"log-{policy.lower()}"))
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    env = {"env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}
    volumes = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": f"log-{policy.lower()}"}}]}
    obj = job("slow-stop", _STOPS_SLOWLY, backoff=2, pod_spec=volumes, **mount, **env)
    obj["spec"]["podReplacementPolicy"] = policy
    create(standin, obj)
    runner = standin.pods
    log = runner.claim_dir(NS, f"log-{policy.lower()}") / "log"

    def lines() -> list[str]:
        return log.read_text().split() if log.exists() else []

    runner.wait_for(lambda: len(lines()) >= 2, 20, "the first pod to start")
    first = lines()[1]
    api(standin, "DELETE", f"/api/v1/namespaces/{NS}/pods/{first}")
    runner.wait_for(lambda: lines().count("start") == 2 and lines().count("end") == 1, 30, "a replacement pod")
    words = lines()
    events = [f"{what} {'old' if who == first else 'new'}" for what, who in zip(words[::2], words[1::2], strict=True)]
    if policy == "Failed":
        assert events == ["start old", "end old", "start new"], events
    else:
        assert events == ["start old", "start new", "end old"], events


def test_init_containers_run_first_and_a_failed_one_fails_the_pod(standin):
    scratch = {"volumes": [{"name": "work", "emptyDir": {}}]}
    init = {
        "name": "prepare",
        "image": "python:3.11-slim-bookworm",
        "command": ["python3", "-c", "open('/work/prepared', 'w').write('by init')"],
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
    }
    check = "import sys; sys.exit(open('/work/prepared').read() != 'by init')"
    mount = [{"name": "work", "mountPath": "/work"}]
    create(standin, job("with-init", check, volumeMounts=mount, pod_spec={**scratch, "initContainers": [init]}))
    expect_complete(standin, "with-init")
    (pod,) = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3Dwith-init")["items"]
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Initialized"] == "True"

    broken = {**init, "command": ["python3", "-c", "raise SystemExit(2)"]}
    spec = job(
        "broken-init", "print('never runs')", volumeMounts=mount, pod_spec={**scratch, "initContainers": [broken]}
    )
    create(standin, spec)
    assert finished(standin, "broken-init") == "Failed"
    (pod,) = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3Dbroken-init")["items"]
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 2
    assert "running" not in pod["status"]["containerStatuses"][0]["state"]
    assert "never runs" not in standin.pods.pod_log(NS, pod["metadata"]["name"])


# --------------------------------------------------------------------------- Services, probes, Deployments

# An HTTP server on the pod's address that answers "<pod name> <VERSION>", is ready while /shared/ready-<pod>
# exists (when the test asks for that), and on SIGTERM keeps serving 1.5 s, then finishes the requests in flight
# before it exits (what a preStop hook and a graceful server do, so connections the proxy opened just before the
# pod left its Service complete).
SERVER = """
import http.server, os, signal, sys, threading, time
name, version = os.environ["HOSTNAME"], os.environ.get("VERSION", "v1")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/ready" and os.environ.get("GATED") and not os.path.exists("/shared/ready-" + name):
            self.send_response(503); self.end_headers(); return
        body = f"{name} {version}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), H)
srv.daemon_threads = False  # server_close() waits for requests in flight
def stop(*_):
    print("draining", flush=True)
    threading.Thread(target=lambda: (time.sleep(1.5), srv.shutdown())).start()
signal.signal(signal.SIGTERM, stop)
print("serving", name, version, flush=True)
srv.serve_forever()
srv.server_close()
"""


def web_deployment(name: str, replicas: int, *, gated: bool = False, version: str = "v1") -> dict[str, Any]:
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "VERSION", "value": version},
    ]
    if gated:
        env.append({"name": "GATED", "value": "1"})
    container = {
        "name": "web",
        "image": "python:3.11-slim-bookworm",
        "command": ["python3", "-c", SERVER],
        "env": env,
        "ports": [{"name": "http", "containerPort": 8080}],
        # failureThreshold and timeoutSeconds leave room for a busy machine: a replica that misses one probe
        # must not leave the Service (with every replica out of it, a request would fail)
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 1,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}}],
                },
            },
        },
    }


def service(name: str, *, headless: bool = False, port: int = 80, target: Any = "http") -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app": name}, "ports": [{"name": "p", "port": port, "targetPort": target}]}
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name + ("-headless" if headless else "")},
        "spec": spec,
    }


def get_via(ip: str, port: int = 80) -> str | None:
    """One request on a new connection through the Service's proxy; None when it fails."""
    conn = http.client.HTTPConnection(ip, port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.read().decode() if resp.status == 200 else None
    except (OSError, http.client.HTTPException) as e:
        LAST_ERRORS.append(f"{time.monotonic():.3f} {e!r}")
        return None
    finally:
        conn.close()


LAST_ERRORS: list[str] = []


def deployment_status(s: KubeApiStandIn, name: str) -> dict[str, Any]:
    return (s.get_object("apps/v1", "Deployment", NS, name) or {}).get("status") or {}


def test_readiness_gates_service_routing(standin):
    create(standin, pvc("shared"))
    create(standin, web_deployment("gated", 2, gated=True))
    create(standin, service("gated"))
    runner = standin.pods
    pods = runner.wait_for(
        lambda: (
            (p := standin.objects("Pod", NS)) and len(p) == 2 and all(x.get("status", {}).get("podIP") for x in p) and p
        ),
        20,
        "two pods",
    )
    ip = runner.wait_for(lambda: runner.service_ip(NS, "gated"), 10, "the Service's address")
    assert get_via(ip) is None  # no ready endpoint: the proxy closes the connection
    first = pods[0]["metadata"]["name"]
    (runner.claim_dir(NS, "shared") / f"ready-{first}").touch()
    runner.wait_for(lambda: deployment_status(standin, "gated").get("readyReplicas") == 1, 20, "one ready replica")
    answers = {get_via(ip) for _ in range(8)}
    assert answers == {f"{first} v1"}, runner.describe()
    endpoints = standin.get_object("v1", "Endpoints", NS, "gated")
    subset = endpoints["subsets"][0]
    assert [a["targetRef"]["name"] for a in subset["addresses"]] == [first]
    assert len(subset["notReadyAddresses"]) == 1
    second = pods[1]["metadata"]["name"]
    (runner.claim_dir(NS, "shared") / f"ready-{second}").touch()
    runner.wait_for(lambda: deployment_status(standin, "gated").get("readyReplicas") == 2, 20, "two ready replicas")
    answers = {get_via(ip) for _ in range(8)}
    assert answers == {f"{first} v1", f"{second} v1"}
    status = deployment_status(standin, "gated")
    assert status["availableReplicas"] == 2
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Available": "True", "Progressing": "True"}


def test_liveness_failure_restarts_the_container(standin):
    create(standin, pvc("shared"))
    alive = standin.pods.claim_dir(NS, "shared") / "alive"
    alive.touch()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "lively"},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim-bookworm",
                    "command": ["python3", "-c", "import time; print('started', flush=True); time.sleep(600)"],
                    "livenessProbe": {
                        "exec": {"command": ["test", "-f", "/shared/alive"]},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                    "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                }
            ],
            "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}}],
        },
    }
    create(standin, pod)

    def container() -> dict[str, Any]:
        obj = standin.get_object("v1", "Pod", NS, "lively") or {}
        return ((obj.get("status") or {}).get("containerStatuses") or [{}])[0]

    standin.pods.wait_for(lambda: container().get("ready"), 20, "the pod to run")
    alive.unlink()
    standin.pods.wait_for(lambda: container().get("restartCount", 0) >= 1, 30, "a restart after liveness failures")
    alive.touch()
    standin.pods.wait_for(lambda: "running" in container().get("state", {}), 20, "the container to run again")
    standin.pods.wait_for(lambda: standin.pods.pod_log(NS, "lively").count("started") >= 2, 20, "a second start")
    assert container()["lastState"]["terminated"]["reason"] == "Error"


def test_rolling_update_serves_every_request_through_the_service(standin):
    create(standin, pvc("shared"))
    create(standin, web_deployment("web", 2))
    create(standin, service("web"))
    runner = standin.pods
    runner.wait_for(lambda: deployment_status(standin, "web").get("availableReplicas") == 2, 30, "two replicas")
    ip = runner.service_ip(NS, "web")
    failures: list[int] = []
    answers: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set() and i < 5000:  # bounded
            i += 1
            answer = get_via(ip)
            if answer is None:
                failures.append(i)
            else:
                answers.append(answer)

    client = threading.Thread(target=load)
    client.start()
    try:
        runner.wait_for(lambda: len(answers) > 20, 20, "traffic before the rollout")
        old_pods = {p["metadata"]["name"] for p in standin.objects("Pod", NS)}
        patch = {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {**web_deployment("web", 2, version="v2")["spec"]["template"]["spec"]["containers"][0]}
                        ]
                    }
                }
            }
        }
        api(standin, "PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/web", patch, "application/merge-patch+json")

        def rolled_out() -> bool:
            st = deployment_status(standin, "web")
            names = {p["metadata"]["name"] for p in standin.objects("Pod", NS)}
            return (
                st.get("updatedReplicas") == 2
                and st.get("availableReplicas") == 2
                and st.get("replicas") == 2
                and not names & old_pods
            )

        runner.wait_for(rolled_out, 60, "the rollout")
        mark = len(answers)
        runner.wait_for(lambda: len(answers) > mark + 20, 20, "traffic after the rollout")
    finally:
        stop.set()
        client.join()
    assert failures == [], (
        f"{LAST_ERRORS} {len(failures)} failed requests of {len(answers) + len(failures)}\n{runner.describe()}"
    )
    assert answers[0].endswith(" v1") and answers[-1].endswith(" v2")
    assert all(a.endswith(" v2") for a in answers[-10:])
    status = deployment_status(standin, "web")
    assert status["observedGeneration"] == 2
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "NewReplicaSetAvailable"


def test_deleting_a_pod_starts_a_replacement(standin):
    create(standin, pvc("shared"))
    create(standin, web_deployment("phoenix", 1))
    create(standin, service("phoenix"))
    runner = standin.pods
    runner.wait_for(lambda: deployment_status(standin, "phoenix").get("readyReplicas") == 1, 20, "a ready replica")
    (victim,) = standin.objects("Pod", NS)
    name = victim["metadata"]["name"]
    api(standin, "DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
    replacement = runner.wait_for(
        lambda: [
            p
            for p in standin.objects("Pod", NS)
            if p["metadata"]["name"] != name
            and (p.get("status") or {}).get("conditions")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
        ],
        30,
        "a ready replacement",
    )[0]
    assert get_via(runner.service_ip(NS, "phoenix")) == f"{replacement['metadata']['name']} v1"
    # the deleted pod got SIGTERM (its handler ran: a graceful stop), then its process ended
    runner.wait_for(lambda: "draining" in runner.pod_log(NS, name), 10, "the victim's SIGTERM handler")
    runner.wait_for(lambda: get_via(victim["status"]["podIP"], 8080) is None, 10, "the victim's process to end")


def test_scale_subresource_changes_the_pod_count(standin):
    create(standin, pvc("shared"))
    create(standin, web_deployment("scaled", 1))
    runner = standin.pods
    runner.wait_for(lambda: deployment_status(standin, "scaled").get("readyReplicas") == 1, 20, "one replica")
    scale = {"spec": {"replicas": 3}}
    api(
        standin,
        "PATCH",
        f"/apis/apps/v1/namespaces/{NS}/deployments/scaled/scale",
        scale,
        "application/merge-patch+json",
    )
    runner.wait_for(lambda: deployment_status(standin, "scaled").get("readyReplicas") == 3, 30, "three replicas")
    api(
        standin,
        "PATCH",
        f"/apis/apps/v1/namespaces/{NS}/deployments/scaled/scale",
        {"spec": {"replicas": 1}},
        "application/merge-patch+json",
    )
    runner.wait_for(lambda: len(standin.objects("Pod", NS)) == 1, 30, "one pod left")


# --------------------------------------------------------------------------- DNS

GRPC_SERVER = """
import grpc, os, signal, threading
from concurrent import futures
ip = os.environ["POD_IP"]
server = grpc.server(futures.ThreadPoolExecutor(4))
who = grpc.unary_unary_rpc_method_handler(lambda request, context: ip.encode())
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Who", {"Ask": who}),))
from grpc_health.v1 import health, health_pb2_grpc
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "" is SERVING
server.add_insecure_port(ip + ":50051")
server.start()
print("serving on", ip, flush=True)
server.wait_for_termination()
"""

GRPC_CLIENT = """
import grpc, json, socket, sys
name = "who-headless"
addresses = sorted({a[4][0] for a in socket.getaddrinfo(name, 50051, type=socket.SOCK_STREAM)})
config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
target = f"dns:///{name}.pods.svc.cluster.local:50051"
channel = grpc.insecure_channel(target, options=[("grpc.service_config", config)])
ask = channel.unary_unary("/t.Who/Ask")
answered = sorted({ask(b"", timeout=10).decode() for _ in range(20)})
print(json.dumps({"addresses": addresses, "answered": answered}))
sys.exit(0 if len(addresses) == 2 and answered == addresses else 1)
"""


def test_a_headless_service_resolves_to_every_ready_pod(standin):
    container = {
        "name": "who",
        "image": "python:3.11-slim-bookworm",
        "command": ["python3", "-c", GRPC_SERVER],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "grpc", "containerPort": 50051}],
        "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 1},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "who"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "who"}},
            "template": {"metadata": {"labels": {"app": "who"}}, "spec": {"containers": [container]}},
        },
    }
    create(standin, deployment)
    create(standin, service("who", headless=True, port=50051, target="grpc"))
    standin.pods.wait_for(lambda: deployment_status(standin, "who").get("readyReplicas") == 2, 30, "two replicas")
    create(standin, job("client", GRPC_CLIENT))
    expect_complete(standin, "client")
    pod = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3Dclient")["items"][0]
    result = json.loads(standin.pods.pod_log(NS, pod["metadata"]["name"]))
    ready_ips = sorted(
        p["status"]["podIP"] for p in standin.objects("Pod", NS) if p["metadata"]["labels"].get("app") == "who"
    )
    assert result["addresses"] == ready_ips


# --------------------------------------------------------------------------- a real NeuroWeaver image


def _registry_objects(tokens: str) -> list[dict[str, Any]]:
    """The registry's objects from deploy/kubernetes/base, as shipped (it binds the pod IP from the downward API),
    plus the Secrets and ConfigMap an overlay provides; one replica and SQLite on its emptyDir keep it small."""
    docs = [d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/base/registry.yaml").read_text()) if d]
    docs = [d for d in docs if d["kind"] in ("ServiceAccount", "Service", "Deployment")]
    for d in docs:
        d["metadata"]["namespace"] = NS
        if d["kind"] == "Deployment":
            d["spec"]["replicas"] = 1
    auth = secret("neuroweaver-auth", {"auth-tokens.json": tokens, "page-token-secret": "pts"})
    database = secret("neuroweaver-database", {"registry-url": "sqlite+aiosqlite:////var/lib/neuroweaver/registry.db"})
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "neuroweaver-config"},
        "data": {"log-level": "INFO"},
    }
    return [auth, database, config, *docs]


def test_the_registry_image_serves_behind_its_service(standin):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tokens = json.dumps({"tokens": [{"token": "t0ken", "project": "*", "role": "admin", "subject": "tester"}]})
    for obj in _registry_objects(tokens):
        create(standin, obj)
    runner = standin.pods
    try:
        runner.wait_for(
            lambda: deployment_status(standin, "neuroweaver-registry").get("availableReplicas") == 1,
            40,
            "the registry to be ready",
        )
    except TimeoutError as e:
        pytest.fail(str(e))
    ip = runner.service_ip(NS, "neuroweaver-registry")
    with grpc.insecure_channel(f"{ip}:50051") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="neuroweaver.registry.v1.RegistryService"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://{ip}:9451/metrics", timeout=10) as resp:
        assert b"grpc_server_handled_total" in resp.read()
    (pod,) = standin.objects("Pod", NS)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    log = runner.pod_log(NS, pod["metadata"]["name"])
    assert f"listening on {pod['status']['podIP']}:50051" in log, log


def test_stopping_the_standin_leaves_no_process():
    mark = f"standin-leak-check-{uuid.uuid4().hex}"
    with KubeApiStandIn(pods=PodRunner()) as s:
        create(
            s, job("sleeper", f"import subprocess, time; subprocess.Popen(['sleep', '600', '{mark}']); time.sleep(600)")
        )
        s.pods.wait_for(lambda: _processes_with(mark), 20, "the sleeper and its child to run")
    assert _processes_with(mark) == []


def _processes_with(mark: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_the_official_client_works_in_cluster_from_a_pod(standin):
    # load_incluster_config: KUBERNETES_SERVICE_HOST/PORT, the service-account token and ca.crt (HTTPS listener)
    script = """
from kubernetes import client, config
config.load_incluster_config()
names = [p.metadata.name for p in client.CoreV1Api().list_namespaced_pod("pods").items]
print(names)
assert any(n.startswith("incluster-") for n in names), names
"""
    create(standin, job("incluster", script))
    expect_complete(standin, "incluster")


def test_statefulset_pods_keep_their_names_claims_and_dns(standin):
    script = (
        "import os, pathlib, time; p = pathlib.Path('/data/history');"
        "p.write_text(p.read_text() + os.environ['HOSTNAME'] + ' ' if p.exists() else os.environ['HOSTNAME'] + ' ');"
        "print(p.read_text(), flush=True); time.sleep(600)"
    )
    container = {
        "name": "db",
        "image": "python:3.11-slim-bookworm",
        "command": ["python3", "-c", script],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    claim = {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 2,
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [container]}},
            "volumeClaimTemplates": [claim],
        },
    }
    create(
        standin,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]},
        },
    )
    create(standin, sts)
    runner = standin.pods

    def sts_ready() -> bool:
        return ((standin.get_object("apps/v1", "StatefulSet", NS, "db") or {}).get("status") or {}).get(
            "readyReplicas"
        ) == 2

    runner.wait_for(sts_ready, 20, "two ready pods")
    pods = {p["metadata"]["name"]: p for p in standin.objects("Pod", NS)}
    assert set(pods) == {"db-0", "db-1"}
    assert standin.get_object("v1", "PersistentVolumeClaim", NS, "data-db-0") is not None
    ip0 = pods["db-0"]["status"]["podIP"]
    check = f"import socket, sys; sys.exit(socket.gethostbyname('db-0.db.pods.svc.cluster.local') != {ip0!r})"
    create(standin, job("resolve", check))
    expect_complete(standin, "resolve")
    api(standin, "DELETE", f"/api/v1/namespaces/{NS}/pods/db-0")
    runner.wait_for(
        lambda: (
            (p := standin.get_object("v1", "Pod", NS, "db-0"))
            and p["metadata"]["uid"] != pods["db-0"]["metadata"]["uid"]
            and "db-0 db-0" in runner.pod_log(NS, "db-0")
        ),
        30,
        "db-0 back on its claim",
    )


def test_a_selectorless_service_routes_to_the_endpoints_the_user_wrote(standin):
    # How a cluster names an outside address (an external database): a Service without selector and an Endpoints
    # object of the same name. Here the outside server is an HTTP server of this test process on 127.0.0.1.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"outside"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        spec = {"ports": [{"name": "http", "port": 80, "targetPort": port}]}
        create(standin, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "outside"}, "spec": spec})
        subsets = [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "http", "port": port}]}]
        endpoints = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "outside"}, "subsets": subsets}
        api(standin, "POST", f"/api/v1/namespaces/{NS}/endpoints", endpoints)
        runner = standin.pods
        # the allocated address is in the Service object, as the API server's allocator writes it
        ip = runner.wait_for(
            lambda: (standin.get_object("v1", "Service", NS, "outside") or {}).get("spec", {}).get("clusterIP"),
            10,
            "the Service's clusterIP",
        )
        assert ip == runner.service_ip(NS, "outside")
        assert standin.get_object("v1", "Service", NS, "outside")["spec"]["clusterIPs"] == [ip]
        script = "import urllib.request; print(urllib.request.urlopen('http://outside/', timeout=10).read().decode())"
        create(standin, job("reach-outside", script))
        expect_complete(standin, "reach-outside")
        pod = api(standin, "GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3Dreach-outside")["items"][0]
        assert runner.pod_log(NS, pod["metadata"]["name"]).strip() == "outside"
        # the runner leaves the user's Endpoints alone (it writes Endpoints only for Services with a selector)
        assert standin.get_object("v1", "Endpoints", NS, "outside")["subsets"] == subsets
    finally:
        server.shutdown()
        server.server_close()
