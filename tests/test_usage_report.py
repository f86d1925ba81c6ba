"""GET /v1/usage: the organization's usage per bucket, in total or by customer, checked against
sums computed here from the events folded (not from tally's tables)."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.eventkit import fold_events, usage
from tests.factories import Org


@pytest.fixture
async def folded(pool: asyncpg.Pool, org: Org, other_org: Org) -> list[dict]:
    """Usage of 15 customers over the last 20 days, and some of another organization's."""
    rng = random.Random(11)
    events = [
        usage(
            org.name,
            f"rep_{rng.randrange(15):02d}",
            when=datetime.now(UTC) - timedelta(days=rng.uniform(0.1, 19.5)),
            requests=rng.randint(1, 4),
            cost=f"{rng.randint(1, 900) / 1000:.4f}",
        )
        for _ in range(200)
    ]
    noise = [usage(other_org.name, "rep_00", cost="5.0000") for _ in range(5)]
    async with pool.acquire() as conn:
        assert set(await fold_events(conn, *events[:100])) == {"applied"}
        assert set(await fold_events(conn, *events[100:], *noise)) == {"applied"}
    return events


def sums(events: list[dict], start: date, end: date, bucket, who=lambda e: None) -> dict:
    out: dict = defaultdict(lambda: {"requests": 0, "cost": Decimal(0)})
    for e in events:
        day = datetime.fromisoformat(e["time"]).astimezone(UTC).date()
        if start <= day <= end:
            s = out[(who(e), bucket(day))]
            s["requests"] += e["data"]["requests"]
            s["cost"] += Decimal(e["data"]["cost"])
    return dict(out)


def monday(day: date) -> date:
    return day - timedelta(days=day.weekday())


async def test_totals_per_day_and_week_are_the_events_sums(client: TestClient, org: Org, folded) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=13)
    r = await client.get(f"/v1/usage?from={start}&to={end}", headers=org.headers())
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["group_by"] is None and len(body["results"]) == 14  # every day, zero-filled
    want = sums(folded, start, end, lambda d: d)
    got = {
        (None, date.fromisoformat(p["start"])): {"requests": p["requests"], "cost": Decimal(p["cost"])}
        for p in body["results"]
        if p["requests"]
    }
    assert got == want
    r = await client.get(f"/v1/usage?from={start}&to={end}&granularity=week", headers=org.headers())
    weeks = {
        (None, date.fromisoformat(p["start"])): {"requests": p["requests"], "cost": Decimal(p["cost"])}
        for p in (await r.json())["results"]
        if p["requests"]
    }
    assert weeks == sums(folded, start, end, monday)


async def test_by_customer_pages_through_every_customer_once(client: TestClient, org: Org, folded) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=19)
    got: dict = {}
    seen: list[str] = []
    after = None
    while True:
        query = f"from={start}&to={end}&group_by=customer&limit=4" + (f"&after={after}" if after else "")
        r = await client.get(f"/v1/usage?{query}", headers=org.headers())
        assert r.status == 200, await r.text()
        body = await r.json()
        for p in body["results"]:
            got[(p["customer_identifier"], date.fromisoformat(p["start"]))] = {
                "requests": p["requests"],
                "cost": Decimal(p["cost"]),
            }
        seen += list(dict.fromkeys(p["customer_identifier"] for p in body["results"]))
        after = body["next_after"]
        if after is None:
            break
    assert got == sums(folded, start, end, lambda d: d, who=lambda e: e["subject"])
    assert len(seen) == len(set(seen))  # a customer is on one page only


async def test_customer_identifiers_narrow_the_totals(client: TestClient, org: Org, folded) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=19)
    r = await client.get(
        f"/v1/usage?from={start}&to={end}&granularity=month&customer_identifiers=rep_03,rep_07", headers=org.headers()
    )
    body = await r.json()
    total = sum(Decimal(p["cost"]) for p in body["results"])
    assert total == sum(Decimal(e["data"]["cost"]) for e in folded if e["subject"] in ("rep_03", "rep_07"))


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("from=2026-11-02&to=2026-11-01", "to"),
        ("from=2025-01-01&to=2026-11-01", "to"),
        ("group_by=vendor", "group_by"),
        ("after=00000000-0000-0000-0000-000000000000", "after"),
        ("granularity=hour", "granularity"),
    ],
)
async def test_a_bad_query_is_a_400_naming_the_parameter(
    client: TestClient, org: Org, query: str, parameter: str
) -> None:
    r = await client.get(f"/v1/usage?{query}", headers=org.headers())
    assert r.status == 400, await r.text()
    assert parameter in str(await r.json())
