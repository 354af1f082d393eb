"""One trace across service processes, asserted from the JSON-lines span files (`--trace-file`) and JSON logs.

The test process is the client: it sends a W3C `traceparent` of its own (a root span it made up) and checks that
the services continue that trace: experiments → registry (ConcludeExperiment promotes through SetModelAlias) and
trainer → worker process → registry (a job registers its version under the trace of CreateTrainingJob).
Without `--trace-file` nothing is exported, yet the trace id still propagates and appears in the JSON logs.
"""

from __future__ import annotations

import json
import secrets
import time

import grpc

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.testing import free_port

REGISTRY = "neuroweaver.registry.v1.RegistryService"
EXPERIMENTS = "neuroweaver.experiments.v1.ExperimentsService"
TRAINER = "neuroweaver.trainer.v1.TrainerService"


def root_traceparent() -> tuple[str, str, list[tuple[str, str]]]:
    """A client-side root span of the test: (trace id, span id, metadata carrying it as W3C traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, [("traceparent", f"00-{trace_id}-{span_id}-01")]


def wait_for(predicate, what: str, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def one_span(spans: list[dict], name: str, trace_id: str) -> dict:
    matching = [s for s in spans if s["name"] == name and s["trace_id"] == trace_id]
    assert len(matching) == 1, (name, trace_id, [(s["name"], s["trace_id"]) for s in spans])
    return matching[0]


def ancestors(span: dict, spans: list[dict]) -> list[str]:
    """Span ids from `span`'s parent up to the first parent not in `spans`."""
    by_id = {s["span_id"]: s for s in spans}
    out, parent = [], span["parent_span_id"]
    while parent is not None:
        out.append(parent)
        parent = by_id[parent]["parent_span_id"] if parent in by_id else None
    return out


def create_model_with_versions(registry: rgrpc.RegistryServiceStub, model_id: str, versions: int) -> str:
    model = registry.CreateModel(rsvc.CreateModelRequest(parent="projects/default", model_id=model_id), timeout=10)
    for i in range(versions):
        registry.CreateModelVersion(rsvc.CreateModelVersionRequest(
            parent=model.name, version=f"1.0.{i}",
            model_version=rpb.ModelVersion(artifact=rpb.Artifact(uri=f"file:///artifacts/{model_id}/{i}", sha256=f"{i:x}" * 64)),
        ), timeout=10)  # fmt: skip
    return model.name


def test_conclude_with_promote_is_one_trace_from_client_through_experiments_to_registry(start):
    registry = start("neuroweaver_registry", REGISTRY, "registry")
    unused = free_port()  # no deployer: the variants name model versions only, no deployments
    experiments = start("neuroweaver_experiments", EXPERIMENTS, "experiments",
                        "--registry-target", registry.target, "--deployer-target", f"127.0.0.1:{unused}")  # fmt: skip
    with grpc.insecure_channel(registry.target) as rch, grpc.insecure_channel(experiments.target) as ech:
        reg, exp = rgrpc.RegistryServiceStub(rch), egrpc.ExperimentsServiceStub(ech)
        model = create_model_with_versions(reg, "advisor", 2)
        reg.SetModelAlias(
            rsvc.SetModelAliasRequest(model=model, alias="production", version="1.0.0", reason="initial"), timeout=10
        )
        created = exp.CreateExperiment(esvc.CreateExperimentRequest(
            parent="projects/default", experiment_id="tone",
            experiment=epb.Experiment(
                display_name="tone", promote_alias="production",
                variants=[epb.Variant(id="control", model_version=f"{model}/versions/1.0.0", weight=0.5),
                          epb.Variant(id="treatment", model_version=f"{model}/versions/1.0.1", weight=0.5)],
                primary_metric=epb.MetricSpec(name="score", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
            ),
        ), timeout=10)  # fmt: skip
        exp.StartExperiment(esvc.StartExperimentRequest(name=created.name), timeout=10)
        units = [f"user-{i}" for i in range(20)]
        assigned = exp.BatchAssignVariants(esvc.BatchAssignVariantsRequest(experiment=created.name, unit_ids=units), timeout=10)
        events = [epb.MetricEvent(unit_id=u, metric="score", value=2.0 if a.variant.id == "treatment" else 1.0)
                  for u, a in zip(units, assigned.assignments, strict=True)]  # fmt: skip
        recorded = exp.RecordMetricEvents(esvc.RecordMetricEventsRequest(experiment=created.name, events=events), timeout=10)
        assert recorded.accepted == len(events)

        trace_id, root_span_id, metadata = root_traceparent()
        done = exp.ConcludeExperiment(
            esvc.ConcludeExperimentRequest(name=created.name, winner="treatment", promote=True, expected_current_version="1.0.0"),
            metadata=metadata, timeout=20,
        )  # fmt: skip
        assert done.state == epb.Experiment.STATE_CONCLUDED
        alias = reg.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{model}/aliases/production"), timeout=10)
        assert alias.version == "1.0.1"

    # Spans are exported in batches (every 100 ms here), in the order they ended.
    conclude = wait_for(
        lambda: next((s for s in experiments.spans() if s["name"] == f"{EXPERIMENTS}/ConcludeExperiment" and s["trace_id"] == trace_id), None),
        "the experiments ConcludeExperiment span",
    )  # fmt: skip
    set_alias = wait_for(
        lambda: next((s for s in registry.spans() if s["name"] == f"{REGISTRY}/SetModelAlias" and s["trace_id"] == trace_id), None),
        "the registry SetModelAlias span in the client's trace",
    )  # fmt: skip
    exp_spans, reg_spans = experiments.spans(), registry.spans()
    assert conclude == one_span(exp_spans, f"{EXPERIMENTS}/ConcludeExperiment", trace_id)
    assert set_alias == one_span(reg_spans, f"{REGISTRY}/SetModelAlias", trace_id)
    assert conclude["parent_span_id"] == root_span_id and conclude["service"] == "neuroweaver-experiments"
    assert set_alias["service"] == "neuroweaver-registry" and set_alias["status"] == "UNSET"
    # descendant of the experiments server span (directly, or through an experiments client span if there is one)
    assert conclude["span_id"] in ancestors(set_alias, exp_spans), (set_alias, conclude)
    assert conclude["start_ns"] <= set_alias["start_ns"] <= set_alias["end_ns"] <= conclude["end_ns"]
    # the setup calls carried no traceparent: each got a trace of its own
    setup_alias = [s for s in reg_spans if s["name"] == f"{REGISTRY}/SetModelAlias" and s["trace_id"] != trace_id]
    assert len(setup_alias) == 1 and setup_alias[0]["parent_span_id"] is None
    assert [s["name"] for s in reg_spans if s["trace_id"] == trace_id] == [f"{REGISTRY}/SetModelAlias"]

    # the registry's JSON log line for the alias move carries the same trace id
    moved = [entry for entry in registry.log_lines() if entry.get("msg") == "alias set" and entry.get("version") == "1.0.1"]
    assert len(moved) == 1 and moved[0]["trace_id"] == trace_id, moved
    assert moved[0]["alias"] == f"{model}/aliases/production" and moved[0]["request_id"]


def test_without_trace_file_nothing_is_exported_but_the_trace_id_reaches_the_logs(start, tmp_path):
    registry = start("neuroweaver_registry", REGISTRY, "registry", trace=False)
    with grpc.insecure_channel(registry.target) as channel:
        reg = rgrpc.RegistryServiceStub(channel)
        model = create_model_with_versions(reg, "quiet", 1)
        trace_id, _, metadata = root_traceparent()
        reg.SetModelAlias(
            rsvc.SetModelAliasRequest(model=model, alias="production", version="1.0.0"), metadata=metadata, timeout=10
        )
        reg.SetModelAlias(rsvc.SetModelAliasRequest(model=model, alias="staging", version="1.0.0"), timeout=10)

    def alias_lines():
        lines = [e for e in registry.log_lines() if e.get("msg") == "alias set"]
        return lines if len(lines) == 2 else None

    lines = wait_for(alias_lines, "both alias log lines")
    by_alias = {e["alias"].rsplit("/", 1)[1]: e for e in lines}
    assert by_alias["production"]["trace_id"] == trace_id
    other = by_alias["staging"]["trace_id"]  # no traceparent: a fresh trace id, still logged
    assert len(other) == 32 and int(other, 16) != 0 and other != trace_id
    # nothing exported anywhere: no span file next to the process, its data or the test's files
    exported = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json")]
    assert exported == []


def test_training_job_registers_its_version_in_the_trace_of_create_training_job(start, tmp_path):
    from neuroweaver_ml import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny-llama")
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
            for i in range(12)]  # fmt: skip
    (datasets / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    registry = start("neuroweaver_registry", REGISTRY, "registry")
    trainer = start("neuroweaver_trainer", TRAINER, "trainer", "--registry-target", registry.target,
                    "--dataset-roots", str(datasets), "--model-roots", str(tiny.parent), "--queue-poll-seconds", "0.5",
                    "--registry-retry-seconds", "20")  # fmt: skip
    with grpc.insecure_channel(registry.target) as rch, grpc.insecure_channel(trainer.target) as tch:
        reg, tr = rgrpc.RegistryServiceStub(rch), tgrpc.TrainerServiceStub(tch)
        reg.CreateModel(rsvc.CreateModelRequest(parent="projects/default", model_id="advisor"), timeout=10)
        trace_id, root_span_id, metadata = root_traceparent()
        job = tr.CreateTrainingJob(tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job_id="traced",
            training_job=tpb.TrainingJob(
                base_model=str(tiny), dataset_uri=(datasets / "chat.jsonl").as_uri(), method=tpb.TRAINING_METHOD_SFT_LORA,
                target_model="projects/default/models/advisor", version_bump=cpb.VERSION_BUMP_MINOR, lora=tpb.LoraConfig(r=4, alpha=8),
                hyperparameters=tpb.Hyperparameters(max_steps=2, batch_size=2, max_seq_length=64, checkpoint_every_steps=2,
                                                    eval_every_steps=2, eval_split=0.1, learning_rate=1e-3),
            ),
        ), metadata=metadata, timeout=60)  # fmt: skip

        def finished():
            got = tr.GetTrainingJob(tsvc.GetTrainingJobRequest(name=job.name), timeout=10)
            terminal = {tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED, tpb.TrainingJob.STATE_CANCELLED}
            return got if got.state in terminal else None

        done = wait_for(finished, f"{job.name} to finish", timeout=240, interval=0.25)
        assert done.state == tpb.TrainingJob.STATE_SUCCEEDED, (done.error, list((tmp_path / "trainer").rglob("worker-*.log")))
        assert done.model_version.startswith("projects/default/models/advisor/versions/")

    create = one_span(trainer.spans(), f"{TRAINER}/CreateTrainingJob", trace_id)
    assert create["parent_span_id"] == root_span_id and create["service"] == "neuroweaver-trainer"
    register = wait_for(
        lambda: next((s for s in registry.spans() if s["name"] == f"{REGISTRY}/CreateModelVersion" and s["trace_id"] == trace_id), None),
        "the registry CreateModelVersion span in the trace of CreateTrainingJob",
    )  # fmt: skip
    # trainer server span → worker process span (from the traceparent stored on the job) → client span → registry
    # the worker writes to the trainer's trace file; its run span ends after the job's final state is written
    wait_for(lambda: any(s["name"] == "TrainingJob/run" for s in trainer.spans()), "the worker's run span")
    spans = trainer.spans()
    run = one_span(spans, "TrainingJob/run", trace_id)
    client = one_span(spans, "RegistryService/CreateModelVersion", trace_id)
    assert run["service"] == "neuroweaver-trainer-worker" and run["parent_span_id"] == create["span_id"]
    assert run["attributes"]["neuroweaver.training_job"] == job.name
    assert client["parent_span_id"] == run["span_id"] and client["service"] == "neuroweaver-trainer-worker"
    assert register["parent_span_id"] == client["span_id"] and register["status"] == "UNSET"
    assert ancestors(register, spans) == [client["span_id"], run["span_id"], create["span_id"], root_span_id]
