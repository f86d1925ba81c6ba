"""An organization's reporting time zone: its days (daily rows, usage series and windows), its
calendar periods (budgets) and its "today" are that IANA zone's, daylight-saving days of 23
and 25 hours included. Checked against Python's zoneinfo as the oracle, through the SQL
period functions, the fold (also redelivered, and rebuilt after a late deletion), the budget
alerts the fold records, the API and the CLI."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.domain.events import validate_event
from service.domain.keys import check_time_zone
from service.infra.settings import Settings
from service.store import auth
from service.store.fold import fold
from tests.eventkit import cloud_event, fold_events, usage, wait_until
from tests.factories import Org, insert_customer, make_org
from tests.support import ok_json, tally, uid

BERLIN = "Europe/Berlin"
DURATIONS = ("daily", "weekly", "monthly", "yearly")
# Zones with daylight saving in either hemisphere, a half-hour shift (Lord Howe), a
# quarter-hour offset (Chatham), a fractional one without DST (Kolkata) and the day-ahead
# +14:00 of Kiritimati.
ZONES = (
    BERLIN,
    "America/New_York",
    "America/St_Johns",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Asia/Kolkata",
    "Pacific/Kiritimati",
    "UTC",
)


async def zoned_org(pool: asyncpg.Pool, zone: str) -> Org:
    org = await make_org(pool)
    async with pool.acquire() as conn:
        await auth.set_time_zone(conn, org.name, zone)
    return org


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), zone).astimezone(UTC)


def oracle(duration: str, when: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar period of ``duration`` containing ``when`` in ``zone``: local midnights
    converted to UTC, computed by zoneinfo rather than by PostgreSQL."""
    day = when.astimezone(zone).date()
    if duration == "daily":
        first, nxt = day, day + timedelta(days=1)
    elif duration == "weekly":
        first = day - timedelta(days=day.weekday())
        nxt = first + timedelta(days=7)
    elif duration == "monthly":
        first = day.replace(day=1)
        nxt = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    else:
        first, nxt = date(day.year, 1, 1), date(day.year + 1, 1, 1)
    return local_midnight(first, zone), local_midnight(nxt, zone)


# ---- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Europe/Berlin", "UTC", "America/St_Johns", "Asia/Kolkata"])
def test_iana_names_are_time_zones(name: str) -> None:
    assert check_time_zone(name).key == name


@pytest.mark.parametrize(
    "name", ["+02:00", "-05", "Mars/Olympus_Mons", "", " UTC", "localtime", "Europe/../UTC", "x" * 65]
)
def test_anything_else_is_refused_naming_what_a_zone_is(name: str) -> None:
    with pytest.raises(ValueError, match="IANA time zone name"):
        check_time_zone(name)


async def test_the_database_refuses_a_zone_postgresql_does_not_know(pool: asyncpg.Pool) -> None:
    org = await make_org(pool)
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await pool.execute("UPDATE organizations SET time_zone = 'Mars/Olympus_Mons' WHERE id = $1", org.id)
    assert await pool.fetchval("SELECT time_zone FROM organizations WHERE id = $1", org.id) == "UTC"


# ---- periods -------------------------------------------------------------------------------


async def test_period_bounds_follow_the_zone_across_daylight_saving(pool: asyncpg.Pool) -> None:
    """Every 3h37m over 14 months (both daylight-saving changes of each zone), every duration:
    the period is the zone's calendar period and contains the instant."""
    instants = [datetime(2025, 12, 20, 0, 7, tzinfo=UTC) + i * timedelta(hours=3, minutes=37) for i in range(2800)]
    for zone in ZONES:
        z = ZoneInfo(zone)
        for duration in DURATIONS:
            rows = await pool.fetch(
                "SELECT t, tally_period_start($1, t, $3) AS s, tally_period_end($1, t, $3) AS e"
                " FROM unnest($2::timestamptz[]) t",
                duration,
                instants,
                zone,
            )
            for r in rows:
                assert (r["s"], r["e"]) == oracle(duration, r["t"], z), (zone, duration, r["t"])
                assert r["s"] <= r["t"] < r["e"]


@pytest.mark.parametrize(
    "instant, hours",
    [
        ("2026-03-29T12:00:00Z", 23),  # Berlin springs forward: 02:00 CET becomes 03:00 CEST
        ("2026-10-25T12:00:00Z", 25),  # and falls back: 03:00 CEST becomes 02:00 CET
        ("2026-06-15T12:00:00Z", 24),
    ],
)
async def test_a_daily_period_on_a_daylight_saving_day_is_23_or_25_hours(
    pool: asyncpg.Pool, instant: str, hours: int
) -> None:
    row = await pool.fetchrow(
        "SELECT tally_period_start('daily', $1::timestamptz, $2) AS s,"
        " tally_period_end('daily', $1::timestamptz, $2) AS e",
        datetime.fromisoformat(instant),
        BERLIN,
    )
    assert row["e"] - row["s"] == timedelta(hours=hours)
    assert row["s"].astimezone(ZoneInfo(BERLIN)).time() == time(0)


# ---- the fold's days -----------------------------------------------------------------------


def local_days(events: list[dict], zone: ZoneInfo) -> dict[date, tuple[int, Decimal]]:
    """(requests, cost) per local day of the events, each event once."""
    days: dict[date, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
    for e in {e["id"]: e for e in events}.values():
        day = datetime.fromisoformat(e["time"]).astimezone(zone).date()
        requests, cost = days[day]
        days[day] = (requests + e["data"]["requests"], cost + Decimal(e["data"]["cost"]))
    return dict(days)


async def stored_days(pool: asyncpg.Pool, org: Org, ident: str) -> dict[date, tuple[int, Decimal]]:
    rows = await pool.fetch(
        "SELECT d.day, d.requests, d.cost FROM daily_usage d JOIN customers c"
        " ON c.organization_id = d.organization_id AND c.id = d.customer_id"
        " WHERE c.organization_id = $1 AND c.customer_identifier = $2",
        org.id,
        ident,
    )
    return {r["day"]: (r["requests"], r["cost"]) for r in rows}


def around_midnights(rng: random.Random, zone: ZoneInfo, days: int = 20) -> list[datetime]:
    """Instants within two hours of the zone's recent local midnights: where a UTC day and a
    local day disagree."""
    today = datetime.now(zone).date()
    out = []
    for n in range(1, days):
        midnight = local_midnight(today - timedelta(days=n), zone)
        out += [midnight + timedelta(minutes=rng.randint(-120, 119)) for _ in range(3)]
    return out


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "America/St_Johns", BERLIN])
async def test_usage_lands_on_the_organizations_local_days_exactly_once(pool: asyncpg.Pool, zone: str) -> None:
    org = await zoned_org(pool, zone)
    z = ZoneInfo(zone)
    rng = random.Random(zone)
    ident = uid("local")
    events = [
        usage(org.name, ident, when=t, requests=rng.randint(1, 9), cost=f"{rng.randint(1, 500) / 100:.2f}")
        for t in around_midnights(rng, z)
    ]
    async with pool.acquire() as conn:
        assert set(await fold_events(conn, *events)) == {"applied"}
        # Redelivered, in another order and split: nothing counts twice.
        shuffled = rng.sample(events, len(events))
        assert set(await fold_events(conn, *shuffled[:20])) == {"duplicate"}
        assert set(await fold_events(conn, *shuffled[20:])) == {"duplicate"}
    want = local_days(events, z)
    assert await stored_days(pool, org, ident) == want
    active = await pool.fetchval(
        "SELECT u.active_days FROM customer_usage u JOIN customers c ON c.organization_id = u.organization_id"
        " AND c.id = u.id WHERE c.organization_id = $1 AND c.customer_identifier = $2",
        org.id,
        ident,
    )
    assert active == len(want)
    # The same instants in UTC land on other days somewhere: the zone made a difference.
    if zone != "UTC":
        assert local_days(events, ZoneInfo("UTC")) != want


async def test_a_late_deletion_rebuilds_the_days_in_the_zone(pool: asyncpg.Pool) -> None:
    """A deletion that arrives after newer usage undoes what it predates: the rebuilt daily rows
    are the zone's days of the usage after it."""
    org = await zoned_org(pool, "Pacific/Kiritimati")
    z = ZoneInfo("Pacific/Kiritimati")
    rng = random.Random(3)
    ident = uid("rebuilt")
    instants = sorted(around_midnights(rng, z, days=10))
    events = [usage(org.name, ident, when=t, cost="1.00") for t in instants]
    cut = instants[len(instants) // 2] - timedelta(seconds=1)
    async with pool.acquire() as conn:
        assert set(await fold_events(conn, *events)) == {"applied"}
        assert await fold_events(conn, cloud_event(org.name, ident, "customer.deleted", {}, when=cut)) == ["applied"]
    after = [e for e in events if datetime.fromisoformat(e["time"]) > cut]
    want = local_days(after, z)
    assert await stored_days(pool, org, ident) == want
    assert await pool.fetchval(
        "SELECT u.active_days FROM customer_usage u JOIN customers c ON c.organization_id = u.organization_id"
        " AND c.id = u.id WHERE c.organization_id = $1 AND c.customer_identifier = $2",
        org.id,
        ident,
    ) == len(want)


async def test_budget_alerts_count_the_zones_day(pool: asyncpg.Pool) -> None:
    """Two spends of 6 against a daily budget of 10, an hour apart around Kiritimati's midnight:
    one UTC day (an alert in a UTC organization), two local days (none in Kiritimati's)."""
    clock = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(days=2)
    kiritimati = ZoneInfo("Pacific/Kiritimati")
    midnight = local_midnight(clock.astimezone(kiritimati).date(), kiritimati)
    spends = (midnight - timedelta(minutes=30), midnight + timedelta(minutes=30))
    clock = spends[1] + timedelta(minutes=5)  # inside the local day of the second spend
    assert spends[0].astimezone(UTC).date() == spends[1].astimezone(UTC).date()  # Kiritimati's midnight is 10:00Z
    recorded = {}
    for zone in ("UTC", "Pacific/Kiritimati"):
        org = await zoned_org(pool, zone)
        ident = uid("budget")
        await insert_customer(pool, org, ident, period_budget=Decimal(10), budget_duration="daily")
        events = [validate_event(usage(org.name, ident, when=t, cost="6"), clock) for t in spends]
        async with pool.acquire() as conn:
            result = await fold(conn, events, retention=timedelta(days=35), now=clock)
        assert [o.status for o in result.outcomes] == ["applied", "applied"]
        recorded[zone] = {
            (r["threshold"], r["usage"], r["period_start"])
            for r in await pool.fetch(
                "SELECT threshold, usage, period_start FROM budget_alerts WHERE organization_id = $1", org.id
            )
        }
    utc_day = datetime.combine(clock.date(), time(), UTC)
    assert recorded["UTC"] == {("period_80", Decimal(12), utc_day), ("period_100", Decimal(12), utc_day)}
    assert recorded["Pacific/Kiritimati"] == set()


# ---- the API -------------------------------------------------------------------------------


async def test_the_api_shows_the_zones_budget_period_and_usage(client: TestClient, pool: asyncpg.Pool) -> None:
    org = await zoned_org(pool, "Pacific/Kiritimati")
    z = ZoneInfo("Pacific/Kiritimati")
    ident = uid("api")
    await insert_customer(pool, org, ident, period_budget=Decimal(100), budget_duration="daily")
    now = datetime.now(UTC)
    start, end = oracle("daily", now, z)
    # Spend just inside the local day and just before it (the same UTC day, often).
    inside, before = start + timedelta(minutes=1), start - timedelta(minutes=1)
    async with pool.acquire() as conn:
        assert set(
            await fold_events(
                conn, usage(org.name, ident, when=inside, cost="2"), usage(org.name, ident, when=before, cost="3")
            )
        ) == {"applied"}
    for _ in range(3):  # a local midnight may pass during the request: read again
        doc = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
        series = await ok_json(await client.get(f"/v1/customers/{ident}/usage", headers=org.headers()))
        report = await ok_json(await client.get("/v1/usage", headers=org.headers()))
        if oracle("daily", datetime.now(UTC), z) == (start, end):
            break
    assert (datetime.fromisoformat(doc["period_start"]), datetime.fromisoformat(doc["period_end"])) == (start, end)
    assert Decimal(doc["total_period_usage"]) == 2
    today = now.astimezone(z).date()
    for body in (series, report):
        assert body["time_zone"] == "Pacific/Kiritimati"
        assert body["to"] == today.isoformat()
        by_day = {r["start"]: Decimal(r["cost"]) for r in body["results"]}
        assert by_day[today.isoformat()] == 2
        assert by_day[(today - timedelta(days=1)).isoformat()] == 3


async def test_changing_the_zone_reaches_cached_reads(client: TestClient, pool: asyncpg.Pool) -> None:
    """A cached response shows the old zone's period until the change, never after it."""
    org = await make_org(pool)
    ident = uid("cached")
    await insert_customer(pool, org, ident, period_budget=Decimal(100), budget_duration="monthly")
    url = f"/v1/customers/{ident}"
    first = await ok_json(await client.get(url, headers=org.headers()))
    assert datetime.fromisoformat(first["period_start"]).utcoffset() == timedelta(0)
    assert datetime.fromisoformat(first["period_start"]) == oracle("monthly", datetime.now(UTC), ZoneInfo("UTC"))[0]
    async with pool.acquire() as conn:
        await auth.set_time_zone(conn, org.name, "Asia/Kolkata")

    async def moved() -> bool:
        doc = await ok_json(await client.get(url, headers=org.headers()))
        return doc["period_start"] != first["period_start"]

    await wait_until(moved, what="the API to show the new zone's period")
    doc = await ok_json(await client.get(url, headers=org.headers()))
    assert (
        datetime.fromisoformat(doc["period_start"]) == oracle("monthly", datetime.now(UTC), ZoneInfo("Asia/Kolkata"))[0]
    )


# ---- the CLI -------------------------------------------------------------------------------


def test_the_cli_creates_and_changes_an_organizations_zone(migrated: str, settings: Settings) -> None:
    env = {"TALLY_DATABASE_URL": settings.database_url}
    name = uid("zoned")
    made = tally("orgs", "create", name, "--time-zone", BERLIN, "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert '"time_zone": "Europe/Berlin"' in made.stdout or '"time_zone":"Europe/Berlin"' in made.stdout
    listed = tally("orgs", "list", env=env)
    assert any(line.split()[:2] == [name, BERLIN] for line in listed.stdout.splitlines())
    changed = tally("orgs", "set-time-zone", name, "America/New_York", env=env)
    assert changed.returncode == 0, changed.stderr
    assert "days already folded keep" in changed.stdout
    refused = tally("orgs", "set-time-zone", name, "+02:00", env=env)
    assert refused.returncode != 0
    assert "IANA time zone name" in refused.stderr
    bad_create = tally("orgs", "create", uid("nozone"), "--time-zone", "Mars/Olympus_Mons", env=env)
    assert bad_create.returncode != 0 and "IANA time zone name" in bad_create.stderr
    listed = tally("orgs", "list", env=env)
    assert any(line.split()[:2] == [name, "America/New_York"] for line in listed.stdout.splitlines())
