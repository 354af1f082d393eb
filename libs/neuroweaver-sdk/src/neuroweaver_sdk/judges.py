"""Judges served by the platform itself: a deployment's model server as an LLM judge.

Every deployment's model server answers OpenAI's `/v1/chat/completions` (`Deployment.openai_base_url`), which is what
an OPENAI_COMPATIBLE judge version calls. `judge_version_from_deployment` turns a deployment into such a version: its
base URL, and as the model the deployment's stable name (its resource name, which keeps answering across rollovers)
or, for one of several versions on one server, that version's `{deployment}/{version}` name.

A self-hosted judge costs nothing per token: its prices stay 0 unless given. With auth on, the model server wants a
bearer token of the deployment's project (viewer or above) from whoever calls it — the trainer's RLAIF worker or the
experiments service — so the version names the variable of those processes that holds one (`api_key_env`), and
their `--judge-endpoints` must list the base URL with that variable.
"""

from __future__ import annotations

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

from .clients import Clients

#: The judge's answer budget (tokens): enough for a short justification and the `Score: N` line.
DEFAULT_MAX_TOKENS = 256


class DeploymentNotUsable(ValueError):
    """The deployment cannot serve as a judge (yet): not reachable over HTTP, or it serves no such version."""


def served_model_name_for(deployment: dpb.Deployment, version: str = "") -> tuple[str, str]:
    """(model name to send, model version it reaches now). `version` ("" = the deployment's own) is a semver or a full
    version name among `served_versions`."""
    if not version:
        if not deployment.model_names:
            raise DeploymentNotUsable(f"deployment {deployment.name} has no model names yet (state {_state(deployment)})")
        return deployment.model_names[0], deployment.served_version
    for served in deployment.served_versions:
        if served.model_version == version or served.model_version.endswith(f"/versions/{version}"):
            if not served.model_names:
                break
            return served.model_names[0], served.model_version
    listed = ", ".join(s.model_version.rsplit("/", 1)[-1] for s in deployment.served_versions) or "none yet"
    raise DeploymentNotUsable(f"deployment {deployment.name} serves no version {version!r} (it serves: {listed})")


def judge_version_from_deployment(
    deployment: dpb.Deployment,
    *,
    version: str = "",
    mode: rpb.JudgeMode.ValueType = rpb.JUDGE_MODE_POINTWISE,
    rubric: str = "",
    score_min: float = 1.0,
    score_max: float = 10.0,
    api_key_env: str = "",
    max_tokens: int = 0,
    price_per_1k_prompt_tokens: float = 0.0,
    price_per_1k_completion_tokens: float = 0.0,
) -> rpb.JudgeVersion:
    """An OPENAI_COMPATIBLE judge version that asks `deployment`'s model server (see the module docstring)."""
    if not deployment.openai_base_url:
        raise DeploymentNotUsable(
            f"deployment {deployment.name} has no OpenAI-compatible endpoint yet (state {_state(deployment)}); "
            "wait until it is AVAILABLE (nw deploy watch)"
        )
    model, reaches = served_model_name_for(deployment, version)
    limit = deployment.serving.max_new_tokens_limit
    budget = max_tokens or (min(DEFAULT_MAX_TOKENS, limit) if limit else DEFAULT_MAX_TOKENS)
    if limit and budget > limit:
        raise DeploymentNotUsable(f"max tokens {budget} is above deployment {deployment.name}'s limit of {limit}")
    free = not (price_per_1k_prompt_tokens or price_per_1k_completion_tokens)
    notes = f"served by deployment {deployment.name} (model {model}; {reaches or 'version unknown'} at creation)"
    if free:
        notes += "; self-hosted: cost 0"
    return rpb.JudgeVersion(
        kind=rpb.JUDGE_KIND_OPENAI_COMPATIBLE,
        mode=mode,
        openai=rpb.OpenAICompatibleJudge(
            base_url=deployment.openai_base_url,
            model=model,
            api_key_env=api_key_env,
            max_tokens=budget,
            price_per_1k_prompt_tokens=price_per_1k_prompt_tokens,
            price_per_1k_completion_tokens=price_per_1k_completion_tokens,
        ),
        rubric=rubric,
        score_min=score_min,
        score_max=score_max,
        swap_positions=mode == rpb.JUDGE_MODE_PAIRWISE,
        notes=notes,
    )


async def create_judge_from_deployment(
    clients: Clients, parent: str, judge_id: str, deployment: str, *, request_id: str = "", **options
) -> rpb.Judge:
    """Reads `deployment` (GetDeployment) and creates judge `judge_id` in `parent` with a version that asks it.
    `options` are `judge_version_from_deployment`'s."""
    d = await clients.deployer.GetDeployment(dsvc.GetDeploymentRequest(name=deployment))
    version = judge_version_from_deployment(d, **options)
    judge = rpb.Judge(description=f"LLM judge served by {d.name}")
    return await clients.registry.CreateJudge(
        rsvc.CreateJudgeRequest(parent=parent, judge_id=judge_id, judge=judge, judge_version=version, request_id=request_id)
    )


def _state(d: dpb.Deployment) -> str:
    return dpb.Deployment.State.Name(d.state).removeprefix("STATE_")
