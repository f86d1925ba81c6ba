"""`tally dlq replay` takes each dead letter at most once per run and ends, even while the
consumer dead-letters every replayed event again (its cause not fixed yet)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from consumers.deadletters import DeadLetters
from service.infra import metrics
from service.infra.broker import ATTEMPT_HEADER
from service.infra.settings import Settings
from tests.consumerkit import barrier, running_consumer
from tests.eventkit import AMQP_URL, Broker, publish_all, usage, wait_until
from tests.factories import Org
from tests.processes import ROOT

LETTERS = 200
# Far more than a bounded run needs (about a second here); an unbounded one, taking back
# the copies the consumer keeps dead-lettering, never ends and fails on it.
RUN_TIMEOUT = 60.0


def _refused_again() -> float:
    return metrics.REGISTRY.get_sample_value("tally_dead_letters_total", {"reason": "unknown_organization"}) or 0.0


async def _letters(broker: Broker) -> list:
    """Every letter in the dead-letter queue (held until the session closes, then back)."""
    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        return [m async for m in dlq.messages()]


async def test_replay_takes_each_letter_once_and_ends_while_they_fail_again(
    settings: Settings, pool, broker: Broker, org: Org
) -> None:
    nowhere = f"not-created-{uuid.uuid4().hex[:8]}"  # every replay of these fails again
    events = [usage(nowhere, f"u{i}") for i in range(LETTERS)]
    ids = sorted(e["id"] for e in events)

    async def depth(n: int) -> bool:
        return await broker.queue_depth(broker.names.dead) == n

    async with running_consumer(settings, pool, broker):
        await publish_all(broker, [events[i : i + 20] for i in range(0, LETTERS, 20)])
        await wait_until(lambda: depth(LETTERS), what=f"{LETTERS} dead letters")
        before = _refused_again()

        async with DeadLetters(AMQP_URL, broker.names) as dlq:
            replayed, kept = await asyncio.wait_for(dlq.replay(), RUN_TIMEOUT)
        assert (replayed, kept) == (LETTERS, 0)
        # Once the consumer has taken everything replayed, each letter was refused exactly
        # once more: its copy is back in the queue, and no letter was replayed twice.
        await barrier(pool, broker, org)
        await wait_until(lambda: depth(LETTERS), what="the re-dead-lettered copies")
        assert _refused_again() - before == LETTERS
        letters = await _letters(broker)
        assert sorted(_event_id(m) for m in letters) == ids
        assert all(m.headers[ATTEMPT_HEADER] == 1 for m in letters)
        await wait_until(lambda: depth(LETTERS), what="listed letters back in the queue")

        # The CLI: progress while it runs, then the totals, and it ends.
        env = {**os.environ, "TALLY_AMQP_URL": AMQP_URL, "TALLY_AMQP_NAMESPACE": broker.names.namespace}
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "dlq",
            "replay",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(cli.communicate(), RUN_TIMEOUT)
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()
        stderr = err.decode()
        assert cli.returncode == 0, stderr
        assert "replayed 100" in stderr and f"replayed {LETTERS}, left 0" in stderr, stderr
        await barrier(pool, broker, org)
        await wait_until(lambda: depth(LETTERS), what="the copies of the CLI's replay")
        assert _refused_again() - before == 2 * LETTERS
    letters = await _letters(broker)
    assert Counter(_event_id(m) for m in letters) == Counter(ids)  # each once, no more

    # Purging takes the letters it counted when it began, each once, and ends.
    await wait_until(lambda: depth(LETTERS), what="letters back in the queue")
    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        purged, kept = await asyncio.wait_for(dlq.purge(), RUN_TIMEOUT)
    assert (purged, kept) == (LETTERS, 0)
    assert await broker.queue_depth(broker.names.dead) == 0


async def test_a_run_leaves_letters_that_arrive_after_it_began(broker: Broker, org: Org) -> None:
    """A run is bounded by the letters in the queue when it began: one that arrives while
    it runs is left for the next run (a purge does not delete what it never counted)."""
    assert broker.channel is not None
    dlx = await broker.channel.get_exchange(broker.names.dlx)
    events = [usage(org.name, f"late{i}") for i in range(4)]

    async def dead_letter(event: dict) -> None:
        await dlx.publish(
            aio_pika.Message(orjson.dumps(event), headers={"x-tally-reason": "test"}), routing_key="usage.recorded"
        )

    for event in events[:3]:
        await dead_letter(event)
    await wait_until(lambda: _is(broker.queue_depth(broker.names.dead), 3))
    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        taken = []
        async for message in dlq.messages():
            taken.append(message)
            if len(taken) == 1:
                await dead_letter(events[3])  # arrives mid-run, behind the three counted
                await wait_until(lambda: _is(broker.queue_depth(broker.names.dead), 3), what="the new letter queued")
        assert [_event_id(m) for m in taken] == [e["id"] for e in events[:3]]
        for message in taken:
            await message.ack()
    await wait_until(lambda: _is(broker.queue_depth(broker.names.dead), 1), what="the late letter left alone")
    assert [_event_id(m) for m in await _letters(broker)] == [events[3]["id"]]


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


def _event_id(message: AbstractIncomingMessage) -> str:
    return orjson.loads(message.body)["id"]
