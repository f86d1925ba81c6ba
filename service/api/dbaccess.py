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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from uuid import UUID

import asyncpg
from aiohttp import web

from service.api import appkeys
from service.core.db import Connection
from service.infra import metrics
from service.infra.errors import Unavailable

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
# The organization a request acts for, set by the auth guard once the key is verified.
ORGANIZATION = web.RequestKey("organization_id", UUID)


def connection(request: web.Request, *, read: bool = False) -> AbstractAsyncContextManager[Connection]:
    """The request's database connection (from the read pool with ``read=True``), taken on
    behalf of the request's organization if it is known yet:
    ``async with connection(request) as conn: ...``."""
    pool = request.app[appkeys.READ_POOL if read else appkeys.POOL]
    return request.app[GATE].connection(pool, request.get(ORGANIZATION))
