"""Dead-letter tools: list, replay, purge (``tally dlq``).

They read ``<ns>.dead`` with basic.get and *hold* every message unacked until
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

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from service.domain.events import EVENT_TYPES, Rejection
from service.infra.broker import (
    DEATH_TIME_HEADER,
    REASON_CODE_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    BrokerNodes,
    Names,
    routable,
)


@dataclass
class DeadLetterInfo:
    reason: str
    event_type: str | None
    event_id: str | None
    organization: str | None
    first_death: str | None
    routing_key: str
    events: int
    # The reason's code (service.domain.events.Rejection; None when the broker dead-lettered it).
    code: str | None = None

    @property
    def replay_routing_key(self) -> str:
        """The routing key a replay publishes with: the original one, unless no binding
        routes it (an ``unroutable`` letter), then the event's type when it is one of
        tally's — replaying such a letter is the operator's way of accepting it."""
        if routable(self.routing_key) or self.event_type not in EVENT_TYPES:
            return self.routing_key
        return str(self.event_type)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def describe(message: AbstractIncomingMessage) -> DeadLetterInfo:
    """What a dead letter is and why it died: tally's own headers when the consumer
    dead-lettered it, the broker's x-death record when the broker did (delivery limit)."""
    deaths = (message.headers or {}).get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    reason = _header(message, REASON_HEADER) or f"broker: {_text(death.get('reason', 'unknown'))}"
    routing_key = _header(message, ROUTING_KEY_HEADER)
    if routing_key is None:
        keys = death.get("routing-keys")
        routing_key = _text(keys[0]) if isinstance(keys, list) and keys else message.routing_key or ""
    first = _header(message, DEATH_TIME_HEADER)
    died = death.get("time")
    if first is None and isinstance(died, datetime):
        first = died.isoformat()
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
    return DeadLetterInfo(
        reason, event_type, event_id, organization, first, routing_key, events, _header(message, REASON_CODE_HEADER)
    )


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
    """Whether ``reason`` (None: any) is in the letter's reason text or is its code (so that
    ``--reason unknown_organization``, a metric's label, works as ``--reason "unknown organization"``)."""
    return reason is None or reason.lower() in info.reason.lower() or reason.lower() == (info.code or "")


def _replayable(info: DeadLetterInfo, reason: str | None) -> bool:
    """Whether a replay for ``reason`` takes this letter. A replay re-publishes as tally's own
    AMQP user, which may write any organization: a ``forbidden_publisher`` letter is taken only
    when the operator asked for letters by reason, never by a replay of everything."""
    if info.code == Rejection.FORBIDDEN_PUBLISHER and reason is None:
        return False
    return _matches(info, reason)


class DeadLetters:
    """A session over the dead-letter queue; messages taken stay unacked until settled."""

    def __init__(self, amqp_url: str, names: Names) -> None:
        self.amqp_url = amqp_url
        self.names = names

    async def __aenter__(self) -> DeadLetters:
        self.nodes = BrokerNodes(self.amqp_url)
        self.connection = await self.nodes.connect(timeout=10)
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

    async def messages(self, limit: int | None = None) -> AsyncIterator[AbstractIncomingMessage]:
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
        routing key (an ``unroutable`` letter's: its event's type), each at most once, then
        end; returns (replayed, left in the queue) out of the letters the queue held when the
        run began. A replayed event the consumer refuses again comes back as a new dead
        letter, for a later run. ``forbidden_publisher`` letters are replayed only when
        ``reason`` selects them (see :func:`_replayable`)."""

        async def publish(message: AbstractIncomingMessage, done: int) -> bool:
            info = describe(message)
            if not _replayable(info, reason) or (limit is not None and done >= limit):
                return False
            headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith(("x-death", "x-tally"))}
            try:
                await self.events.publish(
                    aio_pika.Message(
                        message.body,
                        content_type=message.content_type,
                        headers=headers,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=message.message_id,
                        user_id=self.nodes.user,
                    ),
                    routing_key=info.replay_routing_key,
                    mandatory=True,
                )
            except aio_pika.exceptions.DeliveryError:
                return False  # its routing key reaches no queue: leave it where it is
            return True

        return await self._settle(publish, progress)

    async def purge(
        self, reason: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        """Delete matching dead letters among those in the queue when the run began (a
        letter arriving meanwhile is not deleted unseen); returns (purged, left in the queue)."""

        async def matches(message: AbstractIncomingMessage, done: int) -> bool:
            return _matches(describe(message), reason)

        return await self._settle(matches, progress)

    async def _settle(
        self,
        take: Callable[[AbstractIncomingMessage, int], Awaitable[bool]],
        progress: Callable[[int, int], None] | None,
    ) -> tuple[int, int]:
        """Ack (remove from the queue) each letter of the run for which ``take`` (given the
        letter and how many were taken so far) answers True; returns (taken, left)."""
        taken = kept = 0
        async for message in self.messages():
            if not await take(message, taken):
                kept += 1
                continue
            await message.ack()
            taken += 1
            if progress:
                progress(taken, kept)
        return taken, kept
