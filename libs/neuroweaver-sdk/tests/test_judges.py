"""A deployment as a judge version (`neuroweaver_sdk.judges`): which endpoint and model name, which token budget, and
what is refused because it could not work. The real path, against a deployed model server, is
services/deployer/tests/e2e/test_judge_from_deployment.py."""

from __future__ import annotations

import pytest

from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver_sdk.judges import DeploymentNotUsable, judge_version_from_deployment

NAME = "projects/default/deployments/advisor-ab"
V1, V2 = "projects/default/models/advisor/versions/1.0.0", "projects/default/models/advisor/versions/1.1.0"


def deployment(**fields) -> dpb.Deployment:
    return dpb.Deployment(
        name=NAME, state=dpb.Deployment.STATE_AVAILABLE, openai_base_url="http://127.0.0.1:8081/v1", served_version=V1,
        model_names=[NAME, "advisor-ab"],
        served_versions=[
            dpb.ServedVersion(model_version=V1, model_names=[NAME, "advisor-ab"]),
            dpb.ServedVersion(model_version=V2, model_names=[f"{NAME}/1.1.0", "advisor-ab/1.1.0"]),
        ],
        **fields,
    )  # fmt: skip


def test_the_deployments_stable_name_or_one_of_its_versions():
    v = judge_version_from_deployment(deployment(), rubric="r", score_max=5)
    assert v.kind == rpb.JUDGE_KIND_OPENAI_COMPATIBLE and (v.openai.base_url, v.openai.model) == (
        "http://127.0.0.1:8081/v1",
        NAME,
    )
    assert (v.openai.api_key_env, v.openai.price_per_1k_prompt_tokens, v.openai.max_tokens) == ("", 0, 256)
    assert "self-hosted: cost 0" in v.notes and V1 in v.notes and (v.rubric, v.score_max) == ("r", 5)
    for version in ("1.1.0", V2):
        picked = judge_version_from_deployment(deployment(), version=version, api_key_env="JUDGE_TOKEN")
        assert (picked.openai.model, picked.openai.api_key_env) == (f"{NAME}/1.1.0", "JUDGE_TOKEN")
    priced = judge_version_from_deployment(deployment(), price_per_1k_prompt_tokens=0.01)
    assert priced.openai.price_per_1k_prompt_tokens == 0.01 and "cost 0" not in priced.notes
    pairwise = judge_version_from_deployment(deployment(), mode=rpb.JUDGE_MODE_PAIRWISE)
    assert pairwise.swap_positions


def test_the_token_budget_stays_within_the_deployments_limit():
    limited = deployment(serving=dpb.ServingConfig(max_new_tokens_limit=64))
    assert judge_version_from_deployment(limited).openai.max_tokens == 64
    assert judge_version_from_deployment(limited, max_tokens=32).openai.max_tokens == 32
    with pytest.raises(DeploymentNotUsable, match="above deployment .* limit of 64"):
        judge_version_from_deployment(limited, max_tokens=128)


def test_what_could_not_work_is_refused():
    with pytest.raises(DeploymentNotUsable, match="no OpenAI-compatible endpoint yet .state PROGRESSING"):
        judge_version_from_deployment(dpb.Deployment(name=NAME, state=dpb.Deployment.STATE_PROGRESSING))
    with pytest.raises(DeploymentNotUsable, match=r"serves no version '2.0.0' \(it serves: 1.0.0, 1.1.0\)"):
        judge_version_from_deployment(deployment(), version="2.0.0")
