"""Canonical customer routes: ``/v1/customers``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TypedDict
from urllib.parse import quote

from aiohttp import web
from yarl import URL

from service.api import appkeys, dbaccess
from service.api.errors import invalid
from service.api.listing import client_link, json_with, link, run_list
from service.api.models import (
    Customer,
    CustomerCreate,
    CustomerExpanded,
    CustomerList,
    CustomerPatch,
    ListParams,
    RetrieveParams,
    Subscription,
    UsageParams,
    UsageSeries,
)
from service.api.params import WRITE_BODY_BYTES, parse_body, parse_query
from service.api.routing import PRINCIPAL, Endpoint
from service.api.shapes import customer_shape
from service.domain.keys import Principal
from service.domain.listing import CursorCodec, CustomerFilter, ListQuery, Sort, resume
from service.store import customers as core
from service.store.listing import Shape
from service.web.problems import REQUEST_ID

DEFAULT_LIMIT = 50
# Without from/to a usage series covers the last 30 UTC days, today included.
DEFAULT_SERIES_DAYS = 30
DEFAULT_SORT = "-first_seen"
JSON = "application/json"


@cache
def canonical_shape(expand_parent: bool, include_subscriptions: bool) -> Shape:
    return customer_shape(
        Customer,
        parent_key="parent_customer" if expand_parent else None,
        subscriptions_key="subscriptions" if include_subscriptions else None,
        subscription_model=Subscription if include_subscriptions else None,
    )


def build_list_query(principal: Principal, params: ListParams, cursors: CursorCodec) -> ListQuery:
    """The core query for canonical list parameters (pagination styles checked here)."""
    paged = params.page is not None or params.page_size is not None
    if paged and (params.limit is not None or params.offset is not None):
        raise invalid("page", "use page/page_size or limit/offset, not both")
    if params.cursor is not None and (paged or params.offset is not None):
        raise invalid("cursor", "cannot be combined with offset or page")
    if paged:
        limit = params.page_size or DEFAULT_LIMIT
        offset = ((params.page or 1) - 1) * limit
    else:
        limit = params.limit or DEFAULT_LIMIT
        offset = params.offset or 0
    q = ListQuery(
        organization_id=principal.organization_id,
        environment=principal.environment_for(params.environment),
        filter=CustomerFilter(
            statuses=tuple(sorted(set(params.status))),
            name_contains=params.name,
            email=params.email,
            ids=tuple(params.customer_ids),
            identifiers=tuple(params.customer_identifiers),
            parent_ids=tuple(params.parent_customer_ids),
            first_seen_gte=params.first_seen_gte,
            first_seen_lte=params.first_seen_lte,
            last_active_gte=params.last_active_gte,
            last_active_lte=params.last_active_lte,
            total_cost_gte=params.total_cost_gte,
            total_cost_lte=params.total_cost_lte,
            metadata=tuple(sorted(params.metadata.items())),
            period_budget_share_gte=params.period_budget_share_gte,
        ),
        sort=Sort.parse(params.sort_by or DEFAULT_SORT),
        limit=limit,
        offset=offset,
    )
    if params.cursor is not None:
        q = resume(q, cursors.decode(params.cursor), explicit_sort=params.sort_by is not None)
    return q


def page_links(
    request: web.Request, params: ListParams, q: ListQuery, page: core.Page, cursors: CursorCodec
) -> tuple[str | None, str | None, str | None]:
    """(next URL, previous URL, next_cursor) in the pagination style the request used."""
    next_cursor = cursors.encode(q, page.next_position) if page.next_position else None
    prev_cursor = cursors.encode(q, page.previous_position) if page.previous_position else None
    if params.cursor is not None:
        return (
            link(request, cursor=next_cursor) if next_cursor else None,
            link(request, cursor=prev_cursor) if prev_cursor else None,
            next_cursor,
        )
    if params.page is not None or params.page_size is not None:
        number = params.page or 1
        nxt = link(request, page=number + 1) if next_cursor else None
        prev = link(request, page=number - 1) if number > 1 else None
        return nxt, prev, next_cursor
    nxt = link(request, offset=q.offset + q.limit) if next_cursor else None
    prev = link(request, offset=max(q.offset - q.limit, 0) or None) if q.offset > 0 else None
    return nxt, prev, next_cursor


async def list_customers(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, ListParams)
    cursors = request.app[appkeys.CURSORS]
    q = build_list_query(principal, params, cursors)
    shape = canonical_shape(params.expand == "parent_customer", params.include == "subscriptions")
    page = await run_list(request, q, shape)
    nxt, prev, next_cursor = page_links(request, params, q, page, cursors)
    envelope = {"count": page.count, "next": nxt, "previous": prev, "next_cursor": next_cursor}
    return web.Response(body=json_with(envelope, "results", page.docs), content_type=JSON)


async def retrieve_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, RetrieveParams)
    shape = canonical_shape(params.expand == "parent_customer", params.include == "subscriptions")
    async with dbaccess.connection(request, read=True) as conn:
        doc = await core.get_customer(
            conn,
            principal.organization_id,
            principal.environment_for(params.environment),
            request.match_info["customer_identifier"],
            shape,
        )
    return web.Response(text=doc, content_type=JSON)


class WriteStamp(TypedDict):
    at: datetime
    request_id: str | None


def write_stamp(request: web.Request) -> WriteStamp:
    """An API write is a change at the time of its request (ties broken by its request id),
    ordered against events by the same rules (service/store/fold.py)."""
    return {"at": datetime.now(UTC), "request_id": request.get(REQUEST_ID)}


async def create_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    body = await parse_body(request, CustomerCreate)
    values = body.columns()
    values.pop("customer_identifier", None)
    values.pop("environment", None)
    environment = principal.environment_for(body.environment)
    async with dbaccess.connection(request) as conn:
        doc = await core.create_customer(
            conn,
            principal.organization_id,
            environment,
            body.customer_identifier,
            values,
            canonical_shape(False, False),
            **write_stamp(request),
        )
    # The identifier is one path segment whatever it contains ('/', '?', '#', '%').
    target = "/v1/customers/" + quote(body.customer_identifier, safe="")
    location = client_link(request, URL(target, encoded=True))
    return web.Response(text=doc, status=201, content_type=JSON, headers={"Location": location})


async def update_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, RetrieveParams)
    body = await parse_body(request, CustomerPatch)
    async with dbaccess.connection(request) as conn:
        doc = await core.update_customer(
            conn,
            principal.organization_id,
            principal.environment_for(params.environment),
            request.match_info["customer_identifier"],
            body.columns(),
            canonical_shape(False, False),
            **write_stamp(request),
        )
    return web.Response(text=doc, content_type=JSON)


async def delete_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, RetrieveParams)
    async with dbaccess.connection(request) as conn:
        await core.delete_customer(
            conn,
            principal.organization_id,
            principal.environment_for(params.environment),
            request.match_info["customer_identifier"],
            **write_stamp(request),
        )
    return web.Response(status=204)


async def customer_usage(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, UsageParams)
    identifier = request.match_info["customer_identifier"]
    end = params.to or datetime.now(UTC).date()
    start = params.from_ or end - timedelta(days=DEFAULT_SERIES_DAYS - 1)
    async with dbaccess.connection(request, read=True) as conn:
        series = await core.usage_series(
            conn,
            principal.organization_id,
            principal.environment_for(params.environment),
            identifier,
            start,
            end,
            params.granularity,
        )
    envelope = {
        "customer_identifier": identifier,
        "granularity": params.granularity,
        "from": start.isoformat(),
        "to": end.isoformat(),
    }
    return web.Response(body=json_with(envelope, "results", series), content_type=JSON)


IDENTIFIER = {"customer_identifier": "Your identifier for the customer (unique per environment)."}
TAG = "Customers"

ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/customers",
        list_customers,
        "List customers",
        TAG,
        "read",
        query=ListParams,
        response=CustomerList,
        errors=(400, 401, 403, 429),
        description="Paged, sorted, filtered list. count is over all pages; next/previous keep the "
        "pagination style of the request; next_cursor continues at constant cost.",
    ),
    Endpoint(
        "POST",
        "/v1/customers",
        create_customer,
        "Create a customer",
        TAG,
        "write",
        body=CustomerCreate,
        response=Customer,
        status=201,
        errors=(400, 401, 403, 409, 413),
        max_body=WRITE_BODY_BYTES,
    ),
    Endpoint(
        "GET",
        "/v1/customers/{customer_identifier}",
        retrieve_customer,
        "Retrieve a customer",
        TAG,
        "read",
        query=RetrieveParams,
        response=CustomerExpanded,
        errors=(400, 401, 403, 404),
        path_params=IDENTIFIER,
    ),
    Endpoint(
        "PATCH",
        "/v1/customers/{customer_identifier}",
        update_customer,
        "Update a customer",
        TAG,
        "write",
        query=RetrieveParams,
        body=CustomerPatch,
        response=Customer,
        errors=(400, 401, 403, 404, 413),
        path_params=IDENTIFIER,
        description="Only the fields sent change. Read-only or unknown fields are a 400 naming them.",
        max_body=WRITE_BODY_BYTES,
    ),
    Endpoint(
        "DELETE",
        "/v1/customers/{customer_identifier}",
        delete_customer,
        "Delete a customer",
        TAG,
        "write",
        query=RetrieveParams,
        status=204,
        errors=(400, 401, 403, 404),
        path_params=IDENTIFIER,
    ),
    Endpoint(
        "GET",
        "/v1/customers/{customer_identifier}/usage",
        customer_usage,
        "Usage time series",
        TAG,
        "read",
        query=UsageParams,
        response=UsageSeries,
        errors=(400, 401, 403, 404),
        path_params=IDENTIFIER,
        description="One zero-filled bucket per day, week or month from 'from' to 'to' (UTC days, inclusive, "
        f"given as dates; 'to' at most {core.MAX_SERIES_DAYS} days after 'from'); without them, the last "
        f"{DEFAULT_SERIES_DAYS} days up to today.",
    ),
]
