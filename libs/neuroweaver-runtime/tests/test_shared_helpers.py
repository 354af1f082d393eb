"""Helpers every service shares: idempotent creates, timestamps, ports."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import MetaData

from neuroweaver.experiments.v1 import experiment_pb2
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_runtime import testing
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.idempotency import CreateOnce, idempotency_table, request_fingerprint
from neuroweaver_runtime.ports import free_port
from neuroweaver_runtime.timestamps import aware

# -- idempotent creates --------------------------------------------------------------------------


def test_request_fingerprint_ignores_request_id_only():
    def request(request_id: str, display_name: str) -> svc.CreateExperimentRequest:
        return svc.CreateExperimentRequest(
            parent="projects/p", experiment_id="e", request_id=request_id,
            experiment=experiment_pb2.Experiment(display_name=display_name),
        )  # fmt: skip

    first = request(str(uuid.uuid4()), "a")
    assert request_fingerprint(first) == request_fingerprint(request(str(uuid.uuid4()), "a"))
    assert request_fingerprint(first) != request_fingerprint(request(first.request_id, "b"))
    assert first.request_id  # the caller's message is left as it was


async def test_create_once_answers_a_retry_with_the_first_resource(tmp_path):
    metadata = MetaData()
    table = idempotency_table(metadata)
    db = Database(f"sqlite:///{tmp_path / 'idem.db'}")
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        request_id = str(uuid.uuid4())
        once = CreateOnce.of(table, "CreateThing", request_id.upper(), "print-1")
        assert once.request_id == request_id  # normalised, so a retry in other case is the same key
        async with db.transaction() as s:
            assert await once.earlier(s) is None
            await once.remember(s, "things/1")
        async with db.transaction() as s:
            assert await CreateOnce.of(table, "CreateThing", request_id, "print-1").earlier(s) == "things/1"
            for other in (CreateOnce.of(table, "CreateThing", request_id, "print-2"),
                          CreateOnce.of(table, "CreateOther", request_id, "print-1")):  # fmt: skip
                with pytest.raises(InvalidArgument) as exc:
                    await other.earlier(s)
                assert exc.value.reason == "REQUEST_ID_REUSED" and exc.value.field == "request_id"
        without = CreateOnce.of(table, "CreateThing", "", "print-1")
        async with db.transaction() as s:
            await without.remember(s, "things/2")  # no request_id: nothing to remember
            assert await without.earlier(s) is None
            assert (await s.execute(table.select())).all()[0].resource == "things/1"
    finally:
        await db.dispose()


def test_create_once_refuses_a_request_id_that_is_not_a_uuid():
    with pytest.raises(InvalidArgument) as exc:
        CreateOnce.of(idempotency_table(MetaData()), "CreateThing", "retry-1", "print")
    assert exc.value.reason == "INVALID_REQUEST_ID"


# -- timestamps and ports ------------------------------------------------------------------------


def test_aware_attaches_utc_to_naive_datetimes_only():
    naive = datetime(2025, 1, 2, 3, 4, 5)
    assert aware(naive) == naive.replace(tzinfo=UTC)
    plus_two = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert aware(plus_two) is plus_two
    assert aware(None) is None


def test_free_port_can_be_bound_and_tests_still_find_it():
    assert testing.free_port is free_port
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
