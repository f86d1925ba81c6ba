"""Reads whose plan shape does not depend on statistics: on tables that were never analyzed
(a bulk load or a backfill on a server whose autovacuum is off or has not caught up), every
list and retrieve still reaches a customer's other table by its primary key, once per row,
and walks a sort index once, never per row — the quadratic plan (a sort index probed for
each customer, scanning the whole organization each time) cannot be chosen. The same
statements are checked again after ANALYZE. And tally's housekeeping analyzes the tables a
large fold changed where the server does not."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from service.api.compat import respan
from service.api.customers import canonical_shape
from service.domain.listing import CustomerFilter, ListQuery, Position, Sort, condition
from service.infra.migrate import migrate
from service.infra.settings import DEFAULT_MIGRATIONS_DIR
from service.store import fold as fold_module
from service.store import usage as usage_store
from service.store import windows
from service.store.customers import LOCK_CUSTOMER, SELECT_CUSTOMER_ID, _get_sql
from service.store.db import columns
from service.store.fold import INSERT_CUSTOMERS, LOCK_CUSTOMERS, LOOKUP_TABLES, UNANALYZED
from service.store.housekeeping import analyze_stale
from service.store.listing import SORT_FIELDS, list_sql
from service.store.rendering import Shape
from tests.eventkit import fold_events, usage
from tests.support import BASE_DSN, with_database

# Makes and migrates a database of its own (no shared fixture says so).
pytestmark = pytest.mark.services

CUSTOMERS = 30_000
TABLES = ("customers", "customer_usage", "daily_usage", "daily_model_usage")
# A bound on any one read here (each takes milliseconds to a second): a quadratic plan runs
# for minutes, and reports it by running out of this.
TIMEOUT = "60s"
# Days of usage each customer has (two in three of them, each day), ending today.
DAYS = 10

LOAD = """
INSERT INTO customers (organization_id, environment, customer_identifier, name, email, status, created_at, updated_at)
SELECT $1, 'prod', 'user_' || g, 'Name ' || (g % 977) || ' abc' || (g % 13), 'u' || g || '@example.com',
       (ARRAY['active','draft','archived'])[1 + g % 3], now() - g * interval '1 minute', now()
FROM generate_series(1, $2) g
"""
# customer_usage's rows come from the insert trigger; give them heavy-tailed aggregates.
USAGE = """
UPDATE customer_usage SET first_seen = now() - interval '30 days', last_active = now(), active_days = 3,
    number_of_requests = (random() * 1000)::int, total_tokens = (random() * 1e5)::int,
    total_cost = round((random() ^ 4 * 100)::numeric, 6), latency_sum = random() * 10, latency_count = 3,
    ttft_sum = random(), ttft_count = 3
WHERE organization_id = $1
"""
DAILY = f"""
INSERT INTO daily_usage (organization_id, customer_id, day, requests, total_tokens, cost, latency_sum, latency_count)
SELECT c.organization_id, c.id, current_date - k, 3, 100, round((random() * 10)::numeric, 6), 1, 1
FROM customers c, generate_series(0, {DAYS - 1}) k WHERE c.organization_id = $1 AND (hashtext(c.id::text) + k) % 3 <> 0
"""
MODELS = """
INSERT INTO daily_model_usage (organization_id, customer_id, day, model, provider, requests, total_tokens, cost)
SELECT d.organization_id, d.customer_id, d.day,
       (ARRAY['gpt-4o', 'claude', 'llama'])[1 + abs(hashtext(d.customer_id::text)) % 3], 'p',
       d.requests, d.total_tokens, d.cost
FROM daily_usage d WHERE d.organization_id = $1
"""


@pytest.fixture
async def never_analyzed() -> AsyncIterator[tuple[asyncpg.Connection, uuid.UUID]]:
    """A database of its own, migrated, loaded in bulk and not analyzed since (autovacuum off
    on its tables, whatever the server's setting), as after a backfill."""
    name = f"tally_test_stats_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(with_database(BASE_DSN, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(BASE_DSN, name)
    try:
        await migrate(dsn, DEFAULT_MIGRATIONS_DIR)
        conn = await asyncpg.connect(dsn, server_settings={"statement_timeout": TIMEOUT})
        try:
            for table in TABLES:
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            org = await conn.fetchval("INSERT INTO organizations (name) VALUES ('stats') RETURNING id")
            await conn.execute(LOAD, org, CUSTOMERS)
            await conn.execute(USAGE, org)
            await conn.execute(DAILY, org)
            await conn.execute(MODELS, org)
            # As a fresh install leaves them: never analyzed, or analyzed while empty (by a
            # migration); none knows of the load.
            if await conn.fetchval("SELECT to_regproc('pg_stat_force_next_flush') IS NOT NULL"):  # PostgreSQL 15+
                await conn.execute("SELECT pg_stat_force_next_flush()")  # the load counted now, not within seconds
            known = await conn.fetch("SELECT relname, reltuples FROM pg_class WHERE relname = ANY($1)", list(TABLES))
            assert len(known) == len(TABLES) and all(r["reltuples"] <= 0 for r in known), known
            yield conn, org
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def nodes(plan: dict[str, Any], processes: int = 1) -> list[tuple[dict[str, Any], int]]:
    """Each node of ``plan`` and the processes running it: below a Gather, its workers and
    the leader, each of which runs the node once (one loop each) or reads a share of it."""
    out = [(plan, processes)]
    if plan["Node Type"] in ("Gather", "Gather Merge"):
        processes = plan.get("Workers Launched", 0) + 1
    for child in plan.get("Plans", []):
        out.extend(nodes(child, processes))
    return out


def scans(plan: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    return [(n, k) for n, k in nodes(plan) if "Relation Name" in n]


def problems(plan: dict[str, Any], page_rows: int | None, sizes: dict[str, int]) -> list[str]:
    """What makes a plan's cost grow with the organization instead of the page (for an
    unfiltered read, ``page_rows``: no table is probed more often than the page has rows),
    or faster than the organization: no table's rows read more than three times over
    (``sizes``: each table's rows; a count, a bounded count of matches and the page may each
    pass over it once), besides the page's own probes."""
    found = []
    for n, processes in scans(plan):
        loops, index = n.get("Actual Loops", 1), n.get("Index Name", "")
        where = f"{n['Node Type']} on {n['Relation Name']} {index} x{loops}"
        if loops > processes and not (
            index.endswith("_pkey") or index == "customers_organization_id_environment_customer_identifier_key"
        ):
            found.append(f"a scan repeated per row that is not a primary-key probe: {where}")
        if page_rows is not None and loops > page_rows + 1:
            found.append(f"more probes than the page has rows: {where}")
    for table, rows in rows_read(plan).items():
        if rows > 3 * sizes.get(table, 0) + PAGE_PROBES:
            found.append(f"{table}: {rows:.0f} rows read, {sizes.get(table, 0)} in the table")
    return found


def rows_read(plan: dict[str, Any]) -> dict[str, float]:
    """Rows each table's scans read over every loop: returned, and removed by a filter or a
    recheck (EXPLAIN gives them per loop)."""
    read: dict[str, float] = {}
    for n, _ in scans(plan):
        per_loop = sum(n.get(k, 0) for k in ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck"))
        read[n["Relation Name"]] = read.get(n["Relation Name"], 0) + per_loop * n.get("Actual Loops", 1)
    return read


# Rows a read may take from a table besides its passes over it: its page's probes (a 1,000-row
# page picked, rendered, and its usage probed: three times its rows), and a windowed page's
# days (its 51 customers' days, picked and rendered).
PAGE_PROBES = 3 * 1001 + 2 * 51 * DAYS


async def explain(conn: asyncpg.Connection, sql: str, args: list[object]) -> dict[str, Any]:
    doc = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
    return (orjson.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]


def reads(org: uuid.UUID) -> list[tuple[str, str, list[object], int | None]]:
    """(name, statement, arguments, rows per page when unfiltered) of the reads a new user
    makes first."""
    canonical = canonical_shape(False, False)
    first = ListQuery(org, "prod", limit=1000)
    out = [
        ("first 1,000-row page", *list_sql(first, canonical), 1000),
        ("first page by -total_cost", *list_sql(ListQuery(org, "prod", sort=Sort("total_cost", True)), canonical), 50),
        (
            "Respan list, name icontains abc",
            *list_sql(
                ListQuery(
                    org,
                    "prod",
                    sort=Sort("total_cost", True),
                    filter=CustomerFilter(conditions=(condition("name", "icontains", ["abc"], "filters"),)),
                ),
                respan.LIST_SHAPE,
            ),
            None,
        ),
        (
            # Some ten customers match: found by the name's index, not by walking the sort
            # index of the whole organization and checking each (as many probes as the page).
            "a rare name, by -first_seen",
            *list_sql(ListQuery(org, "prod", filter=CustomerFilter(name_contains="name 5 abc1")), canonical),
            50,
        ),
        (
            "status filter by -number_of_requests",
            *list_sql(
                ListQuery(
                    org, "prod", sort=Sort("number_of_requests", True), filter=CustomerFilter(statuses=("draft",))
                ),
                canonical,
            ),
            None,
        ),
        (
            "cost range by name",
            *list_sql(
                ListQuery(org, "prod", sort=Sort("name"), filter=CustomerFilter(total_cost_gte=Decimal("50"))),
                canonical,
            ),
            None,
        ),
        ("retrieve", _get_sql(canonical_shape(True, True)), [org, "prod", "user_77"], 1),
    ]
    return out


def window_reads(org: uuid.UUID, today: date) -> list[tuple[str, str, list[object], int | None]]:
    """Lists ranked inside a window (each customer's days in it aggregated: the whole
    organization's window is read, once) and organization-wide usage reports."""
    canonical = canonical_shape(False, False)

    def window(days: int, **kw: Any) -> CustomerFilter:
        return CustomerFilter(usage_from=today - timedelta(days=days - 1), usage_to=today, **kw)

    def ranked(sort: Sort, f: CustomerFilter) -> tuple[str, list[object]]:
        return list_sql(ListQuery(org, "prod", sort=sort, filter=f), canonical)

    args = [org, "prod", today - timedelta(days=6), today, "day", None]
    return [
        ("3 days by -total_cost", *ranked(Sort("total_cost", True), window(3)), None),
        # No kept sums are for this organization's day yet: the window is aggregated.
        ("30 days by -total_cost", *ranked(Sort("total_cost", True), window(30)), None),
        ("3 days with usage, by name", *ranked(Sort("name"), window(3, usage_only=True)), None),
        (
            "7 days, a model, by -number_of_requests",
            *ranked(Sort("number_of_requests", True), window(7, models=("claude",))),
            None,
        ),
        (
            "7 days, cost range, by -total_tokens",
            *ranked(Sort("total_tokens", True), window(7, total_cost_gte=Decimal("20"))),
            None,
        ),
        ("usage per day", usage_store.TOTALS, args, None),
        ("usage per customer", usage_store.BY_CUSTOMER, [*args, None, 100], None),
        ("usage per model", usage_store.GROUPED["model"], [*args, None, 10], None),
    ]


async def cursor_pages(conn: asyncpg.Connection, org: uuid.UUID) -> list[tuple[str, str, list[object], int | None]]:
    """The second page by each sort field, after the first."""
    out = []
    shape = Shape(fields={"id": "id", "name": "name"})
    for field in SORT_FIELDS:
        first = ListQuery(org, "prod", sort=Sort(field, True), limit=50, count=False)
        sql, args = list_sql(first, shape)
        last = (await conn.fetch(sql, *args))[49]
        q = ListQuery(org, "prod", sort=Sort(field, True), limit=50, position=Position(last["k"], last["kid"]))
        out.append((f"cursor page by {field}", *list_sql(q, shape), 50))
    return out


@pytest.mark.parametrize("analyzed", [False, True], ids=["never-analyzed", "analyzed"])
async def test_reads_probe_by_primary_key_whatever_the_statistics(
    never_analyzed: tuple[asyncpg.Connection, uuid.UUID], analyzed: bool
) -> None:
    conn, org = never_analyzed
    if analyzed:
        await conn.execute(f"ANALYZE {', '.join(TABLES)}")
    sizes = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
    today = await conn.fetchval("SELECT current_date")
    found = {}
    for name, sql, args, rows in [*reads(org), *window_reads(org, today), *await cursor_pages(conn, org)]:
        try:
            plan = await explain(conn, sql, args)
        except asyncpg.QueryCanceledError:
            # A read that takes the whole statement timeout here is the plan these checks are for.
            found[name] = [f"ran past the statement timeout ({TIMEOUT})"]
            continue
        if trouble := problems(plan, rows, sizes):
            found[name] = trouble
    assert not found, found


@pytest.mark.parametrize("analyzed", [False, True], ids=["never-analyzed", "analyzed"])
async def test_customers_found_by_key_are_probed_by_an_index_on_the_key(
    never_analyzed: tuple[asyncpg.Connection, uuid.UUID], analyzed: bool
) -> None:
    """A lookup by (organization, environment, identifier) reads the customers it names and
    no others: a retrieve, an API write's lock, a usage series, and the fold's two statements
    that make sure a batch's customers have rows and lock them. Without statistics every index
    leading with (organization_id, environment) looks as good as the key's, and one of them
    reads the organization's 30,000 customers per key; the lookups' order decides that tie
    here, where the indexes are as tall (where one is taller it may not: the fold analyzes
    the tables first, checked below)."""
    conn, org = never_analyzed
    if analyzed:
        await conn.execute(f"ANALYZE {', '.join(TABLES)}")
    keys = [(org, "prod", f"user_{i}") for i in range(1, CUSTOMERS, CUSTOMERS // 40)]
    keys += [(org, "prod", f"new_{i}") for i in range(10)]
    arrays = columns(sorted(keys), INSERT_CUSTOMERS)
    lookups = [
        ("retrieve", _get_sql(canonical_shape(True, True)), [org, "prod", "user_77"], 1),
        ("an API write's lock", LOCK_CUSTOMER, [org, "prod", "user_77"], 1),
        ("a usage series' customer", SELECT_CUSTOMER_ID, [org, "prod", "user_77"], 1),
        ("the fold's new rows", INSERT_CUSTOMERS, arrays, len(keys)),
        ("the fold's row locks", LOCK_CUSTOMERS, arrays, len(keys)),
    ]
    found = {}
    for name, sql, args, named in lookups:
        # Inside a transaction rolled back: EXPLAIN ANALYZE runs the statement (its rows, its locks).
        transaction = conn.transaction()
        await transaction.start()
        try:
            plan = await explain(conn, sql, args)
        except asyncpg.QueryCanceledError:
            found[name] = f"ran past the statement timeout ({TIMEOUT})"
            continue
        finally:
            await transaction.rollback()
        # Each named customer is read at most twice (found, then locked or rendered).
        if (rows := rows_read(plan).get("customers", 0)) > 2 * named:
            found[name] = f"{rows:.0f} customers read for {named} named"
    assert not found, found


@pytest.mark.parametrize("statistics", ["never-analyzed", "analyzed-before-the-tenant"])
async def test_the_daily_roll_probes_each_customer_of_a_chunk_by_primary_key(
    never_analyzed: tuple[asyncpg.Connection, uuid.UUID], statistics: str
) -> None:
    """Each chunk of the daily roll of window sums (service/store/windows.py) reads its own
    customers' usage rows and no others: on tables never analyzed, and for a tenant as large as
    every other together that arrived after the last analyze (statistics that put it at one
    row). Before, such a chunk scanned the organization's rows by a sort index and looked for
    each of them among the chunk's ids: a roll of 40,000 customers took 522 s, holding
    the chunk's customers locked against folds."""
    conn, org = never_analyzed
    if statistics == "analyzed-before-the-tenant":
        await conn.execute(f"ANALYZE {', '.join(TABLES)}")
        org = await conn.fetchval("INSERT INTO organizations (name) VALUES ('newcomer') RETURNING id")
        await conn.execute(LOAD, org, CUSTOMERS)
        await conn.execute(USAGE, org)
        await conn.execute(DAILY, org)
    today = await conn.fetchval("SELECT current_date")
    found = {}
    async with conn.transaction():
        await conn.execute("; ".join(f"SET LOCAL {setting}" for setting in windows.PLAN))
        ids = [r["id"] for r in await conn.fetch(windows.LOCK_CHUNK, org, uuid.UUID(int=0), 2_000)]
        orgs, costs = [org] * len(ids), [Decimal(1)] * len(ids)
        for name, sql, args in [
            ("read", windows.READ_CHUNK, [today, orgs, ids]),
            ("write", windows.WRITE_CHUNK, [today, orgs, ids, costs, costs, costs]),
        ]:
            plan = await explain(conn, sql, args)  # a quadratic plan runs out of the TIMEOUT
            # Each of the chunk's rows once, and once more where the update finds it.
            if (rows := rows_read(plan).get("customer_usage", 0)) > 2 * len(ids):
                found[name] = f"{rows:.0f} usage rows read for a chunk of {len(ids)}"
    assert len(ids) == 2_000
    assert not found, found


async def test_a_fold_analyzes_the_tables_that_never_were(
    never_analyzed: tuple[asyncpg.Connection, uuid.UUID],
) -> None:
    """The statistics the lookups above rely on are there from a new install's first folds:
    a fold analyzes `customers` and `customer_usage` where they have rows and no statistics, in
    a transaction of its own. Inside a caller's transaction it leaves them alone (its lock
    would be held to that commit)."""
    conn, org = never_analyzed
    unanalyzed = {r["name"] for r in await conn.fetch(UNANALYZED, LOOKUP_TABLES)}
    assert unanalyzed == set(LOOKUP_TABLES)
    async with conn.transaction():
        assert await fold_events(conn, usage(str(org), "user_5")) == ["applied"]
    assert {r["name"] for r in await conn.fetch(UNANALYZED, LOOKUP_TABLES)} == unanalyzed
    assert await fold_events(conn, usage(str(org), "user_6"), usage(str(org), "someone_new")) == ["applied"] * 2
    assert not await conn.fetch(UNANALYZED, LOOKUP_TABLES)
    # Nothing stale is left for housekeeping there: the fold's analyze saw the tables' rows.
    assert not set(LOOKUP_TABLES) & set(await analyze_stale(conn))
    # A retrieve by id now probes the primary keys.
    customer_id = await conn.fetchval("SELECT id FROM customers WHERE customer_identifier = 'user_77'")
    sql, args = list_sql(
        ListQuery(org, "prod", filter=CustomerFilter(ids=(customer_id,)), limit=1, count=False),
        canonical_shape(False, False),
    )
    plan = await explain(conn, sql, args)
    assert rows_read(plan).get("customers", 0) <= 2, plan
    assert all(
        n.get("Index Name", "").endswith("_pkey") for n, _ in scans(plan) if n["Relation Name"] != "organizations"
    )


async def test_the_fold_goes_on_when_it_cannot_analyze(
    never_analyzed: tuple[asyncpg.Connection, uuid.UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The analyze is best effort: a table another session holds locked (another consumer
    analyzing it, a manual VACUUM) is skipped, not waited for, and the fold goes on; the
    other is analyzed. This process does not try the skipped one again."""
    conn, org = never_analyzed
    monkeypatch.setattr(fold_module, "_left_unanalyzed", set())
    holder = await asyncpg.connect(with_database(BASE_DSN, await conn.fetchval("SELECT current_database()")))
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE customers IN SHARE UPDATE EXCLUSIVE MODE")
            analyzed = await asyncio.wait_for(fold_module.ensure_statistics(conn), timeout=30)
            assert analyzed == ["customer_usage"]
            assert await fold_events(conn, usage(str(org), "user_8")) == ["applied"]
        assert {r["name"] for r in await conn.fetch(UNANALYZED, LOOKUP_TABLES)} == {"customers"}
        assert await fold_module.ensure_statistics(conn) == []
    finally:
        await holder.close()


async def test_housekeeping_analyzes_what_a_large_fold_changed(
    never_analyzed: tuple[asyncpg.Connection, uuid.UUID],
) -> None:
    conn, _ = never_analyzed
    analyzed = await analyze_stale(conn)
    assert set(TABLES) <= set(analyzed)
    stats = await conn.fetch(
        "SELECT relname, n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = ANY($1)", list(TABLES)
    )
    assert all(r["n_mod_since_analyze"] == 0 for r in stats), stats
    # Nothing changed since: nothing to analyze.
    assert not set(TABLES) & set(await analyze_stale(conn))
