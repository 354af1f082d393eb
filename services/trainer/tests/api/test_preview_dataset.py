"""PreviewDataset: a dataset's first rows, row count, digest and problems, read under CreateTrainingJob's rules (the
same dataset roots and refusals, the same validation); tenant and role checks with auth on."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from google.protobuf import json_format


@pytest.fixture
async def api(trainers):
    return (await trainers(run_jobs=False)).stub


def preview(h, uri: str, **kw):
    return h.tsvc.PreviewDatasetRequest(parent="projects/default", dataset_uri=uri, **kw)


async def test_rows_count_digest_and_the_digest_a_job_records(api, h, data_root, tiny_model):
    path = data_root / "chat.jsonl"
    resp = await api.PreviewDataset(preview(h, path.as_uri(), method=h.tpb.TRAINING_METHOD_SFT_LORA, max_rows=3))
    assert [r.line for r in resp.rows] == [1, 2, 3]
    assert json_format.MessageToDict(resp.rows[0].content) == h.chat_rows(1)[0] and not resp.rows[0].truncated
    assert (resp.row_count, resp.format, resp.problems) == (40, "chat", [])
    assert resp.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and resp.size_bytes == path.stat().st_size
    job = await api.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job=h.job_pb(tiny_model, path), validate_only=True)
    )
    assert job.dataset_digest == resp.sha256
    # defaults: 5 rows; a plain path works as in a job; long strings are cut, and say so
    long = h.write_jsonl(data_root / "long-answer.jsonl", [{"prompt": "Say: ", "completion": "word " * 1000}])
    assert len((await api.PreviewDataset(preview(h, str(path)))).rows) == 5
    row = (await api.PreviewDataset(preview(h, long.as_uri()))).rows[0]
    assert row.truncated and len(row.content["completion"]) == 2001 and row.content["completion"].endswith("…")


async def test_problems_are_listed_with_line_numbers(api, h, data_root, tiny_model):
    bad = data_root / "preview-bad.jsonl"
    bad.write_text(
        json.dumps(h.chat_rows(1)[0]) + "\n{not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}) + "\n"
    )  # fmt: skip
    resp = await api.PreviewDataset(preview(h, bad.as_uri()))
    assert [r.line for r in resp.rows] == [1, 3]  # the rows that are objects; line 2 is a problem
    assert [p.line for p in resp.problems] == [2, 3] and "invalid JSON" in resp.problems[0].message
    assert "robot" in resp.problems[1].message and resp.row_count == 2 and not resp.problems_truncated

    # The method decides the formats, as in CreateTrainingJob; the base model's tokenizer measures the rows.
    prefs = data_root / "chat.jsonl"
    resp = await api.PreviewDataset(preview(h, prefs.as_uri(), method=h.tpb.TRAINING_METHOD_DPO))
    assert [p.message for p in resp.problems] == ["dataset format 'chat' is not accepted here; expected preference"]
    assert [p.line for p in resp.problems] == [0] and len(resp.rows) == 5
    resp = await api.PreviewDataset(preview(h, prefs.as_uri(), base_model=tiny_model, max_seq_length=8))
    assert resp.problems and all("over the maximum of 8" in p.message for p in resp.problems)

    missing = await api.PreviewDataset(preview(h, (data_root / "missing.jsonl").as_uri()))
    assert [p.message for p in missing.problems] == ["file not found"] and not missing.rows and not missing.sha256


async def test_paths_and_requests_refused_like_create(api, h, data_root, tiny_model, tmp_path, rpc_err):
    outside = h.write_jsonl(tmp_path / "outside.jsonl", h.chat_rows(4))
    for uri in (outside.as_uri(), str(data_root / ".." / outside.name), "/etc/passwd", "s3://bucket/data.jsonl"):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.PreviewDataset(preview(h, uri))
        code, reason, violations = rpc_err(exc)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DATASET_PATH_NOT_ALLOWED"), uri
        assert [f for f, _ in violations] == ["dataset_uri"] and str(tmp_path) not in exc.value.details()

    bad_requests = [
        (preview(h, ""), ["dataset_uri"]),
        (preview(h, "x.jsonl", max_rows=21, method=h.tpb.TRAINING_METHOD_EXPORT), ["method", "max_rows"]),
        (preview(h, "x.jsonl", max_seq_length=64), ["base_model"]),
        (h.tsvc.PreviewDatasetRequest(parent="projects/default", dataset_uri="x.jsonl", method=99), ["method"]),
    ]
    for request, fields in bad_requests:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.PreviewDataset(request)
        code, _, violations = rpc_err(exc)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations] == fields, violations

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.PreviewDataset(preview(h, (data_root / "chat.jsonl").as_uri(), base_model=str(tmp_path)))
    code, reason, violations = rpc_err(exc)
    assert (reason, [f for f, _ in violations]) == ("BASE_MODEL_PATH_NOT_ALLOWED", ["base_model"])


async def test_operators_of_the_project_only(trainers, h, data_root, rpc_err):
    tokens = "tok-op=default:operator:olga,tok-view=default:viewer:vic,tok-other=other:admin:ann"
    trainer = await trainers(run_jobs=False, auth_tokens=tokens, page_token_secret="preview-test-secret")
    uri = (data_root / "chat.jsonl").as_uri()

    async def call(token: str, parent: str = "projects/default"):
        request = h.tsvc.PreviewDatasetRequest(parent=parent, dataset_uri=uri)
        return await trainer.stub.PreviewDataset(request, metadata=(("authorization", f"Bearer {token}"),))

    assert (await call("tok-op")).row_count == 40
    for token, parent, reason in (
        ("tok-view", "projects/default", "ROLE_TOO_LOW"),
        ("tok-other", "projects/default", "WRONG_PROJECT"),
        ("tok-op", "projects/other", "WRONG_PROJECT"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(token, parent)
        assert rpc_err(exc)[:2] == (grpc.StatusCode.PERMISSION_DENIED, reason), (token, parent)


async def test_nw_train_preview_dataset(trainers, h, data_root, capsys):
    """`nw train preview-dataset`: the answer as JSON (or its sha256 with -q); exit 1 when a job would be refused."""
    from neuroweaver_sdk.cli import run

    trainer = await trainers(run_jobs=False)
    base = ["--trainer", f"127.0.0.1:{trainer.port}", "train", "preview-dataset"]
    assert await run([*base, (data_root / "chat.jsonl").as_uri(), "--method", "lora", "--rows", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (len(shown["rows"]), shown["row_count"], shown["format"]) == (2, "40", "chat")
    with pytest.raises(SystemExit) as exc:
        await run([*base, (data_root / "chat.jsonl").as_uri(), "--method", "dpo", "-q"])
    assert exc.value.code == 1 and len(capsys.readouterr().out.strip()) == 64
