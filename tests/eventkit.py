"""Helpers for event tests: a private broker namespace per test, event builders, the
expected aggregates computed independently of tally's fold, and condition waits."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import aio_pika
import asyncpg
import orjson

from service.infra.broker import Names

AMQP_URL = os.environ.get("TALLY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def usage(
    org: str, subject: str, *, when: datetime | None = None, requests: int = 1, prompt: int = 10,
    completion: int = 5, cost: str = "0.0010", latency: float | None = 1.0, ttft: float | None = 0.5,
    source: str = "llm-gateway", event_id: str | None = None, environment: str = "prod",
) -> dict:  # fmt: skip
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
        "time": (when or datetime.now(timezone.utc)).isoformat(),
        "subject": subject,
        "organization": org,
        "environment": environment,
        "data": data,
    }


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
        t.days.add(when.astimezone(timezone.utc).date())
    return out


SELECT_TOTALS = """
SELECT o.name AS organization, c.environment, c.customer_identifier, c.number_of_requests, c.prompt_tokens,
       c.completion_tokens, c.total_tokens, c.total_cost, c.latency_sum, c.latency_count, c.first_seen,
       c.last_active, c.active_days
FROM customers c JOIN organizations o ON o.id = c.organization_id
WHERE o.name = ANY($1::text[])
"""


async def actual(pool: asyncpg.Pool, orgs: Iterable[str]) -> dict[tuple[str, str, str], Totals]:
    out: dict[tuple[str, str, str], Totals] = {}
    for r in await pool.fetch(SELECT_TOTALS, sorted(set(orgs))):
        out[(r["organization"], r["environment"], r["customer_identifier"])] = Totals(
            requests=r["number_of_requests"], prompt_tokens=r["prompt_tokens"],
            completion_tokens=r["completion_tokens"], total_tokens=r["total_tokens"], cost=r["total_cost"],
            latency_sum=r["latency_sum"], latency_count=r["latency_count"], first_seen=r["first_seen"],
            last_active=r["last_active"], days=set(range(r["active_days"])),  # compared by count below
        )  # fmt: skip
    return out


def assert_totals(want: dict[tuple[str, str, str], Totals], got: dict[tuple[str, str, str], Totals]) -> None:
    """Every customer's aggregates equal the independently computed sums: nothing lost,
    nothing counted twice, nothing unexpected."""
    assert set(got) == set(want), {"missing": set(want) - set(got), "unexpected": set(got) - set(want)}
    for key, w in want.items():
        g = got[key]
        assert (g.requests, g.prompt_tokens, g.completion_tokens, g.total_tokens, g.cost, g.latency_count) == (
            w.requests, w.prompt_tokens, w.completion_tokens, w.total_tokens, w.cost, w.latency_count,
        ), key  # fmt: skip
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

    async def __aenter__(self) -> "Broker":
        from service.infra.broker import declare

        self.connection = await aio_pika.connect(AMQP_URL)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.topology = await declare(self.channel, self.names)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.connection is not None
        try:
            channel = await self.connection.channel()
            for queue in (self.names.ingest, self.names.dead, self.names.alerts):
                await channel.queue_delete(queue)
            for exchange in (self.names.events, self.names.dlx):
                await channel.exchange_delete(exchange)
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


def days_ago(n: float, hour: int = 12) -> datetime:
    """``n`` days before today at ``hour`` UTC, never later than a minute ago (an event in
    the future is refused, and tests run at any hour)."""
    now = datetime.now(timezone.utc)
    base = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    return min(base - timedelta(days=n), now - timedelta(minutes=1))
