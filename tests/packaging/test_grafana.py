"""Grafana dashboards and Prometheus wiring: generated JSON is current, and every series and gRPC method
a panel queries is one the code really exports / the contracts really define."""

from __future__ import annotations

import ast
import json
import re

import yaml
from nwpack import DEPLOY, ROOT, grpc_methods, load_module

GEN = load_module(DEPLOY / "grafana/generate_dashboards.py", "nw_generate_dashboards")
PROM_TYPES = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"], "Summary": ["_sum", "_count"]}
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "histogram_quantile",
    "ignoring",
    "group_left",
    "max",
    "le",
    "job",
    "label_values",
    "method",
    "code",
    "grpc_service",
    "grpc_method",
    "grpc_code",
    "grpc_type",
}


def exported_series() -> set[str]:
    """Series names of every prometheus_client metric declared in libs/*/src and services/*/src (AST scan)."""
    out = set()
    for path in [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]:
        tree = ast.parse(path.read_text())
        consts = {
            t.id: n.value.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROM_TYPES and node.args:
                arg = node.args[0]
                name = arg.value if isinstance(arg, ast.Constant) else None
                if isinstance(arg, ast.Name):
                    name = consts.get(arg.id)
                if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and isinstance(arg.func.value, ast.Name):
                    base = consts.get(arg.func.value.id)  # NAME.removesuffix("_total")
                    name = base.removesuffix("_total") if base else None
                if isinstance(name, str):
                    name = name.removesuffix("_total") if node.func.id == "Counter" else name
                    out |= {name + suffix for suffix in PROM_TYPES[node.func.id]}
    if not out:
        raise AssertionError("no metrics found")
    # prometheus_client resolves imported constants too; add neuroweaver_kube's canonical names
    from neuroweaver_kube.metrics import DEFAULT_METRICS

    return out | DEFAULT_METRICS.exported_series()


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (DEPLOY / "grafana/dashboards").glob("*.json")}


def exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_committed_dashboards_are_the_generated_ones():
    rendered = GEN.render_all()
    committed = {p.name: p.read_text() for p in (DEPLOY / "grafana/dashboards").glob("*.json")}
    assert committed == rendered, "run deploy/grafana/generate_dashboards.py"


def test_every_queried_series_is_exported_by_the_code():
    series = exported_series()
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "nw_inference_requests_total"} <= series
    for name, board in dashboards().items():
        assert exprs(board), name
        for expr in exprs(board):
            stripped = re.sub(r'"[^"]*"', "", re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", expr)))
            for ident in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", stripped):
                if ident not in PROMQL_WORDS and "_" in ident:
                    assert ident in series, f"{name}: {ident} is not exported by any service"


def test_grpc_codes_in_panels_are_go_grpc_prometheus_names():
    """Values matched against grpc_code / code are the names the servers export (`NotFound`, not `NOT_FOUND`)."""
    from neuroweaver_runtime.telemetry import GRPC_CODE_LABELS

    names = set(GRPC_CODE_LABELS.values())
    matched = 0
    for name, board in dashboards().items():
        for expr in exprs(board):
            for value in re.findall(r'\b(?:grpc_code|code)\s*(?:!=|=~|!~|=)\s*"([^"]*)"', expr):
                for alternative in value.split("|"):
                    matched += 1
                    assert alternative in names or re.fullmatch(r"[1-5][0-9.]{2}", alternative), f"{name}: {alternative}"
    assert matched


def test_every_grpc_method_named_in_a_panel_exists_in_the_contracts():
    methods = grpc_methods()
    pairs = 0
    for board in dashboards().values():
        for expr in exprs(board):
            for service, method in re.findall(r'grpc_service="([^"]+)", grpc_method="([^"]+)"', expr):
                assert method in methods[service], f"{service}/{method}"
                pairs += 1
    assert pairs >= 8


def test_datasource_and_provider_are_wired():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    for board in dashboards().values():
        default = board["templating"]["list"][0]["current"]["value"]
        assert default == ds["uid"]
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/neuroweaver.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
