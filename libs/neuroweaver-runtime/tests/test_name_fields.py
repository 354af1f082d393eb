"""Which strings of a request the interceptor reads as resource names: the values of name fields, at any depth;
never free text (prompts, answers, descriptions, label values, chat content), whatever it starts with."""

from __future__ import annotations

import pytest

from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as es
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.inspection import _plan, inspect, is_name_field, lenient_deserializer

E = "projects/a/experiments/e"
B = "projects/b/experiments/x"


def findings(message):
    return inspect(lenient_deserializer(type(message).FromString, "x")(message.SerializeToString()))


def test_answers_prompts_and_references_are_not_names():
    answer = es.Answer(unit_id="u1", variant="control", prompt=B + " what is it?", answer=B, reference=B)
    found = findings(es.RecordAnswersRequest(experiment=E, answers=[answer]))
    assert (found.targets, found.references) == ({E}, set())
    found = findings(es.RecordAnswersRequest(experiment=B, answers=[answer]))
    assert found.targets == {B}


def test_nested_name_fields_are_names_at_any_depth():
    exposure = epb.Exposure(experiment=B, unit_id=B, variant=B)
    event = epb.MetricEvent(experiment=E, unit_id="u", metric=B)
    found = findings(es.IngestEventsRequest(batch_id=1, exposures=[exposure], events=[event]))
    assert (found.targets, found.references) == (set(), {B, E})
    lineage = rpb.Lineage(parent_version="projects/b/models/m/versions/1", base_model="projects/b/base", method=B)
    version = rpb.ModelVersion(lineage=lineage, notes=B, labels={B: B})
    found = findings(rs.CreateModelVersionRequest(parent="projects/a/models/m", version="1.0.0", model_version=version))
    # base_model keeps being checked (its name says "model"); notes, labels and the method are free text.
    assert found.references == {"projects/b/models/m/versions/1", "projects/b/base"}


def test_labels_descriptions_and_display_names_are_free_text():
    model = rpb.Model(name="projects/a/models/m", display_name=B, description=B, specialization=B, labels={"origin": B, B: "x"})
    found = findings(rs.UpdateModelRequest(model=model))
    assert (found.targets, found.references) == ({"projects/a/models/m"}, {"projects/a/models/m"})
    # A map whose field says it holds names (alias -> version) is read as names, keys and values.
    found = findings(rs.UpdateModelRequest(model=rpb.Model(name="projects/a/models/m", aliases={"prod": B})))
    assert B in found.references


def test_chat_content_is_free_text_the_model_is_a_name():
    chat = [ipb.ChatMessage(role="user", content=B)]
    found = findings(isvc.GenerateRequest(messages=chat, prompt=B, sampling=ipb.SamplingParams(stop=[B])))
    assert (found.targets, found.references) == (set(), set())
    assert findings(isvc.GenerateRequest(model="projects/b/deployments/d", messages=chat)).targets == {"projects/b/deployments/d"}


def test_without_a_nul_byte_free_text_is_not_even_visited():
    assert [step[0].name for step in _plan(es.RecordAnswersRequest.DESCRIPTOR, False)] == ["experiment"]
    assert _plan(es.Answer.DESCRIPTOR, False) == ()
    assert {step[0].name for step in _plan(es.Answer.DESCRIPTOR, True)} >= {"prompt", "answer", "reference"}


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (
            es.RecordAnswersRequest(experiment=E, answers=[es.Answer(unit_id="u", prompt=B + "\x00", answer="a")]),
            "answers[0].prompt",
        ),
        (
            es.RecordAnswersRequest(experiment=E, answers=[es.Answer(unit_id="u", prompt="p\x00", answer="a")]),
            "answers[0].prompt",
        ),
        (es.RecordAnswersRequest(experiment=E + "\x00"), "experiment"),  # a top-level target too
        (rs.UpdateModelRequest(model=rpb.Model(name="projects/a/models/m", labels={"k": "v\x00"})), "model.labels['k']"),
    ],
)
def test_nul_characters_are_refused_in_names_and_free_text(message, path):
    with pytest.raises(InvalidArgument) as caught:
        findings(message)
    assert caught.value.reason == "INVALID_CHARACTERS"
    assert [v.field for v in caught.value.violations] == [path]


def test_the_rule():
    fields = {f.name: f for f in rpb.Lineage.DESCRIPTOR.fields}
    assert is_name_field(fields["parent_version"]) and is_name_field(fields["training_job"])  # annotated
    assert not is_name_field(fields["dataset_uri"]) and not is_name_field(fields["method"])
    assert is_name_field(rpb.Model.DESCRIPTOR.fields_by_name["name"])
    assert not is_name_field(rpb.Model.DESCRIPTOR.fields_by_name["display_name"])
    assert not is_name_field(rpb.Model.DESCRIPTOR.fields_by_name["labels"])
