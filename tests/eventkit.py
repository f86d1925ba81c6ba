"""Helpers for event tests: a private broker namespace per test, event builders and event
streams, the expected aggregates computed independently of tally's fold, and condition waits
(no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import aio_pika
import asyncpg
import orjson

from service.domain.events import validate_event
from service.infra import broker as amqp
from service.infra.broker import Names
from service.store.fold import fold
from tests.factories import Org

AMQP_URL = os.environ.get("TALLY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def usage(
    org: str,
    subject: str,
    *,
    when: datetime | None = None,
    requests: int = 1,
    prompt: int = 10,
    completion: int = 5,
    cost: str = "0.0010",
    latency: float | None = 1.0,
    ttft: float | None = 0.5,
    source: str = "llm-gateway",
    event_id: str | None = None,
    environment: str = "prod",
) -> dict:
    data: dict = {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion, "cost": cost}
    if latency is not None:
        data["latency"] = latency
    if ttft is not None:
        data["ttft"] = ttft
    return {
        "specversion": "1.0",
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "source": source,
        "type": "usage.recorded",
        "time": (when or datetime.now(UTC)).isoformat(),
        "subject": subject,
        "organization": org,
        "environment": environment,
        "data": data,
    }


def cloud_event(
    org: str,
    subject: str,
    kind: str,
    data: dict | None,
    *,
    when: datetime | None = None,
    environment: str = "prod",
    source: str = "probe",
) -> dict:
    """Any event type, stamped ``when`` (default: now)."""
    return {
        "specversion": "1.0",
        "id": f"evt_{uuid.uuid4().hex}",
        "source": source,
        "type": kind,
        "time": (when or datetime.now(UTC)).isoformat(),
        "subject": subject,
        "organization": org,
        "environment": environment,
        "data": data,
    }


async def fold_events(conn: asyncpg.Connection, *raws: dict) -> list[str]:
    """Validate and fold ``raws`` in one batch, as the consumer would; their outcomes."""
    now = datetime.now(UTC)
    result = await fold(conn, [validate_event(r, now) for r in raws], retention=timedelta(days=35))
    return [o.status for o in result.outcomes]


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_sum: float = 0.0
    latency_count: int = 0
    first_seen: datetime | None = None
    last_active: datetime | None = None
    days: set[date] = field(default_factory=set)


def expected(events: Iterable[dict]) -> dict[tuple[str, str, str], Totals]:
    """Aggregates per (organization, environment, subject), each distinct event id once."""
    seen: set[tuple[str, str, str]] = set()
    out: dict[tuple[str, str, str], Totals] = defaultdict(Totals)
    for e in events:
        key = (e["organization"], e["source"], e["id"])
        if key in seen or e["type"] != "usage.recorded":
            continue
        seen.add(key)
        t = out[(e["organization"], e.get("environment", "prod"), e["subject"])]
        d = e["data"]
        when = datetime.fromisoformat(e["time"])
        t.requests += d.get("requests", 1)
        t.prompt_tokens += d.get("prompt_tokens", 0)
        t.completion_tokens += d.get("completion_tokens", 0)
        t.total_tokens += d.get("prompt_tokens", 0) + d.get("completion_tokens", 0)
        t.cost += Decimal(str(d.get("cost", "0")))
        if "latency" in d:
            t.latency_sum += d["latency"]
            t.latency_count += 1
        t.first_seen = when if t.first_seen is None else min(t.first_seen, when)
        t.last_active = when if t.last_active is None else max(t.last_active, when)
        t.days.add(when.astimezone(UTC).date())
    return out


SELECT_TOTALS = """
SELECT o.name AS organization, c.environment, c.customer_identifier, c.number_of_requests, c.prompt_tokens,
       c.completion_tokens, c.total_tokens, c.total_cost, c.latency_sum, c.latency_count, c.first_seen,
       c.last_active, c.active_days
FROM customer_rows c JOIN organizations o ON o.id = c.organization_id
WHERE o.name = ANY($1::text[])
"""


async def actual(pool: asyncpg.Pool, orgs: Iterable[str]) -> dict[tuple[str, str, str], Totals]:
    out: dict[tuple[str, str, str], Totals] = {}
    for r in await pool.fetch(SELECT_TOTALS, sorted(set(orgs))):
        out[(r["organization"], r["environment"], r["customer_identifier"])] = Totals(
            requests=r["number_of_requests"],
            prompt_tokens=r["prompt_tokens"],
            completion_tokens=r["completion_tokens"],
            total_tokens=r["total_tokens"],
            cost=r["total_cost"],
            latency_sum=r["latency_sum"],
            latency_count=r["latency_count"],
            first_seen=r["first_seen"],
            last_active=r["last_active"],
            days=set(range(r["active_days"])),  # compared by count below
        )
    return out


def assert_totals(want: dict[tuple[str, str, str], Totals], got: dict[tuple[str, str, str], Totals]) -> None:
    """Every customer's aggregates equal the independently computed sums: nothing lost,
    nothing counted twice, nothing unexpected."""
    assert set(got) == set(want), {"missing": set(want) - set(got), "unexpected": set(got) - set(want)}
    for key, w in want.items():
        g = got[key]
        assert (g.requests, g.prompt_tokens, g.completion_tokens, g.total_tokens, g.cost, g.latency_count) == (
            w.requests,
            w.prompt_tokens,
            w.completion_tokens,
            w.total_tokens,
            w.cost,
            w.latency_count,
        ), key
        assert abs(g.latency_sum - w.latency_sum) < 1e-6, key
        assert (g.first_seen, g.last_active) == (w.first_seen, w.last_active), key
        assert len(g.days) == len(w.days), key


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


class Broker:
    """A private namespace on the real RabbitMQ for one test; deleted afterwards."""

    def __init__(self) -> None:
        self.names = Names(f"tally_test_{uuid.uuid4().hex[:10]}")
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Broker:
        from service.infra.broker import declare

        self.connection = await aio_pika.connect(AMQP_URL)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.topology = await declare(self.connection, self.channel, self.names)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.connection is not None
        try:
            await amqp.delete_namespace(self.connection, self.names)
        finally:
            await self.connection.close()

    async def publish(self, events: list[dict] | dict | bytes, routing_key: str = "usage.recorded") -> None:
        if isinstance(events, bytes):
            body, content_type = events, "application/cloudevents+json"
        elif isinstance(events, list):
            body, content_type = orjson.dumps(events), "application/cloudevents-batch+json"
        else:
            body, content_type = orjson.dumps(events), "application/cloudevents+json"
        await self.topology.events.publish(
            aio_pika.Message(body, content_type=content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=routing_key,
        )

    async def queue_depth(self, name: str) -> int:
        assert self.channel is not None
        queue = await self.channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0

    async def consumer_count(self, name: str) -> int:
        assert self.channel is not None
        queue = await self.channel.declare_queue(name, passive=True)
        return queue.declaration_result.consumer_count or 0

    async def dead_letters(self, expect: int, timeout: float = 30.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take ``expect`` messages from the dead-letter queue (acking them)."""
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.names.dead, passive=True)
        out: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout
        while len(out) < expect:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"expected {expect} dead letters, got {len(out)}")
                await asyncio.sleep(0.05)
                continue
            out.append(message)
        return out


def days_ago(n: float, hour: int = 12, *, now: datetime | None = None) -> datetime:
    """``n`` days before today (the day of ``now``, by default the time now) at ``hour`` UTC,
    never later than a minute before ``now`` (an event in the future is refused, and tests
    run at any hour)."""
    now = now or datetime.now(UTC)
    base = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    return min(base - timedelta(days=n), now - timedelta(minutes=1))


async def delete_namespace(namespace: str) -> None:
    """Remove a test namespace's queues and exchanges from the broker (if declared), as
    ``tally namespace delete`` does."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await amqp.delete_namespace(connection, Names(namespace))
    finally:
        await connection.close()


# ---- event streams: many events over hot and cold customers, published concurrently ------


def recent(rng: random.Random, days: float = 20) -> datetime:
    """A time within the last ``days`` (never in the future, well inside the dedupe window)."""
    return datetime.now(UTC) - timedelta(seconds=rng.uniform(60, days * 86_400))


def make_events(rng: random.Random, subjects: list[tuple[str, str]], weights: list[float], n: int) -> list[dict]:
    """``n`` usage events over (organization, subject) pairs, one request each."""
    out = []
    for org, subject in rng.choices(subjects, weights, k=n):
        out.append(
            usage(
                org,
                subject,
                when=recent(rng),
                prompt=rng.randint(0, 500),
                completion=rng.randint(0, 500),
                cost=f"{rng.randint(0, 10**6) / 10**6:.6f}",
                latency=rng.choice([None, round(rng.uniform(0, 5), 3)]),
                ttft=rng.choice([None, round(rng.uniform(0, 1), 3)]),
            )
        )
    return out


def hot_and_cold(orgs: list[Org], hot: int, cold: int) -> tuple[list[tuple[str, str]], list[float]]:
    """``hot`` customers that get ~85% of the traffic, ``cold`` that share the rest."""
    hot_subjects = [(orgs[i % len(orgs)].name, f"hot{i}") for i in range(hot)]
    cold_subjects = [(orgs[i % len(orgs)].name, f"cold{i}") for i in range(cold)]
    return hot_subjects + cold_subjects, [0.85 / hot] * hot + [0.15 / cold] * cold


def in_messages(rng: random.Random, events: list[dict], single_share: float, batch: int) -> list[dict | list[dict]]:
    """Split events into single-event messages (about ``single_share`` of them) and batch
    messages of ``batch`` events."""
    singles = [e for e in events if rng.random() < single_share]
    single_ids = {id(e) for e in singles}
    rest = [e for e in events if id(e) not in single_ids]
    return [*singles, *(rest[i : i + batch] for i in range(0, len(rest), batch))]


async def publish_all(broker: Broker, messages: list, concurrency: int = 64) -> None:
    """Publish every message with confirms, several in flight at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(message: object) -> None:
        async with gate:
            await broker.publish(message)

    await asyncio.gather(*(one(m) for m in messages))


async def applied(pool: asyncpg.Pool, orgs: list[Org]) -> int:
    """Events applied so far for these organizations (their dedupe keys)."""
    return await pool.fetchval(
        "SELECT count(*) FROM processed_events WHERE organization_id = ANY($1::uuid[])", [o.id for o in orgs]
    )


def distinct(events: list[dict]) -> int:
    return len({(e["organization"], e["source"], e["id"]) for e in events})
