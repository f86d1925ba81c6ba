"""What every store function shares: the connection it takes (a connection, or one borrowed
from a pool: asyncpg hands out a proxy), and rows turned into the column arrays that
``unnest()`` zips back into rows (how the store writes a batch in one statement)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection


TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1::text, 0))"
UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1::text, 0))"


@contextlib.asynccontextmanager
async def session_lock(conn: Connection, name: str) -> AsyncIterator[bool]:
    """The session advisory lock ``name``, tried: yields whether it was taken, and releases it
    on leaving (it outlives the transactions inside). A pooled connection goes back to the pool
    without a reset (service/infra/db.py), so one whose lock could not be released for sure (a
    cancellation or a failure around the lock statements) is closed instead of lent out holding it."""
    try:
        taken = bool(await conn.fetchval(TRY_LOCK, name))
    except BaseException:
        conn.terminate()  # whether the lock was taken is not known
        raise
    try:
        yield taken
    finally:
        if taken:
            try:
                await conn.fetchval(UNLOCK, name)
            except BaseException:
                conn.terminate()
                raise


def columns(rows: Iterable[tuple[object, ...]]) -> list[list[object]]:
    """Rows turned into one list per column: the arrays that unnest() zips back into rows."""
    return [list(column) for column in zip(*rows, strict=True)]
