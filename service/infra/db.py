"""asyncpg pools: created with codecs tally relies on, checked at start, closed with a bound."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import asyncpg
import orjson

from service.infra.settings import Settings, redact_dsn

log = logging.getLogger("tally.db")

# asyncpg's Pool.close waits for every connection to be released; a stuck query must not
# hold up shutdown forever, so close is bounded and falls back to terminate().
POOL_CLOSE_TIMEOUT = 10.0


def _default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)  # exact: numeric casts read it back without loss
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: object) -> str:
    return orjson.dumps(value, default=_default).decode()


class TallyConnection(asyncpg.Connection):
    """A pooled connection released without asyncpg's reset query.

    The default reset (unlock advisory locks, CLOSE ALL, UNLISTEN *, RESET ALL) costs a
    round trip on every release, ~10 % of a list request here. tally's pooled connections
    never keep session state past their use: session advisory locks only through
    ``service/store/db.py`` ``session_lock``, which releases them or closes the connection (the
    migrator uses its own connection), no LISTEN, no SET, no cursors outside transactions. An open transaction
    is still rolled back on release (asyncpg does that regardless of the reset query).
    """

    def get_reset_query(self) -> str:
        return ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb travel as Python objects; orjson is several times faster than json.
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def create_pool(
    dsn: str,
    settings: Settings,
    *,
    name: str = "primary",
    statement_timeout: float | None = None,
    min_size: int | None = None,
    check: bool = True,
) -> asyncpg.Pool:
    """A pool whose sessions run in UTC, that has answered ``SELECT 1`` (fail fast; with
    ``check=False`` and ``min_size=0`` it connects only when first used, for a standby the
    process must start without).
    With ``statement_timeout`` (seconds), PostgreSQL cancels any statement of the pool's
    sessions that runs longer: asyncpg's client-side command timeout gives up waiting, but
    only the server's own timeout is sure to stop the work."""
    # No JIT: a statement's estimated cost counts ways it never runs (a windowed page's
    # aggregation behind a condition that is false when kept sums serve it, ~250,000 at 600k
    # customers), and compiling it for PostgreSQL's JIT threshold took 44 ms of a 5 ms page.
    # array_nulls: the store sends some arrays as literals, and reads NULL in them as a null
    # (service/store/db.py); on is PostgreSQL's default, made sure of here.
    server_settings = {"timezone": "UTC", "application_name": f"tally-{name}", "jit": "off", "array_nulls": "on"}
    if statement_timeout is not None:
        server_settings["statement_timeout"] = str(max(1, round(statement_timeout * 1000)))  # milliseconds
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(settings.db_pool_min, settings.db_pool_max) if min_size is None else min_size,
        max_size=settings.db_pool_max,
        command_timeout=settings.db_command_timeout,
        timeout=settings.db_connect_timeout,
        init=_init_connection,
        connection_class=TallyConnection,
        server_settings=server_settings,
    )
    if check:
        await pool.fetchval("SELECT 1")
    log.info("database pool ready", extra={"pool": name, "dsn": redact_dsn(dsn)})
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=POOL_CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("database pool did not close in time; terminating connections")
        pool.terminate()


@asynccontextmanager
async def pool_context(
    dsn: str, settings: Settings, *, name: str = "primary", statement_timeout: float | None = None
) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(dsn, settings, name=name, statement_timeout=statement_timeout)
    try:
        yield pool
    finally:
        await close_pool(pool)
