"""Aliases (CAS, history, rollback), events (list, watch), judges over gRPC on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver_registry.domain.model import EVENT_TYPES
from neuroweaver_runtime.grpc_errors import field_violations

INVALID, NOT_FOUND, ABORTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED
FAILED = grpc.StatusCode.FAILED_PRECONDITION
P = "projects/default"


async def test_alias_lifecycle_with_history(registry, expect_error):
    stub = registry.stub
    m = await registry.model()
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        await registry.version(m.name, version=v)
    alias_name = m.name + "/aliases/prod"
    a = await stub.SetModelAlias(
        rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0", expected_version="-", reason="first")
    )
    assert (a.name, a.version, a.actor, a.reason) == (alias_name, "1.0.0", "anonymous", "first")
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0", expected_version="-")),
        ABORTED,
        "ALIAS_VERSION_MISMATCH",
    )
    err = await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0", expected_version="0.9.0")),
        ABORTED, "ALIAS_VERSION_MISMATCH",
    )  # fmt: skip
    assert "1.0.0" in err.details()
    await stub.SetModelAlias(
        rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0", expected_version="1.0.0", reason="better")
    )
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.2.0", reason="best"))
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="canary", version="1.2.0"))

    got = await stub.GetModelAlias(rs.GetModelAliasRequest(name=alias_name))
    assert got.version == "1.2.0" and got.reason == "best"
    listed = await stub.ListModelAliases(rs.ListModelAliasesRequest(parent=m.name))
    assert [(x.name.rsplit("/", 1)[1], x.version) for x in listed.aliases] == [("canary", "1.2.0"), ("prod", "1.2.0")]
    assert listed.next_page_token == ""
    # paged by parent (AIP-158): one alias a page, in name order, and a token only for the same model
    first = await stub.ListModelAliases(rs.ListModelAliasesRequest(parent=m.name, page_size=1))
    assert [x.name.rsplit("/", 1)[1] for x in first.aliases] == ["canary"] and first.next_page_token
    second = await stub.ListModelAliases(rs.ListModelAliasesRequest(parent=m.name, page_size=1, page_token=first.next_page_token))
    assert [x.name.rsplit("/", 1)[1] for x in second.aliases] == ["prod"] and second.next_page_token == ""
    other = await stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="other-aliases"))
    await expect_error(
        stub.ListModelAliases(rs.ListModelAliasesRequest(parent=other.name, page_token=first.next_page_token)),
        INVALID, "PAGE_TOKEN_QUERY_MISMATCH",
    )  # fmt: skip
    await expect_error(
        stub.ListModelAliases(rs.ListModelAliasesRequest(parent=m.name, page_size=-1)), INVALID, "INVALID_PAGE_SIZE"
    )
    model = await stub.GetModel(rs.GetModelRequest(name=m.name))
    assert dict(model.aliases) == {"canary": "1.2.0", "prod": "1.2.0"}

    # rollback to the previous target, then to a named version
    back = await stub.RollbackModelAlias(rs.RollbackModelAliasRequest(name=alias_name, reason="regression"))
    assert back.version == "1.1.0"
    await expect_error(
        stub.RollbackModelAlias(rs.RollbackModelAliasRequest(name=alias_name, to_version="1.0.0", expected_version="1.2.0")),
        ABORTED,
        "ALIAS_VERSION_MISMATCH",
    )
    named = await stub.RollbackModelAlias(
        rs.RollbackModelAliasRequest(name=alias_name, to_version="1.0.0", expected_version="1.1.0")
    )
    assert named.version == "1.0.0" and named.reason == "rollback"
    assert (await stub.GetModelVersion(rs.GetModelVersionRequest(name=m.name + "/versions/prod"))).version == "1.0.0"

    history, token = [], ""
    while True:
        page = await stub.ListModelAliasHistory(rs.ListModelAliasHistoryRequest(parent=alias_name, page_size=2, page_token=token))
        history += page.entries
        token = page.next_page_token
        if not token:
            break
    A = pb.AliasHistoryEntry
    assert [(e.action, e.from_version, e.to_version, e.reason) for e in history] == [
        (A.ACTION_ROLLBACK, "1.1.0", "1.0.0", "rollback"),
        (A.ACTION_ROLLBACK, "1.2.0", "1.1.0", "regression"),
        (A.ACTION_SET, "1.1.0", "1.2.0", "best"),
        (A.ACTION_SET, "1.0.0", "1.1.0", "better"),
        (A.ACTION_SET, "", "1.0.0", "first"),
    ]  # newest first
    assert all(e.actor == "anonymous" and e.create_time.seconds > 0 and e.alias == alias_name for e in history)
    assert [e.sequence for e in history] == sorted((e.sequence for e in history), reverse=True)

    # deprecation is refused while an alias points at the version; an alias cannot point at a deprecated one
    await expect_error(
        stub.SetModelVersionState(rs.SetModelVersionStateRequest(name=m.name + "/versions/1.0.0", state=pb.ModelVersion.STATE_DEPRECATED)),
        FAILED, "VERSION_HAS_ALIASES",
    )  # fmt: skip
    await stub.SetModelVersionState(
        rs.SetModelVersionStateRequest(name=m.name + "/versions/1.1.0", state=pb.ModelVersion.STATE_DEPRECATED)
    )
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0")), FAILED, "VERSION_DEPRECATED"
    )
    await expect_error(
        stub.RollbackModelAlias(rs.RollbackModelAliasRequest(name=alias_name, to_version="1.1.0")), FAILED, "VERSION_DEPRECATED"
    )

    await expect_error(
        stub.DeleteModelAlias(rs.DeleteModelAliasRequest(name=alias_name, expected_version="1.2.0")),
        ABORTED,
        "ALIAS_VERSION_MISMATCH",
    )
    await stub.DeleteModelAlias(rs.DeleteModelAliasRequest(name=alias_name, expected_version="1.0.0", reason="retire"))
    await expect_error(stub.GetModelAlias(rs.GetModelAliasRequest(name=alias_name)), NOT_FOUND, "ALIAS_NOT_FOUND")
    await expect_error(stub.DeleteModelAlias(rs.DeleteModelAliasRequest(name=alias_name)), NOT_FOUND, "ALIAS_NOT_FOUND")
    await expect_error(stub.RollbackModelAlias(rs.RollbackModelAliasRequest(name=alias_name)), NOT_FOUND, "ALIAS_NOT_FOUND")
    last = await stub.ListModelAliasHistory(rs.ListModelAliasHistoryRequest(parent=alias_name, page_size=1))
    assert (last.entries[0].action, last.entries[0].from_version, last.entries[0].to_version, last.entries[0].reason) == (
        A.ACTION_DELETE, "1.0.0", "", "retire",
    )  # fmt: skip


async def test_alias_bad_inputs(registry, expect_error):
    stub = registry.stub
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="latest", version="1.0.0")), INVALID, "RESERVED_ALIAS"
    )
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="Prod", version="1.0.0")), INVALID, "INVALID_ID"
    )
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="one")), INVALID, "INVALID_VERSION"
    )
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="9.9.9")), NOT_FOUND, "VERSION_NOT_FOUND"
    )
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0", reason="r" * 1025)),
        INVALID,
        "FIELD_TOO_LONG",
    )
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=P + "/models/nope-" + uuid.uuid4().hex[:6], alias="prod", version="1.0.0")),
        NOT_FOUND, "MODEL_NOT_FOUND",
    )  # fmt: skip
    await expect_error(stub.GetModelAlias(rs.GetModelAliasRequest(name=m.name + "/aliases/")), INVALID, "MALFORMED_NAME")
    await expect_error(stub.GetModelAlias(rs.GetModelAliasRequest(name=m.name + "/versions/prod")), INVALID, "MALFORMED_NAME")
    await expect_error(
        stub.ListModelAliasHistory(rs.ListModelAliasHistoryRequest(parent=m.name + "/aliases/never")),
        NOT_FOUND,
        "ALIAS_NOT_FOUND",
    )
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0"))
    await expect_error(
        stub.RollbackModelAlias(rs.RollbackModelAliasRequest(name=m.name + "/aliases/prod")), FAILED, "NO_PREVIOUS_VERSION"
    )
    await expect_error(
        stub.ListModelAliasHistory(rs.ListModelAliasHistoryRequest(parent=m.name + "/aliases/prod", page_token="x")),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    await stub.ArchiveModel(rs.ArchiveModelRequest(name=m.name))
    await expect_error(
        stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0")), FAILED, "MODEL_ARCHIVED"
    )
    await expect_error(stub.DeleteModelAlias(rs.DeleteModelAliasRequest(name=m.name + "/aliases/prod")), FAILED, "MODEL_ARCHIVED")


async def test_list_events_pages_and_filters_by_model(registry, expect_error):
    stub = registry.stub
    start = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, page_size=1000))
    after = start.events[-1].sequence if start.events else 0
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0", reason="go"))
    await stub.ArchiveModel(rs.ArchiveModelRequest(name=m.name))
    events, token = [], ""
    while True:
        page = await stub.ListModelEvents(
            rs.ListModelEventsRequest(parent=P, model=m.name, after_sequence=after, page_size=3, page_token=token)
        )
        events += page.events
        token = page.next_page_token
        if not token:
            break
    E = pb.ModelEvent
    assert [e.type for e in events] == [E.TYPE_MODEL_CREATED, E.TYPE_VERSION_CREATED, E.TYPE_ALIAS_SET, E.TYPE_MODEL_ARCHIVED]
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)
    alias_event = events[2]
    assert alias_event.resource == m.name + "/aliases/prod" and alias_event.details["to_version"] == "1.0.0"
    assert alias_event.details["reason"] == "go" and alias_event.actor == "anonymous"
    await expect_error(stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, after_sequence=-1)), INVALID, "INVALID_CURSOR")
    await expect_error(stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, model="nope")), INVALID, "MALFORMED_NAME")
    first = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, model=m.name, page_size=1))
    await expect_error(
        stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, page_size=1, page_token=first.next_page_token)),
        INVALID,
        "PAGE_TOKEN_QUERY_MISMATCH",
    )


async def _pages(stub, page_size: int, **fields) -> list[pb.ModelEvent]:
    """Every event of a ListModelEvents query, page by page."""
    events, token = [], ""
    while True:
        page = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, page_size=page_size, page_token=token, **fields))
        assert len(page.events) <= page_size
        events += page.events
        token = page.next_page_token
        if not token:
            return events


async def test_list_events_newest_first_pages_in_both_orders(registry, expect_error):
    stub = registry.stub
    m = await registry.model()
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        await registry.version(m.name, version=v)
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0"))
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.2.0"))
    await stub.ArchiveModel(rs.ArchiveModelRequest(name=m.name))

    oldest_first = await _pages(stub, 2, model=m.name)
    assert len(oldest_first) == 7 and [e.sequence for e in oldest_first] == sorted(e.sequence for e in oldest_first)
    newest_first = await _pages(stub, 2, model=m.name, order_by="sequence desc")
    assert newest_first == oldest_first[::-1]
    assert await _pages(stub, 3, model=m.name, order_by="sequence asc") == oldest_first
    assert await _pages(stub, 1000, model=m.name, order_by="sequence desc") == newest_first  # one page, no token
    # after_sequence bounds both orders from below: newest first down to (not including) it.
    after = oldest_first[2].sequence
    assert await _pages(stub, 2, model=m.name, after_sequence=after, order_by="sequence desc") == oldest_first[3:][::-1]
    assert await _pages(stub, 2, model=m.name, after_sequence=after) == oldest_first[3:]
    # Project-wide, newest first: the first event is the newest there is (the archive just written).
    newest = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, page_size=1, order_by="sequence desc"))
    assert list(newest.events) == [oldest_first[-1]] and newest.next_page_token

    # A token is bound to its order: `sequence` and `sequence asc` are one, `sequence desc` another.
    asc = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, model=m.name, page_size=2))
    again = await stub.ListModelEvents(
        rs.ListModelEventsRequest(parent=P, model=m.name, page_size=2, order_by="sequence asc", page_token=asc.next_page_token)
    )
    assert list(again.events) == oldest_first[2:4]
    desc = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, model=m.name, page_size=2, order_by="sequence desc"))
    for order_by, token in (
        ("sequence desc", asc.next_page_token),
        ("", desc.next_page_token),
        ("sequence", desc.next_page_token),
    ):
        err = await expect_error(
            stub.ListModelEvents(
                rs.ListModelEventsRequest(parent=P, model=m.name, page_size=2, order_by=order_by, page_token=token)
            ),
            INVALID,
            "PAGE_TOKEN_QUERY_MISMATCH",
        )
        assert [v.field for v in field_violations(err)] == ["page_token"]
    for order_by in ("create_time", "sequence up", "sequence desc now", "-sequence"):
        err = await expect_error(
            stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, order_by=order_by)), INVALID, "INVALID_ORDER_BY"
        )
        assert [v.field for v in field_violations(err)] == ["order_by"]


async def test_list_events_filters_by_type_and_resource(registry, expect_error):
    assert {n.removeprefix("TYPE_") for n in pb.ModelEvent.Type.keys()} - {"UNSPECIFIED"} == EVENT_TYPES
    stub, E = registry.stub, pb.ModelEvent
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    await registry.version(m.name, version="1.1.0")
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0"))
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="canary", version="1.1.0"))
    await stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0"))
    everything = await _pages(stub, 1000, model=m.name)

    async def listed(filter_text: str, **fields) -> list[pb.ModelEvent]:
        return await _pages(stub, 1, model=m.name, filter=filter_text, **fields)

    alias_sets = [e for e in everything if e.type == E.TYPE_ALIAS_SET]
    assert len(alias_sets) == 3
    assert await listed("type = TYPE_ALIAS_SET") == alias_sets
    assert await listed('type = "alias_set"', order_by="sequence desc") == alias_sets[::-1]  # prefix and case optional
    assert await listed("type != TYPE_ALIAS_SET") == [e for e in everything if e.type != E.TYPE_ALIAS_SET]
    prod = m.name + "/aliases/prod"
    assert [e.details["to_version"] for e in await listed(f'resource = "{prod}" AND type = TYPE_ALIAS_SET')] == ["1.0.0", "1.1.0"]
    assert await listed('actor = "anonymous" AND type = TYPE_VERSION_CREATED') == [
        e for e in everything if e.type == E.TYPE_VERSION_CREATED
    ]
    assert await listed('actor = "someone-else"') == []
    assert await listed("type = TYPE_MODEL_DELETED") == []

    first = await stub.ListModelEvents(
        rs.ListModelEventsRequest(parent=P, model=m.name, page_size=1, filter="type = TYPE_ALIAS_SET")
    )
    await expect_error(
        stub.ListModelEvents(
            rs.ListModelEventsRequest(
                parent=P, model=m.name, page_size=1, filter="type = ALIAS_SET", page_token=first.next_page_token
            )
        ),
        INVALID,
        "PAGE_TOKEN_QUERY_MISMATCH",
    )
    for bad, says in (
        ("type = TYPE_DROP_TABLE", "unknown type 'TYPE_DROP_TABLE'; one of: TYPE_ALIAS_DELETED"),
        ("type = TYPE_UNSPECIFIED", "unknown type 'TYPE_UNSPECIFIED'"),
        ('model = "x"', "unknown field 'model'; filterable fields: actor, resource, type"),
        ("labels.team = ml", "unknown field 'labels.team'"),
        ("type = TYPE_ALIAS_SET OR type = TYPE_ALIAS_DELETED", "comparisons must be joined with AND"),
        ("actor ~ alice", "unexpected character"),
    ):
        err = await expect_error(stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, filter=bad)), INVALID, "INVALID_FILTER")
        assert [v.field for v in field_violations(err)] == ["filter"] and says in err.details(), err.details()
    watch = stub.WatchModelEvents(rs.WatchModelEventsRequest(parent=P, filter="type = TYPE_DROP_TABLE"))
    await expect_error(watch.read(), INVALID, "INVALID_FILTER")


async def test_events_filtered_by_actor_listed_and_watched(registry, own_registry):
    """With auth on, events name their callers: a filter by actor lists one caller's events and a filtered watch
    replays and follows only theirs."""
    tokens = "alice-token=default:operator:alice,bob-token=default:operator:bob"
    async with own_registry(registry.backend, auth_tokens=tokens, page_token_secret="s") as r:
        alice, bob = ([("authorization", f"Bearer {who}-token")] for who in ("alice", "bob"))
        m = await r.stub.CreateModel(
            rs.CreateModelRequest(parent=P, model_id="shared", model=pb.Model(base_model="b")), metadata=alice
        )

        async def version(v: str, caller) -> None:
            mv = pb.ModelVersion(artifact=pb.Artifact(uri="file:///tmp/a", sha256="ab" * 32, size_bytes=1))
            await r.stub.CreateModelVersion(
                rs.CreateModelVersionRequest(parent=m.name, version=v, model_version=mv), metadata=caller
            )

        await version("1.0.0", bob)
        await r.stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0"), metadata=alice)
        await version("1.1.0", bob)

        async def listed(filter_text: str, order_by: str = "") -> list[tuple[str, str]]:
            request = rs.ListModelEventsRequest(parent=P, filter=filter_text, order_by=order_by)
            return [
                (e.actor, pb.ModelEvent.Type.Name(e.type)) for e in (await r.stub.ListModelEvents(request, metadata=alice)).events
            ]

        assert await listed('actor = "bob"', "sequence desc") == [("bob", "TYPE_VERSION_CREATED")] * 2
        assert await listed('actor != "bob"') == [("alice", "TYPE_MODEL_CREATED"), ("alice", "TYPE_ALIAS_SET")]
        assert await listed("actor = bob AND type = TYPE_ALIAS_SET") == []

        call = r.stub.WatchModelEvents(rs.WatchModelEventsRequest(parent=P, filter='actor = "alice"'), metadata=bob)
        try:
            replayed = [await asyncio.wait_for(call.read(), 10) for _ in range(2)]
            assert [pb.ModelEvent.Type.Name(e.event.type) for e in replayed] == ["TYPE_MODEL_CREATED", "TYPE_ALIAS_SET"]
            await version("1.2.0", bob)  # not alice's: not sent
            await r.stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.2.0"), metadata=alice)
            live = await asyncio.wait_for(call.read(), 10)
            assert (live.event.actor, live.event.details["to_version"]) == ("alice", "1.2.0")
        finally:
            call.cancel()


async def test_watch_replays_from_cursor_then_follows_live(registry, expect_error):
    stub = registry.stub
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    history = await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, model=m.name))
    created = history.events[0]
    call = stub.WatchModelEvents(rs.WatchModelEventsRequest(parent=P, model=m.name, after_sequence=created.sequence))
    stream = call.__aiter__()
    try:
        replayed = await asyncio.wait_for(stream.__anext__(), 10)
        assert replayed.event.type == pb.ModelEvent.TYPE_VERSION_CREATED  # the model creation lies before the cursor
        live_write = asyncio.create_task(registry.version(m.name, bump=cpb.VERSION_BUMP_MINOR))
        live = await asyncio.wait_for(stream.__anext__(), 10)
        assert live.event.type == pb.ModelEvent.TYPE_VERSION_CREATED and live.event.details["version"] == "1.1.0"
        assert live.event.sequence > replayed.event.sequence
        await live_write
    finally:
        call.cancel()
    bad = stub.WatchModelEvents(rs.WatchModelEventsRequest(parent=P, after_sequence=-5))
    await expect_error(bad.read(), INVALID, "INVALID_CURSOR")


def _judge_version(**overrides) -> pb.JudgeVersion:
    fields = dict(
        kind=pb.JUDGE_KIND_OPENAI_COMPATIBLE, mode=pb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10,
        prompt_template="Rate this answer: {response}", rubric="helpful and correct",
        openai=pb.OpenAICompatibleJudge(base_url="http://127.0.0.1:8081/v1", model="judge", api_key_env="JUDGE_API_KEY", max_tokens=64),
        notes="v1",
    )  # fmt: skip
    fields.update(overrides)
    return pb.JudgeVersion(**fields)


async def test_judges_create_get_list_versions(registry, expect_error):
    stub = registry.stub
    judge_id = "j-" + uuid.uuid4().hex[:8]
    judge = await stub.CreateJudge(
        rs.CreateJudgeRequest(
            parent=P, judge_id=judge_id, judge=pb.Judge(display_name="Helpfulness"), judge_version=_judge_version()
        )
    )
    assert judge.name == f"{P}/judges/{judge_id}" and judge.latest_version == 1 and judge.display_name == "Helpfulness"
    assert await stub.GetJudge(rs.GetJudgeRequest(name=judge.name)) == judge
    v1 = await stub.GetJudgeVersion(rs.GetJudgeVersionRequest(name=judge.name + "/versions/1"))
    assert v1.openai.api_key_env == "JUDGE_API_KEY" and v1.kind == pb.JUDGE_KIND_OPENAI_COMPATIBLE and v1.notes == "v1"
    assert v1.prompt_template == "Rate this answer: {response}" and v1.score_max == 10

    v2 = await stub.CreateJudgeVersion(
        rs.CreateJudgeVersionRequest(
            parent=judge.name,
            judge_version=_judge_version(mode=pb.JUDGE_MODE_PAIRWISE, prompt_template="{response_a} or {response_b}"),
        )
    )
    assert v2.version == 2 and v2.mode == pb.JUDGE_MODE_PAIRWISE
    assert (await stub.GetJudgeVersion(rs.GetJudgeVersionRequest(name=judge.name + "/versions/latest"))).version == 2
    assert (await stub.GetJudge(rs.GetJudgeRequest(name=judge.name))).latest_version == 2
    page1 = await stub.ListJudgeVersions(rs.ListJudgeVersionsRequest(parent=judge.name, page_size=1))
    page2 = await stub.ListJudgeVersions(
        rs.ListJudgeVersionsRequest(parent=judge.name, page_size=1, page_token=page1.next_page_token)
    )
    assert [v.version for v in [*page1.judge_versions, *page2.judge_versions]] == [2, 1] and not page2.next_page_token
    names = []
    token = ""
    while True:
        page = await stub.ListJudges(rs.ListJudgesRequest(parent=P, page_size=2, page_token=token))
        names += [j.name for j in page.judges]
        token = page.next_page_token
        if not token:
            break
    assert judge.name in names and names == sorted(names)

    # the API key itself is never accepted: only the NAME of an environment variable
    err = await expect_error(
        stub.CreateJudgeVersion(rs.CreateJudgeVersionRequest(parent=judge.name, judge_version=_judge_version(openai=pb.OpenAICompatibleJudge(base_url="http://x/v1", model="m", api_key_env="sk-live-123")))),
        INVALID, "INVALID_ARGUMENT",
    )  # fmt: skip
    assert "api_key_env" in err.details()
    assert (await stub.GetJudge(rs.GetJudgeRequest(name=judge.name))).latest_version == 2  # nothing stored
    await expect_error(
        stub.CreateJudge(rs.CreateJudgeRequest(parent=P, judge_id=judge_id, judge_version=_judge_version())),
        grpc.StatusCode.ALREADY_EXISTS,
        "JUDGE_ALREADY_EXISTS",
    )
    await expect_error(
        stub.CreateJudge(rs.CreateJudgeRequest(parent=P, judge_id="j2" + judge_id, judge_version=_judge_version(kind=0))),
        INVALID,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stub.CreateJudge(rs.CreateJudgeRequest(parent=P, judge_id="j3" + judge_id, judge_version=_judge_version(kind=42))),
        INVALID,
        "INVALID_ENUM",
    )
    await expect_error(
        stub.CreateJudgeVersion(rs.CreateJudgeVersionRequest(parent=judge.name, judge_version=_judge_version(mode=17))),
        INVALID,
        "INVALID_ENUM",
    )
    await expect_error(
        stub.CreateJudge(rs.CreateJudgeRequest(parent=P, judge_id="j4" + judge_id, judge_version=_judge_version(score_min=5, score_max=5))),
        INVALID, "INVALID_ARGUMENT",
    )  # fmt: skip
    await expect_error(stub.GetJudge(rs.GetJudgeRequest(name=P + "/judges/none-" + judge_id)), NOT_FOUND, "JUDGE_NOT_FOUND")
    await expect_error(
        stub.GetJudgeVersion(rs.GetJudgeVersionRequest(name=judge.name + "/versions/9")), NOT_FOUND, "JUDGE_VERSION_NOT_FOUND"
    )
    await expect_error(
        stub.GetJudgeVersion(rs.GetJudgeVersionRequest(name=judge.name + "/versions/0")), INVALID, "MALFORMED_NAME"
    )
    await expect_error(
        stub.CreateJudgeVersion(
            rs.CreateJudgeVersionRequest(parent=P + "/judges/none-" + judge_id, judge_version=_judge_version())
        ),
        NOT_FOUND,
        "JUDGE_NOT_FOUND",
    )


async def test_judge_request_id(registry, expect_error):
    rid = str(uuid.uuid4())
    judge_id = "j-" + uuid.uuid4().hex[:8]
    req = rs.CreateJudgeRequest(parent=P, judge_id=judge_id, judge_version=_judge_version(), request_id=rid)
    a = await registry.stub.CreateJudge(req)
    b = await registry.stub.CreateJudge(req)
    assert a == b
    changed = rs.CreateJudgeRequest(parent=P, judge_id=judge_id, judge_version=_judge_version(notes="other"), request_id=rid)
    await expect_error(registry.stub.CreateJudge(changed), INVALID, "REQUEST_ID_REUSED")
    vreq = rs.CreateJudgeVersionRequest(parent=a.name, judge_version=_judge_version(), request_id=str(uuid.uuid4()))
    assert (await registry.stub.CreateJudgeVersion(vreq)).version == (await registry.stub.CreateJudgeVersion(vreq)).version == 2


async def test_judge_config_stores_only_the_env_var_name(registry):
    """The stored JSON config (read straight from the table) carries the variable name and no key material."""
    from sqlalchemy import select

    from neuroweaver_registry.adapters import tables

    judge_id = "j-" + uuid.uuid4().hex[:8]
    await registry.stub.CreateJudge(rs.CreateJudgeRequest(parent=P, judge_id=judge_id, judge_version=_judge_version()))
    db = registry.service.registry.db
    async with db.transaction() as s:
        row = (
            await s.execute(
                select(tables.judge_versions.c.config).join(tables.judges).where(tables.judges.c.name == f"{P}/judges/{judge_id}")
            )
        ).one()
    assert row.config["openai"]["api_key_env"] == "JUDGE_API_KEY"
    assert not any("key" in k and k != "api_key_env" for k in row.config["openai"])


async def test_idle_watches_do_not_poll_the_database(registry, monkeypatch):
    """Idle WatchModelEvents streams wait on notifications: no reads until something is committed, then one
    read per stream delivers it."""
    from neuroweaver_registry.adapters.repository import SqlEventRepository

    stub = registry.stub
    m = await registry.model()
    reads = []
    original = SqlEventRepository.after

    async def counting(self, *args, **kwargs):
        reads.append(args)
        return await original(self, *args, **kwargs)

    latest = (await stub.ListModelEvents(rs.ListModelEventsRequest(parent=P, model=m.name))).events[-1].sequence
    monkeypatch.setattr(SqlEventRepository, "after", counting)
    calls = [stub.WatchModelEvents(rs.WatchModelEventsRequest(parent=P, model=m.name, after_sequence=latest)) for _ in range(20)]
    try:
        for _ in range(200):  # every stream made its first read (nothing to replay) and now waits
            if len(reads) >= 20:
                break
            await asyncio.sleep(0.01)
        assert len(reads) == 20
        await asyncio.sleep(2.5)  # the interval measured (the old watchers re-read every 2 s)
        assert len(reads) == 20
        await registry.version(m.name, version="1.0.0")
        events = [await asyncio.wait_for(call.read(), 10) for call in calls]
        assert {e.event.type for e in events} == {pb.ModelEvent.TYPE_VERSION_CREATED}
    finally:
        for call in calls:
            call.cancel()
