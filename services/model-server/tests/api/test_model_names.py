"""The names a model server answers to (issue 16 §2): its deployment's stable names and the version-specific name,
over gRPC (unary and streaming) and the OpenAI API through the official SDK (plain and streaming); every answer
says which version served it; any other name is NOT_FOUND / 404 and the error lists no served name."""

from __future__ import annotations

import time

import grpc
import openai
import pytest

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.app import ModelServer, ModelServerConfig
from neuroweaver_runtime.grpc_errors import error_info

SERVED = "advisor-1-2-0-abcdef12"
VERSION = "projects/default/models/advisor/versions/1.2.0"
STABLE = ["projects/default/deployments/advisor-prod", "advisor-prod", "advisor@production",
          "projects/default/models/advisor@production"]  # fmt: skip
HEADER = "x-neuroweaver-model-version"


@pytest.fixture(scope="module")
async def server(tiny_base, adapters):
    path, sha = adapters[0]
    s = ModelServer(
        ModelServerConfig(
            grpc_port=0,
            http_port=0,
            metrics_port=-1,
            base_model=str(tiny_base),
            served_model_name=SERVED,
            model_names=",".join([*STABLE, STABLE[1]]),
            model_version=VERSION,
            adapter_uri=path.as_uri(),
            adapter_sha256=sha,
            shutdown_grace_seconds=1.0,
            shutdown_drain_seconds=0,
        )  # fmt: skip
    )
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
        yield svc_grpc.InferenceServiceStub(channel)


@pytest.fixture
async def client(server):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


def request(model: str, cls=svc.GenerateRequest):
    return cls(model=model, messages=[pb.ChatMessage(role="user", content="Hi")], sampling=pb.SamplingParams(max_tokens=2))


def fingerprint(adapters) -> str:
    return f"nw-1-2-0-{adapters[0][1][:8]}"


async def test_list_models_names_stable_names_first(server, stub, client, adapters):
    listed = (await stub.ListModels(svc.ListModelsRequest())).models
    assert [m.name for m in listed] == [SERVED]
    assert list(listed[0].stable_names) == STABLE  # the duplicate given on the command line is dropped
    assert listed[0].system_fingerprint == fingerprint(adapters)
    models = (await client.models.list()).data
    assert [m.id for m in models] == [*STABLE, SERVED]
    assert {(m.owned_by, m.root) for m in models} == {("default", SERVED)}  # type: ignore[attr-defined]
    assert {m.created for m in models} == {server.service.created}  # when the model was loaded, not 0
    assert time.time() - 600 < server.service.created <= time.time()


@pytest.mark.parametrize("name", [*STABLE, SERVED])
async def test_retrieve_each_name(server, client, name):
    """`client.models.retrieve` percent-encodes the slashes of stable names; each answers its own entry."""
    model = await client.models.retrieve(name)
    assert (model.id, model.object, model.owned_by) == (name, "model", "default")
    assert model.created == server.service.created and model.root == SERVED  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["", *STABLE, SERVED])
async def test_every_accepted_name_over_grpc(stub, adapters, name):
    reply = await stub.Generate(request(name))
    assert reply.model == (name or STABLE[0]) and reply.usage.completion_tokens > 0
    assert (reply.model_version, reply.served_model, reply.system_fingerprint) == (VERSION, SERVED, fingerprint(adapters))
    messages = [m async for m in stub.GenerateStream(request(name, svc.GenerateStreamRequest))]
    last = messages[-1]
    assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert (last.model, last.model_version, last.served_model) == (name or STABLE[0], VERSION, SERVED)
    assert last.system_fingerprint == fingerprint(adapters)
    assert all(not m.model_version for m in messages[:-1])  # only the last message carries it


@pytest.mark.parametrize("name", [*STABLE, SERVED])
async def test_every_accepted_name_over_the_openai_sdk(client, adapters, name):
    messages = [{"role": "user", "content": "Hi"}]
    raw = await client.chat.completions.with_raw_response.create(model=name, messages=messages, max_tokens=2)
    chat = raw.parse()
    assert raw.headers[HEADER] == VERSION
    assert chat.model == name and chat.system_fingerprint == fingerprint(adapters)
    async with client.chat.completions.with_streaming_response.create(
        model=name, messages=messages, max_tokens=2, stream=True
    ) as streamed:
        assert streamed.headers[HEADER] == VERSION
        chunks = [c async for c in await streamed.parse()]
    assert chunks and all(c.model == name and c.system_fingerprint == fingerprint(adapters) for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "name",
    ["advisor", "advisor@staging", "projects/default/deployments/other", "projects/other/deployments/advisor-prod",
     "advisor-1-1-0-abcdef12", "ADVISOR-PROD"],
)  # fmt: skip
async def test_other_names_are_not_found_and_list_nothing(stub, client, name):
    for call in (
        lambda: stub.Generate(request(name)),
        lambda: _drain(stub.GenerateStream(request(name, svc.GenerateStreamRequest))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(err.value)
        assert info.reason == "MODEL_NOT_FOUND" and dict(info.metadata) == {"model": name}
        assert not _names_in((err.value.details() or "").replace(repr(name), ""))
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as http_err:
            await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=stream
            )
        body = http_err.value.body
        assert isinstance(body, dict) and body["code"] == "MODEL_NOT_FOUND" and body["type"] == "not_found_error"
        assert not _names_in(body["message"].replace(repr(name), ""))
    with pytest.raises(openai.NotFoundError) as http_err:
        await client.models.retrieve(name)
    body = http_err.value.body
    assert isinstance(body, dict) and body["code"] == "MODEL_NOT_FOUND" and body["param"] is None
    assert not _names_in(body["message"].replace(repr(name), ""))


def _names_in(text: str) -> list[str]:
    return [n for n in (*STABLE, SERVED) if n in text]


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_a_bad_stable_name_is_a_configuration_error(tiny_base):
    for bad in ("has space", "-leading-dash", "x" * 300):
        with pytest.raises(SystemExit, match="configuration error: model name"):
            ModelServer(ModelServerConfig(base_model=str(tiny_base), model_names=f"ok,{bad}"))
