"""Every database connection an API request takes goes through :func:`connection`: fair
sharing of the pool between organizations, and bounded waits.

Without it one tenant's 32 concurrent deep-offset lists hold every pooled connection for
seconds each, and everyone else's 4 ms retrieve queues behind them without end
(``pool.acquire()`` has no timeout of its own). So, in each API process:

- an organization holds at most ``TALLY_DB_ORG_CONCURRENCY`` connections at once (default:
  half the pool), whatever its requests cost — the rest of the pool stays free for others;
- a request waits at most ``TALLY_DB_ACQUIRE_TIMEOUT`` seconds for its organization's turn
  and a connection together; past that it is shed with 503 and ``Retry-After`` rather than
  queued, so a backlog can never grow faster than it drains.

The per-key rate limit counts requests; this caps their concurrent cost. Key lookups
(before the organization is known) take no organization turn, only the bounded pool wait.
The health check uses the pool directly: it must report the pool, not queue for it.

With a standby (``TALLY_DATABASE_READ_URL``), reads go to it unless it is down or has not
replayed the consistency token the request carries (``X-Tally-Consistency``): then to the
primary. Writes answer with the token of their commit, reads with the token of what they
saw (service/infra/standby.py), so a client that sends back the last token it got reads
its own writes and never reads back in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import UUID

import asyncpg
from aiohttp import web

from service.api import appkeys
from service.api.errors import invalid
from service.api.fairness import CostMeter
from service.infra import metrics
from service.infra.errors import Unavailable, is_overrun, is_transient
from service.infra.standby import SEEN_LSN, Standby, format_lsn, parse_lsn
from service.store.db import Connection

RETRY_AFTER = 1  # seconds


@dataclass
class _Turns:
    """One organization's share: a semaphore, and how many requests hold or await it (the
    entry is dropped when none do, so memory follows active organizations only)."""

    semaphore: asyncio.Semaphore
    users: int = 0


class DatabaseGate:
    """Per-organization concurrency cap and bounded waits for an API process's pools."""

    def __init__(self, per_organization: int, timeout: float) -> None:
        self.per_organization = max(1, per_organization)
        self.timeout = timeout
        self._turns: dict[UUID, _Turns] = {}

    @asynccontextmanager
    async def connection(self, pool: asyncpg.Pool, organization_id: UUID | None) -> AsyncIterator[Connection]:
        """A connection from ``pool`` for work on behalf of ``organization_id`` (None: no
        organization yet, as for a key lookup); Unavailable (503) when the organization's
        turn and a free connection do not both come within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        async with self._turn(organization_id, deadline):
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                conn = await pool.acquire(timeout=remaining)
            except TimeoutError:
                metrics.HTTP_REFUSED.labels("db_pool_timeout").inc()
                raise Unavailable(
                    f"no database connection came free within {self.timeout:g} s; retry shortly",
                    retry_after=RETRY_AFTER,
                ) from None
            try:
                yield conn
            finally:
                await pool.release(conn)

    @asynccontextmanager
    async def _turn(self, organization_id: UUID | None, deadline: float) -> AsyncIterator[None]:
        if organization_id is None:
            yield
            return
        turns = self._turns.get(organization_id)
        if turns is None:
            turns = self._turns[organization_id] = _Turns(asyncio.Semaphore(self.per_organization))
        turns.users += 1
        try:
            semaphore = turns.semaphore
            if semaphore.locked():
                try:
                    await asyncio.wait_for(semaphore.acquire(), max(0.0, deadline - asyncio.get_running_loop().time()))
                except TimeoutError:
                    metrics.HTTP_REFUSED.labels("db_org_busy").inc()
                    raise Unavailable(
                        f"this organization already runs {self.per_organization} database requests at once in "
                        f"this process and none finished within {self.timeout:g} s; retry shortly",
                        retry_after=RETRY_AFTER,
                    ) from None
            else:
                await semaphore.acquire()  # free: returns at once, no timer needed
            try:
                yield
            finally:
                semaphore.release()
        finally:
            turns.users -= 1
            if turns.users == 0:
                del self._turns[organization_id]


GATE = web.AppKey("database_gate", DatabaseGate)
# The read standby, when TALLY_DATABASE_READ_URL is set.
STANDBY = web.AppKey("standby", Standby)
# The organization a request acts for, set by the auth guard once the key is verified.
ORGANIZATION = web.RequestKey("organization_id", UUID)
# What the request has cost so far: each connection it holds adds the time it held it.
COST = web.RequestKey("cost", CostMeter)
# The WAL position the response's data reflects (a write's commit, a read's server), sent as
# the X-Tally-Consistency header.
CONSISTENCY = web.RequestKey("consistency_lsn", int)
CONSISTENCY_HEADER = "X-Tally-Consistency"
# Set when the read standby served the request's read.
FROM_STANDBY = web.RequestKey("from_standby", bool)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def standby_failed(exc: BaseException) -> bool:
    """Whether a read's error says the standby failed (stopped, restarting, cancelling a read
    that conflicts with replay): then the read is refused with 503 and Retry-After, and the
    standby is checked again. Not a read that ran past its statement timeout: that is the
    request's cost, and one tenant's slow filter must not send every tenant's reads to the
    primary. Nor tally's own Unavailable (no turn or pooled connection came in time): that is
    the read pool's state, not the standby's."""
    return is_transient(exc) and not is_overrun(exc) and not isinstance(exc, Unavailable)


def consistency_token(request: web.Request) -> int | None:
    """The token a read request carries, if any (a malformed one is a 400 naming the header)."""
    text = request.headers.get(CONSISTENCY_HEADER)
    if text is None:
        return None
    try:
        return parse_lsn(text)
    except ValueError as exc:
        raise invalid(CONSISTENCY_HEADER, f"{exc}: send back the value a response carried", "header") from None


@asynccontextmanager
async def connection(request: web.Request, *, read: bool = False) -> AsyncIterator[Connection]:
    """The request's database connection (a read's, with ``read=True``: the standby's when it
    may serve the request), taken on behalf of the request's organization if it is known yet:
    ``async with connection(request) as conn: ...``."""
    app, organization = request.app, request.get(ORGANIZATION)
    gate, standby = app[GATE], app.get(STANDBY)
    token = consistency_token(request) if read else None  # checked with or without a standby
    if read and standby is not None and await standby.serves(token):
        try:
            async with gate.connection(standby.pool, organization) as conn, _timed(request):
                request[FROM_STANDBY] = True
                yield conn
                await _note_position(request, conn)
            return
        except Exception as exc:
            if not standby_failed(exc):
                raise
            await standby.failed(exc)
            raise Unavailable("the read standby failed during the request; retry shortly", retry_after=1) from exc
    async with gate.connection(app[appkeys.POOL], organization) as conn, _timed(request):
        yield conn
        if (read and standby is not None) or request.method in WRITE_METHODS:
            await _note_position(request, conn)


@asynccontextmanager
async def _timed(request: web.Request) -> AsyncIterator[None]:
    """Count the time the request waits on the connection the block holds as its database
    time (its organization's share is charged with it: service/api/fairness.py)."""
    meter = request.get(COST)
    if meter is None:
        yield
        return
    meter.holding += 1
    try:
        yield
    finally:
        meter.holding -= 1


async def _note_position(request: web.Request, conn: Connection) -> None:
    try:
        request[CONSISTENCY] = await conn.fetchval(SEEN_LSN)
    except Exception as exc:
        if not (is_transient(exc) or isinstance(exc, asyncpg.PostgresError)):
            raise
        return  # the data was read or written; only the token is missing


async def consistency_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the response's consistency token, when it touched the database."""
    lsn = request.get(CONSISTENCY)
    if lsn is not None and response.status < 400:
        response.headers[CONSISTENCY_HEADER] = format_lsn(lsn)
