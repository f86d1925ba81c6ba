"""Infrastructure errors, and the one rule every retry decision follows: :func:`is_transient`."""

from __future__ import annotations

import aio_pika
import aiormq
import asyncpg


class Unavailable(Exception):
    """A dependency (database, broker) cannot be reached or did not answer in time; the
    caller may retry."""

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


# The database is unreachable, starting, shutting down or out of connections, stopped the
# statement, or two transactions collided: the same work may succeed when tried again.
_DATABASE = (
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08: the connection failed
    asyncpg.CannotConnectNowError,  # 57P03: starting up, or in recovery
    asyncpg.AdminShutdownError,  # 57P01: shut down by an administrator
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed
    asyncpg.TooManyConnectionsError,  # 53300: max_connections, or a role's or database's CONNECTION LIMIT
    asyncpg.QueryCanceledError,  # 57014: statement_timeout, or cancelled by an operator
    asyncpg.DeadlockDetectedError,  # 40P01
    asyncpg.SerializationError,  # 40001, and a standby cancelling a read that conflicts with replay
    # Client side: a connection lost mid-operation (InterfaceError), or a pooled connection to a
    # server that went away while idle, noticed as a protocol state error on its next use.
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# The broker: a connection or channel that closed (a closed channel used mid-batch is aiormq's
# ChannelInvalidStateError, a RuntimeError).
_BROKER = (aio_pika.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says a dependency failed for now rather than that the work is wrong:
    the database or the broker unreachable, restarting, overloaded, or two transactions
    colliding; the network (an OSError: refused, reset, unreachable, a DNS failure, a
    timeout); or tally's own :class:`Unavailable`. The same work may succeed when tried
    again, so the consumer retries its batch with backoff (never dead-letters it), a
    housekeeping job waits for its next turn, and the API answers 503 with Retry-After."""
    return isinstance(exc, (OSError, Unavailable, *_DATABASE, *_BROKER))


def is_overrun(exc: BaseException) -> bool:
    """Whether ``exc`` is a statement that ran past its time: the client's timeout
    (TimeoutError) or the server's ``statement_timeout`` (QueryCanceledError). Transient, but
    a cost of the work itself, not a failure of the server that ran it: one tenant's slow
    filter must not mark a read standby down for every tenant."""
    return isinstance(exc, (TimeoutError, asyncpg.QueryCanceledError))
