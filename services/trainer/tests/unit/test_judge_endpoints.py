"""Judge endpoints: a judge version may only send prompts, and keys, where the trainer's operator allows."""

from __future__ import annotations

import pytest

from neuroweaver_runtime.errors import FailedPrecondition
from neuroweaver_trainer.domain.judge_endpoints import JudgeEndpoints

OPENAI = {"kind": "openai_compatible", "base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"}
LOCAL = {"kind": "local_embedding", "model": "all-minilm-l6-v2"}


def _refused(endpoints: JudgeEndpoints, judge: dict) -> str:
    with pytest.raises(FailedPrecondition) as caught:
        endpoints.check(judge)
    assert caught.value.reason == "JUDGE_ENDPOINT_NOT_ALLOWED"
    return caught.value.message


def test_listed_endpoints_with_their_keys_pass_and_nothing_else():
    endpoints = JudgeEndpoints.from_setting(
        "https://api.openai.com/v1=OPENAI_API_KEY|OPENAI_ORG_KEY, http://127.0.0.1:", auth_enabled=True
    )
    endpoints.check(OPENAI)
    endpoints.check({**OPENAI, "base_url": "http://127.0.0.1:8081/v1", "api_key_env": ""})
    endpoints.check(LOCAL)
    _refused(endpoints, {**OPENAI, "base_url": "http://169.254.169.254/latest"})  # metadata service: not listed
    _refused(endpoints, {**OPENAI, "base_url": "https://api.openai.com.evil.example/v1"})
    _refused(endpoints, {**OPENAI, "api_key_env": "AWS_SECRET_ACCESS_KEY"})  # a key not bound to this endpoint
    _refused(endpoints, {**OPENAI, "base_url": "http://127.0.0.1:9000/v1"})  # that endpoint takes no key


def test_the_trainers_own_settings_are_never_a_judge_key():
    message = _refused(JudgeEndpoints(), {**OPENAI, "api_key_env": "NW_TRAINER_REGISTRY_TOKEN"})
    assert "NW_TRAINER" not in message  # refusals name no variable or value
    with pytest.raises(ValueError):
        JudgeEndpoints.from_setting("https://x.example/v1=NW_TRAINER_REGISTRY_TOKEN", auth_enabled=True)


def test_unset_means_open_without_auth_and_closed_with_it():
    JudgeEndpoints.from_setting("", auth_enabled=False).check(OPENAI)
    _refused(JudgeEndpoints.from_setting("", auth_enabled=True), OPENAI)
    JudgeEndpoints.from_setting("", auth_enabled=True).check(LOCAL)  # nothing leaves the worker


@pytest.mark.parametrize("setting", ["ftp://x/v1", "api.openai.com", "http://"])
def test_malformed_settings_are_refused_at_start(setting):
    with pytest.raises(ValueError):
        JudgeEndpoints.from_setting(setting, auth_enabled=True)
