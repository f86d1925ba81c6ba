"""Lists ranked by cost inside the last 7 days, the last 30 days and the month so far read the
maintained window sums (migration 0017, service/store/windows.py) while the organization's
mark is today, and aggregate the daily rows otherwise: both ways agree with sums computed here
from the events, across folds after the roll, a mark left on an earlier day, a roll that waits
on a fold holding the row, and an organization whose local day is not UTC's."""

from __future__ import annotations

import asyncio
import random
import re
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.api.customers import canonical_shape
from service.domain.listing import CustomerFilter, ListQuery, Sort
from service.infra.settings import Settings
from service.store import apply, auth, windows
from service.store.db import columns
from service.store.listing import list_sql, maintained_window
from tests.eventkit import cloud_event, fold_events, usage, wait_until
from tests.factories import Org, make_org
from tests.test_usage_window import walk

CUSTOMERS = 30


def make_events(org: Org, rng: random.Random, n: int, *, newest: float = 0.0) -> list[dict]:
    """``n`` usage events of CUSTOMERS customers over the last 34 days (the dedupe window is 35) (none newer than
    ``newest`` days ago), costs drawn from a few values so that customers tie."""
    now = datetime.now(UTC)
    return [
        usage(
            org.name,
            f"ws_{rng.randrange(CUSTOMERS):02d}",
            when=now - timedelta(days=rng.uniform(newest, 34)),
            cost=f"{rng.choice([1, 2, 3, 5, 8]) / 100:.2f}",
        )
        for _ in range(n)
    ]


def oracle(events: list[dict], start: date, end: date, zone: str = "UTC") -> dict[str, Decimal]:
    """Each customer's cost on the local days [start, end], from the events."""
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        day = datetime.fromisoformat(e["time"]).astimezone(ZoneInfo(zone)).date()
        sums[e["subject"]] += Decimal(e["data"]["cost"]) if start <= day <= end else Decimal(0)
    return sums


def windows_of(today: date) -> dict[str, tuple[date, date]]:
    return {
        "cost_7d": (today - timedelta(days=6), today),
        "cost_30d": (today - timedelta(days=29), today),
        "cost_month": (today.replace(day=1), today),
    }


async def fold(pool: asyncpg.Pool, events: list[dict]) -> None:
    async with pool.acquire() as conn:
        for start in range(0, len(events), 50):
            assert set(await fold_events(conn, *events[start : start + 50])) <= {"applied", "duplicate"}


async def local_today(pool: asyncpg.Pool, org: Org) -> date:
    day: date = await pool.fetchval("SELECT tally_local_day(time_zone, now()) FROM organizations WHERE id = $1", org.id)
    return day


async def roll(pool: asyncpg.Pool, org: Org, day: date) -> windows.Rolled:
    async with pool.acquire() as conn:
        return await windows.roll(conn, org.id, day, chunk=7)  # several chunks for 30 customers


async def reads_maintained(pool: asyncpg.Pool, org: Org, start: date, end: date) -> bool:
    """Whether the list's statement reads the maintained sums (EXPLAIN ANALYZE: the branch that
    scans customer_usage as ``u`` ran; the aggregating one reads it as ``lu``)."""
    q = ListQuery(
        org.id, "prod", filter=CustomerFilter(usage_from=start, usage_to=end), sort=Sort("total_cost", True), limit=5
    )
    assert maintained_window(q.filter, "total_cost") is not None
    sql, args = list_sql(q, canonical_shape(False, False))
    plan = [r[0] for r in await pool.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}", *args)]
    scans = [line for line in plan if re.search(r" on customer_usage u \(", line)]
    assert len(scans) == 1, plan
    return "never executed" not in scans[0]


async def assert_kept(pool: asyncpg.Pool, org: Org, events: list[dict], day: date) -> None:
    """Every customer's kept sums (in the table) are the oracle's windows ending on ``day``."""
    rows = await pool.fetch(
        "SELECT c.customer_identifier, u.cost_7d, u.cost_30d, u.cost_month FROM customer_usage u"
        " JOIN customers c ON c.organization_id = u.organization_id AND c.id = u.id WHERE u.organization_id = $1",
        org.id,
    )
    for column, (start, end) in windows_of(day).items():
        want = oracle(events, start, end)
        assert {r["customer_identifier"]: r[column] for r in rows} == {w: want[w] for w in want}, column


async def check(client: TestClient, org: Org, events: list[dict], today: date, zone: str = "UTC") -> None:
    """Each window, walked by cursor both ways, is the oracle's ranking (ties by id)."""
    for start, end in windows_of(today).values():
        want = oracle(events, start, end, zone)
        for sort in ("-total_cost", "total_cost"):
            count, rows = await walk(client, org, f"usage_from={start}&usage_to={end}&sort_by={sort}&limit=7")
            assert count == len(rows) == len(want), (start, end, sort)
            got = {r["customer_identifier"]: Decimal(r["total_cost"]) for r in rows}
            assert got == {who: want[who] for who in got} and set(got) == set(want), (start, end, sort)
            keys = [(Decimal(r["total_cost"]), r["id"]) for r in rows]
            assert keys == sorted(keys, reverse=sort.startswith("-")), (start, end, sort)


async def test_a_rolled_organization_is_ranked_from_its_maintained_sums(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    rng = random.Random(11)
    events = make_events(org, rng, 400)
    await fold(pool, events)
    today = await local_today(pool, org)
    # Before any roll, the window is aggregated: right all the same.
    assert not await reads_maintained(pool, org, today - timedelta(days=6), today)
    await check(client, org, events, today)
    rolled = await roll(pool, org, today)
    assert rolled.customers == CUSTOMERS
    for start, end in windows_of(today).values():
        assert await reads_maintained(pool, org, start, end)
    await check(client, org, events, today)
    # Folds after the roll keep the sums: new events today and in the last days, duplicates.
    more = make_events(org, rng, 150, newest=0.0)
    await fold(pool, more + more[:20])
    events += more
    await assert_kept(pool, org, events, today)
    assert await reads_maintained(pool, org, today - timedelta(days=29), today)
    await check(client, org, events, today)


async def test_a_mark_on_another_day_reads_the_daily_rows_and_a_roll_moves_every_sum(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    """Rolled to three days ago, the sums are that day's windows (checked in the table) and a
    list for today aggregates; rolled to today again, every sum is today's."""
    rng = random.Random(12)
    events = make_events(org, rng, 400)
    await fold(pool, events)
    today = await local_today(pool, org)
    earlier = today - timedelta(days=3)
    await roll(pool, org, earlier)
    await assert_kept(pool, org, events, earlier)
    assert not await reads_maintained(pool, org, today - timedelta(days=6), today)
    await check(client, org, events, today)
    await roll(pool, org, today)
    assert await reads_maintained(pool, org, today - timedelta(days=6), today)
    await check(client, org, events, today)


async def test_a_roll_never_overwrites_the_sums_of_a_fold_it_waited_for(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    """A fold holds its customers (its transaction open) with sums for today; a roll to today
    waits for them, then reads what the fold committed: sums read before the fold committed
    would lack its events."""
    rng = random.Random(13)
    events = make_events(org, rng, 200)
    await fold(pool, events)
    today = await local_today(pool, org)
    await roll(pool, org, today - timedelta(days=1))  # every row's sums are yesterday's
    late = [usage(org.name, f"ws_{i:02d}", cost="0.50") for i in range(CUSTOMERS)]
    async with pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        try:
            assert set(await fold_events(holder, *late)) == {"applied"}
            rolling = asyncio.create_task(roll(pool, org, today))

            async def waiting() -> bool:
                return bool(
                    await pool.fetchval(
                        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database())"
                    )
                )

            await wait_until(waiting, timeout=20, interval=0.02, what="the roll waiting for the fold's rows")
        finally:
            await transaction.commit()
        await rolling
    events += late
    assert await reads_maintained(pool, org, today - timedelta(days=6), today)
    await check(client, org, events, today)


async def test_the_window_days_are_the_organizations_local_days(client: TestClient, pool: asyncpg.Pool) -> None:
    """Kiritimati is UTC+14: its today is UTC's tomorrow for most of the UTC day. Usage is
    folded into its local days, the roll and the list's window are its days."""
    org = await make_org(pool)
    zone = "Pacific/Kiritimati"
    async with pool.acquire() as conn:
        await auth.set_time_zone(conn, org.name, zone)
    events = make_events(org, random.Random(14), 300)
    await fold(pool, events)
    today = await local_today(pool, org)
    await roll(pool, org, today)
    assert await reads_maintained(pool, org, today.replace(day=1), today)
    await check(client, org, events, today, zone)


async def test_housekeeping_finds_the_organizations_due_and_the_day_each_rolls_to(pool: asyncpg.Pool) -> None:
    org = await make_org(pool)
    now = datetime(2026, 12, 4, 0, 1, tzinfo=UTC)
    async with pool.acquire() as conn:
        due = dict(await windows.due(conn, timedelta(minutes=2), now))
        # A minute after midnight, with two to settle: still the day before.
        assert due[org.id] == date(2026, 12, 3)
        await conn.execute(windows.MARK, org.id, date(2026, 12, 3))
        assert org.id not in dict(await windows.due(conn, timedelta(minutes=2), now))
        assert dict(await windows.due(conn, timedelta(minutes=2), now + timedelta(minutes=2)))[org.id] == date(
            2026, 12, 4
        )


async def test_a_window_that_runs_past_the_statement_timeout_is_a_400_naming_the_limit(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """40,000 customers with ten days of usage each: adding up ten days takes far longer than
    the 50 ms this app's statements may run, so the list is a 400 naming usage_from and the
    limit; the lifetime list and a kept window of the same organization answer."""
    org = await make_org(pool)
    # The setup's bulk load and roll on a connection of their own without the pool's 10 s
    # client timeout: on a machine loaded by the suite the roll once took longer.
    conn = await asyncpg.connect(settings.database_url, command_timeout=None)
    try:
        await conn.execute(
            "INSERT INTO customers (organization_id, customer_identifier) SELECT $1, 'big_' || g"
            " FROM generate_series(1, 40000) g",
            org.id,
        )
        await conn.execute(
            "INSERT INTO daily_usage (organization_id, customer_id, day, requests, prompt_tokens, completion_tokens,"
            " total_tokens, cost, latency_sum, latency_count, ttft_sum, ttft_count)"
            " SELECT c.organization_id, c.id, current_date - d, 1, 1, 1, 2, 0.01, 0, 0, 0, 0"
            " FROM customers c, generate_series(1, 10) d WHERE c.organization_id = $1",
            org.id,
        )
        await windows.roll(conn, org.id, today := await local_today(pool, org))
    finally:
        await conn.close()
    strict = settings.model_copy(update={"db_command_timeout": 0.05})
    async with TestClient(TestServer(create_app(strict))) as client:
        # Each answering read once unchecked first: a new app's first request of a kind (its
        # key lookup, statements prepared, the first reads after the bulk insert) once took
        # more than 50 ms on a loaded machine, a 503 that is not what this test is about.
        await client.get("/v1/customers?limit=5", headers=org.headers())
        assert (await client.get("/v1/customers?limit=5", headers=org.headers())).status == 200
        window = f"usage_from={today - timedelta(days=10)}&usage_to={today}"
        r = await client.get(f"/v1/customers?{window}&sort_by=-total_cost&limit=5", headers=org.headers())
        assert r.status == 400, await r.text()
        body = await r.json()
        assert body["errors"][0]["name"] == "usage_from" and "0.05 s" in body["detail"], body
        kept = f"usage_from={today - timedelta(days=6)}&usage_to={today}&sort_by=-total_cost&limit=5"
        await client.get(f"/v1/customers?{kept}", headers=org.headers())
        assert (await client.get(f"/v1/customers?{kept}", headers=org.headers())).status == 200


async def test_new_customers_and_a_late_deletion_keep_the_sums_exact(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    """After the roll: customers the fold creates (their usage row inserted with its sums), and
    one whose deletion arrives late, dated between its usage (its usage before the deletion is
    undone and its sums recomputed from what is left), are ranked as the events say."""
    rng = random.Random(15)
    events = make_events(org, rng, 200)
    await fold(pool, events)
    today = await local_today(pool, org)
    await roll(pool, org, today)
    now = datetime.now(UTC)
    fresh = [usage(org.name, f"ws_new_{i}", when=now - timedelta(days=i), cost=f"0.0{i + 1}") for i in range(5)]
    await fold(pool, fresh)
    events += fresh
    gone = "ws_late"
    kept = usage(org.name, gone, when=now - timedelta(days=1), cost="0.70")
    undone = usage(org.name, gone, when=now - timedelta(days=3), cost="0.40")
    await fold(pool, [kept, undone])
    async with pool.acquire() as conn:
        deleted = cloud_event(org.name, gone, "customer.deleted", {}, when=now - timedelta(days=2))
        assert await fold_events(conn, deleted) == ["applied"]
    events.append(kept)
    await assert_kept(pool, org, events, today)
    assert await reads_maintained(pool, org, today - timedelta(days=6), today)
    await check(client, org, events, today)


async def test_a_fold_recomputes_sums_that_end_on_another_day_and_adds_to_those_of_today(
    pool: asyncpg.Pool, org: Org
) -> None:
    """The fold adds a batch's cost to the sums of a row that end on its day, and recomputes
    from the daily rows those that end on another (rolled to the day before here: a day, and
    its cost, left the 7- and 30-day windows since), so both are today's windows after it."""
    rng = random.Random(16)
    events = make_events(org, rng, 400)
    await fold(pool, events)
    today = await local_today(pool, org)
    await roll(pool, org, today - timedelta(days=1))
    await assert_kept(pool, org, events, today - timedelta(days=1))
    now = datetime.now(UTC)
    more = [usage(org.name, f"ws_{i:02d}", when=now - timedelta(hours=i), cost="0.25") for i in range(CUSTOMERS)]
    await fold(pool, more)
    events += more
    await assert_kept(pool, org, events, today)
    days = await pool.fetch("SELECT DISTINCT window_day FROM customer_usage WHERE organization_id = $1", org.id)
    assert [r["window_day"] for r in days] == [today]  # every customer's sums now end today
    # And a second batch today adds to the sums the first one left on today.
    again = [usage(org.name, f"ws_{i:02d}", when=now - timedelta(days=i % 9), cost="0.03") for i in range(CUSTOMERS)]
    await fold(pool, again)
    events += again
    await assert_kept(pool, org, events, today)


async def test_sums_a_fold_computed_for_another_day_than_the_databases_are_recomputed(
    pool: asyncpg.Pool, org: Org
) -> None:
    """Near midnight the fold's clock and the database's may name different days: what the
    fold computed for its day is not added then; the row's sums are recomputed for the
    database's day (its statement's, as the lists and the roll read them)."""
    events = make_events(org, random.Random(17), 200)
    await fold(pool, events)
    today = await local_today(pool, org)
    await assert_kept(pool, org, events, today)
    row = await pool.fetchrow(
        "SELECT u.id FROM customer_usage u WHERE u.organization_id = $1 AND u.window_day = $2 LIMIT 1", org.id, today
    )
    zero = (0, 0, 0, 0, Decimal(0), 0.0, 0, 0.0, 0)  # nothing added to the lifetime sums
    bogus = Decimal("1000")
    for day in (today + timedelta(days=1), today - timedelta(days=1)):
        usage = (org.id, row["id"], *zero, None, None, 0, day, bogus, bogus, bogus)
        assert await pool.execute(apply.UPDATE_USAGE, *columns([usage], apply.UPDATE_USAGE)) == "UPDATE 1"
        await assert_kept(pool, org, events, today)
    # The same for a new customer's first usage row.
    made = await pool.fetchval(
        "INSERT INTO customers (organization_id, environment, customer_identifier, last_event_at)"
        " VALUES ($1, 'prod', 'ws_made', NULL) RETURNING id",
        org.id,
    )
    tomorrow = today + timedelta(days=1)
    usage = (org.id, made, "prod", *zero, None, None, 0, tomorrow, bogus, bogus, bogus)
    assert await pool.execute(apply.INSERT_USAGE, *columns([usage], apply.INSERT_USAGE)) == "INSERT 0 1"
    sums = await pool.fetchrow(
        "SELECT window_day, cost_7d, cost_30d, cost_month FROM customer_usage WHERE id = $1", made
    )
    assert tuple(sums) == (today, 0, 0, 0)
