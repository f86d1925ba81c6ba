"""RabbitMQ topology and publishing, shared by the consumer, the HTTP ingest route, the
dead-letter tools and ``tally demo``.

Topology (declared idempotently by whoever connects first)::

    exchange <ns>.events (topic) ──usage.# customer.# subscription.#──▶ quorum queue <ns>.ingest
    exchange <ns>.events ──alert.#──▶ quorum queue <ns>.alerts (budget alerts for downstream services)
    exchange <ns>.events ──any other routing key──▶ alternate exchange <ns>.unroutable (fanout) ──▶ <ns>.ingest
    <ns>.ingest ──rejected / over delivery limit──▶ exchange <ns>.dlx (topic) ──#──▶ queue <ns>.dead

So every message that reaches ``<ns>.events`` lands in a queue: without the alternate
exchange, the broker confirms a message no binding matches and drops it. The consumer
dead-letters what came through the alternate exchange (its routing key matches none of
BINDINGS) with the reason ``unroutable``.

``<ns>`` is ``TALLY_AMQP_NAMESPACE`` (default ``tally``), so tests and several deployments
can share one broker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from service.infra.errors import is_transient

log = logging.getLogger("tally.broker")

# The routing keys the ingest queue is bound to: an event's type is one of them
# (usage.recorded, customer.upserted, customer.deleted, subscription.upserted).
BINDINGS = ("usage.#", "customer.#", "subscription.#")
# A message redelivered this many times (a consumer crashing on it over and over) is
# dead-lettered by the broker itself rather than crash-looping the fleet forever.
DELIVERY_LIMIT = 20

ALERTS_MAX_LENGTH = 100_000

REASON_HEADER = "x-tally-reason"
REASON_CODE_HEADER = "x-tally-reason-code"
ROUTING_KEY_HEADER = "x-tally-routing-key"
DEATH_TIME_HEADER = "x-tally-dead-at"
# The delivery on which the consumer dead-lettered the message: 1 unless the broker had
# delivered it before (a consumer died or lost its connection holding it). Poison is
# refused on its first delivery, so anything else here means a consumer crashed on it.
ATTEMPT_HEADER = "x-tally-attempt"
# The header RabbitMQ's quorum queues put on a redelivered message: earlier failed deliveries.
DELIVERY_COUNT_HEADER = "x-delivery-count"
# Dead-letter reasons are truncated to this many characters: they quote field names and
# organizations taken from the event, which may be of any length.
MAX_REASON_CHARS = 1000


def routable(routing_key: str) -> bool:
    """Whether ``routing_key`` matches one of BINDINGS (each ``<word>.#``, which matches the
    word alone or followed by more words): a message published to the events exchange with
    any other key reaches the ingest queue only through the alternate exchange."""
    first = routing_key.split(".", 1)[0]
    return any(first == binding.removesuffix(".#") for binding in BINDINGS)


def amqp_user(url: str) -> str:
    """The user a connection to ``url`` authenticates as (aiormq's default, guest, when the
    URL names none): the ``user_id`` RabbitMQ lets that connection put on its messages."""
    from urllib.parse import unquote, urlsplit

    username = urlsplit(url).username
    return unquote(username) if username else "guest"


def broker_urls(amqp_url: str) -> list[str]:
    """``TALLY_AMQP_URL`` as a list of nodes: one URL, or several separated by commas (the
    nodes of a RabbitMQ cluster, each with its credentials and virtual host)."""
    urls = [url.strip() for url in amqp_url.split(",") if url.strip()]
    if not urls:
        raise ValueError("TALLY_AMQP_URL names no broker")
    return urls


class _TransportErrors(logging.Filter):
    """aiormq logs every failed connection attempt at ERROR ("error when creating
    transport"), before the caller has even seen the exception: a cluster node that is down
    by design would write an ERROR on every reconnect. :class:`BrokerNodes` says when a node
    becomes unreachable and when it is back, once each; aiormq's line goes to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "creating transport" in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_AIORMQ_CONNECTION = logging.getLogger("aiormq.connection")
if not any(isinstance(f, _TransportErrors) for f in _AIORMQ_CONNECTION.filters):
    _AIORMQ_CONNECTION.addFilter(_TransportErrors())


class BrokerNodes:
    """The nodes of ``TALLY_AMQP_URL``, connected to in turn: from the last node that worked,
    and past a node that refuses or times out to the next. After a lost connection,
    :meth:`lost` starts the next attempt at the following node, so a client whose node
    stopped moves to another at once instead of first waiting on the one that went away.
    A node's reachability is logged when it changes (a warning when it stops answering, a
    line when it answers again), not on every attempt."""

    def __init__(self, amqp_url: str) -> None:
        self.urls = broker_urls(amqp_url)
        # The first node listed first: to spread a fleet over the cluster, list the nodes in a
        # different order for each replica (or put a TCP load balancer in front of them).
        self._next = 0
        self.current: str | None = None
        self._unreachable: set[str] = set()

    async def connect(self, *, timeout: float, connection_name: str | None = None) -> AbstractConnection:
        last: BaseException | None = None
        for i in range(len(self.urls)):
            k = (self._next + i) % len(self.urls)
            try:
                connection = await aio_pika.connect(
                    self.urls[k],
                    timeout=timeout,
                    client_properties={"connection_name": connection_name} if connection_name else None,
                )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                last = exc
                if self.urls[k] not in self._unreachable:
                    self._unreachable.add(self.urls[k])
                    others = "; trying the next" if len(self.urls) > 1 else ""
                    log.warning(
                        f"broker node unreachable{others}", extra={"node": _host(self.urls[k]), "error": repr(exc)}
                    )
                continue
            if self.urls[k] in self._unreachable:
                self._unreachable.discard(self.urls[k])
                log.info("broker node reachable again", extra={"node": _host(self.urls[k])})
            self._next, self.current = k, self.urls[k]
            return connection
        assert last is not None
        raise last

    def lost(self) -> None:
        self._next = (self._next + 1) % len(self.urls)

    @property
    def user(self) -> str | None:
        """The AMQP user of the node last connected to (None before any connection)."""
        return amqp_user(self.current) if self.current else None


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}"


@dataclass(frozen=True)
class Names:
    namespace: str = "tally"

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def ingest(self) -> str:
        return f"{self.namespace}.ingest"

    @property
    def dlx(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def alerts(self) -> str:
        return f"{self.namespace}.alerts"

    @property
    def unroutable(self) -> str:
        return f"{self.namespace}.unroutable"

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue of the namespace."""
        return (self.ingest, self.dead, self.alerts)

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange of the namespace."""
        return (self.events, self.dlx, self.unroutable)


@dataclass(frozen=True)
class Topology:
    events: AbstractExchange
    dlx: AbstractExchange
    ingest: AbstractQueue
    dead: AbstractQueue


def alternate_exchange_policy(names: Names) -> str:
    """The rabbitmqctl command that gives an existing events exchange its alternate exchange."""
    pattern = "^" + re.escape(names.events) + "$"
    definition = '{"alternate-exchange": "' + names.unroutable + '"}'
    return f"rabbitmqctl set_policy {names.namespace}-unroutable '{pattern}' '{definition}' --apply-to exchanges"


async def _declare_events(connection: AbstractConnection, channel: AbstractChannel, names: Names) -> AbstractExchange:
    """The events exchange, with the alternate exchange as a declaration argument: it works
    from any AMQP client, with no management plugin or rabbitmqctl access (a policy, RabbitMQ's
    recommended way, needs one of them). But RabbitMQ refuses to redeclare an exchange with
    other arguments (PRECONDITION_FAILED, and the channel closes), so an exchange declared by a
    tally from before the alternate exchange is probed on a channel of its own first and, if
    refused, declared as it is, with a warning naming the policy that attaches the alternate
    exchange to it in place (no redeclaration, no downtime, bindings kept)."""
    arguments: dict[str, Any] | None = {"alternate-exchange": names.unroutable}
    probe = await connection.channel(publisher_confirms=False)
    try:
        await probe.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed:
        arguments = None
        log.warning(
            "the events exchange was declared without an alternate exchange (by an earlier tally): unless a "
            "policy gives it one, the broker drops messages no binding routes; attach it in place with the policy",
            extra={"exchange": names.events, "command": alternate_exchange_policy(names)},
        )
    finally:
        if not probe.is_closed:
            await probe.close()
    return await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True, arguments=arguments)


async def delete_namespace(connection: AbstractConnection, names: Names) -> None:
    """Delete a namespace's queues, then its exchanges; the messages in them are lost (``tally
    namespace delete``, and every test's private namespace). Each on a channel of its own: a
    refused deletion closes its channel, not the next one's."""
    for queue in names.queues:
        async with connection.channel() as channel:
            await channel.queue_delete(queue)
    for exchange in names.exchanges:
        async with connection.channel() as channel:
            await channel.exchange_delete(exchange)


async def declare(connection: AbstractConnection, channel: AbstractChannel, names: Names) -> Topology:
    """Declare exchanges, queues and bindings on ``channel`` (idempotent: same arguments every
    time; ``connection``, the channel's, serves the events exchange's probe)."""
    # The alternate exchange is internal (no client publishes to it), and is declared before
    # the events exchange that names it: RabbitMQ drops what it would route to a missing one.
    unroutable = await channel.declare_exchange(
        names.unroutable, aio_pika.ExchangeType.FANOUT, durable=True, internal=True
    )
    events = await _declare_events(connection, channel, names)
    dlx = await channel.declare_exchange(names.dlx, aio_pika.ExchangeType.TOPIC, durable=True)
    dead = await channel.declare_queue(names.dead, durable=True, arguments={"x-queue-type": "quorum"})
    await dead.bind(dlx, "#")
    ingest = await channel.declare_queue(
        names.ingest,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": names.dlx,
            # at-least-once dead-lettering (RabbitMQ >= 3.10) requires reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )
    for key in BINDINGS:
        await ingest.bind(events, key)
    await ingest.bind(unroutable, "")
    # Budget alerts are for downstream services, not for tally: kept here until they consume
    # them (bounded, oldest dropped first, so an unread queue cannot grow without limit).
    alerts = await channel.declare_queue(
        names.alerts,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": ALERTS_MAX_LENGTH, "x-overflow": "drop-head"},
    )
    await alerts.bind(events, "alert.#")
    return Topology(events, dlx, ingest, dead)


def event_message(body: bytes, *, batch: bool, message_id: str | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/cloudevents-batch+json" if batch else "application/cloudevents+json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
    )


def dead_letter_message(
    body: bytes,
    code: str,
    reason: str,
    routing_key: str,
    content_type: str | None,
    *,
    message_id: str | None = None,
    attempt: int = 1,
) -> aio_pika.Message:
    """A dead letter: the message (or one event of a batch) with why it died. It keeps the
    original message's id, so the letters of one message can be found together, and
    ``routing_key`` must be the original message's (the broker accepted it, so it is a valid
    routing key), which replay publishes it with again. ``code`` is the reason's closed-set
    code (service.domain.events.Rejection), ``reason`` its text."""
    return aio_pika.Message(
        body,
        content_type=content_type or "application/cloudevents+json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers={
            REASON_HEADER: reason[:MAX_REASON_CHARS],
            REASON_CODE_HEADER: code,
            ROUTING_KEY_HEADER: routing_key,
            DEATH_TIME_HEADER: datetime.now(UTC).isoformat(),
            ATTEMPT_HEADER: attempt,
        },
    )


def delivery_attempt(headers: Mapping[str, object] | None, redelivered: bool | None) -> int:
    """Which delivery of a message this is (1 = the first), from the broker's own account."""
    count = (headers or {}).get(DELIVERY_COUNT_HEADER)
    earlier = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0
    return 1 + max(earlier, 1 if redelivered else 0)


def encode_events(events: Sequence[object]) -> bytes:
    return orjson.dumps(events if len(events) != 1 else events[0])
