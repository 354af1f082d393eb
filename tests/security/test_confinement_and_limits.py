"""Path confinement on real processes: trainer datasets and base models (`../`, absolute paths, symlinks out of the
roots, /proc, devices, FIFOs, NUL, invalid UTF-8, over-long paths), dataset lines above the 1 MiB bound, the deployer's
artifact roots; refusals are the same whether the path exists and never name a server path, root or PID. And request
size limits (a request above max_message_bytes → RESOURCE_EXHAUSTED, and the server keeps serving)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from nwstack import reason_of, start_service

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.deployer.v1 import deployer_service_pb2 as ds
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dg
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rg
from neuroweaver.trainer.v1 import trainer_service_pb2 as ts
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tg
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.grpc_errors import field_violations

LIMIT = 64 * 1024
MiB = 1 << 20


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    from neuroweaver_ml import build_tiny_llama

    work = tmp_path_factory.mktemp("confine")
    root = work / "datasets"
    root.mkdir()
    outside = work / "outside.jsonl"
    outside.write_text('{"messages": [{"role": "user", "content": "secret"}]}\n')
    (root / "escape.jsonl").symlink_to(outside)
    (root / "escape-dir").symlink_to(work)
    (root / "ok.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    (root / "a-directory").mkdir()
    os.mkfifo(root / "fifo.jsonl")
    (root / "proc-link.jsonl").symlink_to("/proc/1/root/etc/passwd")
    models = work / "models"
    build_tiny_llama(models / "tiny")
    (models / "not-a-model").mkdir()
    (models / "a-file").write_text("x")
    os.mkfifo(models / "fifo")
    (models / "escape").symlink_to(work)
    (models / "escape-etc").symlink_to("/etc")
    (models / "proc").symlink_to("/proc/1/root")
    artifacts = work / "artifacts"
    (artifacts / "adapters").mkdir(parents=True)
    trainer = start_service(
        "trainer", work, "--no-run-jobs", "--dataset-roots", str(root), "--model-roots", str(models),
        "--model-cache-dir", str(work / "cache"),
    )  # fmt: skip
    registry = start_service("registry", work, "--max-message-bytes", str(LIMIT))
    deployer = None
    try:
        trainer.wait_serving()
        registry.wait_serving()
        deployer = start_service(
            "deployer", work, "--registry-target", registry.target, "--artifact-roots", f"{artifacts},{models}"
        )
        deployer.wait_serving()
        yield SimpleNamespace(
            trainer=trainer, registry=registry, deployer=deployer, root=root, outside=outside, work=work, models=models,
            artifacts=artifacts,
        )  # fmt: skip
    finally:
        for proc in (trainer, registry, deployer):
            if proc is not None:
                proc.stop()


def _job(base_model: str, dataset_uri: str) -> tpb.TrainingJob:
    return tpb.TrainingJob(
        base_model=base_model,
        dataset_uri=dataset_uri,
        method=tpb.TRAINING_METHOD_SFT_LORA,
        target_model="projects/default/models/m1",
        version_bump=cpb.VERSION_BUMP_MINOR,
        lora=tpb.LoraConfig(r=4, alpha=8),
        hyperparameters=tpb.Hyperparameters(max_steps=2, batch_size=1, max_seq_length=64),
    )


def _refusal(stub, job: tpb.TrainingJob) -> grpc.RpcError:
    req = ts.CreateTrainingJobRequest(parent="projects/default", training_job_id="escape", training_job=job, validate_only=True)
    with pytest.raises(grpc.RpcError) as exc:
        stub.CreateTrainingJob(req, timeout=60)
    return exc.value


def _status_bytes(err: grpc.RpcError) -> bytes:
    """The whole error as the client sees it: message and the google.rpc.Status details."""
    details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
    return err.details().encode() + b"\0" + details


def _assert_names_nothing(err: grpc.RpcError, ns, *extra: str) -> None:
    """No server path, root, symlink target, working directory or PID in the message or the details."""
    text = _status_bytes(err).decode("utf-8", "replace")
    forbidden = [str(ns.work), str(ns.root), str(ns.models), "/etc", "passwd", "/proc", "secret", *extra]
    forbidden += [f"pid {ns.trainer.proc.pid}", str(ns.trainer.proc.pid)]
    for needle in forbidden:
        assert needle not in text, (needle, text)


def _escapes(root: Path, outside: Path) -> list[str]:
    return [
        f"{root}/../outside.jsonl",
        f"file://{root}/../outside.jsonl",
        f"file://{root}/../../../../../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        outside.as_uri(),
        str(root / "escape.jsonl"),  # a symlink inside the root pointing out of it
        str(root / "escape-dir" / "outside.jsonl"),  # a symlinked directory
        str(root / "proc-link.jsonl"),  # a symlink to /proc/1/root
        "datasets/ok.jsonl",  # relative: resolved against nothing the caller controls
        "s3://bucket/x.jsonl",
        "/proc/1/root",
        "/proc/self/environ",
        "/dev/zero",
        "file:///tmp/x%00y.jsonl",
        "file:///tmp/%FF.jsonl",
        "/" + "a" * 300,
        "/a" * 3000,
    ]


def test_trainer_refuses_dataset_paths_outside_its_roots(procs):
    root, outside = procs.root, procs.outside
    escapes = _escapes(root, outside)
    with grpc.insecure_channel(procs.trainer.target) as ch:
        stub = tg.TrainerServiceStub(ch)
        for field in ("dataset_uri", "eval_dataset_uri"):
            for uri in escapes:
                job = _job("builtin:tiny-llama", str(root / "ok.jsonl"))
                setattr(job, field, uri)
                err = _refusal(stub, job)
                assert (err.code(), reason_of(err)) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "DATASET_PATH_NOT_ALLOWED",
                ), (field, uri, err)
                assert [v.field for v in field_violations(err)] == [f"training_job.{field}"]
                _assert_names_nothing(err, procs)
            # a raw NUL is refused (by the request checks or the resolver), never INTERNAL
            job = _job("builtin:tiny-llama", str(root / "ok.jsonl"))
            setattr(job, field, f"{root}/ok.jsonl\x00")
            assert _refusal(stub, job).code() == grpc.StatusCode.INVALID_ARGUMENT
            # existing and missing outside files: byte-identical answers
            missing = _job("builtin:tiny-llama", str(root / "ok.jsonl"))
            setattr(missing, field, str(procs.work / "no-such.jsonl"))
            existing = _job("builtin:tiny-llama", str(root / "ok.jsonl"))
            setattr(existing, field, str(outside))
            assert _status_bytes(_refusal(stub, existing)) == _status_bytes(_refusal(stub, missing))
            etc = _job("builtin:tiny-llama", str(root / "ok.jsonl"))
            setattr(etc, field, "/etc/passwd")
            etc_missing = _job("builtin:tiny-llama", str(root / "ok.jsonl"))
            setattr(etc_missing, field, "/etc/no-such-file")
            assert _status_bytes(_refusal(stub, etc)) == _status_bytes(_refusal(stub, etc_missing))
        # inside the root: a FIFO (never opened: the call answers) and a directory are invalid datasets
        for uri in (root / "fifo.jsonl", root / "a-directory"):
            err = _refusal(stub, _job("builtin:tiny-llama", str(uri)))
            assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID"), (uri, err)
            _assert_names_nothing(err, procs)
        assert stub.ListTrainingJobs(ts.ListTrainingJobsRequest(parent="projects/default"), timeout=10).training_jobs == []
    assert procs.trainer.proc.poll() is None


def test_dataset_previews_refuse_the_same_paths(procs):
    """PreviewDataset reads datasets under the same rules as CreateTrainingJob: the same refusals, no path echoed,
    existing and missing outside files answered alike; a FIFO inside the root is never opened."""
    root, outside = procs.root, procs.outside

    def refusal(stub, uri: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as exc:
            stub.PreviewDataset(ts.PreviewDatasetRequest(parent="projects/default", dataset_uri=uri), timeout=60)
        return exc.value

    with grpc.insecure_channel(procs.trainer.target) as ch:
        stub = tg.TrainerServiceStub(ch)
        for uri in _escapes(root, outside):
            err = refusal(stub, uri)
            assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_PATH_NOT_ALLOWED"), (uri, err)
            assert [v.field for v in field_violations(err)] == ["dataset_uri"]
            _assert_names_nothing(err, procs)
        assert _status_bytes(refusal(stub, str(outside))) == _status_bytes(refusal(stub, str(procs.work / "no-such.jsonl")))
        for uri in (root / "fifo.jsonl", root / "a-directory"):
            err = refusal(stub, str(uri))
            assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID"), (uri, err)
            _assert_names_nothing(err, procs)
        ok = stub.PreviewDataset(ts.PreviewDatasetRequest(parent="projects/default", dataset_uri=str(root / "ok.jsonl")))
        assert ok.rows and ok.sha256
    assert procs.trainer.proc.poll() is None


def test_trainer_refuses_base_models_outside_its_model_roots(procs):
    models, work = procs.models, procs.work
    dataset = str(procs.root / "ok.jsonl")
    outside = [
        "/etc", "/root", "file:///etc/passwd", "/proc/1/root", "/proc/self/root/etc", "/dev/zero", str(work),
        str(work / "no-such-dir"), str(procs.root), f"{models}/../datasets", f"{models}/escape", f"{models}/escape/datasets",
        f"{models}/escape-etc", f"{models}/proc", f"file://{models}/../../../../etc",
    ]  # fmt: skip
    lexical = [
        "./tiny", "../models/tiny", "~", "~/models", "tiny/../../etc", "file:tiny", "s3://bucket/model",
        "file://host/etc", "file:///x%00y", "file:///%FF", "/" + "a" * 300, "/a" * 3000,
    ]  # fmt: skip
    with grpc.insecure_channel(procs.trainer.target) as ch:
        stub = tg.TrainerServiceStub(ch)
        answers = {}
        for ref in outside + lexical:
            err = _refusal(stub, _job(ref, dataset))
            assert (err.code(), reason_of(err)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "BASE_MODEL_PATH_NOT_ALLOWED",
            ), (ref, err)
            assert [v.field for v in field_violations(err)] == ["training_job.base_model"]
            _assert_names_nothing(err, procs, os.getcwd())
            answers[ref] = _status_bytes(err)
        # one answer for every path outside the roots, existing or not: no existence oracle
        assert len({answers[ref] for ref in outside}) == 1, {answers[ref] for ref in outside}
        assert b"outside the directories this server may read" in answers["/etc"]
        err = _refusal(stub, _job(f"{models}/tiny\x00", dataset))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # inside the roots, "missing" and "not a model" are told apart, still without paths
        inside = {
            f"{models}/no-such-model": "BASE_MODEL_NOT_FOUND",
            f"{models}/not-a-model": "BASE_MODEL_INVALID",
            f"{models}/a-file": "BASE_MODEL_INVALID",
            f"{models}/fifo": "BASE_MODEL_INVALID",
        }
        for ref, reason in inside.items():
            err = _refusal(stub, _job(ref, dataset))
            assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, reason), (ref, err)
            _assert_names_nothing(err, procs)
        # the model roots accept a real checkpoint, as a path or a file:// URI
        for ref in (str(models / "tiny"), (models / "tiny").as_uri(), f"{models}/not-a-model/../tiny"):
            checked = stub.CreateTrainingJob(
                ts.CreateTrainingJobRequest(parent="projects/default", training_job=_job(ref, dataset), validate_only=True),
                timeout=120,
            )
            assert checked.dataset_digest
    assert procs.trainer.proc.poll() is None


def _reset_peak_rss(pid: int) -> None:
    """Peak RSS restarts from the current RSS (else an earlier peak, e.g. importing torch, would hide growth)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_dataset_line_over_one_mib_is_refused_with_its_number_without_reading_it_whole(procs):
    root, models = procs.root, procs.models
    ok = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    big = root / "one-long-line.jsonl"
    with open(big, "w") as f:
        f.write(ok)
        f.write('{"messages": [{"role": "user", "content": "')
        chunk = "x" * MiB
        for _ in range(96):  # a 96 MiB line with no newline
            f.write(chunk)
    with grpc.insecure_channel(procs.trainer.target) as ch:
        stub = tg.TrainerServiceStub(ch)
        warm = ts.CreateTrainingJobRequest(
            parent="projects/default", training_job=_job(str(models / "tiny"), str(root / "ok.jsonl")), validate_only=True
        )
        stub.CreateTrainingJob(warm, timeout=120)  # tokenizer loaded, allocator warm
        _reset_peak_rss(procs.trainer.proc.pid)
        before = _peak_rss(procs.trainer.proc.pid)
        err = _refusal(stub, _job(str(models / "tiny"), str(big)))
        grown = _peak_rss(procs.trainer.proc.pid) - before
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_INVALID"), err
    assert grown < 32 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB while validating a 96 MiB line"
    violations = [(v.field, v.description) for v in field_violations(err)]
    assert violations == [("training_job.dataset_uri", "line 2: line is longer than 1048576 bytes (the maximum)")]
    _assert_names_nothing(err, procs)


def test_deployer_refuses_artifacts_and_base_models_outside_its_artifact_roots(procs):
    sha = hashlib.sha256(b"x").hexdigest()
    adapter = procs.artifacts / "adapters" / "v1"
    adapter.mkdir(exist_ok=True)
    (procs.artifacts / "adapters" / "escape").symlink_to(procs.work)
    cases = {
        # version: (artifact uri, base model, expected reason)
        "1.0.0": (procs.outside.as_uri(), "builtin:smollm2-135m-instruct", "ARTIFACT_PATH_NOT_ALLOWED"),
        "1.0.1": ((procs.work / "no-such-adapter").as_uri(), "builtin:smollm2-135m-instruct", "ARTIFACT_PATH_NOT_ALLOWED"),
        "1.0.2": ("file:///etc/passwd", "builtin:smollm2-135m-instruct", "ARTIFACT_PATH_NOT_ALLOWED"),
        "1.0.3": (
            (procs.artifacts / "adapters" / "escape").as_uri(),
            "builtin:smollm2-135m-instruct",
            "ARTIFACT_PATH_NOT_ALLOWED",
        ),
        "1.0.4": (adapter.as_uri(), "/etc", "BASE_MODEL_PATH_NOT_ALLOWED"),
        "1.0.5": (adapter.as_uri(), str(procs.work / "no-such-base"), "BASE_MODEL_PATH_NOT_ALLOWED"),
    }
    with grpc.insecure_channel(procs.registry.target) as rch, grpc.insecure_channel(procs.deployer.target) as dch:
        reg, dep = rg.RegistryServiceStub(rch), dg.DeployerServiceStub(dch)
        reg.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="confined"), timeout=10)
        answers = {}
        for version, (uri, base, reason) in cases.items():
            mv = reg.CreateModelVersion(
                rs.CreateModelVersionRequest(
                    parent="projects/default/models/confined",
                    version=version,
                    model_version=rpb.ModelVersion(
                        artifact=rpb.Artifact(uri=uri, sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                        lineage=rpb.Lineage(base_model=base, method="sft-lora"),
                    ),
                ),
                timeout=10,
            )
            with pytest.raises(grpc.RpcError) as exc:
                dep.CreateDeployment(
                    ds.CreateDeploymentRequest(
                        parent="projects/default",
                        deployment_id="d" + version.replace(".", "-"),
                        deployment=dpb.Deployment(model_version=mv.name, replicas=1, backend=dpb.BACKEND_LOCAL),
                    ),
                    timeout=30,
                )
            err = exc.value
            assert (err.code(), reason_of(err)) == (grpc.StatusCode.FAILED_PRECONDITION, reason), (version, err)
            _assert_names_nothing(err, procs, str(procs.artifacts))
            answers[version] = _status_bytes(err).replace(version.encode(), b"V")
        # an existing and a missing file outside the roots: the same answer (bar the version's own name)
        assert answers["1.0.0"] == answers["1.0.1"] == answers["1.0.2"] == answers["1.0.3"]
        assert answers["1.0.4"] == answers["1.0.5"]
        assert dep.ListDeployments(ds.ListDeploymentsRequest(parent="projects/default"), timeout=10).deployments == []


def test_request_above_max_message_bytes_is_resource_exhausted_and_server_keeps_serving(procs):
    registry = procs.registry
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
