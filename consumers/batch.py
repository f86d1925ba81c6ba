"""One batch of the ingest consumer (consumers/ingest.py runs the loop): deliveries decoded
and validated as they are taken, the valid events with the deliveries they came in, and the
dead letters of what can never apply — with how a dead letter is encoded, logged and
published. A bug that one input brings out (in decoding, validation or encoding) dead-letters
that input alone, with an internal-error reason; it never stops the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiormq.abc import DeliveredMessage

from service.domain.events import EVENT_CONTENT_TYPE, Event, InvalidEvent, Rejection, decode_body, validate_event
from service.infra import metrics
from service.infra.broker import BINDINGS, Topology, dead_letter_message, delivery_attempt, routable

log = logging.getLogger("tally.consumer")


class Delivery:
    """A message as the broker delivered it, read straight from aiormq's frames: aio-pika's
    per-message object (every property decoded and copied) and its second task per delivery
    were a tenth of a folding process's CPU on single-event messages (py-spy)."""

    __slots__ = ("raw",)

    def __init__(self, raw: DeliveredMessage) -> None:
        self.raw = raw

    @property
    def body(self) -> bytes:
        return self.raw.body

    @property
    def routing_key(self) -> str | None:
        return self.raw.routing_key

    @property
    def delivery_tag(self) -> int | None:
        return self.raw.delivery_tag

    @property
    def redelivered(self) -> bool | None:
        return self.raw.redelivered

    @property
    def content_type(self) -> str | None:
        return self.raw.header.properties.content_type

    @property
    def user_id(self) -> str | None:
        return self.raw.header.properties.user_id

    @property
    def message_id(self) -> str | None:
        return self.raw.header.properties.message_id

    @property
    def headers(self) -> Mapping[str, object]:
        return self.raw.header.properties.headers or {}


class Received:
    """A delivery. Its body is decoded when it is taken into a batch (not on arrival), so the
    prefetched backlog costs its raw bytes only, while batches are still bounded in events."""

    __slots__ = ("message", "_raws", "error")

    def __init__(self, message: Delivery) -> None:
        self.message = message
        self._raws: list[object] | None = None
        self.error: tuple[Rejection, str] | None = None

    @classmethod
    def of(cls, message: DeliveredMessage) -> Received:
        return cls(Delivery(message))

    @property
    def raws(self) -> list[object]:
        if self._raws is None and not routable(self.message.routing_key or ""):
            # Published with a routing key the ingest queue is not bound to: it came through
            # the alternate exchange, and is dead-lettered whole, undecoded (the publisher has
            # the contract wrong; service/infra/broker.py).
            self._raws, self.error = [], (Rejection.UNROUTABLE, unroutable_reason(self.message.routing_key or ""))
        if self._raws is None:
            try:
                self._raws = decode_body(self.message.body)
            except InvalidEvent as exc:
                self._raws, self.error = [], (exc.code, exc.reason)
            except Exception as exc:  # a bug, brought out by this message: it dies alone
                self._raws, self.error = [], (Rejection.INTERNAL_ERROR, internal_error("decoding the message", exc))
                log.error(
                    "bug: decoding a message raised; dead-lettering it",
                    exc_info=exc,
                    extra={"routing_key": self.message.routing_key, "bytes": len(self.message.body)},
                )
        return self._raws

    @property
    def size(self) -> int:
        return max(1, len(self.raws))


@dataclass
class DeadLetter:
    body: bytes
    code: Rejection
    reason: str
    # The delivery it came from. Its routing key is the dead letter's (and replay's): the
    # broker accepted it, so it is a valid routing key, whereas anything taken from the
    # event itself (its `type`, of any length) may not be one and would fail the publish.
    message: Delivery
    content_type: str | None = EVENT_CONTENT_TYPE
    # The event's id and organization, for the log line (None for a whole message that holds
    # no readable event: not JSON, say).
    event_id: str | None = None
    organization: str | None = None


# Identifiers in a log line are the event's own: cut, so one event cannot blow up the log.
LOGGED_ID_CHARS = 100


def logged(value: object) -> str | None:
    """An event's identifier as a log line shows it: text cut short, anything else omitted."""
    return value[:LOGGED_ID_CHARS] if isinstance(value, str) else None


def event_ids(raw: object) -> dict[str, str | None]:
    """The id and organization of a decoded event, fit for a log line."""
    if not isinstance(raw, dict):
        return {"event_id": None, "organization": None}
    return {"event_id": logged(raw.get("id")), "organization": logged(raw.get("organization"))}


def unroutable_reason(routing_key: str) -> str:
    return (
        f"unroutable: routing key '{routing_key}' matches none of {', '.join(BINDINGS)}; "
        "publish each event with its type as the routing key (usage.recorded, ...)"
    )


def internal_error(doing: str, exc: BaseException) -> str:
    """A dead-letter reason for a bug that one input brought out (the exception's type only:
    its message may quote the input)."""
    return f"internal error while {doing}: {type(exc).__name__}"


def encode_event(raw: object) -> bytes:
    """One decoded event back as JSON, to dead-letter it alone. orjson refuses nesting past
    255 levels and the decoder accepts 1024, so deeper values take a slower path that never
    recurses: no event can make dead-lettering it fail."""
    try:
        return orjson.dumps(raw)
    except orjson.JSONEncodeError:
        return _encode_deep(raw)


def _encode_deep(value: object) -> bytes:
    # An explicit stack of values still to write, and of bytes already rendered (punctuation):
    # decoded JSON holds no bytes, so a bytes item on the stack is always output.
    out: list[bytes] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, dict):
            parts: list[object] = [b"{"]
            for i, (key, child) in enumerate(item.items()):
                parts += [(b"," if i else b"") + orjson.dumps(str(key)) + b":", child]
            parts.append(b"}")
            stack.extend(reversed(parts))
        elif isinstance(item, list):
            parts = [b"["]
            for i, child in enumerate(item):
                parts += [b","] if i else []
                parts.append(child)
            parts.append(b"]")
            stack.extend(reversed(parts))
        else:
            out.append(orjson.dumps(item))
    return b"".join(out)


class Batch:
    """Deliveries taken for one transaction, validated as they are taken (so validation
    overlaps the previous batch's fold): the valid events with their origins, and the dead
    letters of what can never apply."""

    def __init__(self) -> None:
        self.items: list[Received] = []
        self.events: list[Event] = []
        # Per event: the delivery it came in, and that delivery's body when it held this
        # event alone (then its dead letter is the message as received, byte for byte).
        self.origins: list[tuple[Delivery, bytes | None]] = []
        self.dead: list[DeadLetter] = []
        self.size = 0  # events, as counted for the batch bounds
        self.now = datetime.now(UTC)

    def add(self, item: Received) -> None:
        self.items.append(item)
        self.size += item.size
        message, raws = item.message, item.raws
        if item.error is not None:
            self.dead.append(DeadLetter(message.body, *item.error, message, message.content_type))
            metrics.EVENTS.labels(metrics.OTHER_TYPE, "invalid").inc()
            return
        alone = message.body if len(raws) == 1 else None
        for raw in raws:
            try:
                self.events.append(validate_event(raw, self.now))
                self.origins.append((message, alone))
                continue
            except InvalidEvent as exc:
                code, reason = exc.code, exc.reason
            except Exception as exc:  # a bug, brought out by this event: it dies alone
                code, reason = Rejection.INTERNAL_ERROR, internal_error("validating the event", exc)
                log.error(
                    "bug: validating an event raised; dead-lettering it",
                    exc_info=exc,
                    extra={"routing_key": message.routing_key},
                )
            event_type = raw.get("type") if isinstance(raw, dict) else None
            body = alone if alone is not None else encode_event(raw)
            self.dead.append(DeadLetter(body, code, reason, message, **event_ids(raw)))
            metrics.EVENTS.labels(metrics.event_type_label(event_type), "invalid").inc()


async def publish_dead_letters(topology: Topology, letters: list[DeadLetter]) -> None:
    """Publish ``letters`` to the dead-letter exchange (with confirms: the channel's), each
    under the routing key of the delivery it came in, and log each one."""
    for letter in letters:
        origin = letter.message
        routing_key = origin.routing_key or ""
        await topology.dlx.publish(
            dead_letter_message(
                letter.body,
                letter.code,
                letter.reason,
                routing_key,
                letter.content_type,
                message_id=origin.message_id,
                attempt=delivery_attempt(origin.headers, origin.redelivered),
            ),
            routing_key=routing_key or "unrouted",
        )
        metrics.DEAD_LETTERS.labels(letter.code.value).inc()
        log.warning(
            "dead-lettered",
            extra={
                "reason_code": letter.code.value,
                "reason": letter.reason[:200],
                "event_id": letter.event_id,
                "organization": letter.organization,
                "message_id": logged(origin.message_id),
                "routing_key": routing_key,
            },
        )
