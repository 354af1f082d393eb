"""API behaviour without training: validation (datasets with line numbers, paths, base models, fields),
status codes with ErrorInfo reasons, queue states, cancel of a queued job, listing and paging."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest


@pytest.fixture
async def api(trainers):
    return (await trainers(run_jobs=False)).stub


def create(h, job, job_id="", **kw):
    return h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id=job_id, training_job=job, **kw)


async def test_bad_datasets_name_line_numbers(api, h, tiny_model, data_root, rpc_err):
    bad = data_root / "bad.jsonl"
    bad.write_text(
        json.dumps(h.chat_rows(1)[0]) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}) + "\n"
        + json.dumps({"text": "no fields"}) + "\n"
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, bad)))
    code, reason, violations = rpc_err(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "DATASET_INVALID"
    descriptions = [d for f, d in violations]
    assert all(f == "training_job.dataset_uri" for f, _ in violations)
    assert descriptions[0].startswith("line 2: invalid JSON")
    assert descriptions[1].startswith("line 3:") and "robot" in descriptions[1]
    assert descriptions[2].startswith("line 4:") and "empty" in descriptions[2]
    assert descriptions[3].startswith("line 5:")
    assert "line 2" in exc.value.details()

    long = h.write_jsonl(data_root / "long.jsonl", [{"prompt": "Say: ", "completion": "word " * 400}])
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, long)))
    code, reason, violations = rpc_err(exc)
    assert reason == "DATASET_INVALID" and "line 1" in violations[0][1] and "over the maximum of 128" in violations[0][1]

    empty = data_root / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, empty)))
    assert rpc_err(exc)[1] == "DATASET_INVALID" and "no rows" in exc.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "missing.jsonl")))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID") and "not found" in exc.value.details()


async def test_dataset_paths_are_confined(api, h, tiny_model, data_root, tmp_path, rpc_err):
    outside = h.write_jsonl(tmp_path / "outside.jsonl", h.chat_rows(4))
    for uri in (outside.as_uri(), str(data_root / ".." / outside.name), "/etc/passwd", f"file://{data_root}/../../etc/passwd"):
        job = h.job_pb(tiny_model, data_root / "chat.jsonl")
        job.dataset_uri = uri
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.CreateTrainingJob(create(h, job))
        assert rpc_err(exc)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_PATH_NOT_ALLOWED"), uri
    job = h.job_pb(tiny_model, data_root / "chat.jsonl")
    job.dataset_uri = "s3://bucket/data.jsonl"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, job))
    assert rpc_err(exc)[1] == "DATASET_PATH_NOT_ALLOWED"


async def test_unknown_base_model_and_bad_fields(api, h, data_root, tiny_model, rpc_err):
    model_root = str(Path(tiny_model).parent)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(f"{model_root}/nonexistent-model", data_root / "chat.jsonl")))
    code, reason, violations = rpc_err(exc)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BASE_MODEL_NOT_FOUND")
    assert violations[0][0] == "training_job.base_model" and "does not exist" in exc.value.details()
    assert model_root not in exc.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb("builtin:gpt-17", data_root / "chat.jsonl")))
    assert rpc_err(exc)[1] == "BASE_MODEL_NOT_FOUND" and "smollm2-135m-instruct" in exc.value.details()

    job = h.job_pb(
        tiny_model,
        data_root / "chat.jsonl",
        method=h.tpb.TRAINING_METHOD_UNSPECIFIED,
        target_model="models/x",
    )
    job.hyperparameters.learning_rate = -1
    job.hyperparameters.lr_scheduler = "zigzag"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, job))
    code, reason, violations = rpc_err(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f for f, _ in violations}
    assert {"training_job.method", "training_job.target_model",
            "training_job.hyperparameters.learning_rate", "training_job.hyperparameters.lr_scheduler"} <= fields  # fmt: skip

    # version_bump is the shared VersionBump enum: a number outside it is refused by name, not stored.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl", version_bump=99)))
    code, reason, violations = rpc_err(exc)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ENUM")
    assert [f for f, _ in violations] == ["training_job.version_bump"]

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_DPO)))
    # DPO needs prompt/chosen/rejected rows: a chat dataset is refused at create
    assert rpc_err(exc)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID")
    assert "preference" in exc.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl", executor=h.tpb.EXECUTOR_KUBERNETES)))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "EXECUTOR_NOT_CONFIGURED")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl"), job_id="Bad_Id"))
    assert rpc_err(exc)[1] == "INVALID_ID"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl"), request_id="not-a-uuid"))
    assert rpc_err(exc)[1] == "INVALID_REQUEST_ID"


async def test_base_model_paths_are_confined_to_the_model_roots(api, h, data_root, tiny_model, tmp_path, rpc_err):
    model_root = Path(tiny_model).parent
    (model_root / "not-a-model").mkdir(exist_ok=True)
    (model_root / "link-to-tiny").unlink(missing_ok=True)
    (model_root / "link-to-tiny").symlink_to(tiny_model)

    async def refusal(base_model: str):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.CreateTrainingJob(create(h, h.job_pb(base_model, data_root / "chat.jsonl"), validate_only=True))
        return (*rpc_err(exc), exc.value.details())

    outside = [
        "/etc", "/root", "file:///etc/passwd", "/proc/1/root", "/etc/no-such-dir", str(data_root), str(tmp_path / "missing"),
        f"{model_root}/../{data_root.name}", "./tiny-llama", "~/tiny-llama", "tiny/../../etc", "file:///x%00y", "file:///x%FF",
    ]  # fmt: skip
    # a raw NUL may be refused earlier by the generic request checks; either way never INTERNAL
    code, reason, _, _ = await refusal(f"{model_root}/tiny-llama\x00")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in ("BASE_MODEL_PATH_NOT_ALLOWED", "INVALID_CHARACTERS")
    answers = {ref: await refusal(ref) for ref in outside}
    for ref, (code, reason, violations, details) in answers.items():
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BASE_MODEL_PATH_NOT_ALLOWED"), (ref, details)
        assert violations[0][0] == "training_job.base_model"
        assert str(model_root) not in details and str(tmp_path) not in details and str(data_root) not in details
    # existing and missing outside paths are indistinguishable
    assert answers["/etc"] == answers["/etc/no-such-dir"] == answers[str(data_root)] == answers[str(tmp_path / "missing")]
    code, reason, _, details = await refusal(str(model_root / "not-a-model"))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BASE_MODEL_INVALID") and "config.json" in details
    checked = await api.CreateTrainingJob(
        create(h, h.job_pb((model_root / "link-to-tiny").as_uri(), data_root / "chat.jsonl"), validate_only=True)
    )
    assert checked.dataset_digest


def test_filter_enums_are_the_contracts(h):
    """The filter's allowed states and methods (the domain's) are the contract's names without prefix and UNSPECIFIED."""
    from neuroweaver_trainer.domain.job import JobState, Method

    for domain, names, prefix in (
        (JobState, h.tpb.TrainingJob.State.keys(), "STATE_"),
        (Method, h.tpb.TrainingMethod.keys(), "TRAINING_METHOD_"),
    ):
        assert {v.value for v in domain} == {n.removeprefix(prefix) for n in names} - {"UNSPECIFIED"}


async def test_queue_cancel_delete_list(api, h, tiny_model, data_root, rpc_err):
    checked = await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl"), validate_only=True))
    assert checked.dataset_digest and checked.state == h.tpb.TrainingJob.STATE_QUEUED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=checked.name))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.NOT_FOUND, "TRAINING_JOB_NOT_FOUND")

    names = []
    for i in range(3):
        job = await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl"), job_id=f"queued-{i}"))
        names.append(job.name)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.CreateTrainingJob(create(h, h.job_pb(tiny_model, data_root / "chat.jsonl"), job_id="queued-0"))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "TRAINING_JOB_ALREADY_EXISTS")

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.DeleteTrainingJob(h.tsvc.DeleteTrainingJobRequest(name=names[0]))
    assert rpc_err(exc)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "TRAINING_JOB_NOT_FINISHED")

    # A watcher of a queued job sees the cancel live and its stream ends there.
    watch = __import__("asyncio").create_task(h.watch_all(api, names[0]))
    cancelled = await api.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=names[0]))
    assert cancelled.state == h.tpb.TrainingJob.STATE_CANCELLED
    events = await __import__("asyncio").wait_for(watch, 10)
    assert [e.state for e in events] == [h.tpb.TrainingJob.STATE_QUEUED, h.tpb.TrainingJob.STATE_CANCELLED]
    h.assert_gap_free(events)
    again = await api.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=names[0]))
    assert again.state == h.tpb.TrainingJob.STATE_CANCELLED

    page1 = await api.ListTrainingJobs(
        h.tsvc.ListTrainingJobsRequest(parent="projects/default", page_size=1, filter="state = QUEUED")
    )
    page2 = await api.ListTrainingJobs(
        h.tsvc.ListTrainingJobsRequest(
            parent="projects/default", page_size=1, filter="state = QUEUED", page_token=page1.next_page_token
        )
    )
    listed = [j.name for j in page1.training_jobs] + [j.name for j in page2.training_jobs]
    assert listed == [names[2], names[1]] and not page2.next_page_token

    async def matching(filter_text: str) -> list[str]:
        page = await api.ListTrainingJobs(h.tsvc.ListTrainingJobsRequest(parent="projects/default", filter=filter_text))
        return [j.name for j in page.training_jobs]

    for state in ("STATE_QUEUED", "queued"):  # the contract's name, or bare; any case
        for method in ("TRAINING_METHOD_SFT_QLORA", "SFT_QLORA", "sft_qlora"):
            assert await matching(f"state = {state} AND method = {method}") == listed
            assert await matching(f"state = {state} AND method != {method}") == []
    for bad, says in (
        ("state = BOGUS", "unknown state 'BOGUS'; one of: STATE_CANCELLED, STATE_CANCELLING, STATE_FAILED"),
        ("state = STATE_UNSPECIFIED", "unknown state"),
        ("method = TRAINING_METHOD_UNSPECIFIED", "one of: TRAINING_METHOD_DPO, TRAINING_METHOD_EXPORT"),
        ("method = STATE_SFT_LORA", "unknown method 'STATE_SFT_LORA'"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await matching(bad)
        code, reason, violations = rpc_err(exc)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER") and says in exc.value.details()
        assert [f for f, _ in violations] == ["filter"]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.ListTrainingJobs(h.tsvc.ListTrainingJobsRequest(parent="projects/default", page_token=page1.next_page_token))
    assert rpc_err(exc)[1] == "PAGE_TOKEN_QUERY_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.ListTrainingJobs(h.tsvc.ListTrainingJobsRequest(parent="projects/default", filter="colour = red"))
    assert rpc_err(exc)[1] == "INVALID_FILTER"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.ListTrainingJobs(h.tsvc.ListTrainingJobsRequest(parent="projects/default", page_size=-1))
    assert rpc_err(exc)[1] == "INVALID_PAGE_SIZE"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.ListTrainingJobEvents(h.tsvc.ListTrainingJobEventsRequest(parent=names[1], after_sequence=-1))
    assert rpc_err(exc)[1] == "INVALID_CURSOR"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name="projects/default/models/x"))
    assert rpc_err(exc)[1] == "MALFORMED_NAME"

    await api.DeleteTrainingJob(h.tsvc.DeleteTrainingJobRequest(name=names[0]))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.ListTrainingJobEvents(h.tsvc.ListTrainingJobEventsRequest(parent=names[0]))
    assert rpc_err(exc)[0] == grpc.StatusCode.NOT_FOUND
