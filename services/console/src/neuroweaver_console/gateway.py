"""The console's only way to the platform: the services' gRPC APIs through typed stubs, on behalf of the browser's
user (their bearer token), with the console's client TLS. One set of clients per token, kept while in use.

Each screen module (deployments.py, experiments.py, ...) makes its own calls through `Gateway`'s stubs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator

from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.client import ClientTLS, ServiceClient

MAX_CACHED_TOKENS = 64
ServiceClients = tuple[ServiceClient, ServiceClient, ServiceClient, ServiceClient]  # registry, trainer, deployer, experiments


class Gateway:
    """Calls for one user (token); every call is a single RPC."""

    def __init__(self, project: str, clients: ServiceClients, tls: ClientTLS, token: str, deadline: float) -> None:
        self.project = project
        self._registry, self._trainer, self._deployer, self._experiments = clients
        self.tls, self.token, self.deadline = tls, token, deadline  # for channels to model servers (the playground)

    @property
    def trainer_target(self) -> str:
        """The trainer's address as the console dials it (for the commands the new-job form shows)."""
        return self._trainer.target

    @property
    def registry(self) -> rgrpc.RegistryServiceStub:
        return self._registry.stub(rgrpc.RegistryServiceStub)

    @property
    def trainer(self) -> tgrpc.TrainerServiceStub:
        return self._trainer.stub(tgrpc.TrainerServiceStub)

    @property
    def deployer(self) -> dgrpc.DeployerServiceStub:
        return self._deployer.stub(dgrpc.DeployerServiceStub)

    @property
    def experiments(self) -> egrpc.ExperimentsServiceStub:
        return self._experiments.stub(egrpc.ExperimentsServiceStub)

    # trainer
    async def list_jobs(self, page_token: str = "") -> tsvc.ListTrainingJobsResponse:
        return await self.trainer.ListTrainingJobs(
            tsvc.ListTrainingJobsRequest(parent=f"projects/{self.project}", page_size=50, page_token=page_token)
        )

    async def get_job(self, name: str) -> tpb.TrainingJob:
        return await self.trainer.GetTrainingJob(tsvc.GetTrainingJobRequest(name=name))

    async def job_action(self, name: str, action: str) -> tpb.TrainingJob:
        if action == "cancel":
            return await self.trainer.CancelTrainingJob(tsvc.CancelTrainingJobRequest(name=name))
        if action == "pause":
            return await self.trainer.PauseTrainingJob(tsvc.PauseTrainingJobRequest(name=name))
        if action == "resume":
            return await self.trainer.ResumeTrainingJob(tsvc.ResumeTrainingJobRequest(name=name))
        if action == "checkpoint":
            return await self.trainer.CheckpointTrainingJob(tsvc.CheckpointTrainingJobRequest(name=name))
        raise ValueError(f"unknown action {action!r}")

    async def watch_job(self, name: str, after_sequence: int) -> AsyncGenerator[tpb.TrainingJobEvent, None]:
        call = self.trainer.WatchTrainingJob(tsvc.WatchTrainingJobRequest(name=name, after_sequence=after_sequence))
        try:
            async for resp in call:
                yield resp.event
        finally:
            call.cancel()  # the browser went away: end the stream on the trainer too

    # registry
    async def list_models(self, page_token: str = "") -> rsvc.ListModelsResponse:
        return await self.registry.ListModels(
            rsvc.ListModelsRequest(parent=f"projects/{self.project}", page_size=100, page_token=page_token)
        )

    async def get_model(self, name: str) -> rpb.Model:
        return await self.registry.GetModel(rsvc.GetModelRequest(name=name))

    async def list_versions(self, model: str) -> list[rpb.ModelVersion]:
        versions: list[rpb.ModelVersion] = []
        token = ""
        while True:  # a model page shows every version (semver order, newest first)
            resp = await self.registry.ListModelVersions(
                rsvc.ListModelVersionsRequest(parent=model, page_size=200, page_token=token, order_by="version desc")
            )
            versions.extend(resp.model_versions)
            token = resp.next_page_token
            if not token or len(versions) >= 1000:
                return versions

    async def list_aliases(self, model: str) -> list[rpb.ModelAlias]:
        resp = await self.registry.ListModelAliases(rsvc.ListModelAliasesRequest(parent=model, page_size=100))
        return list(resp.aliases)

    async def alias_history(self, model: str) -> list[rpb.AliasHistoryEntry]:
        resp = await self.registry.ListModelAliasHistory(rsvc.ListModelAliasHistoryRequest(parent=model, page_size=100))
        return list(resp.entries)

    async def set_alias(self, model: str, alias: str, version: str, expected: str, reason: str) -> rpb.ModelAlias:
        return await self.registry.SetModelAlias(
            rsvc.SetModelAliasRequest(model=model, alias=alias, version=version, expected_version=expected, reason=reason)
        )

    async def rollback_alias(self, alias: str, to_version: str, expected: str, reason: str) -> rpb.ModelAlias:
        return await self.registry.RollbackModelAlias(
            rsvc.RollbackModelAliasRequest(name=alias, to_version=to_version, expected_version=expected, reason=reason)
        )

    async def compare(self, base: str, candidate: str) -> rsvc.CompareModelVersionsResponse:
        return await self.registry.CompareModelVersions(
            rsvc.CompareModelVersionsRequest(base_version=base, candidate_version=candidate)
        )


class Gateways:
    """Clients per bearer token (the logged-in user's, or the console's default), least recently used closed first."""

    def __init__(self, project: str, targets: tuple[str, str, str, str], tls: ClientTLS, deadline: float) -> None:
        self._project = project
        self._targets = targets  # registry, trainer, deployer, experiments
        self._tls = tls
        self._deadline = deadline
        self._cache: OrderedDict[str, ServiceClients] = OrderedDict()

    async def for_token(self, token: str) -> Gateway:
        clients = self._cache.pop(token, None)
        if clients is None:
            clients = tuple(  # type: ignore[assignment]
                ServiceClient(t, token=token or None, deadline=self._deadline, tls=self._tls) for t in self._targets
            )
            while len(self._cache) >= MAX_CACHED_TOKENS:
                _, old = self._cache.popitem(last=False)
                for client in old:
                    await client.close()
        assert clients is not None
        self._cache[token] = clients
        return Gateway(self._project, clients, self._tls, token, self._deadline)

    async def close(self) -> None:
        while self._cache:
            _, clients = self._cache.popitem()
            for client in clients:
                await client.close()
