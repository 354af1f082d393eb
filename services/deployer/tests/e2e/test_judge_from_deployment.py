"""An LLM judge served by the platform itself: a tiny model deployed on the LOCAL backend (a real model-server
process), a judge created from that deployment with the `nw` CLI (`nw judges create J --from-deployment D`), and answers
scored through the judge client the experiments service and the RLAIF worker use, against the deployment's real
OpenAI-compatible endpoint. The tiny random model's verdicts are junk: what is asserted is the path — the requests
reach the deployment (its token usage comes back), every answer gets a verdict or counts as malformed, nothing fails.
With auth on, the judge version names the variable holding a viewer token, and only with it do the requests pass."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
from helpers import Stack, model_server_processes, watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver_experiments.adapters.judges import judge_config_fields
from neuroweaver_experiments.domain.judging import JudgeEndpoints
from neuroweaver_ml.rlaif.judges import JudgeConfig, make_judge
from neuroweaver_runtime.errors import FailedPrecondition
from neuroweaver_runtime.testing import free_port

pytestmark = pytest.mark.slow  # model-server processes

NW = str(Path(sys.executable).parent / "nw")  # the console script pip installed
AVAILABLE = dpb.Deployment.STATE_AVAILABLE
ANSWERS = [
    ("How often should I rotate my tyres?", "Every 8,000 km.", "Every 8,000 to 10,000 km."),
    ("Is the brake fluid due?", "Yes, it is two years old.", "Brake fluid is replaced every two years."),
]


async def nw(stack: Stack, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    """The installed `nw` as a separate process (awaited: the registry and deployer serve on this event loop)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NW_TOKEN")}
    env |= {"NW_REGISTRY_TARGET": f"127.0.0.1:{stack.registry.port}", "NW_DEPLOYER_TARGET": f"127.0.0.1:{stack.deployer.port}"}
    for service in ("TRAINER", "EXPERIMENTS"):
        env[f"NW_{service}_TARGET"] = f"127.0.0.1:{free_port()}"
    if token:
        env["NW_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(NW, *args, stdout=PIPE, stderr=PIPE, env=env)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return subprocess.CompletedProcess([NW, *args], proc.returncode, out.decode(), err.decode())


async def deploy(stack: Stack, deployment_id: str) -> dpb.Deployment:
    name = f"projects/default/deployments/{deployment_id}"
    await stack.dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id=deployment_id,
            deployment=dpb.Deployment(
                model_version=stack.versions[0],
                replicas=1,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(max_new_tokens_limit=16),
            ),
        )  # fmt: skip
    )
    return await watch_until(stack.dep, name, lambda d: d.state == AVAILABLE and d.ready_replicas == 1)


async def judge_config(stack: Stack, judge: str) -> tuple[rpb.JudgeVersion, JudgeConfig]:
    """The judge version as the experiments service turns it into neuroweaver_ml's judge config."""
    v = await stack.reg.GetJudgeVersion(rsvc.GetJudgeVersionRequest(name=f"projects/default/judges/{judge}/versions/latest"))
    return v, JudgeConfig(**judge_config_fields(v, max_retries=0))


async def test_a_judge_from_a_deployment_scores_through_its_endpoint(stack, tmp_path):
    d = await deploy(stack, "judge-llm")
    rubric = tmp_path / "rubric.md"
    rubric.write_text("Correct and specific about maintenance intervals.")
    made = await nw(stack, "judges", "create", "served-judge", "--from-deployment", "judge-llm", "--rubric-file", str(rubric),
              "--score-max", "5", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "projects/default/judges/served-judge"
    assert d.openai_base_url in made.stderr  # where to allow it (--judge-endpoints), on stderr beside the JSON

    v, config = await judge_config(stack, "served-judge")
    assert v.kind == rpb.JUDGE_KIND_OPENAI_COMPATIBLE and v.mode == rpb.JUDGE_MODE_POINTWISE
    assert (v.openai.base_url, v.openai.model, v.openai.api_key_env) == (d.openai_base_url, d.model_names[0], "")
    assert v.openai.max_tokens == 16  # within the deployment's max_new_tokens_limit, else every request is refused
    assert (v.openai.price_per_1k_prompt_tokens, v.openai.price_per_1k_completion_tokens) == (0, 0)
    assert "self-hosted: cost 0" in v.notes and stack.versions[0] in v.notes
    assert v.rubric == rubric.read_text() and (v.score_min, v.score_max) == (1, 5)

    # a service with auth on allows the deployment's endpoint only when listed; listed, the version passes
    with pytest.raises(FailedPrecondition):
        JudgeEndpoints.from_setting("", auth_enabled=True).check({"base_url": config.base_url})
    JudgeEndpoints.from_setting(d.openai_base_url, auth_enabled=True).check({"base_url": config.base_url})

    judge = make_judge(config)
    try:
        verdicts = await judge.score_many(ANSWERS)
    finally:
        await judge.aclose()
    assert len(verdicts) == len(ANSWERS)
    assert all(j.error is None for j in verdicts), [j.error for j in verdicts]
    assert all(j.ok or j.malformed for j in verdicts)
    assert all(j.prompt_tokens > 0 and 0 < j.completion_tokens <= 16 for j in verdicts)  # the model server's usage
    assert all(j.cost_usd == 0 for j in verdicts)
    assert judge.stats.requests == len(ANSWERS) and judge.stats.errors == 0
    assert judge.stats.malformed == sum(not j.ok for j in verdicts)

    # what cannot work is refused before anything is written: a version the deployment does not serve
    wrong = await nw(stack, "judges", "create", "other-judge", "--from-deployment", "judge-llm", "--served-version", "9.9.9")
    assert wrong.returncode == 1 and "serves no version '9.9.9'" in wrong.stderr
    await stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=d.name))
    assert model_server_processes() == []


ADMIN, VIEWER, SERVICE = "admin-default-token", "viewer-default-token", "svc-deployer-token"
TOKENS = f"{ADMIN}=default:admin:alice,{VIEWER}=default:viewer:val,{SERVICE}=*:service:deployer"


@pytest.fixture(scope="module")
async def auth_stack(tmp_path_factory, tiny_base, adapters, kube_standin):
    import grpc

    stack = Stack(
        tmp_path_factory.mktemp("auth-stack"), tiny_base, adapters[:1], kube_standin.url,
        registry_extra={"auth_tokens": TOKENS, "page_token_secret": "test-page-secret"},
        deployer_extra={"auth_tokens": TOKENS, "page_token_secret": "test-page-secret", "registry_token": SERVICE},
        credentials=grpc.composite_channel_credentials(
            grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP), grpc.access_token_call_credentials(ADMIN)
        ),
    )  # fmt: skip
    await stack.start()
    yield stack
    await stack.stop()


async def test_with_auth_on_the_judge_sends_the_token_its_version_names(auth_stack, monkeypatch):
    d = await deploy(auth_stack, "judge-secure")
    refused = await nw(auth_stack, "judges", "create", "secure-judge", "--from-deployment", "judge-secure", token=ADMIN)
    assert refused.returncode == 1 and "--api-key-env" in refused.stderr  # a judge without a key would only get 401s
    made = await nw(auth_stack, "judges", "create", "secure-judge", "--from-deployment", "judge-secure",
              "--api-key-env", "JUDGE_TOKEN", "-q", token=ADMIN)  # fmt: skip
    assert made.returncode == 0, made.stderr
    v, config = await judge_config(auth_stack, "secure-judge")
    assert v.openai.api_key_env == "JUDGE_TOKEN"
    JudgeEndpoints.from_setting(f"{d.openai_base_url}=JUDGE_TOKEN", auth_enabled=True).check(
        {"base_url": config.base_url, "api_key_env": config.api_key_env}
    )

    monkeypatch.setenv("JUDGE_TOKEN", "not-a-token")
    judge = make_judge(config)
    try:
        [denied] = await judge.score_many(ANSWERS[:1])
    finally:
        await judge.aclose()
    assert denied.error and "401" in denied.error  # a failure the caller sees, not a crash and not a score

    monkeypatch.setenv("JUDGE_TOKEN", VIEWER)
    judge = make_judge(config)
    try:
        verdicts = await judge.score_many(ANSWERS)
    finally:
        await judge.aclose()
    assert all(j.error is None and (j.ok or j.malformed) and j.prompt_tokens > 0 for j in verdicts), verdicts
    await auth_stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=d.name))
