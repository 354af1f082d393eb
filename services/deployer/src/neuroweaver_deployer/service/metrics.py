"""GetDeploymentMetrics: live performance of one deployment over a window, from the source that serves its backend
(local replicas' /metrics, Prometheus, or Kubernetes pods' /metrics; see adapters/metrics.py, adapters/prometheus.py)."""

from __future__ import annotations

from typing import Protocol

from neuroweaver_runtime.errors import FailedPrecondition, NotFound

from ..domain.metrics import DeploymentPerformance, validate_window
from ..domain.model import DEPLOYMENT, Backend, Deployment
from .ports import UnitOfWorkFactory


class MetricsSource(Protocol):
    async def performance(self, d: Deployment, window: float) -> DeploymentPerformance:
        """Per-replica and total performance over the last `window` seconds (domain errors when unreachable)."""


class DeploymentMetrics:
    def __init__(self, uow: UnitOfWorkFactory, sources: dict[Backend, MetricsSource]) -> None:
        self.uow, self.sources = uow, sources

    async def get(self, name: str, window_seconds: float | None) -> DeploymentPerformance:
        DEPLOYMENT.parse(name)
        window = validate_window(window_seconds)
        async with self.uow.read() as view:
            d = await view.deployments.get(name)
        if d is None:
            raise NotFound(f"deployment {name} does not exist", reason="DEPLOYMENT_NOT_FOUND", metadata={"deployment": name})
        source = self.sources.get(d.backend)
        if source is None:
            raise FailedPrecondition(
                f"the {d.backend.value.lower()} backend is not configured on this deployer",
                reason="BACKEND_NOT_CONFIGURED",
                metadata={"backend": d.backend.value},
            )
        return await source.performance(d, window)
