"""Writes the Grafana dashboards in deploy/grafana/dashboards/ (run after editing, commit the JSON).

    .venv/bin/python deploy/grafana/generate_dashboards.py

Only metrics the code really exports are queried: the shared runtime's grpc-ecosystem metrics
(`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`,
`grpc_server_msg_received_total`, `grpc_server_msg_sent_total`, labels grpc_type/grpc_service/grpc_method/grpc_code
with go-grpc-prometheus code names such as `NotFound`) and the model server's `nw_inference_*` metrics.
tests/packaging checks every series and every grpc_method named here against the code and protos.
"""

from __future__ import annotations

import json
from pathlib import Path

from neuroweaver_kube.metrics import SERVER_ERROR_CODES_REGEX

OUT = Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def _templating(job_metric: str, default_regex: str = ".*") -> dict:
    return {
        "list": [
            {
                "name": "datasource",
                "type": "datasource",
                "query": "prometheus",
                "label": "Data source",
                "current": {"text": "Prometheus", "value": "neuroweaver-prometheus"},
            },
            {
                "name": "job",
                "type": "query",
                "label": "Job",
                "datasource": DS,
                "query": {"query": f"label_values({job_metric}, job)", "refId": "jobs"},
                "definition": f"label_values({job_metric}, job)",
                "regex": default_regex,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "refresh": 2,
                "current": {"text": "All", "value": "$__all"},
            },
        ]
    }


class Board:
    def __init__(self, uid: str, title: str, job_metric: str, description: str) -> None:
        self.uid, self.title, self.job_metric, self.description = uid, title, job_metric, description
        self.panels: list[dict] = []
        self.y = 0

    def row(self, title: str) -> None:
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panels_row(self, *panels: dict, h: int = 8) -> None:
        w = 24 // len(panels)
        for i, p in enumerate(panels):
            p["id"] = len(self.panels) + 1
            p["gridPos"] = {"h": h, "w": w, "x": i * w, "y": self.y}
            self.panels.append(p)
        self.y += h

    def render(self) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["neuroweaver"],
            "timezone": "browser",
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "templating": _templating(self.job_metric),
            "annotations": {"list": []},
            "links": [],
            "panels": self.panels,
        }


def ts(title: str, unit: str, *targets: tuple[str, str], description: str = "") -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi"},
        },
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def stat(title: str, unit: str, expr: str, legend: str = "") -> dict:
    return {
        "type": "stat",
        "title": title,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend, "datasource": DS}],
    }


def q(level: float, bucket: str, by: str, sel: str) -> str:
    return f"histogram_quantile({level}, sum by (le, {by}) (rate({bucket}{{{sel}}}[{RI}])))"


def method_rate(service: str, method: str, code: str = "") -> str:
    sel = f'job=~"$job", grpc_service="{service}", grpc_method="{method}"'
    if code:
        sel += f', grpc_code="{code}"'
    return f"sum(rate(grpc_server_handled_total{{{sel}}}[{RI}]))"


def grpc_board() -> dict:
    b = Board(
        "nw-grpc",
        "NeuroWeaver / gRPC services",
        "grpc_server_handled_total",
        "Request rate, latency and errors of every NeuroWeaver service (grpc-ecosystem metrics).",
    )
    sel = 'job=~"$job"'
    b.row("Traffic")
    b.panels_row(
        ts("Requests per second by job", "reqps", (f"sum by (job) (rate(grpc_server_handled_total{{{sel}}}[{RI}]))", "{{job}}")),
        ts(
            "Requests per second by method",
            "reqps",
            (
                f"sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{sel}}}[{RI}]))",
                "{{grpc_service}}/{{grpc_method}}",
            ),
        ),
    )
    b.row("Errors")
    b.panels_row(
        ts(
            "Non-OK ratio by job and gRPC code",
            "percentunit",
            (
                f'sum by (job, grpc_code) (rate(grpc_server_handled_total{{{sel}, grpc_code!="OK"}}[{RI}]))'
                f" / ignoring (grpc_code) group_left sum by (job) (rate(grpc_server_handled_total{{{sel}}}[{RI}]))",
                "{{job}} {{grpc_code}}",
            ),
        ),
        ts(
            "Server-side errors per second by method",
            "reqps",
            (
                f"sum by (grpc_service, grpc_method, grpc_code) (rate(grpc_server_handled_total{{{sel}, "
                f'grpc_code=~"Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss"}}[{RI}]))',
                "{{grpc_method}} {{grpc_code}}",
            ),
            description="Codes that are the server's fault; client errors (InvalidArgument...) are left out.",
        ),
    )
    b.row("Latency (unary calls)")
    usel = f'{sel}, grpc_type="unary"'
    b.panels_row(
        ts(
            "Latency p50 / p95 / p99 by job",
            "s",
            (q(0.5, "grpc_server_handling_seconds_bucket", "job", usel), "p50 {{job}}"),
            (q(0.95, "grpc_server_handling_seconds_bucket", "job", usel), "p95 {{job}}"),
            (q(0.99, "grpc_server_handling_seconds_bucket", "job", usel), "p99 {{job}}"),
        ),
        ts(
            "Latency p95 by method",
            "s",
            (
                q(0.95, "grpc_server_handling_seconds_bucket", "grpc_service, grpc_method", usel),
                "{{grpc_service}}/{{grpc_method}}",
            ),
        ),
    )
    b.row("Streams")
    b.panels_row(
        ts(
            "Open server streams by method",
            "short",
            (
                f'sum by (grpc_service, grpc_method) (grpc_server_started_total{{{sel}, grpc_type!="unary"}})'
                f' - sum by (grpc_service, grpc_method) (grpc_server_handled_total{{{sel}, grpc_type!="unary"}})',
                "{{grpc_service}}/{{grpc_method}}",
            ),
            description="Started minus finished streaming calls (WatchTrainingJob, WatchDeployment, GenerateStream...).",
        ),
        ts(
            "Stream messages per second by method",
            "short",
            (
                f'sum by (grpc_service, grpc_method) (rate(grpc_server_msg_sent_total{{{sel}, grpc_type!="unary"}}[{RI}]))',
                "sent {{grpc_service}}/{{grpc_method}}",
            ),
            (
                "sum by (grpc_service, grpc_method) "
                f'(rate(grpc_server_msg_received_total{{{sel}, grpc_type=~"client_stream|bidi_stream"}}[{RI}]))',
                "received {{grpc_service}}/{{grpc_method}}",
            ),
            description="Messages written to server streams and read from client streams.",
        ),
    )
    return b.render()


def activity_board() -> dict:
    b = Board(
        "nw-activity",
        "NeuroWeaver / training, deployments, experiments",
        "grpc_server_handled_total",
        "What the platform is doing, read off the services' gRPC metrics (successful calls per method).",
    )
    tr, dp, ex, rg = (
        "neuroweaver.trainer.v1.TrainerService",
        "neuroweaver.deployer.v1.DeployerService",
        "neuroweaver.experiments.v1.ExperimentsService",
        "neuroweaver.registry.v1.RegistryService",
    )
    watch = f'job=~"$job", grpc_service="{tr}", grpc_method="WatchTrainingJob"'
    b.row("Training")
    b.panels_row(
        ts(
            "Training jobs created / cancelled per minute",
            "short",
            (f"60 * {method_rate(tr, 'CreateTrainingJob', 'OK')}", "created"),
            (f"60 * {method_rate(tr, 'CancelTrainingJob', 'OK')}", "cancelled"),
        ),
        ts(
            "Clients watching training jobs",
            "short",
            (
                f"sum(grpc_server_started_total{{{watch}}}) - sum(grpc_server_handled_total{{{watch}}})",
                "open WatchTrainingJob streams",
            ),
        ),
    )
    b.row("Registry and deployments")
    b.panels_row(
        ts(
            "Model versions created and aliases moved per minute",
            "short",
            (f"60 * {method_rate(rg, 'CreateModelVersion', 'OK')}", "versions created"),
            (f"60 * {method_rate(rg, 'SetModelAlias', 'OK')}", "alias set (promotions)"),
            (f"60 * {method_rate(rg, 'RollbackModelAlias', 'OK')}", "alias rollbacks"),
        ),
        ts(
            "Deployments created / scaled per minute",
            "short",
            (f"60 * {method_rate(dp, 'CreateDeployment', 'OK')}", "created"),
            (f"60 * {method_rate(dp, 'ScaleDeployment', 'OK')}", "scaled"),
        ),
    )
    b.row("Experiments")
    asel = f'job=~"$job", grpc_service="{ex}", grpc_method="AssignVariant"'
    b.panels_row(
        ts("Variant assignments per second", "reqps", (method_rate(ex, "AssignVariant", "OK"), "AssignVariant OK")),
        ts(
            "AssignVariant latency p50 / p99",
            "s",
            (q(0.5, "grpc_server_handling_seconds_bucket", "grpc_method", asel), "p50"),
            (q(0.99, "grpc_server_handling_seconds_bucket", "grpc_method", asel), "p99"),
        ),
        ts(
            "Experiments started / concluded per hour",
            "short",
            (f"3600 * {method_rate(ex, 'StartExperiment', 'OK')}", "started"),
            (f"3600 * {method_rate(ex, 'ConcludeExperiment', 'OK')}", "concluded"),
        ),
    )
    return b.render()


def inference_board() -> dict:
    b = Board(
        "nw-inference",
        "NeuroWeaver / model servers",
        "nw_inference_requests_total",
        "Model-server traffic, latency, tokens and queueing (nw_inference_* metrics, gRPC and HTTP).",
    )
    sel = 'job=~"$job"'
    b.row("Traffic and errors")
    b.panels_row(
        ts(
            "Requests per second by method and code",
            "reqps",
            (f"sum by (method, code) (rate(nw_inference_requests_total{{{sel}}}[{RI}]))", "{{method}} {{code}}"),
        ),
        ts(
            "Server error ratio",
            "percentunit",
            (
                f'sum(rate(nw_inference_requests_total{{{sel}, code=~"{SERVER_ERROR_CODES_REGEX}"}}[{RI}]))'
                f" / sum(rate(nw_inference_requests_total{{{sel}}}[{RI}]))",
                "server errors / all",
            ),
        ),
    )
    b.row("Latency")
    b.panels_row(
        ts(
            "Request latency p50 / p95 / p99",
            "s",
            (q(0.5, "nw_inference_request_duration_seconds_bucket", "job", sel), "p50 {{job}}"),
            (q(0.95, "nw_inference_request_duration_seconds_bucket", "job", sel), "p95 {{job}}"),
            (q(0.99, "nw_inference_request_duration_seconds_bucket", "job", sel), "p99 {{job}}"),
        ),
        ts(
            "Time to first token p50 / p95",
            "s",
            (q(0.5, "nw_inference_time_to_first_token_seconds_bucket", "job", sel), "p50 {{job}}"),
            (q(0.95, "nw_inference_time_to_first_token_seconds_bucket", "job", sel), "p95 {{job}}"),
        ),
    )
    b.row("Tokens and queueing")
    b.panels_row(
        ts(
            "Tokens per second",
            "short",
            (f"sum by (job) (rate(nw_inference_completion_tokens_total{{{sel}}}[{RI}]))", "generated {{job}}"),
            (f"sum by (job) (rate(nw_inference_prompt_tokens_total{{{sel}}}[{RI}]))", "prompt {{job}}"),
        ),
        ts(
            "Queue depth and in-flight requests",
            "short",
            (f"sum by (job) (nw_inference_queue_depth{{{sel}}})", "queued {{job}}"),
            (f"sum by (job) (nw_inference_inflight_requests{{{sel}}})", "decoding {{job}}"),
        ),
        ts(
            "Batch size p50 / p95",
            "short",
            (q(0.5, "nw_inference_batch_size_bucket", "job", sel), "p50 {{job}}"),
            (q(0.95, "nw_inference_batch_size_bucket", "job", sel), "p95 {{job}}"),
        ),
    )
    b.panels_row(
        stat("Models loaded", "short", f"sum(nw_inference_model_loaded{{{sel}}})"),
        stat("Model load time", "s", f"max by (job) (nw_inference_model_load_seconds{{{sel}}})", "{{job}}"),
        h=4,
    )
    return b.render()


DASHBOARDS = {
    "neuroweaver-grpc.json": grpc_board,
    "neuroweaver-activity.json": activity_board,
    "neuroweaver-inference.json": inference_board,
}


def render_all() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
