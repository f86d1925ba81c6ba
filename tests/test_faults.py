"""Faults, Jepsen-style: a known history of events with expected sums, faults during the
run (process kills, crash loops, failpoints, broker and database restarts), then heal,
drain, and compare — nothing lost, nothing duplicated, nothing unexpected.

These tests stop and start the machine's own PostgreSQL and RabbitMQ, so they are marked
``faults`` and run by ``make test-faults`` (and CI), not by ``make test``. Every test that
stops a service starts it again in a ``finally``, whatever happens.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from consumers.deadletters import DeadLetters
from service.store.failpoints import EXIT_CODE
from tests.eventkit import (
    AMQP_URL,
    Broker,
    actual,
    applied,
    assert_totals,
    distinct,
    expected,
    hot_and_cold,
    in_messages,
    make_events,
    publish_all,
    wait_until,
)
from tests.factories import Org
from tests.processes import Fleet, free_port, terminate_all, wait_applied, wait_drained

pytestmark = pytest.mark.faults


# ---- service control --------------------------------------------------------------------


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=180)


def _pg_cluster() -> list[str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def postgres(action: str) -> None:
    _run(*_pg_cluster(), action, *(["-m", "fast"] if action in ("stop", "restart") else []))


def rabbitmq(action: str) -> None:
    _run("rabbitmqctl", f"{action}_app")
    if action == "start":
        _run("rabbitmqctl", "await_startup", "--timeout", "120")


@pytest.fixture
def restores_services() -> Iterator[None]:
    """Whatever a test does to the services, they are running when it ends."""
    try:
        yield
    finally:
        subprocess.run([*_pg_cluster(), "start"], capture_output=True, timeout=180)
        subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=180)
        subprocess.run(["rabbitmqctl", "await_startup", "--timeout", "120"], capture_output=True, timeout=180)


needs_services = pytest.mark.skipif(
    not (shutil.which("pg_ctlcluster") and shutil.which("rabbitmqctl")),
    reason="needs the machine's own PostgreSQL and RabbitMQ service commands",
)


# ---- 1. SIGKILL five times --------------------------------------------------------------


async def test_sigkill_five_times_while_50k_events_flow(
    pool, broker: Broker, fleet: Fleet, org: Org, other_org: Org
) -> None:
    rng = random.Random(11)
    orgs = [org, other_org]
    subjects, weights = hot_and_cold(orgs, hot=5, cold=200)
    events = make_events(rng, subjects, weights, 50_000)
    messages = in_messages(rng, events, single_share=0.2, batch=100)
    rng.shuffle(messages)
    consumer = fleet.start("c0")
    publishing = asyncio.create_task(publish_all(broker, messages))
    total = distinct(events)
    for kill in range(5):
        target = (kill + 1) * total // 6 + rng.randint(-total // 30, total // 30)
        await wait_applied(pool, orgs, target, fleet)
        consumer.kill()
        consumer = fleet.start(f"c{kill + 1}")
    await publishing
    await wait_applied(pool, orgs, total, fleet, timeout=180)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [o.name for o in orgs]))
    assert await applied(pool, orgs) == total
    await terminate_all(fleet, [consumer])


# ---- 4. failpoints: crash inside the transaction, crash between commit and ack ----------


@pytest.mark.parametrize("failpoint", ["fold.before_commit", "consumer.after_commit"])
async def test_crash_at_a_failpoint_then_recover_exactly_once(
    pool, broker: Broker, fleet: Fleet, org: Org, failpoint: str
) -> None:
    rng = random.Random(5)
    events = make_events(rng, [(org.name, f"f{i}") for i in range(20)], [1.0] * 20, 2_000)
    await publish_all(broker, in_messages(rng, events, single_share=0.5, batch=50))
    crashing = fleet.start("crashing", tally_failpoints=failpoint)
    await wait_until(lambda: _exited(crashing), timeout=60, what="the failpoint to crash the consumer")
    assert crashing.proc.returncode == EXIT_CODE, crashing.tail()
    committed = await applied(pool, [org])
    if failpoint == "fold.before_commit":
        assert committed == 0  # the transaction died with the process
    else:
        assert committed > 0  # committed, then died before the ack: redelivery must be absorbed
    healthy = fleet.start("healthy")
    await wait_applied(pool, [org], distinct(events), fleet)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [org.name]))
    await terminate_all(fleet, [healthy])


async def _exited(process) -> bool:
    return process.proc.poll() is not None


# ---- 5. a crash loop longer than the delivery limit -------------------------------------


async def test_crash_loop_beyond_the_delivery_limit_dead_letters_then_replays_exactly(
    pool, broker: Broker, fleet: Fleet, org: Org
) -> None:
    rng = random.Random(7)
    events = make_events(rng, [(org.name, f"l{i}") for i in range(10)], [1.0] * 10, 300)
    await publish_all(broker, in_messages(rng, events, single_share=0.0, batch=30))  # 10 messages
    # Each run takes messages in flight and dies before committing: every death returns
    # them to the queue with one more delivery; past the limit the broker dead-letters them.
    for run in range(25):
        # A dead consumer's messages go back to the queue, or past the limit to the dead
        # letters, a moment after it exits: start the next one only once they are somewhere
        # (one started on an empty queue would wait for a crash that never comes).
        await wait_until(lambda: _settled(broker), timeout=60, what="the messages requeued or dead-lettered")
        if await broker.queue_depth(broker.names.dead) >= 10:
            break
        crashing = fleet.start(
            f"loop{run}", tally_failpoints="fold.before_commit", tally_prefetch="10", tally_batch_size="1000"
        )
        await wait_until(lambda p=crashing: _exited(p), timeout=60, what="the crash")
    await wait_until(lambda: _depth(broker, broker.names.dead, 10), timeout=60, what="all ten messages dead-lettered")
    assert await applied(pool, [org]) == 0
    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        infos = await dlq.list()
    assert len(infos) == 10 and all(i.reason == "broker: delivery_limit" for i in infos), infos
    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        replayed, kept = await dlq.replay()
    assert (replayed, kept) == (10, 0)
    healthy = fleet.start("healthy")
    await wait_applied(pool, [org], distinct(events), fleet)
    assert_totals(expected(events), await actual(pool, [org.name]))
    await terminate_all(fleet, [healthy])


async def _settled(broker: Broker) -> bool:
    return await broker.queue_depth(broker.names.ingest) > 0 or await broker.queue_depth(broker.names.dead) >= 10


async def _depth(broker: Broker, queue: str, n: int) -> bool:
    return await broker.queue_depth(queue) == n


# ---- 6. publishers resending the same events as new messages later ----------------------


async def test_resent_events_minutes_later_are_duplicates(pool, broker: Broker, fleet: Fleet, org: Org) -> None:
    rng = random.Random(9)
    events = make_events(rng, [(org.name, f"r{i}") for i in range(30)], [1.0] * 30, 3_000)
    consumer = fleet.start("c")
    await publish_all(broker, in_messages(rng, events, single_share=0.3, batch=40))
    await wait_applied(pool, [org], distinct(events), fleet)
    # The dedupe window is days; "minutes later" is simply later, with the keys still held.
    resent = rng.sample(events, 1_000)
    await publish_all(broker, in_messages(rng, resent, single_share=0.5, batch=25))
    await wait_drained(broker, fleet)
    await wait_until(lambda: _no_unacked(broker), what="the resent messages consumed")
    assert_totals(expected(events), await actual(pool, [org.name]))
    await terminate_all(fleet, [consumer])


async def _no_unacked(broker: Broker) -> bool:
    return await broker.queue_depth(broker.names.ingest) == 0


# ---- 2. RabbitMQ restarted twice during consumption -------------------------------------


@needs_services
async def test_rabbitmq_restarted_twice_consumers_come_back(
    pool, broker: Broker, fleet: Fleet, org: Org, other_org: Org, restores_services: None
) -> None:
    rng = random.Random(13)
    orgs = [org, other_org]
    subjects, weights = hot_and_cold(orgs, hot=3, cold=100)
    events = make_events(rng, subjects, weights, 12_000)
    messages = in_messages(rng, events, single_share=0.2, batch=50)
    consumers = [fleet.start("a"), fleet.start("b")]
    third = len(messages) // 3
    for restart in range(2):
        await publish_all(broker, messages[restart * third : (restart + 1) * third])
        await wait_applied(pool, orgs, distinct(events[:1]), fleet)
        rabbitmq("stop")
        rabbitmq("start")
        # The test's own broker connection died with the node; reconnect it.
        await broker.__aenter__()
        try:
            await wait_until(lambda: _consumers(broker, 2), timeout=90, what="both consumers back on the queue")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.tails()}") from None
        assert all(c.alive() for c in consumers), fleet.tails()
    await publish_all(broker, messages[2 * third :])
    await wait_applied(pool, orgs, distinct(events), fleet, timeout=180)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [o.name for o in orgs]))
    await terminate_all(fleet, consumers)


async def _consumers(broker: Broker, n: int) -> bool:
    try:
        return await broker.consumer_count(broker.names.ingest) == n
    except Exception:  # the broker may still be starting; keep polling
        await broker.__aenter__()
        return False


# ---- 3. PostgreSQL restarted during consumption and API load ----------------------------


@needs_services
async def test_postgres_restarted_api_answers_503_and_consumer_loses_nothing(
    settings,
    pool,
    broker: Broker,
    fleet: Fleet,
    org: Org,
    http: aiohttp.ClientSession,
    restores_services: None,
    tmp_path: Path,
) -> None:
    rng = random.Random(17)
    events = make_events(rng, [(org.name, f"p{i}") for i in range(50)], [1.0] * 50, 8_000)
    messages = in_messages(rng, events, single_share=0.3, batch=40)
    consumer = fleet.start("c")
    port = free_port()
    api_log = (tmp_path / "api.log").open("wb")
    import os
    import sys

    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api"],
        stdout=api_log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "TALLY_DATABASE_URL": settings.database_url,
            "TALLY_HTTP_PORT": str(port),
            "TALLY_HTTP_HOST": "127.0.0.1",
            "TALLY_AMQP_NAMESPACE": broker.names.namespace,
            "TALLY_DB_COMMAND_TIMEOUT": "3",
            "TALLY_DB_CONNECT_TIMEOUT": "2",
        },
    )
    url = f"http://127.0.0.1:{port}/v1/customers"
    headers = org.headers()
    try:
        await wait_until(lambda: _status(http, url, headers, {200}), timeout=30, what="API up")
        await publish_all(broker, messages[: len(messages) // 2])
        await wait_applied(pool, [org], 1, fleet)
        postgres("stop")
        statuses = set()
        try:
            # While the database is down: 503 problem+json, quickly — never a hang, never a 500.
            for _ in range(10):
                async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    statuses.add(r.status)
                    assert r.status == 503, await r.text()
                    assert r.content_type == "application/problem+json"
                    assert "Retry-After" in r.headers
            await publish_all(broker, messages[len(messages) // 2 :])  # the broker still takes events
        finally:
            postgres("start")
        assert statuses == {503}
        # Both recover by themselves.
        await wait_until(lambda: _status(http, url, headers, {200}), timeout=60, what="API recovered")
        await pool.expire_connections()
        await wait_applied(pool, [org], distinct(events), fleet, timeout=120)
        await wait_drained(broker, fleet)
        assert consumer.alive(), consumer.tail()
        assert_totals(expected(events), await actual(pool, [org.name]))
    finally:
        api.terminate()
        api.wait(30)
        api_log.close()
    await terminate_all(fleet, [consumer])


async def _status(http: aiohttp.ClientSession, url: str, headers: dict[str, str], want: set[int]) -> bool:
    try:
        async with http.get(url, headers=headers) as r:
            return r.status in want
    except aiohttp.ClientError:
        return False
