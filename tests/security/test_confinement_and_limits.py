"""Path confinement of trainer datasets (`../`, absolute paths, symlinks out of the root) and request size limits
(a request above max_message_bytes → RESOURCE_EXHAUSTED, and the server keeps serving), on real processes."""

from __future__ import annotations

import grpc
import pytest
from nwstack import reason_of, start_service

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rg
from neuroweaver.trainer.v1 import trainer_service_pb2 as ts
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tg
from neuroweaver.trainer.v1 import training_job_pb2 as tpb

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    work = tmp_path_factory.mktemp("confine")
    root = work / "datasets"
    root.mkdir()
    outside = work / "outside.jsonl"
    outside.write_text('{"messages": [{"role": "user", "content": "secret"}]}\n')
    (root / "escape.jsonl").symlink_to(outside)
    (root / "escape-dir").symlink_to(work)
    (root / "ok.jsonl").write_text(outside.read_text())
    trainer = start_service("trainer", work, "--no-run-jobs", "--dataset-roots", str(root))
    registry = start_service("registry", work, "--max-message-bytes", str(LIMIT))
    try:
        trainer.wait_serving()
        registry.wait_serving()
        yield trainer, registry, root, outside
    finally:
        trainer.stop()
        registry.stop()


def test_trainer_refuses_dataset_paths_outside_its_roots(procs):
    trainer, _, root, outside = procs
    escapes = [
        f"{root}/../outside.jsonl",
        f"file://{root}/../outside.jsonl",
        f"file://{root}/../../../../../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        outside.as_uri(),
        str(root / "escape.jsonl"),  # a symlink inside the root pointing out of it
        str(root / "escape-dir" / "outside.jsonl"),  # a symlinked directory
        "datasets/ok.jsonl",  # relative: resolved against nothing the caller controls
        "s3://bucket/x.jsonl",
    ]
    with grpc.insecure_channel(trainer.target) as ch:
        stub = tg.TrainerServiceStub(ch)
        for field in ("dataset_uri", "eval_dataset_uri"):
            for uri in escapes:
                job = tpb.TrainingJob(
                    base_model="builtin:tiny-llama",
                    dataset_uri=str(root / "ok.jsonl"),
                    method=tpb.TRAINING_METHOD_SFT_LORA,
                    target_model="projects/default/models/m1",
                    version_bump="minor",
                    lora=tpb.LoraConfig(r=4, alpha=8),
                    hyperparameters=tpb.Hyperparameters(max_steps=2, batch_size=1, max_seq_length=64),
                )
                setattr(job, field, uri)
                req = ts.CreateTrainingJobRequest(
                    parent="projects/default", training_job_id="escape", training_job=job, validate_only=True
                )
                with pytest.raises(grpc.RpcError) as exc:
                    stub.CreateTrainingJob(req, timeout=30)
                assert (exc.value.code(), reason_of(exc.value)) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "DATASET_PATH_NOT_ALLOWED",
                ), (field, uri, exc.value)
                assert "secret" not in exc.value.details()
        assert stub.ListTrainingJobs(ts.ListTrainingJobsRequest(parent="projects/default"), timeout=10).training_jobs == []


def test_request_above_max_message_bytes_is_resource_exhausted_and_server_keeps_serving(procs):
    _, registry, _, _ = procs
    with grpc.insecure_channel(registry.target, options=[("grpc.max_send_message_length", 8 * LIMIT)]) as ch:
        stub = rg.RegistryServiceStub(ch)
        big = rs.CreateModelRequest(parent="projects/default", model_id="big", model=rpb.Model(description="x" * (2 * LIMIT)))
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as exc:
                stub.CreateModel(big, timeout=10)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
        ok = stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="small"), timeout=10)
        assert ok.name == "projects/default/models/small"
        with pytest.raises(grpc.RpcError) as exc:
            stub.GetModel(rs.GetModelRequest(name="projects/default/models/big"), timeout=10)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert registry.proc.poll() is None
