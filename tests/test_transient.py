"""The one rule for retrying (service/infra/errors.py ``is_transient``): what the consumer
retries, what housekeeping waits out, what the API answers 503, and what marks a read standby
down. No database, no broker: the exceptions themselves."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import asyncpg
import pytest

from service.domain.errors import DomainError
from service.infra.errors import Unavailable, is_overrun, is_transient

TRANSIENT = [
    ConnectionRefusedError(111, "refused"),
    ConnectionResetError(),
    TimeoutError(),
    OSError(113, "no route to host"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.ConnectionFailureError("lost"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.TooManyConnectionsError("too many connections for role"),
    asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.DeadlockDetectedError("deadlock detected"),
    asyncpg.SerializationError("canceling statement due to conflict with recovery"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InternalClientError("protocol is in an unknown state"),
    aio_pika.exceptions.AMQPConnectionError("lost"),
    aio_pika.exceptions.ChannelClosed(320, "CONNECTION_FORCED"),
    aiormq.exceptions.ChannelInvalidStateError("writer is None"),
    Unavailable("no database connection came free"),
]
PERMANENT = [
    asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.CheckViolationError("violates check constraint"),
    asyncpg.InvalidTextRepresentationError("invalid input syntax"),
    asyncpg.UndefinedTableError("relation does not exist"),
    asyncpg.InvalidCatalogNameError("database does not exist"),
    asyncpg.InsufficientPrivilegeError("permission denied"),
    ValueError("a bug"),
    RuntimeError("a bug"),
    KeyError("a bug"),
    DomainError("invalid"),
    asyncio.CancelledError(),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_an_overrun_is_transient_but_the_works_own() -> None:
    """A statement past its time, the client's or the server's: retried and answered 503, but
    not a sign that the server failed (service/api/dbaccess.py keeps the standby up)."""
    for exc in (TimeoutError(), asyncpg.QueryCanceledError("canceling statement due to statement timeout")):
        assert is_transient(exc) and is_overrun(exc)
    for exc in (ConnectionResetError(), asyncpg.AdminShutdownError("shutdown"), Unavailable("busy")):
        assert is_transient(exc) and not is_overrun(exc)


def test_the_standby_fails_only_when_its_server_does() -> None:
    from service.api.dbaccess import standby_failed

    assert standby_failed(asyncpg.AdminShutdownError("shutdown")) and standby_failed(ConnectionResetError())
    assert not standby_failed(TimeoutError())
    assert not standby_failed(asyncpg.QueryCanceledError("canceling statement due to statement timeout"))
    assert not standby_failed(Unavailable("no database connection came free"))  # the pool's state
    assert not standby_failed(asyncpg.UniqueViolationError("duplicate key"))
