"""The event contract: CloudEvents 1.0 (structured JSON, one event or a batch array),
validated into typed events. Pure: no I/O, used by the consumer, the HTTP ingest route,
the dead-letter replay and the benchmarks alike."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from service.domain.profile import Identifier, ProfileUpdate, ShortText, Timestamp, exact_decimal, json_fault

EventType = Literal["usage.recorded", "customer.upserted", "customer.deleted", "subscription.upserted"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
EVENT_CONTENT_TYPE = "application/cloudevents+json"

# Clocks drift; an event this far in the future is a bug upstream, not a skew.
MAX_FUTURE = timedelta(minutes=5)
# A batch message is capped so one message cannot hold a consumer for long.
MAX_EVENTS_PER_MESSAGE = 10_000
# An event nested deeper than this is refused before anything walks it recursively (pydantic,
# orjson.dumps, which stops at 255 levels, when it is dead-lettered alone); metadata inside it
# has its own, lower bound (service/domain/profile.py).
MAX_EVENT_DEPTH = 64

Count = Annotated[int, Field(ge=0, le=10**12)]
Seconds = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
Cost = Annotated[Decimal, Field(ge=0, allow_inf_nan=False), exact_decimal(places=12, whole=12)]

# A model or provider name: kept per customer and day (migrations/0013_model_usage.sql), so
# bounded; a comma would split it in a list parameter (model=a,b), so refused.
MAX_MODEL_NAME = 64


def _blank_is_absent(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _model_name(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must hold printable characters only")
    if "," in value:
        raise ValueError("must not contain a comma")
    return value


ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_NAME), AfterValidator(_model_name)]
# On an event: surrounding white space trimmed, and an empty name is no name.
EventModelName = Annotated[ModelName | None, BeforeValidator(_blank_is_absent)]


class CustomerHint(BaseModel):
    """Profile hints on a usage event: used to fill a customer's empty name and email."""

    model_config = ConfigDict(extra="ignore")

    name: ShortText | None = None
    email: ShortText | None = None


class UsageData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    requests: Count = 1
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count | None = None
    cost: Cost = Decimal(0)
    latency: Seconds | None = None
    ttft: Seconds | None = None
    # Which model served the usage, and whose (gpt-4o, openai): trimmed, empty is absent.
    model: EventModelName = None
    provider: EventModelName = None
    customer: CustomerHint | None = None

    @model_validator(mode="after")
    def _total(self) -> UsageData:
        if self.total_tokens is None:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


class ProfileData(ProfileUpdate):
    """customer.upserted data: the writable profile, minus parent_customer_id (an event
    carries identifiers, not tally's ids, and a dangling parent must not fail a batch)."""

    parent_customer_id: None = None


class Plan(BaseModel):
    model_config = ConfigDict(extra="ignore")

    stripe_price_id: ShortText | None = None
    name: ShortText | None = None
    amount: Annotated[int, Field(ge=0, le=10**15)] | None = None
    currency: Annotated[str, StringConstraints(max_length=10)] | None = None
    interval: Annotated[str, StringConstraints(max_length=20)] | None = None


class SubscriptionData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Identifier
    status: Annotated[str, StringConstraints(min_length=1, max_length=50)]
    current_period_start: Timestamp | None = None
    current_period_end: Timestamp | None = None
    plan: Plan | None = None


class CloudEvent(BaseModel):
    """The envelope. Unknown extension attributes are allowed (CloudEvents permits them)."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    type: EventType
    time: Timestamp
    subject: Identifier
    organization: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    environment: Literal["prod", "test"] = "prod"
    data: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """A validated event, ready to fold."""

    id: str
    source: str
    type: str
    time: datetime
    organization: str  # name or id, resolved by the fold
    environment: str
    subject: str
    data: UsageData | ProfileData | SubscriptionData | None
    raw: dict[str, Any]  # the event as received, for dead-lettering it alone


class Rejection(StrEnum):
    """Why an event can never apply, as a code: the dead letter's ``x-tally-reason-code``
    header and the ``reason`` label of tally_dead_letters_total (the text beside it names
    the detail, and may quote the event: never a label)."""

    NOT_JSON = "not_json"
    MALFORMED = "malformed"  # valid JSON, but not an event or a batch of events
    INVALID_FIELD = "invalid_field"
    FUTURE = "future"
    TOO_OLD = "too_old"
    UNKNOWN_ORGANIZATION = "unknown_organization"
    DATABASE_REFUSED = "database_refused"
    INTERNAL_ERROR = "internal_error"  # a bug that one input brought out
    # The message's routing key matches none of the ingest queue's bindings: it reached the
    # queue only through the events exchange's alternate exchange (service/infra/broker.py).
    UNROUTABLE = "unroutable"
    # With publishers bound to organizations (TALLY_AMQP_PUBLISHERS), an event for an
    # organization its AMQP user may not write (service/domain/publishers.py).
    FORBIDDEN_PUBLISHER = "forbidden_publisher"


@dataclass(frozen=True)
class FieldProblem:
    path: str  # dotted, from the event's top: "data.requests"
    detail: str


class InvalidEvent(Exception):
    """An event (or message) that can never be applied: ``code`` says why, ``reason`` how
    (both go on its dead letter); ``fields`` lists every invalid field, where known."""

    def __init__(
        self, code: Rejection, reason: str, raw: object = None, fields: list[FieldProblem] | None = None
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.raw = raw
        self.fields = fields or []


EventData = UsageData | ProfileData | SubscriptionData
_DATA_MODELS: dict[str, type[UsageData] | type[ProfileData] | type[SubscriptionData] | None] = {
    "usage.recorded": UsageData,
    "customer.upserted": ProfileData,
    "customer.deleted": None,
    "subscription.upserted": SubscriptionData,
}


def _path(loc: tuple[int | str, ...], prefix: str) -> str:
    return prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "event"


def _invalid(exc: ValidationError, raw: object, prefix: str = "") -> InvalidEvent:
    """Every field pydantic refused, by path; the reason names the first and counts the rest."""
    errors = exc.errors(include_url=False)
    fields = [FieldProblem(_path(e["loc"], prefix), e["msg"].removeprefix("Value error, ")) for e in errors]
    more = f" (+{len(fields) - 1} more)" if len(fields) > 1 else ""
    reason = f"invalid field {fields[0].path}: {fields[0].detail}{more}"
    return InvalidEvent(Rejection.INVALID_FIELD, reason, raw, fields)


def too_old_reason(retention: timedelta) -> str:
    return f"too old: older than the {retention.days}-day dedupe window"


def validate_event(raw: object, now: datetime, *, retention: timedelta | None = None) -> Event:
    """One CloudEvent (a decoded JSON object) as an :class:`Event`, or InvalidEvent: not an
    object, nested too deep, a NUL character anywhere, invalid fields, a time in the future
    or (with ``retention``) older than the dedupe window."""
    if not isinstance(raw, dict):
        raise InvalidEvent(Rejection.MALFORMED, "event is not a JSON object", raw)
    fault = json_fault(raw, max_depth=MAX_EVENT_DEPTH)
    if fault:
        raise InvalidEvent(Rejection.INVALID_FIELD, f"invalid event: {fault}", raw)
    try:
        envelope = CloudEvent.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc, raw) from None
    model = _DATA_MODELS[envelope.type]
    try:
        data: EventData | None = model.model_validate(envelope.data) if model else None
    except ValidationError as exc:
        raise _invalid(exc, raw, "data.") from None
    if envelope.time > now + MAX_FUTURE:
        raise InvalidEvent(Rejection.FUTURE, f"event time {envelope.time.isoformat()} is in the future", raw)
    if retention is not None and envelope.time < now - retention:
        raise InvalidEvent(Rejection.TOO_OLD, too_old_reason(retention), raw)
    return Event(
        id=envelope.id,
        source=envelope.source,
        type=envelope.type,
        time=envelope.time,
        organization=envelope.organization,
        environment=envelope.environment,
        subject=envelope.subject,
        data=data,
        raw=raw,
    )


def decode_body(body: bytes) -> list[object]:
    """The events of a message body: a JSON object, or an array of them (a batch).
    Raises InvalidEvent when the body as a whole is unusable."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidEvent(Rejection.NOT_JSON, "body is not valid JSON") from None
    if isinstance(decoded, list):
        if not decoded:
            raise InvalidEvent(Rejection.MALFORMED, "batch is empty")
        if len(decoded) > MAX_EVENTS_PER_MESSAGE:
            raise InvalidEvent(Rejection.MALFORMED, f"batch holds more than {MAX_EVENTS_PER_MESSAGE} events")
        return decoded
    if isinstance(decoded, dict):
        return [decoded]
    raise InvalidEvent(Rejection.MALFORMED, "body is neither an event object nor an array of events")
