"""Budgets that reset right, each on an injected clock (the fold's ``now``): the ways budget
resets have gone wrong in LiteLLM, as its users reported them, checked here against tally. A
period that never resets; spend wiped when a budget is set; "monthly" meaning 30 days;
resets at the hour the budget was made rather than at midnight; a duration dropped by an
update; a budget set mid-period; periods across a daylight-saving change in the
organization's zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from aiohttp.test_utils import TestClient

from service.domain.events import validate_event
from service.store import auth
from service.store.fold import fold
from tests.eventkit import cloud_event, usage
from tests.factories import Org, make_org
from tests.support import ok_json, uid

RETENTION = timedelta(days=35)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def fold_at(pool: asyncpg.Pool, clock: datetime, *raws: dict) -> list[str]:
    """Fold ``raws`` as the consumer would if the time were ``clock``."""
    async with pool.acquire() as conn:
        result = await fold(conn, [validate_event(r, clock) for r in raws], retention=RETENTION, now=clock)
    return [o.status for o in result.outcomes]


def budget(org: Org, ident: str, when: datetime, **fields: object) -> dict:
    return cloud_event(org.name, ident, "customer.upserted", fields, when=when)


def spend(org: Org, ident: str, when: datetime, cost: str) -> dict:
    return usage(org.name, ident, when=when, cost=cost)


async def alerts(pool: asyncpg.Pool, org: Org) -> set[tuple[str, datetime | None]]:
    rows = await pool.fetch("SELECT threshold, period_start FROM budget_alerts WHERE organization_id = $1", org.id)
    return {(r["threshold"], r["period_start"]) for r in rows}


async def period_usage(pool: asyncpg.Pool, org: Org, ident: str, when: datetime) -> Decimal:
    """The customer's usage in its period containing ``when``, as the fold's alerts see it."""
    value: Decimal = await pool.fetchval(
        "SELECT tally_period_usage(c.organization_id, c.id, c.budget_duration, $3, u.total_cost)"
        " FROM customers c JOIN customer_usage u ON u.organization_id = c.organization_id AND u.id = c.id"
        " WHERE c.organization_id = $1 AND c.customer_identifier = $2",
        org.id,
        ident,
        when,
    )
    return value


async def test_a_period_resets_at_its_end(pool: asyncpg.Pool, org: Org) -> None:
    """Spend over a daily budget alerts in its day; the next day starts at zero and alerts
    again only when it crosses the threshold itself."""
    ident = uid("reset")
    day1, day2 = at("2026-05-04T09:00:00Z"), at("2026-05-05T09:00:00Z")
    assert await fold_at(
        pool, day1, budget(org, ident, day1 - timedelta(hours=1), period_budget="10", budget_duration="daily")
    ) == ["applied"]
    assert await fold_at(pool, day1, spend(org, ident, day1, "12")) == ["applied"]
    first = at("2026-05-04T00:00:00Z")
    assert await alerts(pool, org) == {("period_80", first), ("period_100", first)}
    assert await period_usage(pool, org, ident, day2) == 0
    assert await fold_at(pool, day2, spend(org, ident, day2, "1")) == ["applied"]
    assert await period_usage(pool, org, ident, day2) == 1
    assert await alerts(pool, org) == {("period_80", first), ("period_100", first)}
    assert await fold_at(pool, day2 + timedelta(hours=1), spend(org, ident, day2 + timedelta(hours=1), "7.5")) == [
        "applied"
    ]
    second = at("2026-05-05T00:00:00Z")
    assert await alerts(pool, org) == {("period_80", first), ("period_100", first), ("period_80", second)}


async def test_setting_a_budget_keeps_the_spend_already_in_its_period(pool: asyncpg.Pool, org: Org) -> None:
    """A budget set mid-period counts what the period already holds: nothing is wiped, and the
    next spend that crosses a threshold alerts (setting the budget itself alerts nobody: an
    alert belongs to the spend that crosses)."""
    ident = uid("midperiod")
    before = at("2026-06-03T10:00:00Z")
    assert await fold_at(pool, before, spend(org, ident, before, "8")) == ["applied"]
    set_at = at("2026-06-15T16:37:00Z")
    assert await fold_at(pool, set_at, budget(org, ident, set_at, period_budget="10", budget_duration="monthly")) == [
        "applied"
    ]
    assert await period_usage(pool, org, ident, set_at) == 8
    assert await alerts(pool, org) == set()
    later = set_at + timedelta(minutes=5)
    assert await fold_at(pool, later, spend(org, ident, later, "0.01")) == ["applied"]
    assert await alerts(pool, org) == {("period_80", at("2026-06-01T00:00:00Z"))}


async def test_monthly_is_the_calendar_month_not_30_days(pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("monthly")
    made = at("2026-01-20T08:00:00Z")
    assert await fold_at(pool, made, budget(org, ident, made, period_budget="100", budget_duration="monthly")) == [
        "applied"
    ]
    jan31, feb1, feb28 = at("2026-01-31T23:30:00Z"), at("2026-02-01T00:30:00Z"), at("2026-02-28T23:00:00Z")
    for when, cost in ((jan31, "5"), (feb1, "7"), (feb28, "11")):
        assert await fold_at(pool, when, spend(org, ident, when, cost)) == ["applied"]
    assert await period_usage(pool, org, ident, jan31) == 5  # January: its own 31 days
    assert await period_usage(pool, org, ident, feb28) == 18  # February: 28 days, January's spend not in it
    assert await period_usage(pool, org, ident, at("2026-03-01T00:00:00Z")) == 0  # not 30 days after Feb 1
    row = await pool.fetchrow(
        "SELECT tally_period_start('monthly', $1::timestamptz) AS s, tally_period_end('monthly', $1::timestamptz) AS e",
        feb1,
    )
    assert (row["s"], row["e"]) == (at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z"))


async def test_a_period_starts_at_midnight_not_at_the_hour_the_budget_was_set(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid("midnight")
    resp = await client.post(
        "/v1/customers",
        json={"customer_identifier": ident, "period_budget": "10", "budget_duration": "daily"},
        headers=org.headers(),
    )
    doc = await ok_json(resp, 201)
    start = datetime.fromisoformat(doc["period_start"])
    end = datetime.fromisoformat(doc["period_end"])
    assert (start.hour, start.minute, start.second, start.microsecond) == (0, 0, 0, 0)
    assert end - start == timedelta(days=1)
    assert start <= datetime.now(UTC) < end + timedelta(seconds=5)


async def test_an_update_keeps_the_duration_it_does_not_name(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """Changing the amount (by event or PATCH) or any other field leaves budget_duration as it
    was; only an explicit null clears it."""
    ident = uid("keep")
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    assert await fold_at(
        pool, datetime.now(UTC), budget(org, ident, t0, period_budget="10", budget_duration="weekly")
    ) == ["applied"]
    assert await fold_at(
        pool, datetime.now(UTC), budget(org, ident, t0 + timedelta(minutes=1), period_budget="20")
    ) == ["applied"]
    url = f"/v1/customers/{ident}"
    doc = await ok_json(await client.get(url, headers=org.headers()))
    assert (doc["period_budget"], doc["budget_duration"]) == ("20", "weekly")
    doc = await ok_json(await client.patch(url, json={"name": "Renamed", "period_budget": "30"}, headers=org.headers()))
    assert (doc["period_budget"], doc["budget_duration"]) == ("30", "weekly")
    doc = await ok_json(await client.patch(url, json={"budget_duration": None}, headers=org.headers()))
    assert (doc["budget_duration"], doc["period_start"]) == (None, None)


async def test_daily_periods_across_daylight_saving_in_the_organizations_zone(pool: asyncpg.Pool) -> None:
    """Berlin's 29 March 2026 has 23 hours: a daily budget's period is that local day, and the
    spends an hour either side of local midnight fall in different periods."""
    org = await make_org(pool)
    async with pool.acquire() as conn:
        await auth.set_time_zone(conn, org.name, "Europe/Berlin")
    ident = uid("dst")
    made = at("2026-03-28T12:00:00Z")
    assert await fold_at(pool, made, budget(org, ident, made, period_budget="10", budget_duration="daily")) == [
        "applied"
    ]
    # 23:30 CET on the 28th; 00:30 CEST and 23:30 CEST on the 29th; 00:30 CEST on the 30th.
    spends = {
        at("2026-03-28T22:30:00Z"): "4",
        at("2026-03-28T23:30:00Z"): "5",
        at("2026-03-29T21:30:00Z"): "3",
        at("2026-03-29T22:30:00Z"): "6",
    }
    for when, cost in spends.items():
        assert await fold_at(pool, when, spend(org, ident, when, cost)) == ["applied"]
    assert await period_usage(pool, org, ident, at("2026-03-29T12:00:00Z")) == 8
    assert await period_usage(pool, org, ident, at("2026-03-28T22:59:59Z")) == 4
    assert await period_usage(pool, org, ident, at("2026-03-29T22:00:00Z")) == 6
    # 5 + 3 reached 80 % of the 29th's budget, in a period of 23 hours.
    assert await alerts(pool, org) == {("period_80", at("2026-03-28T23:00:00Z"))}
    row = await pool.fetchrow("SELECT period_start, period_end FROM budget_alerts WHERE organization_id = $1", org.id)
    assert row["period_end"] - row["period_start"] == timedelta(hours=23)
