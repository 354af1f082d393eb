"""The RLAIF pipeline end to end on tiny models (few prompts, few tokens, few steps)."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from neuroweaver_ml.rlaif import JudgeConfig, RlaifConfig, run_rlaif, wilson_interval
from neuroweaver_ml.rlaif.judge_server import JudgeServer
from neuroweaver_ml.testing import write_jsonl

QUESTIONS = [
    ("When should brake pads be replaced?", "Replace brake pads when the lining is under three millimetres."),
    ("What does a flashing check engine light mean?", "A flashing light means a severe misfire; stop driving."),
    ("How often should I rotate my tyres?", "Rotate the tyres every eight thousand kilometres."),
    ("Why does my car pull to the left?", "Pulling usually means wheel alignment or uneven tyre pressure."),
    ("Is it safe to drive with low coolant?", "No, low coolant can overheat the engine; top it up first."),
    ("What is the oil change interval?", "Change the oil every ten thousand kilometres or once a year."),
]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    rows = [{"prompt": q, "reference": a} for q, a in QUESTIONS]
    return write_jsonl(d / "train.jsonl", rows[:4]), write_jsonl(d / "eval.jsonl", rows[4:])


def _cfg(tiny_model_dir, prompt_files, out, **kw):
    train, ev = prompt_files
    base = dict(
        base_model_dir=str(tiny_model_dir),
        prompts_file=str(train),
        eval_prompts_file=str(ev),
        output_dir=str(out),
        judge=JudgeConfig(name="local-minilm/1", kind="local_embedding", score_min=0, score_max=10),
        candidates_per_prompt=3,
        max_new_tokens=8,
        policy_steps=2,
        min_margin=0.01,
        reward_model_steps=2,
        reward_model_batch_size=4,
        reward_model_eval_fraction=0.25,
        checkpoint_every_steps=1,
        learning_rate=1e-4,
        device="cpu",
        judge_chunk_size=4,
    )
    base.update(kw)
    return RlaifConfig(**base)


def test_wilson():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 0) == (None, None)


@pytest.mark.slow
def test_rlaif_grpo_local_judge_end_to_end(tiny_model_dir, prompt_files, tmp_path):
    events = []
    cfg = _cfg(tiny_model_dir, prompt_files, tmp_path / "run", algorithm="grpo", reward_source="both")
    res = run_rlaif(cfg, events.append)
    assert res.status == "completed"
    stages = {(e.stage, e.status) for e in events if e.kind == "stage"}
    for s in ("generate", "judge", "preferences", "reward_model", "policy", "evaluate"):
        assert (s, "started") in stages and (s, "completed") in stages, s
    jp = [e for e in events if e.kind == "judge_progress" and e.stage == "judge"]
    assert jp and jp[-1].done == jp[-1].total == 12
    steps = [e for e in events if e.kind == "rl_step" and e.stage == "policy"]
    assert [e.step for e in steps] == [1, 2] and all(e.reward is not None for e in steps)
    assert "rewards/judge/mean" in steps[0].metrics and "rewards/reward_model/mean" in steps[0].metrics
    assert res.judged == 12 and res.preference_pairs > 0
    assert res.reward_model is not None and res.reward_model.accuracy is not None
    wr = res.win_rate_vs_parent
    assert wr is not None and wr.n + wr.excluded == 2 and 0 <= wr.ci_low <= wr.win_rate <= wr.ci_high <= 1
    m = res.metrics
    for k in (
        "reward_model_accuracy",
        "judge_win_rate_vs_parent",
        "judge_win_rate_vs_base",
        "judge_cost_usd",
        "judged",
        "malformed",
    ):
        assert k in m
    assert (Path(res.adapter_dir) / "adapter_config.json").is_file()
    rep = json.loads(Path(res.report_path).read_text())
    assert rep["judge_version"] == "local-minilm/1" and rep["evaluation"]["win_rates"]["parent"]["ties_policy"] == "half"
    # a finished run returns its recorded result
    again = run_rlaif(cfg)
    assert again.adapter_sha256 == res.adapter_sha256


@pytest.mark.slow
def test_rlaif_dpo_from_sft_parent_with_policy_reward_model(tiny_model_dir, chat_file, prompt_files, tmp_path):
    from neuroweaver_ml.training import SFTConfig, run_sft

    sft = run_sft(
        SFTConfig(
            base_model_dir=str(tiny_model_dir),
            train_file=str(chat_file),
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            batch_size=4,
            lora_r=4,
            lora_alpha=8,
            checkpoint_every_steps=0,
        )
    )
    events = []
    cfg = _cfg(
        tiny_model_dir,
        prompt_files,
        tmp_path / "run",
        algorithm="dpo",
        parent_adapter_dir=sft.adapter_dir,
        reward_model_backbone="policy",
        lora_r=4,
        lora_alpha=8,
    )
    res = run_rlaif(cfg, events.append)
    assert res.status == "completed" and res.policy.algorithm == "dpo" and res.policy.global_step == 2
    assert res.reward_model.backbone == "policy" and res.reward_model.accuracy is not None
    assert res.win_rate_vs_base is not None and res.win_rate_vs_parent is not None
    steps = [e for e in events if e.kind == "rl_step" and e.stage == "policy"]
    assert len(steps) == 2 and "rewards/margins" in steps[0].metrics
    # the trained adapter is the parent's LoRA continued (same rank), loadable on the plain base
    conf = json.loads((Path(res.adapter_dir) / "adapter_config.json").read_text())
    assert conf["r"] == 4


@pytest.fixture()
def judge_server():
    with JudgeServer() as s:
        yield s


def _spawn(cfg_dict, block_kind):
    env = dict(os.environ, NW_TEST_JUDGE_KEY="sk-test", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    worker = Path(__file__).with_name("_rlaif_worker.py")
    return subprocess.Popen(
        [sys.executable, str(worker), json.dumps(cfg_dict), block_kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _read_until(proc, pred):
    seen = []
    for line in proc.stdout:
        ev = json.loads(line)
        seen.append(ev)
        if pred(ev):
            return seen
    raise AssertionError(f"child exited before the expected event; saw {[e['kind'] for e in seen]}")


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


@pytest.mark.slow
def test_openai_judge_run_killed_in_judging_and_in_policy_resumes(
    tiny_model_dir, prompt_files, tmp_path, judge_server, monkeypatch
):
    monkeypatch.setenv("NW_TEST_JUDGE_KEY", "sk-test")
    judge_server.state.malformed_if_contains = "coolant"  # eval prompt → malformed verdicts, skipped
    judge_server.state.faults += [{"status": 429, "retry_after": 0.1}, {"status": 500}]
    jc = JudgeConfig(
        name="projects/p/judges/http/versions/1",
        kind="openai_compatible",
        base_url=judge_server.base_url,
        model="nw-judge",
        api_key_env="NW_TEST_JUDGE_KEY",
        max_concurrency=2,
        backoff_base_seconds=0.05,
        price_per_1k_prompt_tokens=0.01,
    )
    cfg = _cfg(
        tiny_model_dir,
        prompt_files,
        tmp_path / "run",
        judge=jc,
        algorithm="grpo",
        reward_source="judge",
        judge_chunk_size=2,
        policy_steps=2,
        train_reward_model=False,
    )
    d = asdict(cfg)

    # 1) killed right after the first judge-progress event (2 of 12 verdicts done)
    p = _spawn(d, "judge_progress")
    _read_until(p, lambda e: e["kind"] == "judge_progress")
    _kill(p)
    first = judge_server.state.contents()
    assert len(first) == 2

    # 2) rerun: generation is skipped, judging resumes through the cache; killed at the first policy checkpoint
    p = _spawn(d, "checkpoint")
    seen = _read_until(p, lambda e: e["kind"] == "checkpoint")
    _kill(p)
    assert {"stage": "generate", "status": "skipped"}.items() <= next(
        e for e in seen if e["kind"] == "stage" and e["stage"] == "generate"
    ).items()
    jp = [e for e in seen if e["kind"] == "judge_progress" and e["stage"] == "judge"]
    assert jp[0]["cache_hits"] == 2 and jp[-1]["done"] == 12
    judge_stage = judge_server.state.contents()[len(first) : len(first) + 10]
    assert not set(first) & set(judge_stage)  # already judged items were not sent again
    assert len(set(first) | set(judge_stage)) == 12

    # 3) rerun in-process: the policy stage resumes from its checkpoint, evaluation runs
    events = []
    res = run_rlaif(cfg, events.append)
    assert res.status == "completed"
    resumed = [e for e in events if e.kind == "resumed"]
    assert resumed and resumed[0].step >= 1
    assert res.policy.resumed_from_step >= 1 and res.policy.global_step == 2
    assert {"generate", "judge", "preferences"} <= set(res.skipped_stages)
    assert res.judged == 12 and res.judge_cost_usd > 0
    wr = res.win_rate_vs_parent
    assert wr.excluded >= 1  # the "coolant" eval prompt got malformed verdicts: excluded, not scored
    statuses = [r.status for r in judge_server.state.requests]
    assert statuses[:2] == [429, 500] or (429 in statuses and 500 in statuses)


@pytest.mark.slow
def test_rloo_with_reward_model_no_eval(tiny_model_dir, prompt_files, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        prompt_files,
        tmp_path / "run",
        algorithm="rloo",
        reward_source="reward_model",
        eval_prompts_file=None,
        candidates_per_prompt=2,
    )
    events = []
    res = run_rlaif(cfg, events.append)
    assert res.status == "completed" and res.policy.algorithm == "rloo" and res.policy.global_step == 2
    assert res.win_rate_vs_parent is None and res.metrics["judge_win_rate_vs_parent"] is None
    assert any(e.kind == "rl_step" and "rewards/reward_model/mean" in e.metrics for e in events)


@pytest.mark.slow
def test_direct_reward_model_and_dpo_on_preference_file(tiny_model_dir, tmp_path):
    from neuroweaver_ml.rlaif import DPOJobConfig, RewardModelConfig, run_dpo, run_reward_model

    rows = [{"prompt": q, "chosen": a, "rejected": "I don't know."} for q, a in QUESTIONS] * 2
    pf = write_jsonl(tmp_path / "prefs.jsonl", rows)
    rm = run_reward_model(
        RewardModelConfig(
            preference_file=str(pf),
            output_dir=str(tmp_path / "rm"),
            max_steps=3,
            batch_size=4,
            eval_fraction=0.25,
            learning_rate=1e-4,
            device="cpu",
        )
    )
    assert rm.status == "completed" and rm.eval_pairs == 3 and rm.accuracy is not None
    assert (Path(rm.model_dir) / "reward_model.json").is_file()
    events = []
    dpo = DPOJobConfig(
        base_model_dir=str(tiny_model_dir),
        preference_file=str(pf),
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        batch_size=2,
        lora_r=4,
        lora_alpha=8,
        checkpoint_every_steps=1,
        device="cpu",
    )
    pol = run_dpo(dpo, events.append)
    assert pol.status == "completed" and pol.global_step == 2 and pol.adapter_sha256
    assert [e.kind for e in events].count("checkpoint") == 2
    # called again: the recorded result, no training
    again = run_dpo(dpo)
    assert again.adapter_sha256 == pol.adapter_sha256
