"""The trigger-maintained customer counts stay equal to count(*) through every kind of
write, concurrent writers and compaction."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from service.domain.events import validate_event
from service.store.fold import fold
from service.store.housekeeping import compact_counts
from tests.eventkit import usage
from tests.factories import Org, insert_customer

COUNTED = (
    "SELECT status, coalesce(sum(delta), 0)::bigint AS n FROM customer_counts"
    " WHERE organization_id = $1 AND environment = $2 GROUP BY status HAVING sum(delta) <> 0"
)
ACTUAL = "SELECT status, count(*) AS n FROM customers WHERE organization_id = $1 AND environment = $2 GROUP BY status"


async def assert_counts_exact(pool: asyncpg.Pool, org: Org, environment: str = "prod") -> dict[str, int]:
    counted = {r["status"]: r["n"] for r in await pool.fetch(COUNTED, org.id, environment)}
    actual = {r["status"]: r["n"] for r in await pool.fetch(ACTUAL, org.id, environment)}
    assert counted == actual
    return actual


async def test_counts_follow_api_writes(client, pool, org: Org) -> None:
    for i in range(5):
        r = await client.post("/v1/customers", json={"customer_identifier": f"c{i}"}, headers=org.headers())
        assert r.status == 201
    await client.patch("/v1/customers/c0", json={"status": "blacklisted"}, headers=org.headers())
    await client.patch("/v1/customers/c1", json={"status": "draft", "name": "x"}, headers=org.headers())
    await client.patch("/v1/customers/c2", json={"name": "no status change"}, headers=org.headers())
    await client.delete("/v1/customers/c3", headers=org.headers())
    assert await assert_counts_exact(pool, org) == {"active": 2, "blacklisted": 1, "draft": 1}
    r = await client.get("/v1/customers?status=active,draft", headers=org.headers())
    assert (await r.json())["count"] == 3
    await insert_customer(pool, org, "direct", status="archived")
    r = await client.get("/v1/customers", headers=org.headers())
    assert (await r.json())["count"] == 5


async def test_counts_follow_concurrent_folds_and_compaction(pool, org: Org) -> None:
    now = datetime.now(UTC)

    def batch(start: int) -> list:
        raws = [usage(org.name, f"f{(start + i) % 40}") for i in range(60)]
        raws += [
            {
                "specversion": "1.0",
                "id": f"s{start}-{i}",
                "source": "crm",
                "type": "customer.upserted",
                "time": now.isoformat(),
                "subject": f"f{i}",
                "organization": org.name,
                "data": {"status": "deactivated" if (start + i) % 2 else "active"},
            }
            for i in range(5)
        ]
        raws += [
            {
                "specversion": "1.0",
                "id": f"d{start}",
                "source": "crm",
                "type": "customer.deleted",
                "time": now.isoformat(),
                "subject": f"f{start % 40}",
                "organization": org.name,
            }
        ]
        return [validate_event(r, now) for r in raws]

    async def run(start: int) -> None:
        async with pool.acquire() as conn:
            await fold(conn, batch(start), retention=timedelta(days=35))

    async def compact() -> None:
        async with pool.acquire() as conn:
            await compact_counts(conn)

    await asyncio.gather(*(run(s) for s in range(0, 60, 7)), compact(), compact())
    await assert_counts_exact(pool, org)
    await compact()
    rows = await pool.fetchval("SELECT count(*) FROM customer_counts WHERE organization_id = $1", org.id)
    assert rows <= 5  # one row per status after compaction
    await assert_counts_exact(pool, org)
