"""What a fold writes for a customer it makes: the usage row once, with its first values (an
UPDATE of customer_usage rewrites the row and every one of its sort indexes, so an empty row
followed by an update cost a new customer twice). Counted by PostgreSQL itself."""

from __future__ import annotations

import asyncpg

from tests.eventkit import fold_events, usage
from tests.factories import Org

WRITES = """
SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'customer_usage'
"""


async def _folded_in_one_transaction(pool: asyncpg.Pool, *raws: dict) -> tuple[list[str], tuple[int, int]]:
    """The fold's outcomes and the rows it inserted into and updated in customer_usage. The
    counts are the backend's, not yet reported; nothing is reported inside a transaction,
    so the difference across the fold (a savepoint of this transaction) is the fold's."""
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(WRITES)
        outcomes = await fold_events(conn, *raws)
        after = await conn.fetchrow(WRITES)
    return outcomes, (after["n_tup_ins"] - before["n_tup_ins"], after["n_tup_upd"] - before["n_tup_upd"])


async def test_a_new_customers_usage_row_is_inserted_once_with_its_first_values(pool: asyncpg.Pool, org: Org) -> None:
    outcomes, writes = await _folded_in_one_transaction(
        pool, usage(org.name, "new-1", requests=2, cost="0.5"), usage(org.name, "new-2", requests=1, cost="0.25")
    )
    assert outcomes == ["applied", "applied"]
    assert writes == (2, 0)
    rows = await pool.fetch(
        "SELECT customer_identifier, number_of_requests, total_cost, active_days, last_active IS NOT NULL AS active"
        " FROM customer_rows WHERE organization_id = $1 ORDER BY customer_identifier",
        org.id,
    )
    assert [tuple(r) for r in rows] == [("new-1", 2, 0.5, 1, True), ("new-2", 1, 0.25, 1, True)]


async def test_a_customer_made_by_a_profile_change_gets_an_empty_usage_row(pool: asyncpg.Pool, org: Org) -> None:
    created = {**usage(org.name, "profile-only"), "type": "customer.upserted", "data": {"name": "Ada"}}
    outcomes, writes = await _folded_in_one_transaction(pool, created)
    assert outcomes == ["applied"] and writes == (1, 0)
    row = await pool.fetchrow(
        "SELECT name, number_of_requests, active_days, first_seen, last_active FROM customer_rows"
        " WHERE organization_id = $1 AND customer_identifier = 'profile-only'",
        org.id,
    )
    assert tuple(row) == ("Ada", 0, 0, None, None)


async def test_usage_for_a_customer_that_exists_updates_its_row(pool: asyncpg.Pool, org: Org) -> None:
    await _folded_in_one_transaction(pool, usage(org.name, "known", requests=1))
    outcomes, writes = await _folded_in_one_transaction(pool, usage(org.name, "known", requests=3))
    assert outcomes == ["applied"] and writes == (0, 1)
    assert (
        await pool.fetchval(
            "SELECT number_of_requests FROM customer_rows WHERE organization_id = $1 AND customer_identifier = 'known'",
            org.id,
        )
        == 4
    )
