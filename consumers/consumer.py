"""The ingest consumer: receive, batch, fold, dead-letter what can never apply, then ack.

The order of a batch's side effects is what makes it exactly-once in effect:

1. fold the batch's valid events in one database transaction (dedupe keys included);
2. publish the events that can never apply to the dead-letter exchange, with confirms;
3. ack the batch's messages.

A crash before 1 commits loses nothing (the messages come back). A crash between 1 and 3
redelivers messages whose events are now duplicates: the dedupe keys absorb them, and the
bad ones are dead-lettered again (a dead letter is at-least-once; a replay is deduped too).

Connection handling is explicit rather than aio-pika's robust reconnection: on any broker
failure the consumer drops its unacked messages (the broker redelivers them), reconnects
with backoff, redeclares the topology and consumes again. Readiness reports the state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import aio_pika
import aiormq
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from consumers.broker import Names, Topology, dead_letter_message, declare
from service import failpoints, metrics
from service.alerts import ALERT_ROUTING_KEY, relay_alerts
from service.events import Event, InvalidEvent, decode_body, validate_event
from service.customers import compact_counts
from service.fold import Outcome, Outcomes, fold, purge_processed
from service.settings import Settings

log = logging.getLogger("tally.consumer")

# Database errors worth retrying the whole batch for: the database is down, restarting,
# overloaded, or two transactions collided. Anything else is about the data in the batch.
TRANSIENT_DB_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,
)
# A lost broker connection surfaces as any of these, depending on where it is noticed
# (aiormq's ChannelInvalidStateError is a RuntimeError: a closed channel used mid-batch).
BROKER_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
RETRY_BASE = 0.1
RETRY_CAP = 5.0
RECONNECT_CAP = 10.0
PURGE_EVERY = 600.0
# The count deltas grow by about one row per batch that creates customers; compacting
# this often keeps a count read to a few hundred rows at most.
COMPACT_EVERY = 10.0
QUEUE_POLL_EVERY = 15.0
ALERT_RELAY_CHUNK = 100
# Alerts recorded by a consumer that crashed before relaying them are picked up this often.
ALERT_RELAY_EVERY = 5.0
# On SIGTERM, give a batch whose database is unreachable this long before leaving it unacked
# (the broker redelivers it to another consumer).
DRAIN_GRACE = 10.0


class Received:
    """A delivery. Its body is decoded when it is taken into a batch (not on arrival), so the
    prefetched backlog costs its raw bytes only, while batches are still bounded in events."""

    __slots__ = ("message", "_raws", "error")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.message = message
        self._raws: list[object] | None = None
        self.error: str | None = None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> "Received":
        return cls(message)

    @property
    def raws(self) -> list[object]:
        if self._raws is None:
            try:
                self._raws = decode_body(self.message.body)
            except InvalidEvent as exc:
                self._raws, self.error = [], exc.reason
        return self._raws

    @property
    def size(self) -> int:
        return max(1, len(self.raws))


class Inbox:
    """Deliveries waiting to be batched, in delivery order."""

    def __init__(self) -> None:
        self.items: deque[Received] = deque()
        self.arrived = asyncio.Event()

    def put(self, item: Received) -> None:
        self.items.append(item)
        self.arrived.set()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a delivery; True if one is there."""
        if self.items:
            return True
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return bool(self.items)


@dataclass
class DeadLetter:
    body: bytes
    reason: str
    routing_key: str
    content_type: str | None = "application/cloudevents+json"


def _backoff(attempt: int, cap: float) -> float:
    return min(cap, RETRY_BASE * 2**attempt) * (0.5 + random.random() / 2)


class Consumer:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.names = Names(settings.amqp_namespace)
        # How operators (and the management UI) tell this process's connection apart.
        self.connection_name = f"{self.names.namespace}-consumer-{os.getpid()}-{id(self):x}"
        self.retention = timedelta(days=settings.dedupe_retention_days)
        self.connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._last_purge = 0.0
        self._last_relay = 0.0
        self._last_compact = 0.0
        self._last_queue_poll = 0.0
        self._alerts_pending = False
        # Test hook: a callable run between commit and ack (a crash there must lose nothing).
        self.after_commit_hook = None

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`; reconnects after broker failures."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._session()
                attempt = 0
            except BROKER_ERRORS as exc:
                if self._stopping.is_set():
                    break
                delay = _backoff(attempt, RECONNECT_CAP)
                attempt += 1
                log.warning("broker connection lost; reconnecting", extra={"error": repr(exc), "in_s": round(delay, 2)})
                metrics.BROKER_RECONNECTS.inc()
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    async def stop(self) -> None:
        """Stop taking messages; the batch in hand is committed and acked first."""
        log.info("stopping: no new deliveries; finishing the batch in hand")
        self._stop_requested_at = time.monotonic()
        self._stopping.set()

    # ---- one connection --------------------------------------------------------------

    async def _session(self) -> None:
        connection = await aio_pika.connect(
            self.settings.amqp_url, timeout=10, client_properties={"connection_name": self.connection_name}
        )
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        inbox = Inbox()
        try:
            channel = await connection.channel(publisher_confirms=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            # Prefetch bounds memory and keeps a full next batch waiting while one is folded.
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            topology = await declare(channel, self.names)

            async def on_message(message: AbstractIncomingMessage) -> None:
                inbox.put(Received.of(message))
                metrics.IN_FLIGHT.inc()

            tag = await topology.ingest.consume(on_message, no_ack=False)
            self.connected.set()
            metrics.BROKER_CONNECTED.set(1)
            log.info("consuming", extra={"queue": self.names.ingest, "prefetch": self.settings.prefetch})
            while not self._stopping.is_set() and not lost.is_set():
                batch = await self._collect(inbox, lost)
                if batch:
                    await self._process(batch, topology)
                await self._maybe_purge()
                await self._maybe_poll_queues(channel)
            if lost.is_set():
                raise ConnectionError("broker connection closed")
            # Draining: no new deliveries, then fold what was already received.
            await topology.ingest.cancel(tag)
            rest = list(inbox.items)
            log.info("draining", extra={"messages": len(rest)})
            if rest:
                await self._process(rest, topology)
            log.info("drained; all received messages committed and acked")
        finally:
            self.connected.clear()
            metrics.BROKER_CONNECTED.set(0)
            metrics.IN_FLIGHT.set(0)
            if not connection.is_closed:
                await connection.close()

    async def _collect(self, inbox: Inbox, lost: asyncio.Event) -> list[Received]:
        """Deliveries holding up to batch_size events (at least one delivery): waits for the
        first, then at most batch_max_wait for more. Bounding by events, not messages,
        keeps one transaction's size the same whether upstreams send single or batch messages."""
        if not inbox.items:
            inbox.arrived.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (inbox.arrived, self._stopping, lost)]
            try:
                await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if not inbox.items:
                return []
        batch = [inbox.items.popleft()]
        size = batch[0].size
        deadline = time.monotonic() + self.settings.batch_max_wait
        while size < self.settings.batch_size and not self._stopping.is_set():
            if not inbox.items:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await inbox.wait(remaining):
                    break
                continue
            if size + inbox.items[0].size > self.settings.batch_size:
                break  # the next delivery opens the next batch
            batch.append(inbox.items.popleft())
            size += batch[-1].size
        return batch

    # ---- one batch -------------------------------------------------------------------

    async def _process(self, batch: Sequence[Received], topology: Topology) -> None:
        started = time.perf_counter()
        now = datetime.now(timezone.utc)
        events: list[Event] = []
        dead: list[DeadLetter] = []
        for item in batch:
            message, raws = item.message, item.raws
            routing_key = message.routing_key or ""
            if item.error is not None:
                dead.append(DeadLetter(message.body, item.error, routing_key, message.content_type))
                metrics.EVENTS.labels("unknown", "invalid").inc()
                continue
            for raw in raws:
                try:
                    events.append(validate_event(raw, now))
                except InvalidEvent as exc:
                    body = message.body if len(raws) == 1 else orjson.dumps(raw)
                    event_type = raw.get("type") if isinstance(raw, dict) else None
                    key = routing_key if len(raws) == 1 else str(event_type or routing_key)
                    dead.append(DeadLetter(body, exc.reason, key))
                    metrics.EVENTS.labels(str(event_type or "unknown")[:40], "invalid").inc()

        if events:
            outcomes = await self._fold(events)
            self._alerts_pending |= outcomes.alerts > 0
            applied_at = datetime.now(timezone.utc)
            for event, outcome in zip(events, outcomes):
                metrics.EVENTS.labels(event.type, outcome.status).inc()
                if outcome.status == "rejected":
                    dead.append(DeadLetter(orjson.dumps(event.raw), outcome.reason or "rejected", event.type))
                elif outcome.status == "applied":
                    metrics.EVENT_LAG.observe(max(0.0, (applied_at - event.time).total_seconds()))
            metrics.BATCH_SIZE.observe(len(events))
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        messages = [item.message for item in batch]
        failpoints.hit("consumer.after_commit")
        if self.after_commit_hook is not None:
            await self.after_commit_hook(messages)
        for letter in dead:
            await topology.dlx.publish(
                dead_letter_message(letter.body, letter.reason, letter.routing_key, letter.content_type),
                routing_key=letter.routing_key or "unrouted",
            )
            metrics.DEAD_LETTERS.labels(_reason_kind(letter.reason)).inc()
            log.warning("dead-lettered", extra={"reason": letter.reason, "routing_key": letter.routing_key})
        await self._ack(messages)
        if self._alerts_pending or time.monotonic() - self._last_relay > ALERT_RELAY_EVERY:
            await self._relay_alerts(topology)

    async def _relay_alerts(self, topology: Topology) -> None:
        """Publish budget alerts recorded by folds (this one's or a crashed consumer's)."""

        async def publish(event: dict) -> None:
            await topology.events.publish(
                aio_pika.Message(orjson.dumps(event), content_type="application/cloudevents+json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=event["id"]),
                routing_key=ALERT_ROUTING_KEY, mandatory=True,
            )  # fmt: skip

        self._last_relay = time.monotonic()
        try:
            while await relay_alerts(self.pool, publish, limit=ALERT_RELAY_CHUNK) == ALERT_RELAY_CHUNK:
                pass
            self._alerts_pending = False
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("alert relay deferred", extra={"error": repr(exc)})
        except asyncpg.PostgresError as exc:
            log.error("alert relay failed; alerts stay recorded and are retried", extra={"error": repr(exc)})

    async def _ack(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        # Deliveries arrive in tag order and a batch is a run of consecutive deliveries, so
        # one multiple-ack of the last tag covers it; if that ever did not hold, ack each.
        tags = [m.delivery_tag for m in batch]
        if tags == list(range(tags[0], tags[0] + len(tags))) and all(m.channel is batch[0].channel for m in batch):
            await batch[-1].ack(multiple=True)
        else:
            for message in batch:
                await message.ack()
        metrics.IN_FLIGHT.dec(len(batch))

    async def _fold(self, events: list[Event]) -> Outcomes:
        """Fold with retries on transient errors; isolate events the database refuses."""
        attempt = 0
        while True:
            try:
                async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                    return await fold(conn, events, retention=self.retention)
            except TRANSIENT_DB_ERRORS as exc:
                if self._stopping.is_set() and time.monotonic() - (self._stop_requested_at or 0) > DRAIN_GRACE:
                    raise ConnectionAbortedError("stopping with the database unreachable; batch left unacked") from exc
                delay = _backoff(attempt, RETRY_CAP)
                attempt += 1
                metrics.DB_RETRIES.inc()
                log.warning("database error; retrying batch", extra={"error": repr(exc), "in_s": round(delay, 2)})
                await asyncio.sleep(delay)
            except asyncpg.PostgresError as exc:
                # Not transient: some event in the batch makes the database refuse it. Split
                # until the offender stands alone, so the rest of the batch still applies.
                if len(events) == 1:
                    return Outcomes([Outcome("rejected", f"database refused the event: {type(exc).__name__}")])
                middle = len(events) // 2
                first, second = await self._fold(events[:middle]), await self._fold(events[middle:])
                both = Outcomes([*first, *second])
                both.alerts = first.alerts + second.alerts
                return both

    async def _maybe_poll_queues(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Export queue depths as metrics (every consumer does; they agree)."""
        if time.monotonic() - self._last_queue_poll < QUEUE_POLL_EVERY:
            return
        self._last_queue_poll = time.monotonic()
        for name in (self.names.ingest, self.names.dead):
            declared = await channel.declare_queue(name, passive=True)
            metrics.QUEUE_MESSAGES.labels(name).set(declared.declaration_result.message_count or 0)
            metrics.QUEUE_CONSUMERS.labels(name).set(declared.declaration_result.consumer_count or 0)

    async def _maybe_purge(self) -> None:
        """Housekeeping: compact the count deltas often, purge expired dedupe keys rarely."""
        if time.monotonic() - self._last_compact < COMPACT_EVERY:
            return
        self._last_compact = time.monotonic()
        try:
            async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                await compact_counts(conn)
                if time.monotonic() - self._last_purge < PURGE_EVERY:
                    return
                self._last_purge = time.monotonic()
                purged = await purge_processed(conn, self.retention)
            if purged:
                log.info("purged expired dedupe keys", extra={"count": purged})
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("housekeeping deferred", extra={"error": repr(exc)})
        except asyncpg.PostgresError as exc:
            # Housekeeping must never stop ingestion: report it loudly and carry on.
            log.error("housekeeping failed", extra={"error": repr(exc)})


def _reason_kind(reason: str) -> str:
    """A low-cardinality label for a dead-letter reason."""
    for prefix, kind in (
        ("unknown organization", "unknown_organization"),
        ("too old", "too_old"),
        ("event time", "future"),
        ("invalid field", "invalid_field"),
        ("body is not valid JSON", "not_json"),
        ("database refused", "database_refused"),
    ):
        if reason.startswith(prefix):
            return kind
    return "malformed"
