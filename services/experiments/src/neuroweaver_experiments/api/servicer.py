"""ExperimentsService servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

import asyncio
import contextlib

from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import Role
from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.fieldmask import validate_update_mask

from ..domain.experiment import UPDATABLE
from ..service.experiments import ExperimentsService
from ..service.ingest import IngestResult
from . import convert

V, OP = Role.VIEWER, Role.OPERATOR
METHOD_ROLES = {
    "CreateExperiment": OP, "GetExperiment": V, "ListExperiments": V, "UpdateExperiment": OP,
    "StartExperiment": OP, "StopExperiment": OP, "ConcludeExperiment": OP,
    "AssignVariant": V, "BatchAssignVariants": V,
    "RecordMetricEvents": OP, "StreamMetricEvents": OP,
    "GetExperimentResults": V,
    "RecordAnswers": OP,
    "WatchExperimentConfigs": V, "IngestEvents": OP,
}  # fmt: skip
INGEST_READ_AHEAD = 3  # IngestEvents batches received, checked and being stored ahead of the one acknowledged next


class ExperimentsServicer(svc_grpc.ExperimentsServiceServicer):
    def __init__(self, service: ExperimentsService) -> None:
        self.svc = service

    async def CreateExperiment(self, request, context):
        exp = await self.svc.create(
            request.parent,
            request.experiment_id,
            convert.experiment_from_pb(request.experiment),
            request.request_id,
            idempotency.request_fingerprint(request),
        )
        return convert.experiment_to_pb(exp)

    async def GetExperiment(self, request, context):
        return convert.experiment_to_pb(await self.svc.get(request.name))

    async def ListExperiments(self, request, context):
        page = await self.svc.list(request.parent, request.page_size, request.page_token, request.filter, request.order_by)
        return svc.ListExperimentsResponse(
            experiments=[convert.experiment_to_pb(e) for e in page.items], next_page_token=page.next_page_token
        )

    async def UpdateExperiment(self, request, context):
        paths = validate_update_mask(request.update_mask.paths, UPDATABLE)
        exp = await self.svc.update(convert.experiment_from_pb(request.experiment), paths, request.experiment.etag)
        return convert.experiment_to_pb(exp)

    async def StartExperiment(self, request, context):
        return convert.experiment_to_pb(await self.svc.start(request.name))

    async def StopExperiment(self, request, context):
        return convert.experiment_to_pb(await self.svc.stop(request.name, request.reason))

    async def ConcludeExperiment(self, request, context):
        exp = await self.svc.conclude(
            request.name, request.winner, request.promote, request.alias, request.expected_current_version, request.reason
        )
        return convert.experiment_to_pb(exp)

    async def AssignVariant(self, request, context):
        # Fast path: a returning unit of a snapshot validated within the TTL is answered from memory, with no
        # I/O and no re-rendering (its first exposure is already stored; later exposures are not writes).
        assigner = self.svc.assigner
        snap = assigner.fresh(request.experiment)
        if snap is not None:
            reply = snap.replies.get(request.unit_id)
            if reply is not None:
                return reply
        snap, (assignment,) = await self.svc.assign_snapshot(request.experiment, [request.unit_id])
        reply = convert.assignment_to_pb(snap.experiment, assignment)
        assigner.remember_reply(snap, request.unit_id, assignment, reply)
        return reply

    async def BatchAssignVariants(self, request, context):
        units = list(request.unit_ids)
        snap, assignments = await self.svc.assign_snapshot(request.experiment, units, batch=True)
        replies = [convert.assignment_to_pb(snap.experiment, a) for a in assignments]
        for unit, a, reply in zip(units, assignments, replies, strict=True):
            self.svc.assigner.remember_reply(snap, unit, a, reply)
        return svc.BatchAssignVariantsResponse(assignments=replies)

    async def RecordMetricEvents(self, request, context):
        result = await self.svc.record(request.experiment, convert.events_from_pb(request.events))
        return svc.RecordMetricEventsResponse(accepted=result.accepted, duplicates=result.duplicates)

    async def StreamMetricEvents(self, request_iterator, context):
        """Each message is one atomic batch. A bad message ends the stream with its error; the batches before it
        are committed, and the error's metadata says how many (`committed_messages`, `committed_events`)."""
        total = IngestResult()
        messages = 0
        iterator = aiter(request_iterator)

        async def receive():
            """Next message (the interceptor checked it), decoded; runs while the previous message's transaction is in flight."""
            try:
                request = await anext(iterator)
            except StopAsyncIteration:
                return None
            return request.experiment, convert.events_from_pb(request.events)

        ahead = asyncio.ensure_future(receive())
        try:
            while True:
                try:
                    message = await ahead
                    if message is None:
                        break
                    ahead = asyncio.ensure_future(receive())  # decode k+1 while k is written (still one batch each)
                    total += await self.svc.record(*message)
                except DomainError as exc:
                    exc.metadata.update(
                        committed_messages=str(messages), committed_events=str(total.accepted), failed_message=str(messages)
                    )
                    raise
                messages += 1
        finally:
            if not ahead.done():
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
        return svc.StreamMetricEventsResponse(accepted=total.accepted, duplicates=total.duplicates)

    async def GetExperimentResults(self, request, context):
        r = await self.svc.results(request.name)
        reply = convert.results_to_pb(r.experiment.name, r.analysis, r.compute_time)
        judging = await self.svc.judging_status(r.experiment)
        if judging is not None:
            reply.judging.CopyFrom(convert.judging_status_to_pb(judging))
        return reply

    async def RecordAnswers(self, request, context):
        result = await self.svc.record_answers(request.experiment, convert.answers_from_pb(request.answers))
        return svc.RecordAnswersResponse(accepted=result.accepted, duplicates=result.duplicates, sampled=result.sampled)

    async def WatchExperimentConfigs(self, request, context):
        async for change in self.svc.local.watch(request.parent, request.since_version):
            yield svc.WatchExperimentConfigsResponse(
                version=change.version,
                snapshot=change.snapshot,
                configs=[convert.config_to_pb(e) for e in change.configs],
                removed=change.removed,
            )

    async def IngestEvents(self, request_iterator, context):
        """One batch per message, answered in order once durable. A bad batch ends the stream with its error (its
        ErrorInfo metadata names `batch_id`); the batches answered before it are stored (later ones may be stored
        too: a resend reports them as duplicates). A reader task receives and checks each batch and starts storing it
        at once, up to `INGEST_READ_AHEAD` batches ahead of the one answered next: their exposures share the
        group-commit writer's transactions (one transaction for several batches), their events are stored in batch
        order, and the answers go out in order, each once its batch committed."""
        local = self.svc.local
        ready: asyncio.Queue = asyncio.Queue(maxsize=INGEST_READ_AHEAD)
        storing: list[asyncio.Future] = []  # started stores not answered yet (cancelled if the stream ends early)

        async def receive() -> None:
            previous: asyncio.Future | None = None
            try:
                async for request in request_iterator:
                    try:
                        checked = await local.check(
                            convert.exposures_from_pb(request.exposures), convert.events_from_pb(request.events)
                        )
                    except DomainError as exc:
                        exc.metadata.update(batch_id=str(request.batch_id))
                        await ready.put(exc)
                        return
                    previous = asyncio.ensure_future(local.store(checked, after=previous))
                    storing.append(previous)
                    await ready.put((request, previous))
                await ready.put(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the handler, which ends the stream with it
                await ready.put(exc)

        reader = asyncio.ensure_future(receive())
        try:
            while True:
                item = await ready.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                request, task = item
                try:
                    out = await task
                    storing.remove(task)
                except DomainError as exc:
                    exc.metadata.update(batch_id=str(request.batch_id))
                    raise
                yield svc.IngestEventsResponse(
                    batch_id=request.batch_id,
                    exposures_accepted=out.exposures_accepted,
                    exposures_duplicate=out.exposures_duplicate,
                    conflicts=[svc.ExposureConflict(experiment=e, unit_id=u, stored_variant=v) for e, u, v in out.conflicts],
                    events_accepted=out.events_accepted,
                    events_duplicate=out.events_duplicate,
                )
        finally:
            reader.cancel()
            for task in storing:
                task.cancel()
            for task in [reader, *storing]:
                with contextlib.suppress(BaseException):
                    await task
