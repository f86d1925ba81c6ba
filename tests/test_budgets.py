"""Budgets: the current period at each duration (UTC; weeks start on Monday) across its
boundaries, through the SQL functions and through the API; the period_budget_share_gte list
filter; and budget threshold alerts, published once per customer, period and threshold,
also across a consumer crash after commit and the redelivery and republishing that follow."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import aio_pika
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from service.infra.settings import Settings
from service.store import failpoints
from service.store.alerts import ALERT_ROUTING_KEY, ALERT_TYPE
from tests.consumerkit import barrier, drained, running_consumer
from tests.eventkit import Broker, days_ago, usage, wait_until
from tests.factories import Org, add_daily_costs, insert_customer, make_org
from tests.support import ok_json, problem, uid

UTC = UTC
DURATIONS = ("daily", "weekly", "monthly", "yearly")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def oracle(duration: str, when: datetime) -> tuple[datetime, datetime]:
    """The documented period containing ``when``, computed independently of tally: UTC days,
    ISO weeks (Monday 00:00 UTC), calendar months and years."""
    u = when.astimezone(UTC)
    if duration == "daily":
        start = datetime(u.year, u.month, u.day, tzinfo=UTC)
        return start, start + timedelta(days=1)
    if duration == "weekly":
        monday = u.date() - timedelta(days=u.weekday())
        start = datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
        return start, start + timedelta(days=7)
    if duration == "monthly":
        nxt = (u.year + 1, 1) if u.month == 12 else (u.year, u.month + 1)
        return datetime(u.year, u.month, 1, tzinfo=UTC), datetime(*nxt, 1, tzinfo=UTC)
    assert duration == "yearly"
    return datetime(u.year, 1, 1, tzinfo=UTC), datetime(u.year + 1, 1, 1, tzinfo=UTC)


# (duration, instant, period start, period end): each instant just before or just after a boundary.
BOUNDARIES = [
    ("daily", "2025-03-09T23:59:59.999999Z", "2025-03-09T00:00:00Z", "2025-03-10T00:00:00Z"),
    ("daily", "2025-03-10T00:00:00Z", "2025-03-10T00:00:00Z", "2025-03-11T00:00:00Z"),
    ("daily", "2024-02-29T12:00:00Z", "2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z"),  # leap day
    ("daily", "2024-12-31T23:59:59.999999Z", "2024-12-31T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("daily", "2025-03-10T01:30:00+02:00", "2025-03-09T00:00:00Z", "2025-03-10T00:00:00Z"),  # 23:30 UTC
    ("weekly", "2025-03-09T23:59:59.999999Z", "2025-03-03T00:00:00Z", "2025-03-10T00:00:00Z"),  # Sunday
    ("weekly", "2025-03-10T00:00:00Z", "2025-03-10T00:00:00Z", "2025-03-17T00:00:00Z"),  # Monday
    ("weekly", "2024-12-31T12:00:00Z", "2024-12-30T00:00:00Z", "2025-01-06T00:00:00Z"),  # across a new year
    ("weekly", "2025-01-05T23:59:59.999999Z", "2024-12-30T00:00:00Z", "2025-01-06T00:00:00Z"),
    ("weekly", "2024-02-29T08:00:00Z", "2024-02-26T00:00:00Z", "2024-03-04T00:00:00Z"),  # leap day
    ("weekly", "2025-03-09T20:00:00-05:00", "2025-03-10T00:00:00Z", "2025-03-17T00:00:00Z"),  # Monday in UTC
    ("monthly", "2025-01-31T23:59:59.999999Z", "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"),
    ("monthly", "2025-02-01T00:00:00Z", "2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"),
    ("monthly", "2024-02-29T23:59:59.999999Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"),  # leap February
    ("monthly", "2024-03-01T00:00:00Z", "2024-03-01T00:00:00Z", "2024-04-01T00:00:00Z"),
    ("monthly", "2023-02-28T12:00:00Z", "2023-02-01T00:00:00Z", "2023-03-01T00:00:00Z"),
    ("monthly", "2024-12-31T23:59:59.999999Z", "2024-12-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("monthly", "2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"),
    ("monthly", "2025-01-31T22:30:00-02:00", "2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"),  # Feb 1 in UTC
    ("yearly", "2024-12-31T23:59:59.999999Z", "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("yearly", "2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    ("yearly", "2024-02-29T12:00:00Z", "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ("yearly", "2025-01-01T00:30:00+01:00", "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),  # still 2024 in UTC
]


def test_the_oracle_agrees_with_the_boundary_table() -> None:
    for duration, instant, start, end in BOUNDARIES:
        assert oracle(duration, at(instant)) == (at(start), at(end)), (duration, instant)


@pytest.mark.parametrize("session_zone", ["UTC", "Pacific/Kiritimati", "America/St_Johns"])
@pytest.mark.parametrize("duration, instant, start, end", BOUNDARIES)
async def test_period_bounds_at_boundaries(
    pool: asyncpg.Pool, session_zone: str, duration: str, instant: str, start: str, end: str
) -> None:
    """Periods are UTC whatever the session's time zone."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL TimeZone = '{session_zone}'")
        row = await conn.fetchrow(
            "SELECT tally_period_start($1, $2::timestamptz) AS s, tally_period_end($1, $2::timestamptz) AS e",
            duration,
            at(instant),
        )
    assert (row["s"], row["e"]) == (at(start), at(end))


async def test_period_bounds_sweep(pool: asyncpg.Pool) -> None:
    """Every 5h17m over 15 months (a leap February and a new year included), at each duration:
    the period matches the oracle and contains the instant."""
    instants = [
        datetime(2023, 12, 20, 0, 0, 0, 1, tzinfo=UTC) + i * timedelta(hours=5, minutes=17) for i in range(2100)
    ]
    for duration in DURATIONS:
        rows = await pool.fetch(
            "SELECT t, tally_period_start($1, t) AS s, tally_period_end($1, t) AS e FROM unnest($2::timestamptz[]) t",
            duration,
            instants,
        )
        assert len(rows) == len(instants)
        for r in rows:
            assert (r["s"], r["e"]) == oracle(duration, r["t"]), (duration, r["t"])
            assert r["s"] <= r["t"] < r["e"]


async def test_no_duration_has_no_period(pool: asyncpg.Pool) -> None:
    row = await pool.fetchrow("SELECT tally_period_start(NULL, now()) AS s, tally_period_end(NULL, now()) AS e")
    assert (row["s"], row["e"]) == (None, None)


# ---------------------------------------------------------------------------------------------
# tally_period_usage: the cost of the days inside the period, for that customer only.

# Days on both sides of each boundary; day i costs 2**i, so a sum says exactly which days it took.
USAGE_DAYS = [
    date(2023, 12, 31),
    date(2024, 1, 1),
    date(2024, 1, 31),
    date(2024, 2, 1),
    date(2024, 2, 26),
    date(2024, 2, 28),
    date(2024, 2, 29),
    date(2024, 3, 1),
    date(2024, 3, 3),
    date(2024, 3, 4),
    date(2024, 12, 29),
    date(2024, 12, 30),
    date(2024, 12, 31),
    date(2025, 1, 1),
    date(2025, 1, 5),
    date(2025, 1, 6),
    date(2025, 1, 31),
    date(2025, 2, 1),
    date(2025, 3, 2),
    date(2025, 3, 3),
    date(2025, 3, 9),
    date(2025, 3, 10),
    date(2025, 3, 16),
    date(2025, 3, 17),
]
COST = {day: Decimal(2) ** i for i, day in enumerate(USAGE_DAYS)}


async def test_period_usage_counts_the_days_inside_the_period(pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    me = await insert_customer(pool, org, uid("usage"), total_cost=Decimal("999"))
    # Usage on the same days by someone else, here and in another organization: never counted.
    neighbour = await insert_customer(pool, org, uid("neighbour"))
    stranger = await insert_customer(pool, other_org, me["customer_identifier"])
    await add_daily_costs(pool, org.id, me["id"], COST)
    await add_daily_costs(pool, org.id, neighbour["id"], {d: Decimal("1000000") for d in USAGE_DAYS})
    await add_daily_costs(pool, other_org.id, stranger["id"], {d: Decimal("1000000") for d in USAGE_DAYS})

    cases = [(d, at(i)) for d, i, _, _ in BOUNDARIES] + [
        (d, at(i))
        for d in DURATIONS
        for i in (
            "2024-03-03T23:59:59.999999Z",
            "2024-03-04T00:00:00Z",
            "2024-02-01T00:00:00Z",
            "2023-12-31T23:59:59.999999Z",
            "2025-03-16T12:00:00Z",
            "2025-03-17T00:00:00Z",
        )
    ]
    for duration, instant in cases:
        start, end = oracle(duration, instant)
        want = sum((c for d, c in COST.items() if start.date() <= d < end.date()), Decimal(0))
        got = await pool.fetchval(
            "SELECT tally_period_usage($1, $2, $3, $4, $5)", org.id, me["id"], duration, instant, Decimal("999")
        )
        assert got == want, (duration, instant, got, want)

    # Spot checks written out: a boundary's two sides split the days.
    async def usage_at(duration: str, instant: str) -> Decimal:
        return await pool.fetchval(
            "SELECT tally_period_usage($1, $2, $3, $4, 0)", org.id, me["id"], duration, at(instant)
        )

    assert await usage_at("daily", "2025-03-09T23:59:59.999999Z") == COST[date(2025, 3, 9)]
    assert await usage_at("daily", "2025-03-10T00:00:00Z") == COST[date(2025, 3, 10)]
    assert await usage_at("weekly", "2025-03-09T23:59:59Z") == COST[date(2025, 3, 3)] + COST[date(2025, 3, 9)]
    assert await usage_at("weekly", "2025-03-10T00:00:00Z") == COST[date(2025, 3, 10)] + COST[date(2025, 3, 16)]
    assert await usage_at("monthly", "2024-02-29T23:59:59Z") == sum(COST[date(2024, 2, d)] for d in (1, 26, 28, 29))
    assert await usage_at("monthly", "2024-03-01T00:00:00Z") == sum(COST[date(2024, 3, d)] for d in (1, 3, 4))
    assert await usage_at("yearly", "2024-12-31T23:59:59Z") == sum(c for d, c in COST.items() if d.year == 2024)
    assert await usage_at("yearly", "2025-01-01T00:00:00Z") == sum(c for d, c in COST.items() if d.year == 2025)
    # Without a duration the "period" is the customer's life: the lifetime figure passed in.
    assert await pool.fetchval(
        "SELECT tally_period_usage($1, $2, NULL, now(), $3)", org.id, me["id"], Decimal("123.4567")
    ) == Decimal("123.4567")
    # A period with no usage is 0, not NULL.
    assert await usage_at("daily", "2030-01-01T00:00:00Z") == 0


# ---------------------------------------------------------------------------------------------
# Through the API: GET /v1/customers/{id} at the database's current time.


async def current_period(pool: asyncpg.Pool, duration: str) -> tuple[datetime, datetime]:
    row = await pool.fetchrow("SELECT tally_period_start($1, now()) AS s, tally_period_end($1, now()) AS e", duration)
    return row["s"], row["e"]


async def period_at(pool: asyncpg.Pool, duration: str, when: datetime) -> tuple[datetime, datetime]:
    """The period of ``duration`` containing ``when``, by the functions the fold uses."""
    row = await pool.fetchrow(
        "SELECT tally_period_start($1, $2::timestamptz) AS s, tally_period_end($1, $2::timestamptz) AS e",
        duration,
        when,
    )
    return row["s"], row["e"]


@pytest.mark.parametrize("duration", DURATIONS)
async def test_api_period_fields(client: TestClient, pool: asyncpg.Pool, org: Org, duration: str) -> None:
    ident = uid(duration)
    row = await insert_customer(
        pool, org, ident, total_cost=Decimal("5000"), period_budget=Decimal("100"), budget_duration=duration
    )
    for _ in range(3):  # the period is read around the request; retry if one ended meanwhile
        start, end = await current_period(pool, duration)
        await pool.execute("DELETE FROM daily_usage WHERE organization_id = $1", org.id)
        last = (end - timedelta(days=1)).date()
        costs = {
            start.date() - timedelta(days=1): Decimal("1000"),  # the day before: previous period
            start.date(): Decimal("1.25"),
            last: Decimal("0.5") if last != start.date() else Decimal("1.25"),
            end.date(): Decimal("2000"),
        }  # the period's end is the next one's first day
        await add_daily_costs(pool, org.id, row["id"], costs)
        resp = await client.get(f"/v1/customers/{ident}", headers=org.headers())
        doc = await ok_json(resp)
        listed = await ok_json(
            await client.get("/v1/customers", params={"customer_identifiers": ident}, headers=org.headers())
        )
        if await current_period(pool, duration) == (start, end):
            break
    inside = Decimal("1.25") + (Decimal("0.5") if last != start.date() else 0)
    assert datetime.fromisoformat(doc["period_start"]) == start == oracle(duration, start)[0]
    assert datetime.fromisoformat(doc["period_end"]) == end == oracle(duration, start)[1]
    assert Decimal(doc["total_period_usage"]) == inside
    assert doc["budget_duration"] == duration and Decimal(doc["period_budget"]) == 100
    [same] = listed["results"]
    assert {k: same[k] for k in ("period_start", "period_end", "total_period_usage")} == {
        k: doc[k] for k in ("period_start", "period_end", "total_period_usage")
    }


async def test_api_without_duration_uses_lifetime(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("life")
    row = await insert_customer(pool, org, ident, total_cost=Decimal("42.125"), period_budget=Decimal("50"))
    await add_daily_costs(pool, org.id, row["id"], {date(2025, 1, 1): Decimal("7")})
    doc = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
    assert (doc["period_start"], doc["period_end"], doc["budget_duration"]) == (None, None, None)
    assert Decimal(doc["total_period_usage"]) == Decimal("42.125")


async def _share_customer(
    pool: asyncpg.Pool,
    org: Org,
    start: datetime,
    key: str,
    period_cost: str | None,
    *,
    budget: str | None = "100",
    environment: str = "prod",
    duration: str | None = "monthly",
    total_cost: str = "0",
    before: str | None = None,
) -> None:
    row = await insert_customer(
        pool,
        org,
        f"share_{key}",
        environment=environment,
        total_cost=Decimal(total_cost),
        period_budget=None if budget is None else Decimal(budget),
        budget_duration=duration,
    )
    costs = {}
    if period_cost is not None:
        costs[start.date()] = Decimal(period_cost)  # the current month's first day
    if before is not None:
        costs[start.date() - timedelta(days=1)] = Decimal(before)  # the previous month's last day
    await add_daily_costs(pool, org.id, row["id"], costs)


async def _share_list(client: TestClient, org: Org, share: str) -> tuple[set[str], int]:
    body = await ok_json(
        await client.get(
            "/v1/customers", params={"period_budget_share_gte": share, "limit": "100"}, headers=org.headers()
        )
    )
    return {c["customer_identifier"].removeprefix("share_") for c in body["results"]}, body["count"]


async def test_period_budget_share_filter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """Monthly period budgets of 100 (unless said otherwise) and usage placed around the month's start."""
    for _ in range(3):  # the period is read around the requests; retry if a month began meanwhile
        start, end = await current_period(pool, "monthly")
        await pool.execute("DELETE FROM customers WHERE organization_id = $1", org.id)
        for key, period_cost, extra in [
            ("under", "79.99", {}),
            ("exact", "80", {}),
            ("over", "150", {}),
            ("last_month", "10", {"before": "90"}),  # 90 % last month, 10 % now
            ("no_budget", "1000", {"budget": None}),
            ("zero_budget", "5", {"budget": "0"}),
            ("lifetime_in", None, {"budget": "10", "duration": None, "total_cost": "9"}),  # no duration: lifetime
            ("lifetime_out", "9", {"budget": "10", "duration": None, "total_cost": "7.5"}),
            ("other_env", "500", {"environment": "test"}),
        ]:
            await _share_customer(pool, org, start, key, period_cost, **extra)
        results = {share: await _share_list(client, org, share) for share in ("0.8", "1", "0", "1.5", "1.51")}
        if await current_period(pool, "monthly") == (start, end):
            break
    assert results["0.8"] == ({"exact", "over", "lifetime_in"}, 3)
    assert results["1"] == ({"over"}, 1)
    assert results["1.5"] == ({"over"}, 1) and results["1.51"] == (set(), 0)
    assert results["0"] == ({"under", "exact", "over", "last_month", "lifetime_in", "lifetime_out"}, 6)
    for bad in ("-0.1", "lots", "1001"):
        await problem(
            await client.get("/v1/customers", params={"period_budget_share_gte": bad}, headers=org.headers()),
            400,
            "period_budget_share_gte",
        )


# ---------------------------------------------------------------------------------------------
# Threshold alerts: budget.threshold_crossed on <namespace>.alerts.
#
# The alert tests take an injected clock: the consumer folds at one instant (the fold's
# ``now``, which fixes the periods its alerts are recorded in) and every event happens at
# that instant, so a period that ends while a test runs changes nothing it asserts.


async def take_all_alerts(broker: Broker) -> list[tuple[aio_pika.abc.AbstractIncomingMessage, dict]]:
    """Everything now on the alerts queue (taken)."""
    assert broker.channel is not None
    queue = await broker.channel.declare_queue(broker.names.alerts, passive=True)
    out = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        out.append((message, orjson.loads(message.body)))
    return out


async def take_alerts(broker: Broker, org: Org) -> list[tuple[aio_pika.abc.AbstractIncomingMessage, dict]]:
    """Everything now on the alerts queue (taken), keeping this organization's: the relay
    serves the whole outbox, so another test's leftovers may pass through this namespace."""
    return [(m, e) for m, e in await take_all_alerts(broker) if e["organization"] == str(org.id)]


async def alert_rows(pool: asyncpg.Pool, org: Org) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT c.customer_identifier, a.threshold, a.period_start, a.period_end, a.budget, a.usage, a.published_at"
        " FROM budget_alerts a JOIN customers c ON c.organization_id = a.organization_id AND c.id = a.customer_id"
        " WHERE a.organization_id = $1 ORDER BY 1, 2, 3",
        org.id,
    )


async def all_published(pool: asyncpg.Pool, org: Org, count: int) -> bool:
    rows = await alert_rows(pool, org)
    return len(rows) >= count and all(r["published_at"] is not None for r in rows)


async def total_costs(pool: asyncpg.Pool, org: Org) -> dict[str, Decimal]:
    rows = await pool.fetch(
        "SELECT customer_identifier, total_cost FROM customer_rows WHERE organization_id = $1", org.id
    )
    return {r["customer_identifier"]: r["total_cost"] for r in rows}


def check_alert(
    message: aio_pika.abc.AbstractIncomingMessage,
    event: dict,
    org: Org,
    periods: dict[str | None, tuple[datetime, datetime]],
) -> None:
    """The CloudEvent and its data as service/store/alerts.py makes them."""
    assert message.routing_key == ALERT_ROUTING_KEY
    assert message.content_type == "application/cloudevents+json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == event["id"]
    assert set(event) == {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "organization",
        "environment",
        "datacontenttype",
        "data",
    }
    assert (event["specversion"], event["source"], event["type"], event["datacontenttype"]) == (
        "1.0",
        "tally",
        ALERT_TYPE,
        "application/json",
    )
    assert event["id"].startswith("budget_") and (event["organization"], event["environment"]) == (str(org.id), "prod")
    assert datetime.fromisoformat(event["time"]).tzinfo is not None
    data = event["data"]
    assert set(data) == {
        "threshold",
        "share",
        "budget",
        "usage",
        "budget_kind",
        "budget_duration",
        "period_start",
        "period_end",
    }
    threshold = data["threshold"]
    assert data["share"] == {"period_80": "0.8", "period_100": "1", "total_100": "1"}[threshold]
    assert data["budget_kind"] == ("total" if threshold == "total_100" else "period")
    assert Decimal(data["usage"]) >= Decimal(data["budget"]) * Decimal(data["share"])
    if data["budget_duration"] is None:  # a lifetime budget, or a period budget without a duration
        assert data["period_start"] is None and data["period_end"] is None
    else:
        start, end = periods[data["budget_duration"]]
        bounds = datetime.fromisoformat(data["period_start"]), datetime.fromisoformat(data["period_end"])
        assert bounds == (start, end)


async def test_threshold_alerts_are_published_once_per_customer_period_and_threshold(
    settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    budgets = {  # identifier -> budget columns
        "p": {"period_budget": Decimal("10"), "budget_duration": "monthly"},
        "t": {"total_budget": Decimal("10")},
        "b": {"period_budget": Decimal("4"), "budget_duration": "yearly", "total_budget": Decimal("8")},
        "life": {"period_budget": Decimal("10")},  # no duration: the period is the customer's life
        "exact": {"period_budget": Decimal("10"), "budget_duration": "monthly"},
        "jump": {"period_budget": Decimal("10"), "budget_duration": "monthly"},
        "none": {},
        "yesterday": {"period_budget": Decimal("10"), "budget_duration": "daily"},
    }
    for ident, columns in budgets.items():
        await insert_customer(pool, org, ident, **columns)
    clock = datetime.now(UTC)
    periods = {d: await period_at(pool, d, clock) for d in ("monthly", "yearly")}
    # Last month's 80 % alert for "p" is history: this month's is another one.
    await pool.execute(
        "INSERT INTO budget_alerts (organization_id, customer_id, threshold, period_start, period_end, budget, usage,"
        " published_at) SELECT organization_id, id, 'period_80', $2::timestamptz - interval '1 month', $2, 10, 9, now()"
        " FROM customers WHERE organization_id = $1 AND customer_identifier = 'p'",
        org.id,
        periods["monthly"][0],
    )
    steps: list[dict[str, str]] = [  # the cost each customer spends at each step
        {"p": "5", "t": "5", "b": "3.5", "life": "5", "exact": "7.99", "jump": "12", "none": "50"},
        {"p": "3.5", "t": "4", "b": "1", "life": "4", "exact": "0.01"},
        {"p": "2", "t": "2", "b": "4", "exact": "2"},
        {"p": "1", "t": "1", "b": "1", "life": "10", "exact": "1", "jump": "1"},
    ]
    expected = {  # (customer, threshold) -> usage when it was crossed
        ("p", "period_80"): Decimal("8.5"),
        ("p", "period_100"): Decimal("10.5"),
        ("t", "total_100"): Decimal("11"),
        ("b", "period_80"): Decimal("3.5"),
        ("b", "period_100"): Decimal("4.5"),
        ("b", "total_100"): Decimal("8.5"),
        ("life", "period_80"): Decimal("9"),
        ("life", "period_100"): Decimal("19"),
        ("exact", "period_80"): Decimal("8"),
        ("exact", "period_100"): Decimal("10"),
        ("jump", "period_80"): Decimal("12"),
        ("jump", "period_100"): Decimal("12"),
    }
    spent: Counter[str] = Counter()
    async with running_consumer(settings, pool, broker, clock=clock):
        # Usage in yesterday's period only: nothing for today's daily budget.
        await broker.publish(usage(org.name, "yesterday", when=days_ago(1, now=clock), cost="20"))
        spent["yesterday"] += Decimal("20")
        for step in steps:
            for ident, cost in step.items():
                await broker.publish(usage(org.name, ident, cost=cost, when=clock))
                spent[ident] += Decimal(cost)

            async def applied() -> bool:
                costs = await total_costs(pool, org)
                return all(costs[i] == spent[i] for i in spent)

            await wait_until(applied, what="step applied")  # each step folds before the next one is sent
        await wait_until(lambda: all_published(pool, org, len(expected) + 1), what="alerts published")
        await wait_until(lambda: drained(broker))

    alerts = await take_alerts(broker, org)
    got = Counter((e["subject"], e["data"]["threshold"]) for _, e in alerts)
    assert got == Counter(expected.keys())  # exactly one each
    assert len({e["id"] for _, e in alerts}) == len(alerts)
    for message, event in alerts:
        check_alert(message, event, org, periods)
        key = (event["subject"], event["data"]["threshold"])
        assert Decimal(event["data"]["usage"]) == expected[key], key
        budget = budgets[event["subject"]]["total_budget" if key[1] == "total_100" else "period_budget"]
        assert Decimal(event["data"]["budget"]) == budget
        assert event["data"]["budget_duration"] == (
            None if key[1] == "total_100" else budgets[event["subject"]].get("budget_duration")
        )
    # The outbox: one row per customer, period and threshold, all published.
    rows = await alert_rows(pool, org)
    current = [r for r in rows if not (r["customer_identifier"] == "p" and r["period_start"] < periods["monthly"][0])]
    assert len(rows) == len(expected) + 1 and len(current) == len(expected)
    for r in current:
        key = (r["customer_identifier"], r["threshold"])
        assert r["usage"] == expected[key] and r["published_at"] is not None
        duration = budgets[key[0]].get("budget_duration") if key[1] != "total_100" else None
        if duration is None:
            assert r["period_start"] == datetime.min and r["period_end"] is None, r  # '-infinity': no period
        else:
            assert (r["period_start"], r["period_end"]) == periods[duration]


async def test_alerts_exactly_once_across_a_crash_after_commit_and_redelivery(
    settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    await insert_customer(
        pool, org, "c1", period_budget=Decimal("10"), budget_duration="monthly", total_budget=Decimal("12")
    )
    await insert_customer(pool, org, "c2", total_budget=Decimal("5"))
    clock = datetime.now(UTC)
    period = await period_at(pool, "monthly", clock)
    events = [
        usage(org.name, "c1", cost="4", when=clock),
        usage(org.name, "c1", cost="5", when=clock),
        usage(org.name, "c2", cost="6", when=clock),
        usage(org.name, "c1", cost="4", when=clock),
    ]
    expected = {("c1", "period_80"), ("c1", "period_100"), ("c1", "total_100"), ("c2", "total_100")}
    crashed = asyncio.Event()
    at_crash: list[asyncpg.Record] = []

    async def crash_once() -> None:
        if not crashed.is_set():
            at_crash.extend(await alert_rows(pool, org))  # the fold has committed its alerts...
            crashed.set()
            raise ConnectionError("simulated crash after commit")  # ...and dies before the ack and the relay

    async def is_crashed() -> bool:
        return crashed.is_set()

    with failpoints.arm("consumer.after_commit", crash_once):
        async with running_consumer(settings, pool, broker, clock=clock):
            await broker.publish(events)  # one message: one batch
            await wait_until(is_crashed, what="the crash")
            assert {(r["customer_identifier"], r["threshold"]) for r in at_crash} == expected
            assert all(r["published_at"] is None for r in at_crash)
            # The redelivered batch is all duplicates; the relay publishes what the crash left behind.
            await wait_until(lambda: all_published(pool, org, len(expected)), what="alerts published after the crash")
            # The same events again as new messages, one by one and as a batch: all duplicates.
            for e in events:
                await broker.publish(e)
            await broker.publish(events)
            await barrier(pool, broker, org)
            await wait_until(lambda: drained(broker))
            await wait_until(lambda: all_published(pool, org, len(expected)), what="alerts published")

    alerts = await take_alerts(broker, org)
    assert Counter((e["subject"], e["data"]["threshold"]) for _, e in alerts) == Counter(expected)
    for message, event in alerts:
        check_alert(message, event, org, {"monthly": period})
    costs = await total_costs(pool, org)
    assert (costs["c1"], costs["c2"]) == (Decimal("13"), Decimal("6"))  # each event folded once
    rows = await alert_rows(pool, org)
    assert {(r["customer_identifier"], r["threshold"]) for r in rows} == expected
    assert all(r["published_at"] is not None for r in rows)
    assert {(r["customer_identifier"], r["threshold"]): r["usage"] for r in rows} == {
        ("c1", "period_80"): Decimal("13"),
        ("c1", "period_100"): Decimal("13"),
        ("c1", "total_100"): Decimal("13"),
        ("c2", "total_100"): Decimal("6"),
    }
    assert await broker.queue_depth(broker.names.dead) == 0


async def test_alerts_of_other_organizations_stay_apart(settings: Settings, pool: asyncpg.Pool, broker: Broker) -> None:
    """The same identifier with a budget in two organizations: each alert names its own."""
    a, b = await make_org(pool), await make_org(pool)
    for o in (a, b):
        await insert_customer(pool, o, "shared", total_budget=Decimal("1"))
    async with running_consumer(settings, pool, broker):
        await broker.publish([usage(a.name, "shared", cost="2"), usage(b.name, "shared", cost="0.5")])
        await wait_until(lambda: all_published(pool, a, 1), what="a's alert published")
        await barrier(pool, broker, b)
    alerts = [e for _, e in await take_all_alerts(broker) if e["organization"] in (str(a.id), str(b.id))]
    assert [(e["organization"], e["subject"], e["data"]["threshold"]) for e in alerts] == [
        (str(a.id), "shared", "total_100")
    ]
    assert await alert_rows(pool, b) == []
