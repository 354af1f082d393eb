"""The new-job form's mapping without a browser: typed values kept, the console's own refusals (what the request
cannot say), violations placed on their fields, and the commands' quoting."""

from __future__ import annotations

import shlex

from google.protobuf import json_format

from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_console import job_form


def form(**values: str) -> job_form.Form:
    return job_form.Form.parse({"method": "sft", "version_bump": "minor", **values})


def test_values_as_typed_request_id_kept_or_made():
    kept = form(learning_rate=" 2e-4 ", request_id="6f1c1a43-8f6b-4c0e-9d55-1f8f5a0b2c11")
    assert kept.values["learning_rate"] == "2e-4" and kept.request_id == "6f1c1a43-8f6b-4c0e-9d55-1f8f5a0b2c11"
    assert form(request_id="not-a-uuid").request_id != "not-a-uuid"
    request = job_form.build_request(kept, "p")
    assert request.training_job.hyperparameters.learning_rate == 2e-4 and request.parent == "projects/p"
    assert request.request_id == kept.request_id and not kept.failed


def test_what_the_request_cannot_say_is_refused_by_the_form():
    f = form(method="dpo", qlora="on", max_steps="1.5", learning_rate="fast", prompts_uri="file:///p.jsonl")
    job_form.build_request(f, "p")
    assert set(f.errors) == {"qlora", "max_steps", "learning_rate", "prompts_uri"}
    rlaif = form(method="rlaif", qlora="on", judge_version="projects/p/judges/j/versions/1")
    job = job_form.build_request(rlaif, "p").training_job
    assert job.method == tpb.TRAINING_METHOD_RLAIF and job.rlaif.qlora and not rlaif.failed
    assert job_form.build_request(form(qlora="on"), "p").training_job.method == tpb.TRAINING_METHOD_SFT_QLORA


def test_violations_land_on_their_fields_or_the_summary():
    f = form()
    f.error("training_job.hyperparameters.learning_rate", "too big")
    f.error("training_job.lora.r", "too big")
    f.error("training_job.rlaif.prompts_uri", "missing")
    f.error("training_job.resources.gpus", "no GPUs here")
    assert f.errors == {"learning_rate": ["too big"], "lora_r": ["too big"], "prompts_uri": ["missing"]}
    assert f.other_errors == ["training_job.resources.gpus: no GPUs here"]


def test_commands_quote_what_a_shell_would_split():
    f = form(base_model="/models/a b", dataset_uri="file:///d/x.jsonl", target_model="m", display_name="it's $HOME")
    request = job_form.build_request(f, "p")
    argv = shlex.split(job_form.nw_command(f, "p", "trainer:50052"))
    assert argv[argv.index("--display-name") + 1] == "it's $HOME" and argv[argv.index("--base-model") + 1] == "/models/a b"
    assert "--max-steps" not in argv and "--bump" not in argv  # empty and default values stay out
    line = job_form.grpcurl_command(request, "trainer:50052", tls=True, token=True)
    assert '-cacert "$NW_TLS_CA"' in line and '"authorization: Bearer $NW_TOKEN"' in line
    words = shlex.split(line)
    body = json_format.Parse(words[words.index("-d") + 1], tsvc.CreateTrainingJobRequest())
    assert body.training_job.display_name == "it's $HOME" and not body.request_id
