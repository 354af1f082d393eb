"""The worker's parts without training: the event table, and registration through the registry gateway
(against a real gRPC server standing in for the registry)."""

from __future__ import annotations

import grpc
import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_ml import CheckpointEvent, EvalEvent, ResumedEvent, StepEvent
from neuroweaver_ml.rlaif import JudgeProgressEvent, MetricsEvent, RLStepEvent, StageEvent
from neuroweaver_runtime.auth import ON_BEHALF_OF_HEADER
from neuroweaver_trainer.adapters.registry import NewVersion, RegistrationFailed, register_version
from neuroweaver_trainer.domain.job import EventType, Method, TrainingJob, registration_request_id
from neuroweaver_trainer.worker.events import RULES, EventMapper, rule_for


def _step(step: int) -> StepEvent:
    return StepEvent(step, 10, 0.5, 1.25, 1e-4, None, 64, 100.0, None, 1, None)


def test_every_training_event_kind_has_a_rule():
    events = [
        _step(1), EvalEvent(1, 0.5), CheckpointEvent(1, "/c"), ResumedEvent(1, "/c"), MetricsEvent("final", {}),
        JudgeProgressEvent("judge", 1, 2, 0, 0, 0, 1, 0, 1, 1, 0.0), RLStepEvent("policy", 1, 2, 0.1, 0.2, 0.3, 1e-5),
    ] + [StageEvent("judge", status) for status in ("started", "completed", "skipped", "cancelled")]  # fmt: skip
    assert all(rule_for(ev) is not None for ev in events)
    assert rule_for(StageEvent("judge", "cancelled")) is RULES["stage:*"]
    assert EventMapper(1).map(type("Unknown", (), {"kind": "gossip"})()) is None


def test_stages_follow_the_pipeline_and_stageless_events_join_the_running_one():
    m = EventMapper(attempt=3)
    started = m.map(StageEvent("preferences", "started"))
    assert started is not None and m.stage == "pairs"  # the pipeline's name → the contract's
    assert (started.event.type, started.event.stage, started.event.message) == (
        EventType.STAGE_STARTED,
        "pairs",
        "attempt 3: pairs",
    )
    assert started.job_values == {"stage": "pairs"}

    ckpt = m.map(CheckpointEvent(7, "/ckpt/7"))
    assert (ckpt.event.type, ckpt.event.stage, ckpt.event.metrics, ckpt.event.message) == (
        EventType.CHECKPOINT,
        "pairs",
        {"step": 7.0},
        "/ckpt/7",
    )
    resumed = m.map(ResumedEvent(7, "/ckpt/7"))
    assert (resumed.event.type, resumed.event.stage) == (EventType.RESUMED, "pairs")
    assert resumed.job_values == {"resumed_from_step": 7, "current_step": 7}

    done = m.map(
        StageEvent("preferences", "completed", seconds=1.5, detail={"pairs": 4, "ok": True, "bad": float("nan"), "s": "x"})
    )
    assert (done.event.type, done.event.metrics, done.event.message) == (
        EventType.STAGE_COMPLETED,
        {"pairs": 4.0},
        "pairs completed in 1.5s",
    )
    assert done.job_values == {}
    skipped = m.map(StageEvent("judge", "skipped", detail={"verdicts": 2}))
    assert (skipped.event.type, skipped.event.stage, skipped.event.metrics) == (EventType.LOG, "judge", {"verdicts": 2.0})
    assert "already completed by an earlier attempt" in skipped.event.message and m.stage == "pairs"
    other = m.map(StageEvent("judge", "cancelled"))
    assert (other.event.type, other.event.message) == (EventType.LOG, "judge: cancelled")


def test_progress_events_carry_their_metrics_and_job_columns():
    m = EventMapper(attempt=1, stage="policy")
    judge = m.map(JudgeProgressEvent("judge", 3, 8, 1, 0, 0, 4, 1, 30, 12, 0.25))
    assert (judge.event.type, judge.event.stage, judge.event.message) == (EventType.JUDGE, "judge", "judged 3/8")
    assert judge.event.metrics["tokens"] == 42.0 and judge.event.metrics["cost_usd"] == 0.25

    rl = m.map(RLStepEvent("policy", 5, 20, 0.7, None, 0.01, 1e-5, metrics={"rewards/margins": 0.5}))
    assert (rl.event.type, rl.event.stage, rl.event.step.step, rl.event.step.total_steps) == (EventType.STEP, "policy", 5, 20)
    assert rl.event.metrics == {"rewards_margins": 0.5, "loss": 0.7, "kl": 0.01}  # None dropped, '/' → '_'
    assert rl.job_values == {"current_step": 5, "total_steps": 20}
    m.stage = "dpo"  # a DPO job's steps stay in its stage
    assert m.map(RLStepEvent("policy", 6, 20, 0.6, None, None, None)).event.stage == "dpo"

    final = m.map(MetricsEvent("final", {"win_rate": 0.6, "label": "x"}))
    assert (final.event.type, final.event.stage, final.event.metrics, final.event.message) == (
        EventType.EVAL,
        "evaluate",
        {"win_rate": 0.6},
        "final metrics",
    )

    step = m.map(_step(4))
    assert (step.event.type, step.event.stage, step.event.step.loss, step.event.step.grad_norm) == (
        EventType.STEP,
        "sft",
        1.25,
        0.0,
    )
    assert step.job_values == {"current_step": 4, "total_steps": 10}
    ev = m.map(EvalEvent(4, 0.9))
    assert (ev.event.type, ev.event.stage, ev.event.metrics) == (EventType.EVAL, "sft", {"eval_loss": 0.9, "step": 4.0})


class _Registry(rgrpc.RegistryServiceServicer):
    """Answers CreateModelVersion with the codes queued in `answers` (then OK), recording what it got."""

    def __init__(self, answers: list[grpc.StatusCode]) -> None:
        self.answers = answers
        self.calls: list[tuple[rsvc.CreateModelVersionRequest, dict[str, str]]] = []

    async def CreateModelVersion(self, request, context):  # noqa: N802
        self.calls.append((request, dict(context.invocation_metadata())))
        if self.answers:
            await context.abort(self.answers.pop(0), "not now")
        return rpb.ModelVersion(name=f"{request.parent}/versions/1.1.0")


@pytest.fixture
async def fake_registry():
    servers = []

    async def start(answers: list[grpc.StatusCode]) -> tuple[str, _Registry]:
        servicer = _Registry(answers)
        server = grpc.aio.server()
        rgrpc.add_RegistryServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        await server.stop(None)


def _job() -> TrainingJob:
    return TrainingJob(
        name="projects/p/trainingJobs/j", base_model="tiny", dataset_uri="file:///d.jsonl", method=Method.SFT_LORA,
        target_model="projects/p/models/m", creator="alice",
    )  # fmt: skip


NEW = NewVersion(
    uri="file:///store/adapter", sha256="ab" * 32, size_bytes=10, summary="3 steps",
    metrics={"train_loss": 1.0, "judge_win_rate_vs_base_ci_low": 0.4, "tokens": 5.0},
)  # fmt: skip


async def test_registration_retries_a_busy_registry_on_behalf_of_the_creator(fake_registry):
    # RESOURCE_EXHAUSTED: the channel itself retries UNAVAILABLE a few times first; this is the gateway's loop
    target, registry = await fake_registry([grpc.StatusCode.RESOURCE_EXHAUSTED])
    retries: list[str] = []

    async def on_retry(message: str) -> None:
        retries.append(message)

    name = await register_version(target, "", _job(), NEW, retry_seconds=30, on_retry=on_retry)
    assert name == "projects/p/models/m/versions/1.1.0"
    assert len(registry.calls) == 2 and len(retries) == 1 and "registry unreachable (RESOURCE_EXHAUSTED), try 1" in retries[0]
    request, metadata = registry.calls[-1]
    assert request.request_id == registration_request_id("projects/p/trainingJobs/j") == registry.calls[0][0].request_id
    assert metadata[ON_BEHALF_OF_HEADER] == "p:operator:alice"
    assert request.bump == cpb.VERSION_BUMP_MINOR and request.model_version.artifact.sha256 == NEW.sha256
    directions = {m.name: m.direction for m in request.model_version.metrics}
    assert directions == {
        "judge_win_rate_vs_base_ci_low": cpb.METRIC_DIRECTION_HIGHER_IS_BETTER,
        "tokens": cpb.METRIC_DIRECTION_UNSPECIFIED,
        "train_loss": cpb.METRIC_DIRECTION_LOWER_IS_BETTER,
    }
    assert request.model_version.notes == "sft-lora of tiny by projects/p/trainingJobs/j: 3 steps"


async def test_a_refusal_is_not_retried_and_says_where_the_adapter_is(fake_registry):
    target, registry = await fake_registry([grpc.StatusCode.PERMISSION_DENIED])
    with pytest.raises(RegistrationFailed) as exc:
        await register_version(target, "", _job(), NEW, retry_seconds=30)
    assert len(registry.calls) == 1
    assert str(exc.value) == (
        "the registry refused the new version of projects/p/models/m: PERMISSION_DENIED: not now; "
        "the adapter is stored at file:///store/adapter"
    )


async def test_an_unreachable_registry_fails_once_the_retry_time_is_spent(fake_registry):
    target, registry = await fake_registry([grpc.StatusCode.RESOURCE_EXHAUSTED] * 10)
    with pytest.raises(RegistrationFailed) as exc:
        await register_version(target, "", _job(), NEW, retry_seconds=0.2)
    assert len(registry.calls) == 1  # the first backoff (0.5 s) would already pass the 0.2 s
    assert "was unreachable for 0s (1 tries, last: RESOURCE_EXHAUSTED); nothing was registered" in str(exc.value)
