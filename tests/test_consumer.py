"""The consumer against the real RabbitMQ and PostgreSQL, in-process: exactly-once folding,
ordering, dead letters with reasons, and the HTTP ingest path end to end."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from service.api import appkeys
from service.infra.broker import REASON_HEADER, ROUTING_KEY_HEADER
from service.store import failpoints
from tests.consumerkit import barrier, drained, running_consumer
from tests.eventkit import (
    Broker,
    actual,
    assert_totals,
    days_ago,
    expected,
    usage,
    wait_until,
)
from tests.factories import Org, make_org


async def settle(pool: asyncpg.Pool, broker: Broker, orgs: list[str], events: list[dict]) -> None:
    """Wait until the database holds exactly the expected totals (or fail on timeout)."""
    want = expected(events)

    async def done() -> bool:
        got = await actual(pool, orgs)
        return set(got) == set(want) and all(got[k].requests == want[k].requests for k in want)

    await wait_until(done, what="all events applied")
    assert_totals(want, await actual(pool, orgs))


async def test_duplicates_redeliveries_and_out_of_order(settings, pool, broker, org: Org) -> None:
    events = [usage(org.name, f"u{i % 4}", when=days_ago(random.uniform(0, 20))) for i in range(200)]
    shuffled = events[:]
    random.shuffle(shuffled)
    async with running_consumer(settings, pool, broker):
        for e in shuffled:
            await broker.publish(e)
        # The same events again, as new messages, some as a batch: all duplicates.
        for e in events[:50]:
            await broker.publish(e)
        await broker.publish(events[50:150])
        await wait_until(lambda: drained(broker))
        await settle(pool, broker, [org.name], events)
    assert await broker.queue_depth(broker.names.dead) == 0


async def test_batch_messages_and_days_across_utc_midnight(settings, pool, broker, org: Org) -> None:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    events = [
        usage(org.name, "night_owl", when=midnight - timedelta(seconds=1)),
        usage(org.name, "night_owl", when=midnight),
        usage(org.name, "night_owl", when=midnight + timedelta(hours=23, minutes=59, seconds=59)),
        usage(org.name, "night_owl", when=midnight + timedelta(days=1)),
    ]
    async with running_consumer(settings, pool, broker):
        await broker.publish(events)
        await settle(pool, broker, [org.name], events)
    days = await pool.fetchval(
        "SELECT active_days FROM customer_rows WHERE organization_id = $1 AND customer_identifier = 'night_owl'",
        org.id,
    )
    assert days == 3
    rows = await pool.fetch(
        "SELECT d.day, d.requests FROM daily_usage d JOIN customers c ON c.id = d.customer_id"
        " WHERE c.organization_id = $1 ORDER BY d.day",
        org.id,
    )
    assert [r["requests"] for r in rows] == [1, 2, 1]


async def test_same_identifier_in_several_organizations_and_environments(settings, pool, broker) -> None:
    a, b = await make_org(pool), await make_org(pool)
    events = [usage(o.name, "shared", cost="1.5") for o in (a, b) for _ in range(3)]
    events += [usage(a.name, "shared", environment="test", cost="2")]
    events += [usage(str(b.id), "shared", cost="0.25")]  # organization given by id
    async with running_consumer(settings, pool, broker):
        await broker.publish(events)
        want = expected(
            [{**e, "organization": b.name if e["organization"] == str(b.id) else e["organization"]} for e in events]
        )

        async def done() -> bool:
            got = await actual(pool, [a.name, b.name])
            return set(got) == set(want) and all(got[k].requests == want[k].requests for k in want)

        await wait_until(done)
    assert_totals(want, await actual(pool, [a.name, b.name]))


POISON = [
    (b"{not json", "body is not valid JSON"),
    (b"[]", "batch is empty"),
    (b"42", "body is neither"),
    (orjson.dumps({"specversion": "1.0", "id": "x", "type": "usage.recorded"}), "invalid field source"),
    (orjson.dumps(usage("ORG", "p", requests=-1)), "invalid field data.requests"),
    (orjson.dumps({**usage("ORG", "p"), "type": "usage.deleted"}), "invalid field type"),
    (orjson.dumps(usage("ORG", "p", when=datetime.now(UTC) + timedelta(hours=1))), "in the future"),
    (orjson.dumps(usage("no-such-org-anywhere", "p")), "unknown organization"),
    (orjson.dumps(usage("ORG", "p", when=datetime.now(UTC) - timedelta(days=400))), "too old"),
    (orjson.dumps({**usage("ORG", "p"), "data": {"cost": "abc"}}), "invalid field data.cost"),
]


async def test_every_kind_of_poison_is_dead_lettered_with_its_reason(settings, pool, broker, org: Org) -> None:
    good = [usage(org.name, "steady") for _ in range(20)]
    async with running_consumer(settings, pool, broker):
        for i, (body, _) in enumerate(POISON):
            await broker.publish(body.replace(b'"ORG"', f'"{org.name}"'.encode()))
            await broker.publish(good[i])
        for e in good[len(POISON) :]:
            await broker.publish(e)
        await settle(pool, broker, [org.name], good)
        letters = await broker.dead_letters(len(POISON))
    reasons = sorted(str(m.headers[REASON_HEADER]) for m in letters)
    for _, fragment in POISON:
        assert any(fragment in r for r in reasons), (fragment, reasons)
    assert all(m.headers[ROUTING_KEY_HEADER] == "usage.recorded" for m in letters)


async def test_bad_event_inside_a_batch_is_dead_lettered_alone(settings, pool, broker, org: Org) -> None:
    good = [usage(org.name, f"b{i}") for i in range(5)]
    bad = usage(org.name, "b_bad", prompt=-5)
    async with running_consumer(settings, pool, broker):
        await broker.publish([good[0], good[1], bad, good[2], good[3], good[4]])
        await settle(pool, broker, [org.name], good)
        [letter] = await broker.dead_letters(1)
    assert orjson.loads(letter.body) == bad
    assert "prompt_tokens" in str(letter.headers[REASON_HEADER])


async def test_profile_subscription_and_delete_events(settings, pool, broker, org: Org) -> None:
    t0 = days_ago(3)
    base = {"specversion": "1.0", "source": "crm", "organization": org.name, "subject": "vip"}
    upsert_new = {
        **base,
        "id": "p2",
        "type": "customer.upserted",
        "time": (t0 + timedelta(hours=2)).isoformat(),
        "data": {
            "name": "New Name",
            "status": "blacklisted",
            "total_budget": "100.50",
            "metadata": {"tier": "gold"},
            "address": {"city": "Lyon"},
        },
    }
    upsert_old = {
        **base,
        "id": "p1",
        "type": "customer.upserted",
        "time": t0.isoformat(),
        "data": {"name": "Old Name", "email": "vip@example.com"},
    }
    sub_old = {
        **base,
        "source": "billing",
        "id": "s1",
        "type": "subscription.upserted",
        "time": t0.isoformat(),
        "data": {"id": "sub_1", "status": "trialing", "plan": None},
    }
    sub_new = {
        **base,
        "source": "billing",
        "id": "s2",
        "type": "subscription.upserted",
        "time": (t0 + timedelta(hours=1)).isoformat(),
        "data": {
            "id": "sub_1",
            "status": "active",
            "plan": {
                "stripe_price_id": "price_1",
                "name": "Pro",
                "amount": 4999,
                "currency": "usd",
                "interval": "month",
            },
        },
    }
    async with running_consumer(settings, pool, broker):
        # Newest first: the late, older profile change must not overwrite the newer one.
        await broker.publish(upsert_new, "customer.upserted")
        await broker.publish(sub_new, "subscription.upserted")

        async def applied() -> bool:
            return (
                await pool.fetchval("SELECT count(*) FROM subscriptions WHERE organization_id = $1", org.id) == 1
                and await pool.fetchval(
                    "SELECT count(*) FROM customers WHERE organization_id = $1 AND name = 'New Name'", org.id
                )
                == 1
            )

        await wait_until(applied)
        await broker.publish([upsert_old, sub_old])
        await barrier(pool, broker, org)
        row = await pool.fetchrow(
            "SELECT name, email, status, total_budget::text, metadata, address_city FROM customers"
            " WHERE organization_id = $1 AND customer_identifier = 'vip'",
            org.id,
        )
        # Last writer wins per field: the late, older upsert loses 'name' but its 'email' applies.
        assert dict(row) == {
            "name": "New Name",
            "email": "vip@example.com",
            "status": "blacklisted",
            "total_budget": "100.50",
            "metadata": {"tier": "gold"},
            "address_city": "Lyon",
        }
        sub = await pool.fetchrow("SELECT status, plan_amount FROM subscriptions WHERE organization_id = $1", org.id)
        assert (sub["status"], sub["plan_amount"]) == ("active", 4999)

        # A deletion older than the newest change removes only what it predates (the email
        # written at t0); a newer one removes everything.
        stale_delete = {**base, "id": "d1", "type": "customer.deleted", "time": t0.isoformat(), "data": {}}
        await broker.publish(stale_delete, "customer.deleted")
        await barrier(pool, broker, org)
        row = await pool.fetchrow(
            "SELECT name, email FROM customers WHERE organization_id = $1 AND customer_identifier = 'vip'", org.id
        )
        assert dict(row) == {"name": "New Name", "email": None}
        delete = {**base, "id": "d2", "type": "customer.deleted", "time": days_ago(0, hour=0).isoformat(), "data": {}}
        await broker.publish(delete, "customer.deleted")

        async def gone() -> bool:
            return (
                await pool.fetchval(
                    "SELECT count(*) FROM customers WHERE organization_id = $1 AND customer_identifier = 'vip'", org.id
                )
                == 0
            )

        await wait_until(gone)
        assert await pool.fetchval("SELECT count(*) FROM subscriptions WHERE organization_id = $1", org.id) == 0


async def test_crash_between_commit_and_ack_is_absorbed(settings, pool, broker, org: Org) -> None:
    events = [usage(org.name, f"c{i % 3}") for i in range(30)]
    crashed = asyncio.Event()

    async def crash_once() -> None:
        if not crashed.is_set():
            crashed.set()
            # The batch is committed; the connection dies before any ack.
            raise ConnectionError("simulated crash after commit")

    with failpoints.arm("consumer.after_commit", crash_once):
        async with running_consumer(settings, pool, broker):
            await broker.publish(events)
            await wait_until(lambda: _event_set(crashed))
            await settle(pool, broker, [org.name], events)
            await wait_until(lambda: drained(broker))
    assert_totals(expected(events), await actual(pool, [org.name]))


async def test_the_consumer_sees_a_backlog_in_its_queue(settings, pool, broker, org: Org) -> None:
    """Behind (the webhook dispatcher beside it yields then) while more messages wait in the
    ingest queue than its prefetch lets it hold, read from the queue itself; not once they
    are folded."""
    gate = asyncio.Event()

    async def held() -> None:  # the first batch commits, then the fold waits here
        await gate.wait()

    events = [usage(org.name, f"backlog{i}") for i in range(40)]
    for e in events:
        await broker.publish(e)
    with failpoints.arm("consumer.after_commit", held):
        async with running_consumer(settings, pool, broker, prefetch=5) as consumer:

            async def behind() -> bool:
                return consumer.backlogged

            async def caught_up() -> bool:
                return not consumer.backlogged

            await wait_until(behind, what="the backlog seen")
            gate.set()
            await settle(pool, broker, [org.name], events)
            await wait_until(caught_up, what="the backlog folded")


async def _event_set(event: asyncio.Event) -> bool:
    return event.is_set()


async def test_http_ingest_end_to_end(settings, pool, broker, client, org: Org) -> None:
    # Point the app's publisher at this test's private namespace (and back afterwards: a later
    # publish through the shared app would declare the deleted namespace again and leave it).
    publisher = client.app[appkeys.PUBLISHER]
    saved, publisher.names = publisher.names, broker.names
    await publisher.close()
    events = [usage(org.name, "http_user", cost="0.5") for _ in range(3)]
    for e in events:
        del e["organization"]  # taken from the key
    try:
        async with running_consumer(settings, pool, broker):
            r = await client.post("/v1/events", json=events, headers=org.headers())
            assert r.status == 202, await r.text()
            assert await r.json() == {"accepted": 3}
            r = await client.post("/v1/events", json=events[0], headers=org.headers())
            assert r.status == 202  # a duplicate: accepted, folded once
            for e in events:
                e["organization"] = org.name
            await settle(pool, broker, [org.name], events)
            r = await client.get("/v1/customers/http_user", headers=org.headers())
            assert (await r.json())["total_cost"] == "1.5"
    finally:
        await publisher.close()
        publisher.names = saved


async def test_http_ingest_refuses_bad_input(client, org: Org, other_org: Org) -> None:
    bad = usage(org.name, "x", requests=-1)
    r = await client.post("/v1/events", json=bad, headers=org.headers())
    assert r.status == 400 and r.content_type == "application/problem+json"
    assert "requests" in (await r.json())["detail"]
    r = await client.post("/v1/events", json=usage(other_org.name, "x"), headers=org.headers())
    assert r.status == 400
    assert (await r.json())["errors"][0]["name"] == "event.organization"
    r = await client.post("/v1/events", json=[usage(org.name, "x")] * 1001, headers=org.headers())
    assert r.status == 413
    r = await client.post("/v1/events", data=b"{", headers=org.headers())
    assert r.status == 400
    r = await client.post("/v1/events", json=usage(org.name, "x"), headers=org.headers(org.read_key))
    assert r.status == 403
