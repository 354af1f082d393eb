"""Shared fixtures: a tiny model, datasets under a dataset root, an in-process registry, trainer factories.

Helpers are exposed through the `h` fixture (test modules cannot import conftest under importlib mode).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.client import open_channel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_MODEL = "projects/default/models/advisor"
TERMINAL = {tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED, tpb.TrainingJob.STATE_CANCELLED}


def chat_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append({"messages": [
            {"role": "system", "content": "You are a service advisor."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def job_pb(
    base_model: str, dataset: Path, *, method=tpb.TRAINING_METHOD_SFT_QLORA, max_steps=8, checkpoint_every=4, **kw
) -> tpb.TrainingJob:
    return tpb.TrainingJob(
        base_model=base_model,
        dataset_uri=dataset.as_uri(),
        method=method,
        target_model=kw.pop("target_model", TARGET_MODEL),
        version_bump=kw.pop("version_bump", cpb.VERSION_BUMP_MINOR),
        lora=tpb.LoraConfig(r=4, alpha=8),
        hyperparameters=tpb.Hyperparameters(
            max_steps=max_steps,
            batch_size=2,
            max_seq_length=128,
            checkpoint_every_steps=checkpoint_every,
            eval_every_steps=kw.pop("eval_every", 4),
            eval_split=0.1,
            learning_rate=1e-3,
        ),
        **kw,
    )


async def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Polls an (async) predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_state(stub, name: str, states=TERMINAL, timeout: float = 120.0) -> tpb.TrainingJob:
    async def check():
        job = await stub.GetTrainingJob(tsvc.GetTrainingJobRequest(name=name))
        return job if job.state in states else None

    return await wait_for(check, timeout, 0.1, f"{name} to reach {states}")


async def watch_all(stub, name: str, after: int = 0, on_event=None) -> list:
    events = []
    async for resp in stub.WatchTrainingJob(tsvc.WatchTrainingJobRequest(name=name, after_sequence=after)):
        events.append(resp.event)
        if on_event is not None:
            result = on_event(resp.event)
            if asyncio.iscoroutine(result):
                await result
    return events


def assert_gap_free(events, start: int = 1) -> None:
    assert [e.sequence for e in events] == list(range(start, start + len(events))), [e.sequence for e in events]


async def registry_versions_of(registry_stub, job_name: str) -> list:
    resp = await registry_stub.ListModelVersions(
        rsvc.ListModelVersionsRequest(parent=TARGET_MODEL, filter=f'training_job = "{job_name}"', page_size=100)
    )
    return list(resp.model_versions)


@pytest.fixture(scope="session")
def h():
    return SimpleNamespace(
        TARGET_MODEL=TARGET_MODEL, TERMINAL=TERMINAL, chat_rows=chat_rows, write_jsonl=write_jsonl, job_pb=job_pb,
        wait_for=wait_for, wait_state=wait_state, watch_all=watch_all, assert_gap_free=assert_gap_free,
        registry_versions_of=registry_versions_of, tpb=tpb, tsvc=tsvc, tgrpc=tgrpc, rpb=rpb, rsvc=rsvc, rgrpc=rgrpc,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from neuroweaver_ml import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_jsonl(root / "chat.jsonl", chat_rows(40))
    return root


@pytest.fixture(scope="session")
async def registry(tmp_path_factory):
    """A real registry service, in process, on a free port, with the target model created."""
    from neuroweaver_registry.app import RegistryConfig, build

    data = tmp_path_factory.mktemp("registry")
    service = build(RegistryConfig(port=0, metrics_port=-1, data_dir=str(data), shutdown_grace_seconds=1))
    service.port = 0
    port = await service.start()
    channel = open_channel(f"127.0.0.1:{port}")
    stub = rgrpc.RegistryServiceStub(channel)
    await stub.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="advisor", model=rpb.Model(display_name="Advisor"))
    )
    yield SimpleNamespace(port=port, target=f"127.0.0.1:{port}", stub=stub, service=service)
    await channel.close()
    await service.stop()


@pytest.fixture
async def trainers(tmp_path, data_root, registry, tiny_model):
    """Factory of in-process trainers (real worker subprocesses); stops them all at the end. Base models may come
    from the tiny model's directory (`model_roots`), datasets from `data_root`."""
    from neuroweaver_trainer.app import TrainerConfig, build

    started = []

    async def start(**overrides):
        values = dict(
            port=0, metrics_port=-1, data_dir=str(tmp_path / "trainer"), dataset_roots=str(data_root),
            registry_target=registry.target, lease_seconds=4.0, heartbeat_seconds=0.5, queue_poll_seconds=0.5,
            watch_poll_seconds=0.1, registry_retry_seconds=30.0, cancel_grace_seconds=10.0, shutdown_grace_seconds=2.0,
            model_cache_dir=str(tmp_path / "models"), model_roots=str(Path(tiny_model).parent),
        )  # fmt: skip
        values.update(overrides)
        service = build(TrainerConfig(**values))
        service.port = 0
        port = await service.start()
        channel = open_channel(f"127.0.0.1:{port}")
        ns = SimpleNamespace(service=service, port=port, channel=channel, stub=tgrpc.TrainerServiceStub(channel), config=values)
        started.append(ns)
        return ns

    yield start
    for ns in started:
        await ns.channel.close()
        await ns.service.stop()


def rpc_error(exc_info) -> tuple[grpc.StatusCode, str, list]:
    from neuroweaver_runtime.grpc_errors import error_info, field_violations

    err = exc_info.value
    info = error_info(err)
    return err.code(), info.reason if info else "", [(v.field, v.description) for v in field_violations(err)]


@pytest.fixture(scope="session")
def rpc_err():
    return rpc_error
