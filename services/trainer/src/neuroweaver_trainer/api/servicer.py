"""TrainerService servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

from google.protobuf import empty_pb2

from neuroweaver.trainer.v1 import trainer_service_pb2 as svc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as svc_grpc
from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import Role

from ..service.jobs import TrainerService
from . import convert

V, OP, A = Role.VIEWER, Role.OPERATOR, Role.ADMIN
METHOD_ROLES = {
    "CreateTrainingJob": OP, "GetTrainingJob": V, "ListTrainingJobs": V, "CancelTrainingJob": OP,
    "DeleteTrainingJob": A, "ListTrainingJobEvents": V, "WatchTrainingJob": V, "PauseTrainingJob": OP,
    "ResumeTrainingJob": OP, "CheckpointTrainingJob": OP,
    # operator, as CreateTrainingJob: the dataset roots are shared by every project, and a viewer could otherwise
    # read rows of files no one in their project chose to train on
    "PreviewDataset": OP,
    # operator, not viewer: a worker's output may quote dataset rows (a failing row, a sample), paths and settings
    # that the job's events, a viewer's view of it, never carry
    "ReadTrainingJobLogs": OP,
}  # fmt: skip


class TrainerServicer(svc_grpc.TrainerServiceServicer):
    def __init__(self, service: TrainerService) -> None:
        self.svc = service

    async def CreateTrainingJob(self, request, context):
        job = await self.svc.create_job(
            request.parent,
            request.training_job_id,
            convert.job_from_pb(request.training_job),
            request.request_id,
            idempotency.request_fingerprint(request),
            request.validate_only,
        )
        return convert.job_to_pb(job)

    async def GetTrainingJob(self, request, context):
        return convert.job_to_pb(await self.svc.get_job(request.name))

    async def ListTrainingJobs(self, request, context):
        page = await self.svc.list_jobs(request.parent, request.page_size, request.page_token, request.filter, request.order_by)
        return svc.ListTrainingJobsResponse(
            training_jobs=[convert.job_to_pb(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelTrainingJob(self, request, context):
        return convert.job_to_pb(await self.svc.cancel_job(request.name))

    async def PauseTrainingJob(self, request, context):
        return convert.job_to_pb(await self.svc.pause_job(request.name))

    async def ResumeTrainingJob(self, request, context):
        return convert.job_to_pb(await self.svc.resume_job(request.name))

    async def CheckpointTrainingJob(self, request, context):
        return convert.job_to_pb(await self.svc.checkpoint_job(request.name))

    async def DeleteTrainingJob(self, request, context):
        await self.svc.delete_job(request.name)
        return empty_pb2.Empty()

    async def ListTrainingJobEvents(self, request, context):
        page = await self.svc.list_events(request.parent, request.after_sequence, request.page_size, request.page_token)
        return svc.ListTrainingJobEventsResponse(
            events=[convert.event_to_pb(e) for e in page.items], next_page_token=page.next_page_token
        )

    async def WatchTrainingJob(self, request, context):
        async for event in self.svc.watch(request.name, request.after_sequence):
            yield svc.WatchTrainingJobResponse(event=convert.event_to_pb(event))

    async def PreviewDataset(self, request, context):
        preview = await self.svc.preview_dataset(
            request.parent, request.dataset_uri, convert.method_from_pb(request.method, "method"), request.base_model,
            request.max_seq_length, request.chat_template, request.max_rows,
        )  # fmt: skip
        return convert.preview_to_pb(preview)

    async def ReadTrainingJobLogs(self, request, context):
        offset = request.offset if request.HasField("offset") else None
        job, attempt, chunk = await self.svc.read_logs(request.name, request.attempt, request.tail_lines, offset)
        return convert.logs_to_pb(job, attempt, chunk)
