"""The registry lookups RLAIF and EXPORT jobs make at create time (service/ports.py `RegistryLookups`), on adapters/registry.py."""

from __future__ import annotations

from typing import Any

from neuroweaver_runtime.client import ClientTLS

from .registry import fetch_judge, fetch_start_version


class RegistryClientLookups:
    def __init__(self, target: str, token: str, tls: ClientTLS | None) -> None:
        self.target, self.token, self.tls = target, token, tls

    async def judge(self, judge_version: str) -> dict[str, Any]:
        return await fetch_judge(self.target, self.token, judge_version, tls=self.tls)

    async def start_version(self, model_version: str) -> tuple[str, str, str, str]:
        return await fetch_start_version(self.target, self.token, model_version, tls=self.tls)

    async def export_version(self, model_version: str) -> tuple[str, str, str, str]:
        return await fetch_start_version(
            self.target, self.token, model_version, tls=self.tls, field="training_job.export.model_version",
            needs="an export merges or converts a LoRA adapter",
        )  # fmt: skip
