"""Customers ranked inside a usage window: GET /v1/customers with usage_from/usage_to shows,
sorts, filters and pages by each customer's usage in those UTC days, checked against sums
computed here from the events themselves (not from tally's tables)."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.eventkit import days_ago, fold_events, usage
from tests.factories import Org

CUSTOMERS = 24


@pytest.fixture
async def folded(pool: asyncpg.Pool, org: Org) -> tuple[list[dict], date, date]:
    """Usage of 24 customers over the last 20 days, folded as the consumer would; the window is
    the last 8 UTC days, so some customers have usage only before it."""
    rng = random.Random(7)
    events = []
    for _ in range(300):
        who = rng.randrange(CUSTOMERS)
        # Customers 20..23 are active only before the window.
        age = rng.uniform(11, 19.5) if who >= 20 else rng.uniform(0.1, 19.5)
        events.append(
            usage(
                org.name,
                f"win_{who:02d}",
                when=datetime.now(UTC) - timedelta(days=age),
                requests=rng.randint(1, 5),
                prompt=rng.randint(1, 100),
                completion=rng.randint(1, 50),
                # Ties in cost between customers, so ids break them.
                cost=f"{rng.choice([1, 2, 3, 5]) / 100:.4f}",
                latency=round(rng.uniform(0.1, 3), 3),
            )
        )
    async with pool.acquire() as conn:
        for start in range(0, len(events), 100):
            assert set(await fold_events(conn, *events[start : start + 100])) == {"applied"}
    today = datetime.now(UTC).date()
    return events, today - timedelta(days=7), today


def oracle(events: list[dict], start: date, end: date) -> dict[str, dict[str, object]]:
    """Each customer's usage in [start, end] (UTC days), from the events."""
    sums: dict[str, dict] = defaultdict(
        lambda: {"requests": 0, "tokens": 0, "cost": Decimal(0), "latency": 0.0, "days": set()}
    )
    for e in events:
        when = datetime.fromisoformat(e["time"]).astimezone(UTC)
        s = sums[e["subject"]]
        if not start <= when.date() <= end:
            continue
        d = e["data"]
        s["requests"] += d["requests"]
        s["tokens"] += d["prompt_tokens"] + d["completion_tokens"]
        s["cost"] += Decimal(d["cost"])
        s["latency"] += d["latency"]
        s["days"].add(when.date())
    return {
        who: {
            "number_of_requests": s["requests"],
            "total_tokens": s["tokens"],
            "total_cost": s["cost"],
            "active_days": len(s["days"]),
        }
        for who, s in sums.items()
    }


async def walk(client: TestClient, org: Org, query: str) -> tuple[int, list[dict]]:
    """Every page of a list, by cursor: (count, rows)."""
    rows: list[dict] = []
    r = await client.get(f"/v1/customers?{query}", headers=org.headers())
    assert r.status == 200, await r.text()
    body = await r.json()
    count = body["count"]
    rows += body["results"]
    while body["next_cursor"]:
        # A cursor is bound to the filters (the window included): the request repeats them.
        r = await client.get(f"/v1/customers?{query}&cursor={body['next_cursor']}", headers=org.headers())
        assert r.status == 200, await r.text()
        body = await r.json()
        rows += body["results"]
    return count, rows


def shown(row: dict) -> dict[str, object]:
    return {
        "number_of_requests": row["number_of_requests"],
        "total_tokens": row["total_tokens"],
        "total_cost": Decimal(row["total_cost"]),
        "active_days": row["active_days"],
    }


ZERO = {"number_of_requests": 0, "total_tokens": 0, "total_cost": Decimal(0), "active_days": 0}


async def test_a_window_ranks_customers_by_their_usage_in_it(client: TestClient, org: Org, folded) -> None:
    events, start, end = folded
    want = oracle(events, start, end)
    count, rows = await walk(client, org, f"usage_from={start}&usage_to={end}&sort_by=-total_cost&limit=5")
    assert count == CUSTOMERS == len(rows)
    assert {r["customer_identifier"]: shown(r) for r in rows} == {
        who: want.get(who) or ZERO for who in (f"win_{i:02d}" for i in range(CUSTOMERS))
    }
    # Descending cost, ties by id (descending too); customers without usage in it have zeros, last.
    # Which customers those are depends on the hour the test runs (the window starts at a UTC
    # midnight, the events are stamped relative to now): at least 20..23, taken from the oracle.
    keys = [(Decimal(r["total_cost"]), r["id"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    idle = {f"win_{i:02d}" for i in range(CUSTOMERS)} - {who for who, sums in want.items() if sums != ZERO}
    assert idle >= {"win_20", "win_21", "win_22", "win_23"}
    assert {r["customer_identifier"] for r in rows[-len(idle) :]} == idle
    assert all(shown(r) == ZERO for r in rows[-len(idle) :])


async def test_usage_only_leaves_out_customers_without_usage_in_the_window(
    client: TestClient, org: Org, folded
) -> None:
    events, start, end = folded
    active = {who for who, s in oracle(events, start, end).items() if s["number_of_requests"]}
    count, rows = await walk(
        client, org, f"usage_from={start}&usage_to={end}&usage_only=true&sort_by=-number_of_requests"
    )
    assert count == len(active) == len(rows)
    assert {r["customer_identifier"] for r in rows} == active
    keys = [(r["number_of_requests"], r["id"]) for r in rows]
    assert keys == sorted(keys, reverse=True)


async def test_usage_filters_apply_to_the_window(client: TestClient, org: Org, folded) -> None:
    events, start, end = folded
    want = oracle(events, start, end)
    threshold = sorted(s["total_cost"] for s in want.values())[len(want) // 2]
    count, rows = await walk(client, org, f"usage_from={start}&usage_to={end}&total_cost_gte={threshold}")
    assert {r["customer_identifier"] for r in rows} == {w for w, s in want.items() if s["total_cost"] >= threshold}
    assert count == len(rows)


async def test_a_one_day_window_and_the_lifetime_list_agree_with_the_events(
    client: TestClient, org: Org, folded
) -> None:
    events, _, end = folded
    day = days_ago(3).date()
    want = oracle(events, day, day)
    _, rows = await walk(client, org, f"usage_from={day}&usage_to={day}&usage_only=true")
    assert {r["customer_identifier"]: shown(r) for r in rows} == {w: s for w, s in want.items() if s["active_days"]}
    lifetime = oracle(events, date(2000, 1, 1), end)
    _, rows = await walk(client, org, "sort_by=-total_cost")
    assert {r["customer_identifier"]: shown(r) for r in rows} == lifetime


async def test_a_cursor_belongs_to_its_window(client: TestClient, org: Org, folded) -> None:
    _, start, end = folded
    r = await client.get(f"/v1/customers?usage_from={start}&usage_to={end}&limit=2", headers=org.headers())
    cursor = (await r.json())["next_cursor"]
    r = await client.get(
        f"/v1/customers?cursor={cursor}&usage_from={start - timedelta(days=1)}&usage_to={end}", headers=org.headers()
    )
    assert r.status == 400
    assert "filters" in (await r.json())["detail"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("usage_from=2026-11-01", "usage_to"),
        ("usage_to=2026-11-01", "usage_from"),
        ("usage_from=2026-11-02&usage_to=2026-11-01", "usage_to"),
        ("usage_from=2025-01-01&usage_to=2026-11-01", "usage_to"),
        ("usage_only=true", "usage_only"),
        ("usage_from=2026-11-01T00:00:00Z&usage_to=2026-11-02", "usage_from"),
    ],
)
async def test_a_window_that_is_not_one_is_a_400_naming_the_parameter(
    client: TestClient, org: Org, query: str, parameter: str
) -> None:
    r = await client.get(f"/v1/customers?{query}", headers=org.headers())
    assert r.status == 400, await r.text()
    body = await r.json()
    assert parameter in str(body), body
