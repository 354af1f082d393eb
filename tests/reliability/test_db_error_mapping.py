"""errors.unavailable_from_db_error: what a PostgreSQL restart raises (seen in test_postgres_restart) maps to
UNAVAILABLE; SQL errors that are the caller's or the code's fault do not."""

from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy.exc as sa_exc

from neuroweaver_runtime.errors import ErrorKind, unavailable_from_db_error


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        sa_exc.DBAPIError("SELECT 1", {}, asyncpg.exceptions.CannotConnectNowError("shutting down")),
        sa_exc.DBAPIError("SELECT 1", {}, ValueError("x"), connection_invalidated=True),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_failures_are_unavailable(exc):
    err = unavailable_from_db_error(exc)
    assert err is not None and err.kind is ErrorKind.UNAVAILABLE and err.reason == "DATABASE_UNAVAILABLE"


def test_chained_cause_is_found():
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("pool checkout failed") from inner
    except RuntimeError as outer:
        assert unavailable_from_db_error(outer) is not None


@pytest.mark.parametrize(
    "exc",
    [
        sa_exc.IntegrityError("INSERT", {}, asyncpg.exceptions.UniqueViolationError("duplicate key")),
        sa_exc.ProgrammingError("SELECT", {}, asyncpg.exceptions.UndefinedColumnError("no such column")),
        ValueError("bad"),
        FileNotFoundError("missing"),
        KeyError("k"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_are_not_unavailable(exc):
    assert unavailable_from_db_error(exc) is None
