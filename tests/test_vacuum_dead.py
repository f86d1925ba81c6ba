"""Housekeeping vacuums where autovacuum will not: a table whose deleted rows autovacuum's rule
would reclaim is vacuumed when autovacuum is off for it (here: for the table, so that the test
means the same on a server whose autovacuum is on)."""

from __future__ import annotations

import asyncpg

from service.store.housekeeping import vacuum_dead
from tests.eventkit import wait_until
from tests.factories import Org

TABLE = "customer_changes"


async def dead_rows(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # this backend's cached statistics
    return int(await conn.fetchval("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = $1", TABLE))


async def delete_many(pool: asyncpg.Pool, org: Org) -> int:
    """Insert and delete more rows than autovacuum's rule lets stand; how many."""
    async with pool.acquire() as conn:
        size = int(await conn.fetchval("SELECT greatest(reltuples, 0) FROM pg_class WHERE relname = $1", TABLE))
        n = 1_000 + size // 2
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO customer_changes (organization_id, environment, customer_ids, customer_identifiers, kinds)"
                " SELECT $1, 'vacuum-test', ARRAY[gen_random_uuid()], ARRAY['c' || g], 'c'"
                " FROM generate_series(1, $2) g",
                org.id,
                n,
            )
        await conn.execute(
            "DELETE FROM customer_changes WHERE organization_id = $1 AND environment = 'vacuum-test'", org.id
        )
        if await conn.fetchval("SELECT to_regproc('pg_stat_force_next_flush') IS NOT NULL"):  # PostgreSQL 15+
            await conn.execute("SELECT pg_stat_force_next_flush()")  # the deletions counted now, not within 10 s
    return n


async def test_dead_rows_are_vacuumed_where_autovacuum_is_off(pool: asyncpg.Pool, org: Org) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"ALTER TABLE {TABLE} SET (autovacuum_enabled = false)")
        try:
            n = await delete_many(pool, org)

            async def counted() -> bool:  # another backend's counts reach the statistics view
                return await dead_rows(conn) >= n

            await wait_until(counted, what="the deleted rows counted as dead")
            assert TABLE in await vacuum_dead(conn)
            assert await dead_rows(conn) < n  # reclaimed (rows other tests deleted meanwhile may remain)
            assert TABLE not in await vacuum_dead(conn)  # nothing left to do
        finally:
            await conn.execute(f"ALTER TABLE {TABLE} RESET (autovacuum_enabled)")
