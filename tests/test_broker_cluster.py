"""A real three-node RabbitMQ cluster (deploy/local/rabbit-cluster.sh: tally1..3@localhost on
ports 5681-5683): tally's queues are quorum queues replicated on all three, and the node
leading ``tally.ingest`` is stopped in the middle of a stream of 24,000 events — every
aggregate exact afterwards, nothing lost or doubled, the consumers back within seconds.

Marked ``faults`` (three more RabbitMQ nodes on this machine, started and removed by the
module's fixture; the machine's own RabbitMQ on 5672 is never touched): run by ``make
test-faults`` and CI.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import aio_pika
import asyncpg
import orjson
import pytest

from service.infra.broker import BrokerNodes, Names, declare, delete_namespace, event_message
from service.infra.errors import Unavailable
from service.infra.publisher import Publisher
from service.infra.settings import Settings
from tests.eventkit import (
    actual,
    applied,
    assert_totals,
    distinct,
    expected,
    hot_and_cold,
    in_messages,
    make_events,
    wait_until,
)
from tests.factories import Org
from tests.processes import Fleet, terminate_all, wait_applied

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local" / "rabbit-cluster.sh"
URLS = ",".join(f"amqp://guest:guest@127.0.0.1:568{n}/" for n in (1, 2, 3))
NODES = [f"tally{n}@localhost" for n in (1, 2, 3)]


def cluster(*args: str, timeout: float = 600) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"rabbit-cluster.sh {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def queues() -> dict[str, dict]:
    return {q["name"]: q for q in json.loads(cluster("queues", timeout=60))}


async def queues_now() -> dict[str, dict]:
    """``queues()`` off the event loop: rabbitmqctl can take seconds while a node stops, and
    the consumers' and publishers' heartbeats in this process must not wait for it."""
    return await asyncio.to_thread(queues)


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[str]:
    """Three clustered RabbitMQ nodes for this module; stopped and removed afterwards, whatever happens."""
    try:
        cluster("up")
        yield URLS
    finally:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, timeout=300)


async def test_queues_are_quorum_queues_on_all_three_nodes(three_nodes: str) -> None:
    names = Names(f"tally_cluster_{uuid.uuid4().hex[:8]}")
    connection = await BrokerNodes(three_nodes).connect(timeout=10)
    try:
        await declare(connection, await connection.channel(), names)
        declared = queues()
        for name in (names.ingest, names.dead, names.alerts):
            q = declared[name]
            assert q["type"] == "quorum", q
            assert sorted(q["members"]) == NODES, q
    finally:
        await connection.close()
        await _delete(three_nodes, names)


async def test_the_leader_of_the_ingest_queue_stopped_mid_stream_loses_and_doubles_nothing(
    three_nodes: str, settings: Settings, pool: asyncpg.Pool, org: Org, other_org: Org, tmp_path: Path
) -> None:
    rng = random.Random(23)
    orgs = [org, other_org]
    subjects, weights = hot_and_cold(orgs, hot=5, cold=300)
    events = make_events(rng, subjects, weights, 24_000)
    messages = in_messages(rng, events, single_share=0.2, batch=50)
    rng.shuffle(messages)
    names = Names(f"tally_cluster_{uuid.uuid4().hex[:8]}")
    # The queues are declared from the first node, so it leads them (RabbitMQ places a quorum
    # queue's leader on the declaring client's node). Two of tally's own publishers (the API's)
    # share the stream: one on the first node, whose connection the stop cuts (it fails over
    # to another node), one on the second, whose channel outlives the stop and must go on
    # publishing to the queue's new leader.
    declaring = await BrokerNodes(three_nodes).connect(timeout=10)
    try:
        await declare(declaring, await declaring.channel(), names)
    finally:
        await declaring.close()
    urls = three_nodes.split(",")
    publishers = [Publisher(",".join(urls[k:] + urls[:k]), names) for k in (0, 1)]
    for publisher in publishers:
        await publisher.topology()
    fleet = Fleet(settings, SimpleNamespace(names=names), tmp_path)  # type: ignore[arg-type]
    retried, published = [0], [0]

    async def publish(publisher: Publisher, message: dict | list) -> None:
        body = orjson.dumps(message)
        deadline = time.monotonic() + 120
        while True:
            try:
                await publisher.publish(event_message(body, batch=isinstance(message, list)), "usage.recorded")
                published[0] += 1
                return
            except Unavailable as exc:
                # Not confirmed: published again (the broker may hold it already; the fold
                # dedupes by event id, so a resend never doubles).
                retried[0] += 1
                assert time.monotonic() < deadline, (
                    f"a message not confirmed by any node for 120 s; the last refusal, from "
                    f"{publisher.nodes.current}: {exc}; queue {(await queues_now()).get(names.ingest)}"
                )
                await asyncio.sleep(0.2)

    half = len(messages) // 2
    stopping = asyncio.Event()

    async def publish_all() -> None:
        # The first half, then (once the leader's stop has begun) the second half paced over
        # about ten seconds (8 workers, four on each publisher, ~250 messages/s): the stream is
        # flowing while the leader stops, whatever this machine's speed.
        async def send(part: list, pause: float) -> None:
            queue = list(reversed(part))

            async def worker(publisher: Publisher) -> None:
                while queue:
                    await publish(publisher, queue.pop())
                    await asyncio.sleep(pause)

            await asyncio.gather(*(worker(publishers[w % 2]) for w in range(8)))

        await send(messages[:half], 0.008)
        await stopping.wait()
        await send(messages[half:], 0.032)

    stopped: str | None = None
    publishing: asyncio.Task | None = None
    try:
        # One consumer per node (each lists its own node first), so the node that stops always
        # holds one of them: it must reconnect to another node.
        consumers = [fleet.start(f"c{i}", tally_amqp_url=",".join(urls[i:] + urls[:i])) for i in range(3)]
        publishing = asyncio.create_task(publish_all())
        total = distinct(events)
        await wait_until(lambda: _at_least(published, half), timeout=180, what="the first half published")
        await wait_applied(pool, orgs, total // 5, fleet, timeout=180)
        leader = (await queues_now())[names.ingest]["leader"]
        stopped = leader
        before = await applied(pool, orgs)
        t0 = time.monotonic()
        stopping.set()
        await asyncio.to_thread(cluster, "stop-node", leader.removeprefix("tally").split("@")[0])
        stop_took = time.monotonic() - t0

        async def consumers_back() -> bool:
            try:
                return (await queues_now())[names.ingest]["consumers"] == 3
            except (AssertionError, KeyError, ValueError, subprocess.TimeoutExpired):
                return False

        async def progress() -> bool:
            return await applied(pool, orgs) > before + 500

        async def reconnected() -> bool:  # the stopped node's consumer consumes again elsewhere
            return sum(e.get("message") == "consuming" for c in consumers for e in c.log_entries()) >= 4

        async def after_stop(condition, what: str, **kwargs) -> float:  # type: ignore[no-untyped-def]
            try:
                await wait_until(condition, timeout=120, what=what, **kwargs)
            except AssertionError as exc:
                state = await queues_now()
                raise AssertionError(
                    f"{exc}: applied {await applied(pool, orgs)} (before the stop {before}), published "
                    f"{published[0]}, retried {retried[0]}; queue {state.get(names.ingest)}\n{fleet.tails()}"
                ) from None
            return time.monotonic() - t0

        resumed = await after_stop(progress, "ingestion resumed after the leader stopped")
        reconnect = await after_stop(reconnected, "the stopped node's consumer consuming again")
        back = await after_stop(consumers_back, "three consumers on tally.ingest again", interval=0.2)
        new_leader = (await queues_now())[names.ingest]["leader"]
        await asyncio.wait_for(publishing, timeout=300)
        await wait_applied(pool, orgs, total, fleet, timeout=300)
        assert all(c.alive() for c in consumers), fleet.tails()
        assert_totals(expected(events), await actual(pool, [o.name for o in orgs]))
        assert await applied(pool, orgs) == total
        print(
            f"\nleader {leader} stopped (rabbitmqctl stop took {stop_took:.1f} s) after {before} of {total} events "
            f"applied; new leader {new_leader}; after the stop began: ingestion resumed {resumed:.1f} s, its "
            f"consumer consuming again from another node {reconnect:.1f} s, the queue reporting 3 consumers "
            f"{back:.1f} s; {len(messages)} messages ({total} events) sent, {retried[0]} "
            f"publishes retried; lost 0, doubled 0 (every aggregate exact)"
        )
        await terminate_all(fleet, consumers)
    finally:
        if publishing is not None:
            publishing.cancel()
        fleet.close()
        if stopped is not None:
            await asyncio.to_thread(cluster, "start-node", stopped.removeprefix("tally").split("@")[0])
        for publisher in publishers:
            await publisher.close()
        await _delete(three_nodes, names)


async def _at_least(counter: list[int], n: int) -> bool:
    return counter[0] >= n


async def _delete(urls: str, names: Names) -> None:
    connection = await BrokerNodes(urls).connect(timeout=10)
    try:
        await delete_namespace(connection, names)
    except aio_pika.exceptions.AMQPError:
        pass
    finally:
        await connection.close()
