"""EXPORT jobs end to end: a registered adapter version is exported by a worker process (GGUF q8_0 through llama.cpp's
converter, merged f16 safetensors), stored in the artifact store and recorded in the registry's version artifacts;
bad requests are refused at create."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc
import pytest

from neuroweaver_ml import digest_path, uri_to_path

pytestmark = pytest.mark.slow  # worker processes merge and convert models


@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (llama.cpp's converter knows it) and an adapter on it."""
    from transformers import AutoTokenizer

    from neuroweaver_ml.models import build_tiny_llama, builtin_gguf_path
    from neuroweaver_ml.testing import make_lora_adapter

    root = tmp_path_factory.mktemp("smolbase")
    gguf = builtin_gguf_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    base = build_tiny_llama(root / "base", tokenizer=tok)
    adapter, sha = make_lora_adapter(base, root / "adapter", seed=11)
    return base, adapter, sha


def _export_job(h, version: str, fmt, quant: str = ""):
    return h.tpb.TrainingJob(
        method=h.tpb.TRAINING_METHOD_EXPORT, export=h.tpb.ExportConfig(model_version=version, format=fmt, quantization=quant)
    )


async def test_export_jobs_add_artifacts_to_the_version(trainers, registry, smol_tiny, h, rpc_err):
    base, adapter, sha = smol_tiny
    size = digest_path(adapter)[1]
    version = await registry.stub.CreateModelVersion(
        h.rsvc.CreateModelVersionRequest(
            parent=h.TARGET_MODEL, version="1.1.0",
            model_version=h.rpb.ModelVersion(
                artifact=h.rpb.Artifact(uri=adapter.as_uri(), sha256=sha, size_bytes=size, format=h.rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=h.rpb.Lineage(base_model=str(base), method="sft-lora"),
            ),
        )
    )  # fmt: skip
    await registry.stub.SetModelAlias(h.rsvc.SetModelAliasRequest(model=h.TARGET_MODEL, alias="candidate", version="1.1.0"))
    trainer = await trainers(model_roots=f"{base.parent},{base}")
    stub = trainer.stub

    job = await stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job_id="export-q8",
            training_job=_export_job(h, h.TARGET_MODEL + "/versions/candidate", h.tpb.EXPORT_FORMAT_GGUF, "q8_0"),
        )
    )  # fmt: skip
    # the alias became the concrete version; base and target come from it
    assert job.export.model_version == version.name and job.base_model == str(base) and job.target_model == h.TARGET_MODEL
    done = await h.wait_state(stub, job.name, timeout=300)
    assert done.state == h.tpb.TrainingJob.STATE_SUCCEEDED, done.error
    assert done.model_version == version.name and done.output_uri.endswith("/model-q8_0.gguf")
    events = await h.watch_all(stub, job.name)
    stages = [(e.type, e.stage) for e in events if e.type in (h.tpb.EVENT_TYPE_STAGE_STARTED, h.tpb.EVENT_TYPE_REGISTERED)]
    assert stages == [
        (h.tpb.EVENT_TYPE_STAGE_STARTED, "export"), (h.tpb.EVENT_TYPE_STAGE_STARTED, "register"),
        (h.tpb.EVENT_TYPE_REGISTERED, "register"),
    ]  # fmt: skip

    got = await registry.stub.GetModelVersion(h.rsvc.GetModelVersionRequest(name=version.name))
    [art] = got.artifacts
    assert (art.format, art.quantization, art.uri) == (h.rpb.ARTIFACT_FORMAT_GGUF, "q8_0", done.output_uri)
    path = uri_to_path(art.uri)
    assert digest_path(path) == (art.sha256, art.size_bytes)
    assert art.produced_by.startswith(job.name) and "convert_hf_to_gguf" in art.produced_by
    import gguf

    assert gguf.GGUFReader(str(path)).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    assert len(llm.tokenize(b"Check the brakes")) > 0
    llm.close()

    merged = await stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(
            parent="projects/default", training_job_id="export-merged",
            training_job=_export_job(h, version.name, h.tpb.EXPORT_FORMAT_MERGED),
        )
    )  # fmt: skip
    assert merged.export.quantization == "f16"  # the documented default
    done = await h.wait_state(stub, merged.name, timeout=300)
    assert done.state == h.tpb.TrainingJob.STATE_SUCCEEDED, done.error
    got = await registry.stub.GetModelVersion(h.rsvc.GetModelVersionRequest(name=version.name))
    assert [(a.format, a.quantization) for a in got.artifacts] == [
        (h.rpb.ARTIFACT_FORMAT_GGUF, "q8_0"), (h.rpb.ARTIFACT_FORMAT_MERGED, "f16"),
    ]  # fmt: skip
    merged_dir = uri_to_path(got.artifacts[1].uri)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert version.name in (merged_dir / "README.md").read_text()

    # the CLI: `nw versions export advisor 1.1.0 --format gguf-lora --quant f16` follows the job and prints the artifact
    env = dict(os.environ, NW_REGISTRY_TARGET=registry.target, NW_TRAINER_TARGET=f"127.0.0.1:{trainer.port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neuroweaver_sdk.cli", "--json", "versions", "export", "advisor", "1.1.0",
        "--format", "gguf-lora", "--quant", "f16", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()[-2000:]
    printed = json.loads(out)
    assert printed["format"] == "ARTIFACT_FORMAT_GGUF_LORA" and printed["quantization"] == "f16"
    lora_path = uri_to_path(printed["uri"])
    assert gguf.GGUFReader(str(lora_path)).get_field("general.type").contents() == "adapter"
    got = await registry.stub.GetModelVersion(h.rsvc.GetModelVersionRequest(name=version.name))
    assert len(got.artifacts) == 3 and got.artifacts[2].sha256 == printed["sha256"] == digest_path(lora_path)[0]

    # refused at create: no format, a bad quantization, settings an EXPORT job does not take, a missing version
    async def create(training_job):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job=training_job))
        return rpc_err(exc)

    code, _, violations = await create(_export_job(h, version.name, h.tpb.EXPORT_FORMAT_UNSPECIFIED))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "training_job.export.format" in {f for f, _ in violations}
    code, _, violations = await create(_export_job(h, version.name, h.tpb.EXPORT_FORMAT_GGUF_LORA, "q4_k_m"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "training_job.export.quantization" in {f for f, _ in violations}
    bad = _export_job(h, version.name, h.tpb.EXPORT_FORMAT_GGUF)
    bad.dataset_uri = "file:///x.jsonl"
    code, _, violations = await create(bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "training_job.dataset_uri" in {f for f, _ in violations}
    code, reason, _ = await create(_export_job(h, h.TARGET_MODEL + "/versions/9.9.9", h.tpb.EXPORT_FORMAT_GGUF))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_VERSION_NOT_FOUND")
