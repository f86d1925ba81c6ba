"""The AMQP contract, against the real RabbitMQ: every message that reaches tally's events
exchange is applied or dead-lettered with a reason — a routing key no binding matches
included (the alternate exchange, reason ``unroutable``) — and, with publishers bound to
organizations, an event its AMQP user may not write is dead-lettered as ``forbidden_publisher``
(RabbitMQ validates the ``user_id`` the consumer trusts).

The tests that create a RabbitMQ user or set a policy use rabbitmqctl; they skip where it is
absent, and CI (.ci/run) sets TALLY_REQUIRE_RABBITMQCTL so that there they never skip."""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from consumers.deadletters import DeadLetters
from service.infra import metrics
from service.infra.broker import (
    REASON_CODE_HEADER,
    ROUTING_KEY_HEADER,
    alternate_exchange_policy,
    declare,
    routable,
)
from service.infra.settings import Settings
from tests.consumerkit import barrier, running_consumer
from tests.eventkit import AMQP_URL, Broker, usage, wait_until
from tests.factories import Org
from tests.support import rabbitmqctl, rabbitmqctl_problem, uid

REQUIRE_RABBITMQCTL = bool(os.environ.get("TALLY_REQUIRE_RABBITMQCTL"))


@pytest.fixture
def ctl() -> None:
    """rabbitmqctl usable on this machine: the test skips, saying why, where it is not (CI,
    which runs as root beside its broker, sets TALLY_REQUIRE_RABBITMQCTL: there it fails)."""
    problem = rabbitmqctl_problem()
    assert problem is None or not REQUIRE_RABBITMQCTL, f"TALLY_REQUIRE_RABBITMQCTL is set but {problem}"
    if problem is not None:
        pytest.skip(f"needs rabbitmqctl administering the local RabbitMQ ({problem}; .ci/run has it)")


# Customer identifiers no other test uses (tests share one database).
WHO = {
    name: uid(name)
    for name in (
        "by_name",
        "by_id",
        "not_mine",
        "anonymous",
        "spoofed",
        "tallys_own",
        "lost_batch_a",
        "lost_batch_b",
        "routed",
        "dropped",
        "caught",
        "no_user_id",
        "replayed_0",
        "replayed_1",
    )
}

# Keys a publisher could plausibly get wrong; none matches usage.#, customer.# or subscription.#.
UNROUTABLE_KEYS = ["events", "", "Usage.recorded", "usage_recorded", "events.usage.recorded", "x" * 255]


def dead_letters_total(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("tally_dead_letters_total", {"reason": reason}) or 0.0


async def customers(pool: asyncpg.Pool, org: Org) -> set[str]:
    rows = await pool.fetch("SELECT customer_identifier FROM customers WHERE organization_id = $1", org.id)
    return {r["customer_identifier"] for r in rows}


def test_routable_keys_are_those_the_ingest_queue_is_bound_to() -> None:
    for key in ("usage.recorded", "customer.upserted", "customer.deleted", "subscription.upserted", "usage"):
        assert routable(key), key
    for key in [*UNROUTABLE_KEYS, "alert.budget", "usagex.recorded"]:
        assert not routable(key), key


async def test_a_message_with_any_routing_key_is_applied_or_dead_lettered(
    settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    before = dead_letters_total("unroutable")
    sent = {key: usage(org.name, uid("lost")) for key in UNROUTABLE_KEYS}
    batch = [usage(org.name, WHO["lost_batch_a"]), usage(org.name, WHO["lost_batch_b"])]
    async with running_consumer(settings, pool, broker):
        for key, event in sent.items():
            await broker.publish(event, routing_key=key)
        await broker.publish(batch, routing_key="events")
        await broker.publish(usage(org.name, WHO["routed"]), routing_key="usage.recorded")
        await barrier(pool, broker, org)
        letters = await broker.dead_letters(len(sent) + 1)
    assert dead_letters_total("unroutable") - before == len(sent) + 1
    by_key: dict[str, list[aio_pika.abc.AbstractIncomingMessage]] = {}
    for letter in letters:
        assert letter.headers[REASON_CODE_HEADER] == "unroutable", letter.headers
        assert "matches none of usage.#, customer.#, subscription.#" in letter.headers["x-tally-reason"]
        by_key.setdefault(str(letter.headers[ROUTING_KEY_HEADER]), []).append(letter)
    assert set(by_key) == set(UNROUTABLE_KEYS)
    assert orjson.loads(by_key["events"][0].body) in (sent["events"], batch)  # the message as sent, whole
    assert {b.body for b in by_key["events"]} == {orjson.dumps(sent["events"]), orjson.dumps(batch)}
    # Nothing of an unroutable message was applied; the routed event around them was.
    assert await customers(pool, org) & {e["subject"] for e in [*sent.values(), *batch]} == set()
    assert WHO["routed"] in await customers(pool, org)


async def test_replaying_unroutable_letters_applies_them_by_their_type(
    settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    events = [usage(org.name, WHO["replayed_0"]), usage(org.name, WHO["replayed_1"])]
    async with running_consumer(settings, pool, broker):
        for event in events:
            await broker.publish(event, routing_key="events")
        await wait_until(lambda: _depth(broker, 2), what="two unroutable dead letters")
        async with DeadLetters(AMQP_URL, broker.names) as dlq:
            assert await dlq.replay(reason="unroutable") == (2, 0)

        async def applied() -> bool:
            return {WHO["replayed_0"], WHO["replayed_1"]} <= await customers(pool, org)

        await wait_until(applied, what="the replayed events applied")
    assert await broker.queue_depth(broker.names.dead) == 0


async def _depth(broker: Broker, n: int) -> bool:
    return await broker.queue_depth(broker.names.dead) == n


async def test_an_events_exchange_declared_without_the_alternate_exchange_gets_it_by_policy(
    settings: Settings, pool: asyncpg.Pool, org: Org, caplog: pytest.LogCaptureFixture, ctl: None
) -> None:
    """An earlier tally declared the events exchange without an alternate exchange: tally
    starts on it anyway, says how to attach one, and the policy it names does."""
    broker = Broker()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.declare_exchange(broker.names.events, aio_pika.ExchangeType.TOPIC, durable=True)
    policy = f"{broker.names.namespace}-unroutable"
    caplog.set_level(logging.WARNING, logger="tally.broker")
    try:
        async with broker:
            [warning] = [r for r in caplog.records if "without an alternate exchange" in r.getMessage()]
            command = warning.command
            assert command == alternate_exchange_policy(broker.names)
            async with running_consumer(settings, pool, broker):
                # Without the policy, the broker drops what no binding routes (the gap it closes).
                await broker.publish(usage(org.name, WHO["dropped"]), routing_key="events")
                await barrier(pool, broker, org)
                assert await broker.queue_depth(broker.names.dead) == 0
                # The command the warning names, as an operator would paste it (from "set_policy").
                pattern, definition = command.split("'")[1], command.split("'")[3]
                rabbitmqctl("set_policy", policy, pattern, definition, "--apply-to", "exchanges")
                await broker.publish(usage(org.name, WHO["caught"]), routing_key="events")
                [letter] = await broker.dead_letters(1)
                assert letter.headers[REASON_CODE_HEADER] == "unroutable"
                assert WHO["caught"] in letter.body.decode()
    finally:
        rabbitmqctl("clear_policy", policy)
        await connection.close()


# ---- publishers bound to organizations ------------------------------------------------------


@pytest.fixture
async def publisher_user(broker: Broker, ctl: None) -> AsyncIterator[tuple[str, str]]:
    """A RabbitMQ user that may only publish to this test's events exchange (deleted after)."""
    user, password = f"tally_test_pub_{uuid.uuid4().hex[:8]}", secrets.token_hex(12)
    rabbitmqctl("add_user", user, password)
    try:
        events = "^" + broker.names.events.replace(".", r"\.") + "$"
        rabbitmqctl("set_permissions", "-p", "/", user, "^$", events, "^$")
        yield user, f"amqp://{user}:{password}@127.0.0.1:5672/"
    finally:
        rabbitmqctl("delete_user", user)


async def publish_as(url: str, broker: Broker, event: dict[str, Any], user_id: str | None) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        # Publish only: this user may not declare (configure) anything.
        exchange = await channel.get_exchange(broker.names.events, ensure=False)
        await exchange.publish(aio_pika.Message(orjson.dumps(event), user_id=user_id), routing_key="usage.recorded")
    finally:
        await connection.close()


async def test_publishers_bound_to_organizations_write_only_theirs(
    settings: Settings,
    pool: asyncpg.Pool,
    broker: Broker,
    org: Org,
    other_org: Org,
    publisher_user: tuple[str, str],
) -> None:
    user, url = publisher_user
    before = dead_letters_total("forbidden_publisher")
    # The user is bound to org by name; the binding holds whichever name or id an event uses.
    binding = {user: [org.name]}
    async with running_consumer(settings, pool, broker, amqp_publishers=binding):
        await publish_as(url, broker, usage(org.name, WHO["by_name"]), user)
        await publish_as(url, broker, usage(str(org.id), WHO["by_id"]), user)
        await publish_as(url, broker, usage(other_org.name, WHO["not_mine"]), user)
        await publish_as(url, broker, usage(org.name, WHO["anonymous"]), None)  # who published it?
        # RabbitMQ refuses a user_id that is not the connection's user: the consumer can trust it.
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="user_id"):
            await publish_as(url, broker, usage(other_org.name, WHO["spoofed"]), "guest")
        # tally's own AMQP user (TALLY_AMQP_URL's) may write any organization, when it says so.
        # Published last: one consumer folds in delivery order, so once it is applied, all is done.
        own = usage(other_org.name, WHO["tallys_own"])
        await broker.topology.events.publish(
            aio_pika.Message(orjson.dumps(own), user_id="guest"), routing_key="usage.recorded"
        )

        async def own_applied() -> bool:
            return WHO["tallys_own"] in await customers(pool, other_org)

        await wait_until(own_applied, what="tally's own event applied")
        letters = await broker.dead_letters(2)
        assert await customers(pool, org) >= {WHO["by_name"], WHO["by_id"]}
        assert {WHO["not_mine"], WHO["spoofed"]}.isdisjoint(await customers(pool, other_org))
        assert WHO["anonymous"] not in await customers(pool, org)
        assert dead_letters_total("forbidden_publisher") - before == 2
        reasons = sorted(str(m.headers["x-tally-reason"]) for m in letters)
        assert all(m.headers[REASON_CODE_HEADER] == "forbidden_publisher" for m in letters)
        assert f"AMQP user '{user}' may not publish events for organization '{other_org.name}'" in reasons[0]
        assert "no user_id property" in reasons[1]
        # A replay re-publishes as tally's own user: a forbidden letter is replayed only on request.
        for m in letters:
            await broker.topology.dlx.publish(
                aio_pika.Message(m.body, headers=dict(m.headers), user_id=m.user_id), routing_key="usage.recorded"
            )
        await wait_until(lambda: _depth(broker, 2), what="the letters back in the dead-letter queue")
        async with DeadLetters(AMQP_URL, broker.names) as dlq:
            assert await dlq.replay() == (0, 2)
        await wait_until(lambda: _depth(broker, 2), what="the letters kept")
        async with DeadLetters(AMQP_URL, broker.names) as dlq:
            assert await dlq.replay(reason="forbidden_publisher") == (2, 0)

        async def replayed() -> bool:
            return WHO["not_mine"] in await customers(pool, other_org) and WHO["anonymous"] in await customers(
                pool, org
            )

        await wait_until(replayed, what="the forbidden letters applied once an operator replayed them")


async def test_without_a_binding_any_publisher_writes_any_organization(
    settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    async with running_consumer(settings, pool, broker):
        await broker.publish(usage(org.name, WHO["no_user_id"]))  # no user_id, no binding: applied
        await barrier(pool, broker, org)
    assert WHO["no_user_id"] in await customers(pool, org)


async def test_the_topology_is_declared_again_unchanged(broker: Broker) -> None:
    """A second declaration (every process declares on connect) is accepted as it is."""
    assert broker.connection is not None
    await declare(broker.connection, await broker.connection.channel(), broker.names)
