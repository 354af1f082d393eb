"""Where a service may send an AI judge's prompts, and which key variable may go with them.

A judge version is data any operator of a project can write: its `base_url` is where the calling process (the
trainer's RLAIF worker, the experiments service judging live answers) sends prompts, and its `api_key_env` names that
process's environment variable sent there as the bearer key. Unchecked, that is a server-side request forgery and a
way to read any variable of the process (its service credentials included). So a service only accepts judges whose
endpoint starts with a configured prefix, each prefix with the key variables allowed to go to it:

    --judge-endpoints "https://api.openai.com/v1=OPENAI_API_KEY,http://judge.internal:8080/v1"

With no list, a service with auth off (one user on their own machine) accepts any endpoint, and one with auth on
accepts none. The service's own settings (`NW_<SERVICE>_*`) are never a judge key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from .errors import FailedPrecondition


@dataclass(frozen=True)
class JudgeEndpoint:
    prefix: str
    key_envs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class JudgeEndpoints:
    """The allow-list of one service; subclasses name the service (`SERVICE`) and its own settings' prefix."""

    SERVICE: ClassVar[str] = "service"
    OWN_SETTINGS: ClassVar[str] = "NW_"

    endpoints: tuple[JudgeEndpoint, ...] = ()
    open_when_unset: bool = True

    @classmethod
    def from_setting(cls, setting: str, *, auth_enabled: bool) -> Self:
        endpoints = []
        for item in filter(None, (s.strip() for s in (setting or "").split(","))):
            prefix, _, keys = item.partition("=")
            if not prefix.startswith(("http://", "https://")) or len(prefix) < len("http://x"):
                raise ValueError(f"judge endpoint {item[:60]!r} must be an http(s) URL prefix[=KEY_ENV|KEY_ENV]")
            names = frozenset(k.strip() for k in keys.split("|") if k.strip())
            if any(n.startswith(cls.OWN_SETTINGS) for n in names):
                raise ValueError(f"judge endpoint {prefix[:60]!r}: {cls.OWN_SETTINGS}* variables are the {cls.SERVICE}'s own")
            endpoints.append(JudgeEndpoint(prefix, names))
        return cls(tuple(endpoints), open_when_unset=not auth_enabled)

    def check(self, judge: dict) -> None:
        """Raises FAILED_PRECONDITION when a judge config (`base_url`, `api_key_env`) may not be used here."""
        self.check_endpoint(judge.get("base_url") or "", judge.get("api_key_env") or "")

    def check_endpoint(self, base_url: str, key_env: str) -> None:
        if not base_url:  # a local judge: nothing leaves the process
            return
        service = self.SERVICE
        if key_env.startswith(self.OWN_SETTINGS):
            _refuse(f"the judge's api_key_env names one of the {service}'s own settings")
        if not self.endpoints:
            if self.open_when_unset:
                return
            _refuse(f"this {service} allows no judge endpoints; its operator lists them in --judge-endpoints")
        for endpoint in self.endpoints:
            if base_url.startswith(endpoint.prefix):
                if key_env and key_env not in endpoint.key_envs:
                    _refuse(f"the judge's api_key_env is not allowed for its endpoint (see the {service}'s --judge-endpoints)")
                return
        _refuse(f"the judge's base_url is not among the {service}'s --judge-endpoints")


def _refuse(message: str) -> None:
    raise FailedPrecondition(message, reason="JUDGE_ENDPOINT_NOT_ALLOWED")
