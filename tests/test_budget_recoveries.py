"""Budget recoveries (the webhook event ``alert.budget.recovered``), on an injected clock: a
period threshold's alert recovers when a later period starts below that threshold, once per
alert, decided after the alerted period ended (service/store/alerts.py). The mark that says
how far housekeeping has looked moves once over each period end, a day per transaction, and
one process looks at a time."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from service.store import alerts as store
from service.store import auth
from service.store.db import session_lock
from tests.factories import Org, make_org
from tests.support import uid
from tests.test_budget_resets import at, budget, fold_at, spend


async def recoveries(pool: asyncpg.Pool, org: Org) -> dict[tuple[str, datetime], asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM budget_recoveries WHERE organization_id = $1", org.id)
    return {(r["threshold"], r["period_start"]): r for r in rows}


async def record(pool: asyncpg.Pool, org: Org, since: datetime, until: datetime, now: datetime) -> int:
    """Look at alerts (of every organization: the look is global) whose period ended in
    (``since``, ``until``], at ``now``; how many recoveries ``org`` has then."""
    async with pool.acquire() as conn:
        await store.record_recoveries(conn, since, until, now)
    return len(await recoveries(pool, org))


async def daily(pool: asyncpg.Pool, org: Org, ident: str, when: datetime, amount: str = "10") -> None:
    assert await fold_at(pool, when, budget(org, ident, when, period_budget=amount, budget_duration="daily")) == [
        "applied"
    ]


async def spent(pool: asyncpg.Pool, org: Org, ident: str, when: datetime, cost: str) -> None:
    assert await fold_at(pool, when, spend(org, ident, when, cost)) == ["applied"]


async def test_a_new_period_below_the_threshold_recovers_each_alert_once(pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("recover")
    day1, day2 = at("2026-07-01T00:00:00Z"), at("2026-07-02T00:00:00Z")
    await daily(pool, org, ident, day1 + timedelta(hours=1))
    await spent(pool, org, ident, day1 + timedelta(hours=2), "12")  # 80 % and 100 % of day 1
    # The period has not ended: nothing recovers.
    assert await record(pool, org, day1, day2 - timedelta(seconds=1), day2 - timedelta(seconds=1)) == 0
    await spent(pool, org, ident, day2 + timedelta(minutes=1), "3")  # day 2, under both thresholds
    assert await record(pool, org, day2 - timedelta(seconds=1), day2, day2 + timedelta(minutes=3)) == 2
    got = await recoveries(pool, org)
    assert set(got) == {("period_80", day1), ("period_100", day1)}
    for row in got.values():
        assert (row["period_end"], row["budget"], row["usage"]) == (day2, Decimal("10"), Decimal("3"))
        assert (row["current_start"], row["current_end"]) == (day2, day2 + timedelta(days=1))
    # Looking again, or over a wider range, records nothing twice.
    assert await record(pool, org, day1, day2 + timedelta(hours=1), day2 + timedelta(hours=1)) == 2


async def test_a_threshold_crossed_again_before_the_look_does_not_recover(pool: asyncpg.Pool, org: Org) -> None:
    """Day 2 crossed 80 % again before housekeeping looked: day 1's 80 % alert did not recover
    (day 2's own alert stands), its 100 % alert did (day 2 is below 100 %)."""
    ident = uid("again")
    day1, day2 = at("2026-07-10T00:00:00Z"), at("2026-07-11T00:00:00Z")
    await daily(pool, org, ident, day1 + timedelta(hours=1))
    await spent(pool, org, ident, day1 + timedelta(hours=2), "12")
    await spent(pool, org, ident, day2 + timedelta(hours=2), "9")
    assert await record(pool, org, day2 - timedelta(seconds=1), day2, day2 + timedelta(hours=3)) == 1
    assert set(await recoveries(pool, org)) == {("period_100", day1)}


async def test_no_recovery_without_a_period_budget_or_for_a_lifetime_budget(pool: asyncpg.Pool, org: Org) -> None:
    removed, lifetime = uid("removed"), uid("lifetime")
    day1, day2 = at("2026-07-20T00:00:00Z"), at("2026-07-21T00:00:00Z")
    await daily(pool, org, removed, day1 + timedelta(hours=1))
    await spent(pool, org, removed, day1 + timedelta(hours=2), "12")
    when = day1 + timedelta(hours=3)
    assert await fold_at(pool, when, budget(org, removed, when, period_budget=None)) == ["applied"]
    assert await fold_at(pool, when, budget(org, lifetime, when, total_budget="1")) == ["applied"]
    await spent(pool, org, lifetime, day1 + timedelta(hours=4), "2")
    rows = await pool.fetch("SELECT threshold FROM budget_alerts WHERE organization_id = $1", org.id)
    assert sorted(r["threshold"] for r in rows) == ["period_100", "period_80", "total_100"]
    assert await record(pool, org, day1, day2 + timedelta(days=400), day2 + timedelta(days=400)) == 0


async def test_a_deleted_customer_takes_its_recoveries_with_it(pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("gone")
    day1, day2 = at("2026-07-25T00:00:00Z"), at("2026-07-26T00:00:00Z")
    await daily(pool, org, ident, day1 + timedelta(hours=1))
    await spent(pool, org, ident, day1 + timedelta(hours=2), "9")
    assert await record(pool, org, day2 - timedelta(seconds=1), day2, day2 + timedelta(minutes=5)) == 1
    await pool.execute("DELETE FROM customers WHERE organization_id = $1 AND customer_identifier = $2", org.id, ident)
    assert await recoveries(pool, org) == {}


async def test_periods_end_at_local_midnight_in_the_organizations_zone(pool: asyncpg.Pool) -> None:
    """Berlin, across the end of summer time: the local day 25 October 2026 has 25 hours, ends
    at 23:00 UTC, and the recovery names the next local day as the current period."""
    org = await make_org(pool)
    async with pool.acquire() as conn:
        await auth.set_time_zone(conn, org.name, "Europe/Berlin")
    ident = uid("berlin")
    start, end = at("2026-10-24T22:00:00Z"), at("2026-10-25T23:00:00Z")
    await daily(pool, org, ident, start + timedelta(hours=1))
    await spent(pool, org, ident, start + timedelta(hours=2), "8.5")
    assert await record(pool, org, start, end - timedelta(seconds=1), end - timedelta(seconds=1)) == 0
    assert await record(pool, org, end - timedelta(seconds=1), end, end + timedelta(minutes=5)) == 1
    row = (await recoveries(pool, org))[("period_80", start)]
    assert row["period_end"] - row["period_start"] == timedelta(hours=25)
    assert (row["current_start"], row["current_end"]) == (end, at("2026-10-26T23:00:00Z"))


async def test_the_mark_moves_over_each_period_end_once_and_one_process_looks_at_a_time(pool: asyncpg.Pool) -> None:
    """`recover` looks from the mark to ``now - settle`` a day per transaction, moves the mark
    there, and finds the mark taken while another process looks. The mark is put back after."""
    org = await make_org(pool)
    mark = await pool.fetchval("SELECT checked_to FROM budget_recovery_mark")
    try:
        ident = uid("mark")
        day1 = datetime.combine(mark.date() + timedelta(days=1), datetime.min.time(), tzinfo=mark.tzinfo)
        day2 = day1 + timedelta(days=1)
        await daily(pool, org, ident, day1 + timedelta(hours=1))
        await spent(pool, org, ident, day1 + timedelta(hours=2), "9")
        settle = timedelta(minutes=2)
        async with pool.acquire() as conn:
            # The period ended, but less than `settle` ago: not yet.
            assert await store.recover(conn, settle, day2 + timedelta(minutes=1)) is not None
            assert await recoveries(pool, org) == {}
            # Three days later: caught up, one recovery, the mark at now - settle.
            later = day2 + timedelta(days=3)
            assert (await store.recover(conn, settle, later) or 0) >= 1
            assert set(await recoveries(pool, org)) == {("period_80", day1)}
            assert await pool.fetchval("SELECT checked_to FROM budget_recovery_mark") == later - settle
            assert await store.recover(conn, settle, later + timedelta(minutes=1)) is not None
            assert len(await recoveries(pool, org)) == 1
            async with pool.acquire() as other, session_lock(other, store.RECOVERY_LOCK) as taken:
                assert taken
                assert await store.recover(conn, settle, later + timedelta(minutes=2)) is None
    finally:
        await pool.execute("UPDATE budget_recovery_mark SET checked_to = $1", mark)


async def test_recoveries_are_recorded_a_bounded_number_per_transaction(pool: asyncpg.Pool, org: Org) -> None:
    """The webhook dispatcher reads a transaction's recoveries whole: at most ``most`` share one."""
    day1, day2 = at("2026-08-03T00:00:00Z"), at("2026-08-04T00:00:00Z")
    for i in range(5):
        ident = uid(f"bounded{i}")
        await daily(pool, org, ident, day1 + timedelta(hours=1))
        await spent(pool, org, ident, day1 + timedelta(hours=2), "9")
    async with pool.acquire() as conn:
        await store.record_recoveries(conn, day2 - timedelta(seconds=1), day2, day2 + timedelta(minutes=5), most=2)
    rows = await pool.fetch("SELECT xid::text FROM budget_recoveries WHERE organization_id = $1", org.id)
    per_transaction = sorted(sum(1 for r in rows if r["xid"] == x) for x in {r["xid"] for r in rows})
    assert len(rows) == 5 and per_transaction == [1, 2, 2]
