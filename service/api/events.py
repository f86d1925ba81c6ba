"""``POST /v1/events``: validated with the consumer's own rules, published with confirms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, Field, RootModel, StringConstraints

from service.api import appkeys
from service.api.errors import bad_request, payload_too_large
from service.api.routing import PRINCIPAL, Endpoint
from service.core.events import CloudEvent, InvalidEvent, decode_body, validate_event
from service.infra import metrics
from service.infra.broker import encode_events, event_message
from service.web.problems import ProblemField


class HttpCloudEvent(CloudEvent):
    """A CloudEvent sent over HTTP: ``organization`` may be omitted (it is the key's)."""

    # Widens the base's required field on purpose (mypy cannot know pydantic allows it).
    organization: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None  # type: ignore[assignment]


class EventsBody(RootModel[HttpCloudEvent | list[HttpCloudEvent]]):
    """One CloudEvent or an array of them (at most TALLY_MAX_EVENTS_PER_REQUEST)."""


class Accepted(BaseModel):
    accepted: int = Field(description="Events accepted and confirmed by the broker.")


async def ingest_events(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    settings = request.app[appkeys.SETTINGS]
    raw_body = await request.read()  # client_max_size bounds it (413 beyond)
    try:
        raws = decode_body(raw_body)
    except InvalidEvent as exc:
        raise bad_request([ProblemField("body", exc.reason, "body")]) from None
    if len(raws) > settings.max_events_per_request:
        raise payload_too_large(f"at most {settings.max_events_per_request} events per request")
    own = {principal.organization_name, str(principal.organization_id)}
    now = datetime.now(UTC)
    # The consumer's own rules, the dedupe window included: what it could never apply is
    # refused here at once rather than accepted and dead-lettered later.
    retention = timedelta(days=settings.dedupe_retention_days)
    errors: list[ProblemField] = []
    for i, raw in enumerate(raws):
        where = f"[{i}]" if len(raws) > 1 else "event"
        if not isinstance(raw, dict):
            errors.append(ProblemField(where, "must be an object", "body"))
            continue
        organization = raw.get("organization", principal.organization_name)
        if not isinstance(organization, str) or organization not in own:
            errors.append(ProblemField(f"{where}.organization", "must be your key's organization (or omitted)", "body"))
            continue
        raw["organization"] = str(principal.organization_id)
        try:
            validate_event(raw, now, retention=retention)
        except InvalidEvent as exc:
            errors.append(ProblemField(where, exc.reason, "body"))
    if errors:
        raise bad_request(errors)
    # Every event is a valid event of a known type by now: the first one's routes the message.
    first = raws[0]
    assert isinstance(first, dict)
    message = event_message(encode_events(raws), batch=len(raws) > 1)
    await request.app[appkeys.PUBLISHER].publish(message, routing_key=str(first["type"]))
    metrics.PUBLISHED.inc(len(raws))
    return web.json_response({"accepted": len(raws)}, status=202)


ENDPOINTS = [
    Endpoint(
        "POST",
        "/v1/events",
        ingest_events,
        "Publish usage and customer events",
        "events",
        "write",
        body=EventsBody,
        response=Accepted,
        status=202,
        errors=(400, 401, 403, 413, 503),
        description="One CloudEvent 1.0 (structured JSON) or an array of them, validated with the "
        "consumer's rules, published persistent with publisher confirms. 202 means the broker "
        "has them; the consumer folds them exactly once.",
    ),
]
