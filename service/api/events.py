"""``POST /v1/events``: validated with the consumer's own rules, published with confirms."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints

from service.api import appkeys, examples
from service.api.errors import bad_request, environment_detail, other_environment, payload_too_large
from service.api.routing import CPU_SLOT, Call, Endpoint, NoQuery
from service.domain.events import CloudEvent, FieldProblem, InvalidEvent, decode_body, validate_event
from service.domain.keys import Principal
from service.infra import metrics
from service.infra.broker import encode_events, event_message
from service.web.problems import ProblemField, json_response

# Events validated between two turns of the event loop (about a millisecond of work).
VALIDATION_SLICE = 25


class HttpCloudEvent(CloudEvent):
    """A CloudEvent sent over HTTP: ``organization`` may be omitted (it is the key's)."""

    # Widens the base's required field on purpose (mypy cannot know pydantic allows it).
    organization: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None  # type: ignore[assignment]


class EventsBody(RootModel[HttpCloudEvent | list[HttpCloudEvent]]):
    """One CloudEvent or an array of them (at most TALLY_MAX_EVENTS_PER_REQUEST)."""

    # Stamped when the document is built (at start), so the example is never too old to apply.
    model_config = ConfigDict(json_schema_extra=lambda schema: schema.update(examples=[examples.events()]))


class Accepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"accepted": 2}]})

    accepted: int = Field(description="Events accepted and confirmed by the broker.")


def _at(where: str, path: str) -> str:
    return f"{where}.{path}" if path else where


@dataclass
class _Checked:
    """What checking a request's events found: every problem of every event, by its path
    ("[3].data.requests" in a batch, "event.data.requests" for a single event)."""

    invalid: list[ProblemField] = field(default_factory=list)
    elsewhere: list[ProblemField] = field(default_factory=list)  # another environment than the key's


def _check(raws: list[object], indexes: range, principal: Principal, now: datetime, retention: timedelta) -> _Checked:
    """Check events ``raws[i]`` for ``i`` in ``indexes`` with the consumer's own rules, the
    dedupe window included (what it could never apply is refused here at once rather than
    accepted and dead-lettered later); each is stamped with the key's organization and, where
    it names none, its environment."""
    found = _Checked()
    own = {principal.organization_name, str(principal.organization_id)}
    for i in indexes:
        raw = raws[i]
        where = f"[{i}]" if len(raws) > 1 else "event"
        if not isinstance(raw, dict):
            found.invalid.append(ProblemField(where, "must be an object", "body"))
            continue
        organization = raw.get("organization", principal.organization_name)
        if not isinstance(organization, str) or organization not in own:
            detail = "must be your key's organization (or omitted)"
            found.invalid.append(ProblemField(_at(where, "organization"), detail, "body"))
            continue
        raw["organization"] = str(principal.organization_id)
        # Every event is the key's environment's: omitted, it is filled in; another is a 403.
        environment = raw.setdefault("environment", principal.environment)
        if environment != principal.environment:
            detail = environment_detail(principal.environment)
            found.elsewhere.append(ProblemField(_at(where, "environment"), detail, "body"))
            continue
        try:
            validate_event(raw, now, retention=retention)
        except InvalidEvent as exc:
            problems = exc.fields or [FieldProblem("", exc.reason)]
            found.invalid.extend(ProblemField(_at(where, p.path), p.detail, "body") for p in problems)
    return found


async def ingest_events(call: Call[NoQuery, bytes]) -> web.Response:
    app, principal = call.request.app, call.principal
    settings = app[appkeys.SETTINGS]
    try:
        raws = decode_body(call.body)
    except InvalidEvent as exc:
        raise bad_request([ProblemField("body", exc.reason, "body")]) from None
    if len(raws) > settings.max_events_per_request:
        raise payload_too_large(f"at most {settings.max_events_per_request} events per request")
    now = datetime.now(UTC)
    retention = timedelta(days=settings.dedupe_retention_days)
    invalid: list[ProblemField] = []
    elsewhere: list[ProblemField] = []
    for start in range(0, len(raws), VALIDATION_SLICE):
        # Checking a full batch takes tens of milliseconds: it runs in slices that take turns
        # on the API's CPU slot, so that no tenant's batch holds the event loop that long.
        async with app[CPU_SLOT]:
            found = _check(raws, range(start, min(start + VALIDATION_SLICE, len(raws))), principal, now, retention)
        invalid += found.invalid
        elsewhere += found.elsewhere
    if invalid:
        raise bad_request(invalid)
    if elsewhere:
        raise other_environment(
            f"this key is for the '{principal.environment}' environment: its events are too", elsewhere
        )
    # Every event is a valid event of a known type by now: the first one's routes the message.
    first = raws[0]
    assert isinstance(first, dict)
    message = event_message(encode_events(raws), batch=len(raws) > 1)
    await app[appkeys.PUBLISHER].publish(message, routing_key=str(first["type"]))
    metrics.PUBLISHED.inc(len(raws))
    return json_response({"accepted": len(raws)}, status=202)


TAG = "Events"

ENDPOINTS = [
    Endpoint(
        "POST",
        "/v1/events",
        ingest_events,
        "Publish usage and customer events",
        TAG,
        "write",
        body=EventsBody,
        raw_body=True,
        response=Accepted,
        status=202,
        description="One CloudEvent 1.0 (structured JSON) or an array of them, validated with the "
        "consumer's rules, published persistent with publisher confirms. 202 means the broker "
        "has them; the consumer folds them exactly once.",
    ),
]
