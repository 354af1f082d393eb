"""The console's objects from deploy/kubernetes/base, run on the Kubernetes stand-in (neuroweaver_kube.testing): its pod
starts as the console image would (ENTRYPOINT, CMD, ENV and the chart.js files of deploy/docker/console.Dockerfile,
bubblewrap sandbox, read-only root), binds its pod IP, turns ready through the HTTP probes on its ops port, and its
Service serves the pages and chart.js. Not modelled there: nodes, NetworkPolicies, resource limits."""

from __future__ import annotations

import json
import urllib.request

import pytest
from nwpack import K8S, console_ports, render

from neuroweaver_kube.client import KubeClient
from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing.pods import PodRunner, bwrap_path

pytestmark = pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap (bwrap) is not installed; .ci/run installs it")
NS = "neuroweaver"


def _console_objects() -> list[dict]:
    """The console's ServiceAccount, Service and Deployment (one replica), its namespace and the shared ConfigMap."""
    objs = []
    for o in render(K8S / "base"):
        name = o["metadata"]["name"]
        if o["kind"] == "Namespace" or (o["kind"] == "ConfigMap" and name == "neuroweaver-config"):
            objs.append(o)
        elif name == "neuroweaver-console" and o["kind"] in ("ServiceAccount", "Service", "Deployment"):
            objs.append(o)
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    deployment["spec"]["replicas"] = 1
    return objs


def test_the_console_deployment_serves_behind_its_service():
    with KubeApiStandIn(pods=PodRunner()) as standin:
        runner = standin.pods
        assert runner is not None
        KubeClient.from_config(host=standin.url, token="packaging-test").apply_sync(_console_objects())

        def available() -> bool:
            dep = standin.get_object("apps/v1", "Deployment", NS, "neuroweaver-console") or {}
            return (dep.get("status") or {}).get("availableReplicas") == 1

        try:
            runner.wait_for(available, 60, "the console to be ready")
        except TimeoutError as e:
            pytest.fail(f"{e}\n{runner.describe()}")
        ip, ports = runner.service_ip(NS, "neuroweaver-console"), console_ports()
        with urllib.request.urlopen(f"http://{ip}:{ports['http']}/login", timeout=10) as resp:
            assert resp.status == 200 and b"<form" in resp.read()
        with urllib.request.urlopen(f"http://{ip}:{ports['http']}/assets/chart.umd.min.js", timeout=10) as resp:
            assert b"Chart" in resp.read()
        with urllib.request.urlopen(f"http://{ip}:{ports['http-metrics']}/metrics", timeout=10) as resp:
            assert b"console_http_requests_total" in resp.read()
        (pod,) = standin.objects("Pod", NS)
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        serving = [
            json.loads(line) for line in runner.pod_log(NS, pod["metadata"]["name"]).splitlines() if "console serving" in line
        ]
        assert [s["url"] for s in serving] == [f"http://{pod['status']['podIP']}:{ports['http']}"]  # the pod IP
