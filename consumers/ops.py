"""Operator tooling over the broker: queue statistics and dead-letter list, replay, purge.

Queue statistics come from the RabbitMQ management API when it is reachable (ready,
unacknowledged, consumers, publish and deliver rates) and degrade to what AMQP alone can
tell (ready and consumers) when it is not.

Dead-letter tools read ``<ns>.dead`` with basic.get and *hold* every message unacked until
they are done: a replayed or purged message is acked only after its fate is settled (a
replay is acked after the broker confirmed the re-publish), and everything else goes back
to the queue when the tool's channel closes — also when the tool is interrupted. Nothing is
lost; at worst a message interrupted between its re-publish and its ack is replayed twice,
which the consumer's dedupe absorbs.

Each run (a list, a replay, a purge) takes at most the letters that were in the queue when
it began, and each of them once, so it always ends: a letter the consumer dead-letters
again during a replay (its cause is not fixed yet) is a new message at the queue's tail,
left for the next run rather than replayed again and again by this one.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage

from consumers.broker import DEATH_TIME_HEADER, REASON_HEADER, ROUTING_KEY_HEADER, Names

MANAGEMENT_TIMEOUT = 3.0


@dataclass
class QueueStats:
    name: str
    ready: int
    unacknowledged: int | None
    consumers: int
    publish_rate: float | None
    deliver_rate: float | None
    source: str  # "management" or "amqp"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _vhost(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def _management_stats(management_url: str, vhost: str, queue: str) -> QueueStats:
    parts = urlsplit(management_url)
    credentials = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
    url = f"{base}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    timeout = aiohttp.ClientTimeout(total=MANAGEMENT_TIMEOUT)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        data = await response.json()
    stats = data.get("message_stats") or {}
    return QueueStats(
        name=queue,
        ready=int(data.get("messages_ready", 0)),
        unacknowledged=int(data.get("messages_unacknowledged", 0)),
        consumers=int(data.get("consumers", 0)),
        publish_rate=float((stats.get("publish_details") or {}).get("rate", 0.0)),
        deliver_rate=float((stats.get("deliver_get_details") or {}).get("rate", 0.0)),
        source="management",
    )


async def queue_stats(amqp_url: str, management_url: str | None, names: Names) -> list[QueueStats]:
    """Statistics of the ingest and dead-letter queues."""
    queues = (names.ingest, names.dead)
    if management_url:
        try:
            return [await _management_stats(management_url, _vhost(amqp_url), q) for q in queues]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            pass  # degrade to AMQP
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        out = []
        for queue in queues:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                result = declared.declaration_result
                out.append(QueueStats(queue, result.message_count or 0, None, result.consumer_count or 0,
                                      None, None, "amqp"))  # fmt: skip
            except aio_pika.exceptions.ChannelClosed:  # not declared yet: nothing in it
                out.append(QueueStats(queue, 0, None, 0, None, None, "amqp"))
        return out
    finally:
        await connection.close()


@dataclass
class DeadLetterInfo:
    reason: str
    event_type: str | None
    event_id: str | None
    organization: str | None
    first_death: str | None
    routing_key: str
    events: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def describe(message: AbstractIncomingMessage) -> DeadLetterInfo:
    """What a dead letter is and why it died: tally's own headers when the consumer
    dead-lettered it, the broker's x-death record when the broker did (delivery limit)."""
    deaths = (message.headers or {}).get("x-death") or []
    death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    reason = _header(message, REASON_HEADER) or f"broker: {death.get('reason', 'unknown')}"
    routing_key = _header(message, ROUTING_KEY_HEADER)
    if routing_key is None:
        keys = death.get("routing-keys") or [message.routing_key or ""]
        routing_key = keys[0].decode() if isinstance(keys[0], bytes) else str(keys[0])
    first = _header(message, DEATH_TIME_HEADER)
    if first is None and isinstance(death.get("time"), datetime):
        first = death["time"].isoformat()
    event_type = event_id = organization = None
    events = 0
    try:
        decoded = orjson.loads(message.body)
        items = decoded if isinstance(decoded, list) else [decoded]
        events = len(items)
        if items and isinstance(items[0], dict):
            event_type, event_id, organization = (_shown(items[0].get(k)) for k in ("type", "id", "organization"))
    except orjson.JSONDecodeError:
        pass
    return DeadLetterInfo(reason, event_type, event_id, organization, first, routing_key, events)


# A dead letter holds whatever was refused: a field shown in a listing is cut to this many
# characters, and a nested value is named, not rendered (str() of a value nested 1,000
# levels deep would exhaust the stack).
SHOWN_CHARS = 200


def _shown(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return f"<{'object' if isinstance(value, dict) else 'array'}>"
    return str(value)[:SHOWN_CHARS]


def _matches(info: DeadLetterInfo, reason: str | None) -> bool:
    return reason is None or reason.lower() in info.reason.lower()


class DeadLetters:
    """A session over the dead-letter queue; messages taken stay unacked until settled."""

    def __init__(self, amqp_url: str, names: Names) -> None:
        self.amqp_url = amqp_url
        self.names = names

    async def __aenter__(self) -> "DeadLetters":
        self.connection = await aio_pika.connect(self.amqp_url, timeout=10)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.queue = await self.channel.declare_queue(self.names.dead, passive=True)
        self.events = await self.channel.get_exchange(self.names.events, ensure=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Closing returns every message still unacked to the queue, in any outcome.
        await self.connection.close()

    async def depth(self) -> int:
        """Letters ready in the queue now (not counting those this session holds)."""
        declared = await self.channel.declare_queue(self.names.dead, passive=True)
        return declared.declaration_result.message_count or 0

    async def messages(self, limit: int | None = None):  # type: ignore[no-untyped-def]
        """The letters in the queue when the run began, oldest first, each once (held
        unacked by this session until it settles them or closes)."""
        # The bound is what makes a run end, and take each letter once. The queue is FIFO;
        # every letter taken stays unacked in this session, so the broker does not hand it
        # out again; letters dead-lettered while the run goes on (a replayed event refused
        # again) are published to the tail, behind the ones counted here. Without the bound
        # a replay of letters that fail again takes back its own re-dead-lettered copies
        # and never ends.
        bound = await self.depth()
        if limit is not None:
            bound = min(bound, limit)
        for _ in range(bound):
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                return  # fewer than counted: another session took or purged some meanwhile
            yield message

    async def list(self, limit: int | None = None, reason: str | None = None) -> list[DeadLetterInfo]:
        return [i async for m in self.messages(limit) if _matches(i := describe(m), reason)]

    async def replay(
        self, reason: str | None = None, limit: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        """Re-publish matching dead letters to the events exchange with their original
        routing key, each at most once, then end; returns (replayed, left in the queue) out
        of the letters the queue held when the run began. A replayed event the consumer
        refuses again comes back as a new dead letter, for a later run."""
        replayed = kept = 0
        async for message in self.messages():
            info = describe(message)
            if not _matches(info, reason) or (limit is not None and replayed >= limit):
                kept += 1
                continue
            headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith(("x-death", "x-tally"))}
            try:
                await self.events.publish(
                    aio_pika.Message(
                        message.body, content_type=message.content_type, headers=headers,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message.message_id,
                    ),
                    routing_key=info.routing_key,
                    mandatory=True,
                )  # fmt: skip
            except aio_pika.exceptions.DeliveryError:
                kept += 1  # its routing key reaches no queue: leave it where it is
                continue
            await message.ack()
            replayed += 1
            if progress:
                progress(replayed, kept)
        return replayed, kept

    async def purge(self, reason: str | None = None, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Delete matching dead letters among those in the queue when the run began (a
        letter arriving meanwhile is not deleted unseen); returns (purged, left in the queue)."""
        purged = kept = 0
        async for message in self.messages():
            if not _matches(describe(message), reason):
                kept += 1
                continue
            await message.ack()
            purged += 1
            if progress:
                progress(purged, kept)
        return purged, kept
