"""``/v1/webhooks``: signed outbound webhooks (the admin scope).

An endpoint is a URL and the event types it takes, in the key's organization and environment;
its signing secret is shown when it is created and when it is rotated, never otherwise. The
consumer process materialises and sends the deliveries (consumers/webhooks.py); these routes
manage endpoints and read and replay their delivery log. docs/api/webhooks.md is the guide.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from service.api import appkeys, dbaccess
from service.api.customers import canonical_shape
from service.api.errors import invalid
from service.api.listing import JSON
from service.api.params import WRITE_BODY_BYTES
from service.api.routing import Call, Endpoint, NoQuery
from service.domain.errors import NotFound
from service.domain.keys import as_uuid
from service.domain.webhooks import DELIVERY_STATES, EVENT_TYPES, address_refusal, check_url, new_secret
from service.store import webhooks as store
from service.store.rendering import Shape

TAG = "Webhooks"
# Endpoints one organization's environment may have: each costs a read of the change log per
# commit, and a list of them is answered whole.
MAX_ENDPOINTS = 20
# Deliveries one redelivery by time range makes pending again at most (the answer says when it
# stopped there: narrow the range and repeat).
REDELIVER_MOST = 10_000
# How long an endpoint's host may take to resolve when it is created: a name that does not
# resolve now is accepted (every delivery checks the address it connects to).
RESOLVE_SECONDS = 2.0
# The previous secret signs beside the new one for this long after a rotation by default.
DEFAULT_OVERLAP_SECONDS = 86_400
MAX_OVERLAP_SECONDS = 7 * 86_400

EventType = Literal[
    "customer.created", "customer.updated", "customer.deleted", "alert.budget", "alert.budget.recovered"
]
DeliveryState = Literal["pending", "delivered", "failed"]
assert set(EventType.__args__) == set(EVENT_TYPES)  # type: ignore[attr-defined]
assert set(DeliveryState.__args__) == set(DELIVERY_STATES)  # type: ignore[attr-defined]

ENDPOINT_EXAMPLE: dict[str, Any] = {
    "id": "6f1c2b9e-3d4a-4e5f-8a7b-1c2d3e4f5a6b",
    "url": "https://hooks.example.com/tally",
    "events": ["customer.created", "customer.deleted", "alert.budget"],
    "environment": "prod",
    "created_at": "2026-11-21T10:00:00Z",
    "failing_since": None,
    "disabled_at": None,
    "previous_secret_expires_at": None,
}
SECRET_EXAMPLE = "whsec_Jq8f0mYpQ2v3k5Lx7N9rT1uW4zA6cE8gH0jK2mP4sR6"


@cache
def webhook_shape() -> Shape:
    """How a delivery shows a customer: as ``GET /v1/customers/{customer_identifier}`` does."""
    return canonical_shape(False, False)


# ---- models ---------------------------------------------------------------------------------


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://hooks.example.com/tally", "events": ["customer.created", "alert.budget"]}]
        },
    )

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="Where deliveries are POSTed: http(s), a public address (see the guide's address rules)."
    )
    events: list[EventType] = Field(min_length=1, max_length=len(EVENT_TYPES), description="The event types sent.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_url(value)
        return value

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names an event type twice")
        return value


class WebhookEndpoint(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ENDPOINT_EXAMPLE]})

    id: UUID
    url: str
    events: list[str]
    environment: str
    created_at: datetime
    failing_since: datetime | None = Field(description="Since when every attempt failed (null after a success).")
    disabled_at: datetime | None = Field(
        description="When the endpoint was disabled for failing continuously: it gets no more deliveries."
    )
    previous_secret_expires_at: datetime | None = Field(
        description="After a rotation, until when the previous secret signs too."
    )


class WebhookCreated(WebhookEndpoint):
    model_config = ConfigDict(json_schema_extra={"examples": [{**ENDPOINT_EXAMPLE, "secret": SECRET_EXAMPLE}]})

    secret: str = Field(description="The signing secret: shown now only. Keep it to verify Tally-Signature.")


class WebhookList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [ENDPOINT_EXAMPLE]}]})

    results: list[WebhookEndpoint]


class RotateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"overlap_seconds": 86_400}]})

    overlap_seconds: int = Field(
        DEFAULT_OVERLAP_SECONDS,
        ge=0,
        le=MAX_OVERLAP_SECONDS,
        description="How long the previous secret signs beside the new one (both v1= entries are sent).",
    )


DELIVERY_EXAMPLE: dict[str, Any] = {
    "id": 1042,
    "event_id": "evt_3b2a7c8f0e1d4c5b9a8f7e6d5c4b3a21",
    "event_type": "customer.created",
    "status": "delivered",
    "attempts": 1,
    "created_at": "2026-11-21T10:00:00Z",
    "next_attempt_at": None,
    "give_up_at": "2026-11-24T10:00:00Z",
    "last_attempt_at": "2026-11-21T10:00:00Z",
    "last_status_code": 200,
    "last_error": None,
    "delivered_at": "2026-11-21T10:00:00Z",
}


class Delivery(BaseModel):
    id: int
    event_id: str
    event_type: str
    status: DeliveryState
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When a pending delivery is attempted next.")
    give_up_at: datetime
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"results": [DELIVERY_EXAMPLE], "next_cursor": None, "has_more": False}]}
    )

    results: list[Delivery]
    next_cursor: str | None = Field(description="Pass as cursor for the next (older) page; null on the last one.")
    has_more: bool


class DeliveryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=200, description="Deliveries per page, newest first (1 to 200, default 50).")
    cursor: Annotated[str, StringConstraints(max_length=20)] | None = Field(
        None, description="A page's next_cursor: the deliveries older than that page's."
    )
    status: DeliveryState | None = Field(None, description="Only deliveries in this state.")


class RedeliverRange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"examples": [{"from": "2026-11-21T00:00:00Z", "to": "2026-11-22T00:00:00Z"}]},
    )

    created_from: datetime = Field(alias="from", description="Deliveries created at or after this time.")
    created_to: datetime = Field(alias="to", description="…and before this one.")


class Redelivered(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"redelivered": 12, "truncated": False}]})

    redelivered: int = Field(description="Finished deliveries made pending again (pending ones are left as they are).")
    truncated: bool = Field(description=f"True when it stopped at {REDELIVER_MOST}: narrow the range and repeat.")


# ---- handlers -------------------------------------------------------------------------------


def _endpoint_json(r: asyncpg.Record, secret: str | None = None) -> dict[str, object]:
    out: dict[str, object] = {
        "id": r["id"],
        "url": r["url"],
        "events": r["events"],
        "environment": r["environment"],
        "created_at": r["created_at"],
        "failing_since": r["failing_since"],
        "disabled_at": r["disabled_at"],
        "previous_secret_expires_at": r["previous_expires_at"],
    }
    if secret is not None:
        out["secret"] = secret
    return out


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json(), content_type=JSON, status=status)


def _endpoint_id(call: Call[Any, Any]) -> UUID:
    text = call.request.match_info["webhook_id"]
    endpoint_id = as_uuid(text)
    if endpoint_id is None:
        raise NotFound(f"no webhook endpoint '{text}'")
    return endpoint_id


async def _owned(call: Call[Any, Any]) -> UUID:
    """The endpoint the path names, in the key's organization and environment; NotFound otherwise."""
    endpoint_id, principal = _endpoint_id(call), call.principal
    async with dbaccess.connection(call.request) as conn:
        row = await store.endpoint(conn, principal.organization_id, principal.environment, endpoint_id)
    if row is None:
        raise NotFound(f"no webhook endpoint '{endpoint_id}'")
    return endpoint_id


async def check_address(url: str, allow_private: bool) -> None:
    """400 naming ``url`` when its host is, or resolves to, an address a webhook may not reach."""
    host, refusal = check_url(url)
    if allow_private:
        return
    if refusal is None:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_SECONDS
            )
        except (OSError, TimeoutError):
            return
        refusals = [r for r in (address_refusal(str(info[4][0])) for info in infos) if r is not None]
        if refusals:
            refusal = f"{host} resolves to a non-public address ({refusals[0]})"
    if refusal is not None:
        raise invalid("url", f"{refusal}: webhooks reach public addresses only", "body")


async def create(call: Call[NoQuery, WebhookCreate]) -> web.Response:
    principal, body = call.principal, call.body
    await check_address(body.url, call.request.app[appkeys.SETTINGS].webhook_allow_private)
    secret = new_secret()
    async with dbaccess.connection(call.request) as conn:
        row = await store.create_endpoint(
            conn, principal.organization_id, principal.environment, body.url, body.events, secret, most=MAX_ENDPOINTS
        )
    return _json(WebhookCreated.model_validate(_endpoint_json(row, secret)), 201)


async def list_webhooks(call: Call[NoQuery, None]) -> web.Response:
    principal = call.principal
    async with dbaccess.connection(call.request) as conn:
        rows = await store.endpoints(conn, principal.organization_id, principal.environment)
    return _json(WebhookList(results=[WebhookEndpoint.model_validate(_endpoint_json(r)) for r in rows]))


async def retrieve(call: Call[NoQuery, None]) -> web.Response:
    endpoint_id, principal = _endpoint_id(call), call.principal
    async with dbaccess.connection(call.request) as conn:
        row = await store.endpoint(conn, principal.organization_id, principal.environment, endpoint_id)
    if row is None:
        raise NotFound(f"no webhook endpoint '{endpoint_id}'")
    return _json(WebhookEndpoint.model_validate(_endpoint_json(row)))


async def delete(call: Call[NoQuery, None]) -> web.Response:
    endpoint_id, principal = _endpoint_id(call), call.principal
    async with dbaccess.connection(call.request) as conn:
        deleted = await store.delete_endpoint(conn, principal.organization_id, principal.environment, endpoint_id)
    if not deleted:
        raise NotFound(f"no webhook endpoint '{endpoint_id}'")
    return web.Response(status=204)


async def rotate(call: Call[NoQuery, RotateBody | None]) -> web.Response:
    endpoint_id, principal = _endpoint_id(call), call.principal
    overlap = (call.body or RotateBody()).overlap_seconds
    secret = new_secret()
    until = datetime.now(UTC) + timedelta(seconds=overlap)
    async with dbaccess.connection(call.request) as conn:
        row = await store.rotate_secret(
            conn, principal.organization_id, principal.environment, endpoint_id, secret, until
        )
    if row is None:
        raise NotFound(f"no webhook endpoint '{endpoint_id}'")
    return _json(WebhookCreated.model_validate(_endpoint_json(row, secret)))


async def list_deliveries(call: Call[DeliveryParams, None]) -> web.Response:
    params = call.query
    before = None
    if params.cursor is not None:
        if not params.cursor.isdigit():
            raise invalid("cursor", "is not a cursor tally gave (a page's next_cursor)")
        before = int(params.cursor)
    endpoint_id = await _owned(call)
    async with dbaccess.connection(call.request) as conn:
        rows = await store.deliveries(
            conn, call.principal.organization_id, endpoint_id, before, params.status, params.limit + 1
        )
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    # A finished delivery's next_attempt_at is meaningless: shown as null.
    results = [
        Delivery.model_validate(
            {**dict(r), "next_attempt_at": None if r["status"] != "pending" else r["next_attempt_at"]}
        )
        for r in rows
    ]
    return _json(DeliveryList(results=results, next_cursor=str(rows[-1]["id"]) if more else None, has_more=more))


def _delivery_id(call: Call[Any, Any]) -> int:
    text = call.request.match_info["delivery_id"]
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"no delivery '{text}'")
    return int(text)


def _retry_until(call: Call[Any, Any], now: datetime) -> datetime:
    return now + timedelta(hours=call.request.app[appkeys.SETTINGS].webhook_retry_hours)


async def redeliver_one(call: Call[NoQuery, None]) -> web.Response:
    delivery_id = _delivery_id(call)
    endpoint_id, organization = await _owned(call), call.principal.organization_id
    now = datetime.now(UTC)
    async with dbaccess.connection(call.request) as conn:
        if not await store.delivery_exists(conn, organization, endpoint_id, delivery_id):
            raise NotFound(f"no delivery {delivery_id} of webhook endpoint '{endpoint_id}'")
        count = await store.redeliver(
            conn, organization, endpoint_id, now, _retry_until(call, now), delivery_id=delivery_id
        )
    return _json(Redelivered(redelivered=count, truncated=False), 202)


async def redeliver_range(call: Call[NoQuery, RedeliverRange]) -> web.Response:
    body = call.body
    for name, value in (("from", body.created_from), ("to", body.created_to)):
        if value.tzinfo is None:
            raise invalid(name, "needs a time zone (Z or an offset)", "body")
    if body.created_to <= body.created_from:
        raise invalid("to", "must be after from", "body")
    endpoint_id, organization = await _owned(call), call.principal.organization_id
    now = datetime.now(UTC)
    async with dbaccess.connection(call.request) as conn:
        count = await store.redeliver(
            conn,
            organization,
            endpoint_id,
            now,
            _retry_until(call, now),
            created_from=body.created_from,
            created_to=body.created_to,
            most=REDELIVER_MOST,
        )
    return _json(Redelivered(redelivered=count, truncated=count == REDELIVER_MOST), 202)


WEBHOOK_ID = {"webhook_id": "The endpoint's id (from its creation or the list)."}
DELIVERY_ID = {**WEBHOOK_ID, "delivery_id": "The delivery's id (from the delivery log)."}
ENDPOINTS = [
    Endpoint(
        "POST",
        "/v1/webhooks",
        create,
        "Create a webhook endpoint",
        TAG,
        "admin",
        body=WebhookCreate,
        response=WebhookCreated,
        status=201,
        errors=(409,),
        max_body=WRITE_BODY_BYTES,
        description="Deliveries of the event types named are POSTed to the URL, signed with the secret in this "
        "response (shown this once) in Tally-Signature, Stripe's scheme. A URL whose host is or resolves to a "
        "private, loopback, link-local or otherwise non-public address is a 400 naming url.",
        operation_id="webhooks_create_webhook",
    ),
    Endpoint(
        "GET",
        "/v1/webhooks",
        list_webhooks,
        "List webhook endpoints",
        TAG,
        "admin",
        response=WebhookList,
        description=f"Every endpoint of the key's organization and environment (at most {MAX_ENDPOINTS}); never "
        "their secrets.",
        operation_id="webhooks_list_webhooks",
    ),
    Endpoint(
        "GET",
        "/v1/webhooks/{webhook_id}",
        retrieve,
        "Retrieve a webhook endpoint",
        TAG,
        "admin",
        response=WebhookEndpoint,
        path_params=WEBHOOK_ID,
        operation_id="webhooks_retrieve_webhook",
    ),
    Endpoint(
        "DELETE",
        "/v1/webhooks/{webhook_id}",
        delete,
        "Delete a webhook endpoint",
        TAG,
        "admin",
        status=204,
        path_params=WEBHOOK_ID,
        description="The endpoint and its delivery log go; pending deliveries are not sent.",
        operation_id="webhooks_delete_webhook",
    ),
    Endpoint(
        "POST",
        "/v1/webhooks/{webhook_id}/rotate",
        rotate,
        "Rotate a webhook endpoint's secret",
        TAG,
        "admin",
        body=RotateBody,
        body_required=False,
        response=WebhookCreated,
        path_params=WEBHOOK_ID,
        max_body=WRITE_BODY_BYTES,
        description="A new secret (in this response only). The previous one signs too for overlap_seconds "
        "(default a day): Tally-Signature then carries two v1= entries, so receivers can switch without missing "
        "a delivery.",
        operation_id="webhooks_rotate_secret",
    ),
    Endpoint(
        "GET",
        "/v1/webhooks/{webhook_id}/deliveries",
        list_deliveries,
        "The endpoint's delivery log",
        TAG,
        "admin",
        query=DeliveryParams,
        response=DeliveryList,
        path_params=WEBHOOK_ID,
        description="Deliveries newest first, with their status, attempts, and the last answer's status code and "
        "time; next_cursor pages on to older ones.",
        operation_id="webhooks_list_deliveries",
    ),
    Endpoint(
        "POST",
        "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
        redeliver_one,
        "Redeliver one delivery",
        TAG,
        "admin",
        response=Redelivered,
        status=202,
        path_params=DELIVERY_ID,
        description="A delivered or failed delivery is sent again (same event id and body), retried as a new one; "
        "a pending one is left as it is (redelivered: 0).",
        operation_id="webhooks_redeliver_delivery",
    ),
    Endpoint(
        "POST",
        "/v1/webhooks/{webhook_id}/redeliver",
        redeliver_range,
        "Redeliver deliveries created in a time range",
        TAG,
        "admin",
        body=RedeliverRange,
        response=Redelivered,
        status=202,
        path_params=WEBHOOK_ID,
        max_body=WRITE_BODY_BYTES,
        description=f"Every delivered or failed delivery created in [from, to) is sent again, oldest first, at "
        f"most {REDELIVER_MOST} per request.",
        operation_id="webhooks_redeliver_range",
    ),
]
