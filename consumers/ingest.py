"""The ingest consumer: receive, batch, fold, dead-letter what can never apply, then ack.

The order of a batch's side effects is what makes it exactly-once in effect:

1. fold the batch's valid events in one database transaction (dedupe keys included);
2. publish the events that can never apply to the dead-letter exchange, with confirms;
3. ack the batch's messages.

A crash before 1 commits loses nothing (the messages come back). A crash between 1 and 3
redelivers messages whose events are now duplicates: the dedupe keys absorb them, and the
bad ones are dead-lettered again (a dead letter is at-least-once; a replay is deduped too).

Batches are pipelined: while batch N is folded (the consumer waiting on PostgreSQL), the
deliveries of batch N+1 are received, decoded and validated; N+1 is folded only once N is
committed, dead-lettered and acked, so acks stay in delivery order. A batch takes what
arrived while the previous one was folded, up to batch_size events, or up to
batch_max_events when a backlog is waiting (larger batches coalesce more events per
customer per transaction); with nothing in flight it closes batch_max_wait after its
first delivery, so a trickle is folded at once.

Connection handling is explicit rather than aio-pika's robust reconnection: on any broker
failure the consumer drops its unacked messages (the broker redelivers them), reconnects
with backoff, redeclares the topology and consumes again. Readiness reports the state.

What a batch holds, how its deliveries are decoded and validated, and how a dead letter is
made and published: consumers/batch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage

from consumers.batch import (
    Batch,
    DeadLetter,
    Delivery,
    Received,
    encode_event,
    event_ids,
    internal_error,
    publish_dead_letters,
)
from service.domain.events import Event, Rejection
from service.domain.publishers import PublisherBinding
from service.infra import metrics
from service.infra.broker import BrokerNodes, Names, Topology, amqp_user, broker_urls, declare
from service.infra.errors import is_transient
from service.infra.settings import Settings
from service.infra.waits import wait_event
from service.store import failpoints
from service.store.fold import FoldResult, Outcome, fold
from service.store.publishers import load_binding

log = logging.getLogger("tally.consumer")

RETRY_BASE = 0.1
RETRY_CAP = 5.0
RECONNECT_CAP = 10.0
# On SIGTERM, give a batch whose database is unreachable this long before leaving it unacked
# (the broker redelivers it to another consumer).
DRAIN_GRACE = 10.0
# asyncpg raises a plain InterfaceError both for a connection lost mid-query (transient) and
# for a statement tally built wrong (a bug: the server expects other arguments, say). After
# this many failed tries in a row while the database answers a probe, it is the batch that
# fails, not the database: the batch is split like a refused one rather than retried forever
# (a consumer stuck on one batch stops ingestion as surely as one that exits).
CLIENT_ERROR_TRIES = 3
PROBE_TIMEOUT = 2.0
# Seconds the consumer waits for the broker to close its connection once it has settled
# everything it received.
CLOSE_TIMEOUT = 5.0
# How often the consumer reads its queue's depth (a passive declare, on a channel of its own):
# how far behind the fold is, which the webhook dispatcher beside it yields to.
DEPTH_EVERY = 1.0
DEPTH_RETRY = 10.0


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
        await wait_event(self.arrived, timeout)
        return bool(self.items)


def _backoff(attempt: int, cap: float) -> float:
    return float(min(cap, RETRY_BASE * 2.0**attempt) * (0.5 + random.random() / 2))


class Consumer:
    """The ingest loop of one process: collect a batch, validate, fold, dead-letter what can
    never apply, ack. Nothing else runs on its timers (housekeeping is its own tasks:
    consumers/housekeeping.py), so no periodic job ever delays a batch."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.names = Names(settings.amqp_namespace)
        self.nodes = BrokerNodes(settings.amqp_url)  # one URL, or a cluster's nodes
        # How operators (and the management UI) tell this process's connection apart.
        self.connection_name = f"{self.names.namespace}-consumer-{os.getpid()}-{id(self):x}"
        self.retention = timedelta(days=settings.dedupe_retention_days)
        self.connected = asyncio.Event()
        self.sessions = 0  # connections on which consuming started
        self._stopping = asyncio.Event()
        self._stop_requested_at: float | None = None
        # Set when a batch recorded budget alerts, or when consuming (re)starts: the
        # housekeeping jobs that relay alerts and poll the queues act on it at once.
        self.alerts_recorded = asyncio.Event()
        # Set after each fold's commit: wakes this process's webhook dispatcher.
        self.committed = asyncio.Event()
        self.started_consuming = asyncio.Event()
        # Messages ready in the ingest queue (not yet handed to any consumer), as last read.
        self.waiting = 0
        # Loaded on first use when TALLY_AMQP_PUBLISHERS binds publishers to organizations.
        self.binding: PublisherBinding | None = None
        self.own_users = frozenset(amqp_user(url) for url in broker_urls(settings.amqp_url))

    @property
    def backlogged(self) -> bool:
        """Whether the fold is behind: more messages wait in its queue than its prefetch lets
        it hold (the prefetch window alone never filled on two cores: the broker, this loop
        and the database share them). The webhook dispatcher beside it yields meanwhile."""
        return self.waiting > self.settings.prefetch

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`; reconnects after broker failures."""
        attempt = 0
        sessions_seen = self.sessions
        while not self._stopping.is_set():
            try:
                await self._session()
                attempt = 0
            except Exception as exc:
                # A lost broker connection, wherever it is noticed (the database's failures
                # are retried where they happen and never reach here).
                if not is_transient(exc):
                    raise
                if self._stopping.is_set():
                    break
                if self.sessions != sessions_seen:  # that session had consumed: a new outage
                    sessions_seen = self.sessions
                    attempt = 0
                delay = _backoff(attempt, RECONNECT_CAP)
                attempt += 1
                # Said once per outage; the attempts that follow are debug lines (and the
                # nodes' own state changes are logged by BrokerNodes).
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                extra = {"error": repr(exc), "in_s": round(delay, 2)}
                log.log(level, "broker connection lost; reconnecting", extra=extra)
                self.nodes.lost()
                metrics.BROKER_RECONNECTS.inc()
                await wait_event(self._stopping, delay)

    async def stop(self) -> None:
        """Stop taking messages; the batch in hand is committed and acked first."""
        log.info("stopping: no new deliveries; finishing the batch in hand")
        self._stop_requested_at = time.monotonic()
        self._stopping.set()

    # ---- one connection --------------------------------------------------------------

    async def _session(self) -> None:
        connection = await self.nodes.connect(timeout=10, connection_name=self.connection_name)
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        inbox = Inbox()
        inflight: asyncio.Task[None] | None = None  # the batch being folded, dead-lettered, acked
        depth: asyncio.Task[None] | None = None
        try:
            channel = await connection.channel(publisher_confirms=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            # Prefetch bounds memory and keeps a full next batch waiting while one is folded.
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            topology = await declare(connection, channel, self.names)

            async def on_message(message: DeliveredMessage) -> None:
                inbox.put(Received.of(message))
                metrics.IN_FLIGHT.inc()

            # Consumed on aiormq's channel under aio-pika's (the same channel, its prefetch
            # and its close callbacks): deliveries as aiormq reads them (consumers/batch.py).
            underlay = await channel.get_underlay_channel()
            consuming = await underlay.basic_consume(self.names.ingest, on_message, no_ack=False)
            tag = consuming.consumer_tag or ""
            depth = asyncio.create_task(self._watch_depth(connection), name="tally-queue-depth")
            self.started_consuming.set()
            self.sessions += 1
            self.connected.set()
            metrics.BROKER_CONNECTED.set(1)
            log.info("consuming", extra={"queue": self.names.ingest, "prefetch": self.settings.prefetch})
            while not self._stopping.is_set() and not lost.is_set():
                batch = await self._collect(inbox, lost, inflight)
                if inflight is not None and (batch.items or inflight.done()):
                    # Batch N is committed and acked before N+1 starts: acks in delivery order.
                    await inflight
                    inflight = None
                if batch.items:
                    inflight = asyncio.create_task(self._process(batch, topology))
            if inflight is not None:
                await inflight
                inflight = None
            if lost.is_set():
                raise ConnectionError("broker connection closed")
            # Draining: no new deliveries, then fold what was already received.
            await underlay.basic_cancel(tag)
            rest = Batch()
            while inbox.items:
                rest.add(inbox.items.popleft())
            log.info("draining", extra={"messages": len(rest.items)})
            if rest.items:
                await self._process(rest, topology)
            log.info("drained; all received messages committed and acked")
        finally:
            if depth is not None:
                depth.cancel()
                await asyncio.gather(depth, return_exceptions=True)
            if inflight is not None and not inflight.done():
                # Leaving on a failure: the batch in flight is abandoned unacked (the broker
                # redelivers it; if its fold committed, the dedupe keys absorb it).
                inflight.cancel()
                await asyncio.gather(inflight, return_exceptions=True)
            self.connected.clear()
            metrics.BROKER_CONNECTED.set(0)
            metrics.IN_FLIGHT.set(0)
            if not connection.is_closed:
                # Bounded: everything received is settled by now (committed and acked, or left
                # for redelivery), and a close the broker does not answer must not hold up the
                # process's shutdown.
                try:
                    await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
                except Exception as exc:  # TimeoutError, or the connection failing as it closes
                    log.warning("the broker connection did not close cleanly", extra={"error": repr(exc)})

    async def _watch_depth(self, connection: AbstractConnection) -> None:
        """Read the ingest queue's ready messages every DEPTH_EVERY until cancelled. A passive
        declare that fails (or takes longer than PROBE_TIMEOUT) closes only its own channel:
        the depth reads as none until a new channel answers, tried every DEPTH_RETRY."""
        warned = False
        while True:
            try:
                channel = await asyncio.wait_for(connection.channel(), PROBE_TIMEOUT)
                try:
                    while True:
                        declare = channel.declare_queue(self.names.ingest, passive=True)
                        queue = await asyncio.wait_for(declare, PROBE_TIMEOUT)
                        self.waiting = queue.declaration_result.message_count or 0
                        await asyncio.sleep(DEPTH_EVERY)
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(channel.close(), PROBE_TIMEOUT)
            except asyncio.CancelledError:
                self.waiting = 0
                raise
            except Exception as exc:
                self.waiting = 0
                if not warned:  # once a session: the webhook dispatcher does not yield meanwhile
                    log.warning("the ingest queue's depth is unavailable", extra={"error": repr(exc)})
                    warned = True
                await asyncio.sleep(DEPTH_RETRY)

    async def _collect(self, inbox: Inbox, lost: asyncio.Event, inflight: asyncio.Task[None] | None) -> Batch:
        """The next batch, validated as it is taken (returned empty when no delivery came
        within a second, or the batch in flight finished first: the caller settles it).

        It takes every delivery already waiting, up to the largest batch; while a batch is in
        flight it also takes what arrives until that one finishes (nothing could be folded
        sooner); with none in flight, a batch smaller than batch_size waits batch_max_wait
        at most for more. So a trickle is folded at once, a backlog in large batches. Bounds
        count events, not messages: a transaction's size is the same whether upstreams send
        single or batch messages."""
        batch = Batch()
        largest = self.settings.largest_batch
        if not inbox.items:
            await _arrival(inbox, lost, self._stopping, inflight, timeout=1.0)
            if not inbox.items:
                return batch
        batch.add(inbox.items.popleft())
        deadline = time.monotonic() + self.settings.batch_max_wait
        while not self._stopping.is_set() and not lost.is_set():
            if inbox.items:
                if batch.size + inbox.items[0].size > largest:
                    break  # the next delivery opens the next batch
                batch.add(inbox.items.popleft())
            elif inflight is not None and not inflight.done():
                await _arrival(inbox, lost, self._stopping, inflight)
            elif batch.size >= self.settings.batch_size:
                break
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await inbox.wait(remaining):
                    break
        return batch

    # ---- one batch -------------------------------------------------------------------

    async def _process(self, batch: Batch, topology: Topology) -> None:
        started = time.perf_counter()
        if self.settings.amqp_publishers:
            await self._refuse_forbidden(batch)
        events, origins, dead = batch.events, batch.origins, batch.dead
        if events:
            result = await self._fold(events)
            self.committed.set()
            if result.alerts:
                self.alerts_recorded.set()
            applied_at = datetime.now(UTC)
            # Counted per (type, outcome) once per batch: a label lookup per event was measurable.
            counts: Counter[tuple[str, str]] = Counter()
            for event, (message, alone), outcome in zip(events, origins, result.outcomes, strict=True):
                counts[(event.type, outcome.status)] += 1
                # duplicate and stale (older than a deletion of its customer) are counted and
                # acked like applied ones: only a rejected event can never apply.
                if outcome.status == "rejected":
                    body = alone if alone is not None else encode_event(event.raw)
                    code, reason = outcome.code or Rejection.MALFORMED, outcome.reason or "rejected"
                    dead.append(DeadLetter(body, code, reason, message, **event_ids(event.raw)))
                elif outcome.status == "applied":
                    metrics.EVENT_LAG.observe(max(0.0, (applied_at - event.time).total_seconds()))
            for (event_type, status), n in counts.items():
                metrics.EVENTS.labels(metrics.event_type_label(event_type), status).inc(n)
            metrics.BATCH_SIZE.observe(len(events))
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        messages = [item.message for item in batch.items]
        await failpoints.hit("consumer.after_commit")
        await publish_dead_letters(topology, dead)
        await self._ack(messages)

    async def _refuse_forbidden(self, batch: Batch) -> None:
        """Take out of the batch, as dead letters, the events whose publisher (the message's
        user_id, which the broker validated) may not write their organization. The binding is
        loaded on first use, and again when an event looks forbidden: its organization may
        have been created since, and be named by the id of one the binding lists by name."""
        if self.binding is None:
            self.binding = await self._load_binding()

        def forbidden(binding: PublisherBinding) -> set[int]:
            pairs = zip(batch.events, batch.origins, strict=True)
            return {i for i, (e, (m, _)) in enumerate(pairs) if not binding.permits(m.user_id, e.organization)}

        refused = forbidden(self.binding)
        if refused:
            self.binding = await self._load_binding()
            refused = forbidden(self.binding)
        if not refused:
            return
        for i in sorted(refused):
            event, (message, alone) = batch.events[i], batch.origins[i]
            body = alone if alone is not None else encode_event(event.raw)
            reason = self.binding.refusal(message.user_id, event.organization)
            batch.dead.append(DeadLetter(body, Rejection.FORBIDDEN_PUBLISHER, reason, message, **event_ids(event.raw)))
            metrics.EVENTS.labels(metrics.event_type_label(event.type), "rejected").inc()
        batch.events = [e for i, e in enumerate(batch.events) if i not in refused]
        batch.origins = [o for i, o in enumerate(batch.origins) if i not in refused]

    async def _load_binding(self) -> PublisherBinding:
        """The publisher binding, resolved in the database (retried while it is unreachable:
        refusing events for want of it would dead-letter good ones)."""
        attempt = 0
        while True:
            try:
                async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                    return await load_binding(conn, self.settings.amqp_publishers, self.own_users)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self._stopping.is_set() and time.monotonic() - (self._stop_requested_at or 0) > DRAIN_GRACE:
                    raise ConnectionAbortedError("stopping with the database unreachable; batch left unacked") from exc
                delay = _backoff(attempt, RETRY_CAP)
                attempt += 1
                metrics.DB_RETRIES.inc()
                log.warning("database error loading the publisher binding; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)

    async def _ack(self, batch: Sequence[Delivery]) -> None:
        # Deliveries arrive in tag order and a batch is a run of consecutive deliveries, so
        # one multiple-ack of the last tag covers it; if that ever did not hold, ack each.
        tags = [m.delivery_tag for m in batch]
        first, last = tags[0], tags[-1]
        channel = batch[0].raw.channel
        consecutive = first is not None and tags == list(range(first, first + len(tags)))
        if consecutive and last is not None and all(m.raw.channel is channel for m in batch):
            await channel.basic_ack(last, multiple=True)
        else:
            for message in batch:
                if message.delivery_tag is not None:
                    await message.raw.channel.basic_ack(message.delivery_tag)
        metrics.IN_FLIGHT.dec(len(batch))

    async def _fold(self, events: list[Event]) -> FoldResult:
        """Fold with retries on transient errors; isolate events the database refuses, and
        events that bring out a bug in the fold, so one event can neither stop the batch nor
        make the consumer exit (and crash-loop the fleet on its redelivery)."""
        attempt = 0
        while True:
            try:
                async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                    return await fold(conn, events, retention=self.retention)
            except Exception as exc:
                if isinstance(exc, asyncpg.PostgresError) and not is_transient(exc):
                    # Some event in the batch makes the database refuse it.
                    return await self._isolate(
                        events, exc, Rejection.DATABASE_REFUSED, f"database refused the event: {type(exc).__name__}"
                    )
                if not is_transient(exc):
                    # Neither the database nor the broker failing: a bug, brought out by some
                    # event. Isolated the same way, dead-lettered with an internal-error reason
                    # and logged as a bug.
                    return await self._isolate(
                        events, exc, Rejection.INTERNAL_ERROR, internal_error("folding the event", exc), bug=True
                    )
                if self._stopping.is_set() and time.monotonic() - (self._stop_requested_at or 0) > DRAIN_GRACE:
                    raise ConnectionAbortedError("stopping with the database unreachable; batch left unacked") from exc
                if attempt + 1 >= CLIENT_ERROR_TRIES and _client_error(exc) and await self._database_answers():
                    return await self._isolate(
                        events, exc, Rejection.INTERNAL_ERROR, internal_error("folding the event", exc), bug=True
                    )
                delay = _backoff(attempt, RETRY_CAP)
                attempt += 1
                metrics.DB_RETRIES.inc()
                log.warning("database error; retrying batch", extra={"error": repr(exc), "in_s": round(delay, 2)})
                await asyncio.sleep(delay)

    async def _database_answers(self) -> bool:
        try:
            async with self.pool.acquire(timeout=PROBE_TIMEOUT) as conn:
                return bool(await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT) == 1)
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, asyncpg.PostgresError)):
                raise
            return False

    async def _isolate(
        self, events: list[Event], exc: Exception, code: Rejection, reason: str, *, bug: bool = False
    ) -> FoldResult:
        """Split the batch until the offender stands alone, so the rest still applies: each
        half is folded (and retried, or split again) on its own. A batch of n events with one
        offender costs about 2·log2(n) more folds."""
        if len(events) == 1:
            if bug:
                e = events[0]
                where = {"type": e.type, **event_ids(e.raw)}
                log.error("bug: folding an event raised; dead-lettering it", exc_info=exc, extra=where)
            return FoldResult([Outcome("rejected", code, reason)])
        middle = len(events) // 2
        first, second = await self._fold(events[:middle]), await self._fold(events[middle:])
        return FoldResult([*first.outcomes, *second.outcomes], first.alerts + second.alerts)


def _client_error(exc: BaseException) -> bool:
    """An asyncpg error raised on the client side that is not a lost connection."""
    if isinstance(exc, asyncpg.InternalClientError):
        return True
    return (
        isinstance(exc, asyncpg.InterfaceError)
        and not isinstance(exc, asyncpg.ConnectionDoesNotExistError)
        and "connection is closed" not in str(exc)
    )


async def _arrival(
    inbox: Inbox,
    lost: asyncio.Event,
    stopping: asyncio.Event,
    inflight: asyncio.Task[None] | None,
    timeout: float | None = None,
) -> None:
    """Wait for a delivery, the batch in flight to finish, the connection to go, a stop, or
    ``timeout``."""
    if inbox.items:
        return
    inbox.arrived.clear()
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in (inbox.arrived, lost, stopping)]
    watched: set[asyncio.Future[Any]] = set(waiters)
    if inflight is not None:
        watched.add(inflight)  # only watched: never cancelled here
    try:
        await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
