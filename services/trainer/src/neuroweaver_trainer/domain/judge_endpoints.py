"""Where an RLAIF job's judge may send prompts, and which key variable may go with them.

A judge version is data any operator of a project can write: its `base_url` is where the trainer's worker sends
prompts and its `api_key_env` names the worker's environment variable sent there as the bearer key. Unchecked, that
is a server-side request forgery and a way to read any variable of the worker (its registry credential included).
So the trainer only accepts judges whose endpoint starts with a configured prefix, each prefix with the key
variables allowed to go to it:

    --judge-endpoints "https://api.openai.com/v1=OPENAI_API_KEY,http://judge.internal:8080/v1"

With no list, a trainer with auth off (one user on their own machine) accepts any endpoint, and a trainer with auth
on accepts none. The trainer's own settings (`NW_TRAINER_*`) are never a judge key.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroweaver_runtime.errors import FailedPrecondition

_OWN_SETTINGS = "NW_TRAINER_"


@dataclass(frozen=True)
class JudgeEndpoint:
    prefix: str
    key_envs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class JudgeEndpoints:
    endpoints: tuple[JudgeEndpoint, ...] = ()
    open_when_unset: bool = True

    @classmethod
    def from_setting(cls, setting: str, *, auth_enabled: bool) -> JudgeEndpoints:
        endpoints = []
        for item in filter(None, (s.strip() for s in (setting or "").split(","))):
            prefix, _, keys = item.partition("=")
            if not prefix.startswith(("http://", "https://")) or len(prefix) < len("http://x"):
                raise ValueError(f"judge endpoint {item[:60]!r} must be an http(s) URL prefix[=KEY_ENV|KEY_ENV]")
            names = frozenset(k.strip() for k in keys.split("|") if k.strip())
            if any(n.startswith(_OWN_SETTINGS) for n in names):
                raise ValueError(f"judge endpoint {prefix[:60]!r}: {_OWN_SETTINGS}* variables are the trainer's own")
            endpoints.append(JudgeEndpoint(prefix, names))
        return cls(tuple(endpoints), open_when_unset=not auth_enabled)

    def check(self, judge: dict) -> None:
        """Raises FAILED_PRECONDITION when the resolved judge config may not be used by this trainer."""
        base_url, key_env = judge.get("base_url") or "", judge.get("api_key_env") or ""
        if not base_url:  # a local judge: nothing leaves the worker
            return
        if key_env.startswith(_OWN_SETTINGS):
            _refuse("the judge's api_key_env names one of the trainer's own settings")
        if not self.endpoints:
            if self.open_when_unset:
                return
            _refuse("this trainer allows no judge endpoints; its operator lists them in --judge-endpoints")
        for endpoint in self.endpoints:
            if base_url.startswith(endpoint.prefix):
                if key_env and key_env not in endpoint.key_envs:
                    _refuse("the judge's api_key_env is not allowed for its endpoint (see the trainer's --judge-endpoints)")
                return
        _refuse("the judge's base_url is not among the trainer's --judge-endpoints")


def _refuse(message: str) -> None:
    raise FailedPrecondition(message, reason="JUDGE_ENDPOINT_NOT_ALLOWED")
