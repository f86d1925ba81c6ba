"""Every sort field pages by walking one index, at any depth: the list statement's plan (first
page and cursor page, both directions) is read from EXPLAIN for each field of SORT_FIELDS.

Usage aggregates live in their own table (migration 0007) and profile fields in customers; a
page sorted by either must still be a walk of that table's keyset index with the cursor as
an index condition, never a sort of the organization's rows."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest

from service.domain.listing import CustomerFilter, ListQuery, Position, Sort
from service.store.listing import MAINTAINED_WINDOWS, SORT_FIELDS, USAGE_COLUMNS, WINDOW_COLUMNS, list_sql, page_sql
from service.store.rendering import Shape
from tests.factories import Org, make_org

ROWS = 20_000
SHAPE = Shape(fields={"id": "id", "name": "name", "total_cost": "total_cost"})
USAGE_TABLE_FIELDS = {name for name, f in SORT_FIELDS.items() if f.table == "u"}


@pytest.fixture(scope="module")
async def crowded(pool: asyncpg.Pool) -> Org:
    """An organization with enough customers, and fresh statistics, for plans to matter."""
    org = await make_org(pool)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO customers (organization_id, customer_identifier, name, email, status, total_budget,"
            " period_budget, created_at, updated_at)"
            " SELECT $1, 'plan_' || g, 'Name ' || g, 'p' || g || '@example.com',"
            " (ARRAY['active','draft','archived'])[1 + g % 3], g % 100, g % 50,"
            " now() - g * interval '1 minute', now() - g * interval '1 second'"
            " FROM generate_series(1, $2) g",
            org.id,
            ROWS,
        )
        await conn.execute(
            "UPDATE customer_usage SET first_seen = now() - random() * interval '90 days', last_active = now(),"
            " active_days = 1 + (random() * 30)::int, number_of_requests = (random() * 1000)::int,"
            " prompt_tokens = (random() * 1e5)::int, completion_tokens = (random() * 1e5)::int,"
            " total_tokens = (random() * 2e5)::int, total_cost = round((random() * 100)::numeric, 6),"
            " latency_sum = random() * 100, latency_count = 1 + (random() * 10)::int,"
            " ttft_sum = random() * 10, ttft_count = 1 + (random() * 10)::int"
            " WHERE organization_id = $1",
            org.id,
        )
    await pool.execute("ANALYZE customers")
    await pool.execute("ANALYZE customer_usage")
    return org


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(nodes(child))
    return out


def page_walk(plan: dict[str, Any]) -> dict[str, Any]:
    """The node under the inner query's Limit: what picks the page's rows."""
    limits = [n for n in nodes(plan) if n["Node Type"] == "Limit"]
    assert limits, plan
    return limits[-1]["Plans"][0]


async def explain(pool: asyncpg.Pool, q: ListQuery) -> dict[str, Any]:
    sql, args = page_sql(q, SHAPE)
    async with pool.acquire() as conn:
        doc = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    return (orjson.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]


@pytest.mark.parametrize("descending", [True, False], ids=["desc", "asc"])
@pytest.mark.parametrize("field", sorted(SORT_FIELDS))
async def test_every_sort_field_pages_by_one_index_walk(
    pool: asyncpg.Pool, crowded: Org, field: str, descending: bool
) -> None:
    base = ListQuery(crowded.id, "prod", sort=Sort(field, descending), limit=50, count=False)
    async with pool.acquire() as conn:
        key, kid = await conn.fetchrow(
            f"SELECT ({SORT_FIELDS[field].expr})::text, c.id::text"
            " FROM customers c JOIN customer_usage u ON u.organization_id = c.organization_id AND u.id = c.id"
            " WHERE c.organization_id = $1 ORDER BY 1 LIMIT 1 OFFSET $2",
            crowded.id,
            ROWS // 2,
        )
    table = "customer_usage" if field in USAGE_TABLE_FIELDS else "customers"
    for q in (base, ListQuery(**{**base.__dict__, "position": Position(key, kid)})):
        plan = await explain(pool, q)
        walk = page_walk(plan)
        below = nodes(walk)
        assert not [n for n in below if n["Node Type"] in ("Sort", "Incremental Sort", "Seq Scan")], _debug(plan)
        scans = [n for n in below if n["Node Type"] in ("Index Scan", "Index Only Scan")]
        # The outermost scan of the walk is the keyset index of the table holding the field.
        driving = scans[0]
        assert driving["Relation Name"] == table, _debug(plan)
        assert driving["Index Name"].startswith(f"{table}_sort_"), (field, plan)
        assert driving["Scan Direction"] == ("Backward" if descending else "Forward"), (field, plan)
        if q.position is not None:
            # The cursor bounds the walk inside the index: a row comparison on (key, id).
            assert "ROW(" in driving.get("Index Cond", ""), (field, driving)


@pytest.mark.parametrize("descending", [True, False], ids=["desc", "asc"])
@pytest.mark.parametrize("column", [*MAINTAINED_WINDOWS, "cost_month"])
async def test_a_window_ranked_from_its_kept_sums_pages_by_one_index_walk(
    pool: asyncpg.Pool, crowded: Org, column: str, descending: bool
) -> None:
    """The branch of a windowed page that reads the kept sums (service/store/windows.py) walks
    their index, the cursor inside it, like a lifetime sort."""
    today = await pool.fetchval("SELECT tally_local_day(time_zone, now()) FROM organizations WHERE id = $1", crowded.id)
    start = today.replace(day=1) if column == "cost_month" else today - timedelta(days=MAINTAINED_WINDOWS[column])
    window = CustomerFilter(usage_from=start, usage_to=today)
    base = ListQuery(crowded.id, "prod", filter=window, sort=Sort("total_cost", descending), limit=50, count=False)
    for q in (base, replace(base, position=Position("0", str(UUID(int=2**127))))):
        sql, args = list_sql(q, SHAPE)  # the window's relation is the statement's own CTE
        async with pool.acquire() as conn:
            doc = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        plan = (orjson.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
        # The first of the two ways the page may be picked (the other aggregates the window).
        fast = [n for n in nodes(plan) if n["Node Type"] == "Limit"][0]
        below = nodes(fast)
        assert not [n for n in below if n["Node Type"] in ("Sort", "Incremental Sort", "Seq Scan")], _debug(plan)
        driving = next(n for n in below if n["Node Type"] in ("Index Scan", "Index Only Scan"))
        assert driving["Index Name"] == f"customer_usage_sort_{column}", _debug(plan)
        assert driving["Scan Direction"] == ("Backward" if descending else "Forward"), _debug(plan)
        if q.position is not None:
            assert "ROW(" in driving.get("Index Cond", ""), _debug(plan)


def _debug(plan: dict[str, Any], depth: int = 0) -> str:
    line = "  " * depth + " ".join(
        f"{key}={plan.get(key)}" for key in ("Node Type", "Relation Name", "Index Name", "Plan Rows", "Index Cond")
    )
    return "\n".join([line, *(_debug(c, depth + 1) for c in plan.get("Plans", []))])


async def test_usage_columns_are_the_usage_tables(pool: asyncpg.Pool) -> None:
    """query.USAGE_COLUMNS (which decides when a count needs the join) names exactly the
    columns customer_rows takes from customer_usage."""
    columns = {
        r["column_name"]
        for r in await pool.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'customer_usage'"
        )
    }
    assert columns - {"organization_id", "id", "environment"} - WINDOW_COLUMNS == USAGE_COLUMNS
    profile = {
        r["column_name"]
        for r in await pool.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")
    }
    assert not profile & USAGE_COLUMNS
