"""A streaming standby for reads (``TALLY_DATABASE_READ_URL``): its health, its replay
position, and read-your-writes.

Consistency tokens are WAL positions (LSNs, PostgreSQL's ``X/Y`` text form). A write's token
is the primary's WAL position after its commit; a read's is the position of the server it
read from after the read. A read that carries a token is served by the standby only once the
standby has replayed that position — so it sees every write the token covers — after
waiting up to ``TALLY_DATABASE_READ_WAIT``; otherwise it is served by the primary, which has
everything. A standby that does not answer is marked down (reads go to the primary, one log
line, ``tally_db_replica_up`` 0) until a check succeeds again.

The checks and replay-position polls run on a connection of their own, never on the read
pool: a pool filled by slow reads (one tenant's expensive filter) says nothing about the
standby's health, and must not mark it down for every tenant. For the same reason a read
that runs past its statement timeout is the request's problem (a 503 for that request), not
the standby's (service/api/dbaccess.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import asyncpg

from service.infra import metrics
from service.infra.db import close_pool, create_pool
from service.infra.errors import is_transient
from service.infra.settings import Settings

log = logging.getLogger("tally.standby")

# The position of the data a session sees: the standby's replayed WAL, or (on the primary,
# where that is NULL) the primary's WAL insert position — past the end of every commit
# already made, even one not yet flushed (synchronous_commit = off). As bytes since 0/0.
SEEN_LSN = "SELECT (coalesce(pg_last_wal_replay_lsn(), pg_current_wal_insert_lsn()) - '0/0'::pg_lsn)::int8"
# Lag in seconds: 0 when everything received is replayed (an idle primary sends nothing, so
# the last replayed transaction's age would grow without any lag), else the age of the last
# replayed transaction.
CHECK = """
SELECT pg_is_in_recovery(),
       (coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn()) - '0/0'::pg_lsn)::int8,
       CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END
"""
CHECK_TIMEOUT = 1.0
# How often a read waiting for its token asks the standby where replay is (one query serves
# every waiter at a time).
POLL_INTERVAL = 0.005

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` as bytes since 0/0; ValueError if it is not an LSN."""
    match = _LSN.match(text.strip())
    if match is None:
        raise ValueError("not a WAL position (hex/hex, like 16/B374D848)")
    return int(match[1], 16) << 32 | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def probe_failed(exc: BaseException) -> bool:
    """Whether a check's error marks the standby down: a transient failure, or any refusal by
    the server (a role or database that is not there is as down as a stopped server)."""
    return is_transient(exc) or isinstance(exc, asyncpg.PostgresError)


class Standby:
    """The read pool on a streaming standby and what is known of it."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.wait = settings.database_read_wait
        self.interval = settings.database_read_check_interval
        self.connect_timeout = settings.db_connect_timeout
        self.up = False
        self.replayed = 0
        self.checks = 0  # checks completed, whatever their outcome
        # Whether the read database was last seen in recovery (None: not seen yet): a change
        # is logged once, not at every check.
        self.in_recovery: bool | None = None
        self._poll: asyncio.Future[asyncpg.Record] | None = None
        self._checked = asyncio.Event()
        self._probe: asyncpg.Connection | None = None
        self._probe_lock = asyncio.Lock()

    async def _ask(self, query: str) -> asyncpg.Record:
        """One row of ``query`` on the probe connection (opened, or reopened, as needed; one
        query at a time)."""
        async with self._probe_lock:
            if self._probe is None or self._probe.is_closed():
                self._probe = await asyncpg.connect(
                    self.dsn,
                    timeout=min(CHECK_TIMEOUT, self.connect_timeout),
                    server_settings={"application_name": "tally-replica-probe"},
                )
            try:
                row = await self._probe.fetchrow(query, timeout=CHECK_TIMEOUT)
            except BaseException:
                # A probe that failed mid-query (or was cancelled) is in an unknown state.
                self._probe.terminate()
                self._probe = None
                raise
            assert row is not None
            return row

    async def check(self) -> None:
        """Ask the standby where it is; mark it up or down."""
        try:
            in_recovery, replayed, lag = await self._ask(CHECK)
        except Exception as exc:
            if not probe_failed(exc):
                raise
            await self.failed(exc)
            return
        self.replayed = max(self.replayed, replayed)
        metrics.REPLICA_LAG.set(float(lag))
        if in_recovery != self.in_recovery:
            if not in_recovery:
                log.warning("the read database is not in recovery: it is a primary (promoted, or not a standby)")
            elif self.in_recovery is False:
                log.info("the read database is in recovery again: a standby")
            self.in_recovery = in_recovery
        if not self.up:
            log.info("standby up: reads go to the standby", extra={"replayed": format_lsn(replayed)})
        self.up = True
        metrics.REPLICA_UP.set(1)

    async def failed(self, exc: BaseException) -> None:
        """The standby failed a check or a read: reads go to the primary until a check succeeds."""
        if self.up:
            log.warning("standby down: reads go to the primary", extra={"error": repr(exc)})
            # Connections to a server that went away fail only when used: drop them now.
            await self.pool.expire_connections()
        self.up = False
        metrics.REPLICA_UP.set(0)

    async def run(self) -> None:
        """Check every ``interval`` seconds (the first check at once)."""
        while True:
            await self.check()
            self.checks += 1
            self._checked.set()
            await asyncio.sleep(self.interval)

    async def serves(self, token: int | None) -> bool:
        """Whether a read carrying ``token`` (None: no token) may go to the standby now."""
        if not self.up:
            metrics.REPLICA_FALLBACKS.labels("down").inc()
            return False
        if token is None or self.replayed >= token:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while True:
            try:
                self.replayed = max(self.replayed, await self._replay_position())
            except Exception as exc:
                if not probe_failed(exc):
                    raise
                await self.failed(exc)
                metrics.REPLICA_FALLBACKS.labels("down").inc()
                return False
            if self.replayed >= token:
                return True
            if loop.time() + POLL_INTERVAL >= deadline:
                metrics.REPLICA_FALLBACKS.labels("behind").inc()
                return False
            await asyncio.sleep(POLL_INTERVAL)

    async def _replay_position(self) -> int:
        # One query in flight at a time, shared by every waiting read.
        if self._poll is None or self._poll.done():
            self._poll = asyncio.ensure_future(self._ask(SEEN_LSN))
        row = await asyncio.shield(self._poll)
        return int(row[0])

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        async with self._probe_lock:
            if self._probe is not None:
                self._probe.terminate()
                self._probe = None


@asynccontextmanager
async def standby_context(settings: Settings, dsn: str) -> AsyncIterator[Standby]:
    """The standby's pool and its health checks. The API starts whether or not the standby
    answers (reads go to the primary meanwhile); the first check runs before it serves."""
    pool = await create_pool(
        dsn, settings, name="replica", statement_timeout=settings.db_command_timeout, min_size=0, check=False
    )
    standby = Standby(pool, settings, dsn)
    task = asyncio.create_task(standby.run(), name="tally-standby-checks")
    with suppress(TimeoutError):
        await asyncio.wait_for(standby._checked.wait(), CHECK_TIMEOUT * 3)
    if not standby.up:
        log.warning("standby unreachable at start: reads go to the primary until it answers")
    try:
        yield standby
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await standby.close()
        await close_pool(pool)
