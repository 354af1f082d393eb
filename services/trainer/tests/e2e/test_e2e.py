"""End to end through gRPC: a QLoRA job on a tiny model trains in a worker process, streams its events to
200 concurrent watchers, stores its adapter and registers one version with lineage in a real registry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver_ml import digest_path, uri_to_path

pytestmark = pytest.mark.slow  # every test trains in a worker process


async def test_qlora_job_end_to_end(trainers, registry, tiny_model, data_root, h):
    trainer = await trainers()
    stub = trainer.stub
    dataset = data_root / "chat.jsonl"
    job = await stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job_id="e2e-qlora",
            training_job=h.job_pb(tiny_model, dataset, labels={"team": "service"}),
            request_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        )
    )  # fmt: skip
    assert job.name == "projects/default/trainingJobs/e2e-qlora"
    assert job.state in (h.tpb.TrainingJob.STATE_QUEUED, h.tpb.TrainingJob.STATE_RUNNING)
    assert job.dataset_digest == digest_path(dataset)[0]
    assert job.hyperparameters.lr_scheduler == "cosine"  # documented default filled in

    # 200 concurrent watchers on the live job, all from sequence 0.
    watchers = [asyncio.create_task(h.watch_all(stub, job.name)) for _ in range(200)]
    streams = await asyncio.wait_for(asyncio.gather(*watchers), 240)

    first = streams[0]
    h.assert_gap_free(first)
    for s in streams:
        assert [(e.sequence, e.type) for e in s] == [(e.sequence, e.type) for e in first]
    types = [e.type for e in first]
    assert first[-1].type == h.tpb.EVENT_TYPE_STATE_CHANGED and first[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, first[-1]
    steps = [e.step.step for e in first if e.type == h.tpb.EVENT_TYPE_STEP]
    assert steps == list(range(1, 9))
    assert h.tpb.EVENT_TYPE_CHECKPOINT in types and h.tpb.EVENT_TYPE_EVAL in types and h.tpb.EVENT_TYPE_REGISTERED in types
    assert all(e.job == job.name for e in first)

    # Idempotent create: the same request_id returns the same job.
    again = await stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job_id="e2e-qlora",
            training_job=h.job_pb(tiny_model, dataset, labels={"team": "service"}),
            request_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        )
    )  # fmt: skip
    assert again.name == job.name and again.create_time == job.create_time

    done = await stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert done.state == h.tpb.TrainingJob.STATE_SUCCEEDED, done.error
    assert done.current_step == 8 and done.total_steps == 8 and done.attempts == 1 and done.resumed_from_step == 0
    assert "eval_loss" in done.metrics and "train_loss" in done.metrics
    assert done.output_uri.startswith("file://")

    # ListTrainingJobEvents pages the same events.
    paged, token = [], ""
    while True:
        page = await stub.ListTrainingJobEvents(
            h.tsvc.ListTrainingJobEventsRequest(parent=job.name, page_size=5, page_token=token)
        )
        paged += page.events
        token = page.next_page_token
        if not token:
            break
    assert [e.sequence for e in paged] == [e.sequence for e in first]

    # Resume from a cursor: only the later events, ending at the terminal one.
    cursor = first[5].sequence
    tail = await h.watch_all(stub, job.name, after=cursor)
    assert [e.sequence for e in tail] == [e.sequence for e in first[6:]]
    assert await h.watch_all(stub, job.name, after=first[-1].sequence) == []

    # The registry holds exactly one version with lineage, metrics and the stored adapter's digest.
    versions = await h.registry_versions_of(registry.stub, job.name)
    assert len(versions) == 1
    mv = versions[0]
    assert done.model_version == mv.name
    lin = mv.lineage
    assert lin.training_job == job.name and lin.base_model == tiny_model and lin.method == "sft-qlora"
    assert lin.dataset_uri == dataset.as_uri() and lin.dataset_digest == done.dataset_digest
    assert lin.hyperparameters["max_steps"] == "8" and lin.hyperparameters["lora_r"] == "4"
    metrics = {m.name: m for m in mv.metrics}
    assert metrics["eval_loss"].direction == cpb.METRIC_DIRECTION_LOWER_IS_BETTER
    assert metrics["eval_loss"].value == done.metrics["eval_loss"]
    adapter = uri_to_path(mv.artifact.uri)
    assert mv.artifact.format == h.rpb.ARTIFACT_FORMAT_LORA_ADAPTER
    assert (mv.artifact.sha256, mv.artifact.size_bytes) == digest_path(adapter)
    out = uri_to_path(done.output_uri)
    assert (out / "training_report.json").is_file() and (adapter / "README.md").is_file()
    assert (adapter / "tokenizer_config.json").is_file()

    # The stored adapter loads with PEFT on its base model.
    def load():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        return PeftModel.from_pretrained(base, str(adapter))

    model = await asyncio.to_thread(load)
    assert any("lora_A" in n for n, _ in model.named_parameters())

    listed = await stub.ListTrainingJobs(
        h.tsvc.ListTrainingJobsRequest(parent="projects/default", filter='state = SUCCEEDED AND labels.team = "service"')
    )
    assert job.name in [j.name for j in listed.training_jobs]
    assert Path(adapter).is_dir()


async def test_sqlite_watchers_are_woken_by_the_local_worker_not_by_polling(trainers, tiny_model, data_root, h):
    """SQLite has no NOTIFY: with the poll timer set to an hour, a watcher only sees the worker's steps live
    (and the job's end at all) because the worker writes each committed event to its pipe to the trainer."""
    trainer = await trainers(watch_poll_seconds=3600.0)
    stub = trainer.stub
    job = await stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job=h.job_pb(tiny_model, data_root / "chat.jsonl", max_steps=4)
        )
    )
    # Without the pipe this would hang: nothing else wakes the feed before the hour-long poll.
    events = await asyncio.wait_for(h.watch_all(stub, job.name), 240)
    h.assert_gap_free(events)
    assert [e.step.step for e in events if e.type == h.tpb.EVENT_TYPE_STEP] == [1, 2, 3, 4]
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED
