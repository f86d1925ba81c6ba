"""RabbitMQ topology and publishing, shared by the consumer, the HTTP ingest route, the
dead-letter tools and ``tally demo``.

Topology (declared idempotently by whoever connects first)::

    exchange <ns>.events (topic) ──usage.# customer.# subscription.#──▶ quorum queue <ns>.ingest
    <ns>.ingest ──rejected / over delivery limit──▶ exchange <ns>.dlx (topic) ──#──▶ queue <ns>.dead
    exchange <ns>.events ──alert.#──▶ quorum queue <ns>.alerts (budget alerts for downstream services)

``<ns>`` is ``TALLY_AMQP_NAMESPACE`` (default ``tally``), so tests and several deployments
can share one broker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

log = logging.getLogger("tally.broker")

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
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
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


@dataclass(frozen=True)
class Topology:
    events: AbstractExchange
    dlx: AbstractExchange
    ingest: AbstractQueue
    dead: AbstractQueue


async def declare(channel: AbstractChannel, names: Names) -> Topology:
    """Declare exchanges, queues and bindings (idempotent: same arguments every time)."""
    events = await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)
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
    code (service.core.events.Rejection), ``reason`` its text."""
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
