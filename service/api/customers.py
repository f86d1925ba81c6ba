"""Canonical customer routes, ``/v1/customers``: tally's own dialect, served by the handlers
every dialect shares (its ListAdapter: three pagination styles and signed cursors; its
CustomerAdapter: retrieve, create, update, delete), and the usage series."""

from __future__ import annotations

from datetime import timedelta
from functools import cache

from aiohttp import web

from service.api import appkeys, dbaccess
from service.api.detail import CustomerAdapter, NewCustomer
from service.api.errors import invalid
from service.api.links import link
from service.api.listing import JSON, ListAdapter, Listed, Window, json_with, key_environment
from service.api.models import (
    Customer,
    CustomerCreate,
    CustomerExpanded,
    CustomerFilterParams,
    CustomerList,
    CustomerPatch,
    ListParams,
    RetrieveParams,
    Subscription,
    UsageParams,
    UsageSeries,
)
from service.api.params import WRITE_BODY_BYTES
from service.api.routing import Call, Endpoint
from service.api.shapes import customer_shape
from service.domain.listing import CustomerFilter, ListQuery, Sort, resume
from service.store import customers as core
from service.store import usage as usage_store
from service.store.rendering import Shape

DEFAULT_LIMIT = 50
# Without from/to a usage series covers the organization's last 30 days, today included.
DEFAULT_SERIES_DAYS = 30
DEFAULT_SORT = "-first_seen"


@cache
def canonical_shape(expand_parent: bool, include_subscriptions: bool) -> Shape:
    return customer_shape(
        Customer,
        parent_key="parent_customer" if expand_parent else None,
        subscriptions_key="subscriptions" if include_subscriptions else None,
        subscription_model=Subscription if include_subscriptions else None,
    )


def expanded_shape(params: ListParams | RetrieveParams) -> Shape:
    return canonical_shape(params.expand == "parent_customer", params.include == "subscriptions")


def window(params: ListParams) -> Window:
    """The page the parameters ask for, in one of the pagination styles (not two at once)."""
    paged = params.page is not None or params.page_size is not None
    if paged and (params.limit is not None or params.offset is not None):
        raise invalid("page", "use page/page_size or limit/offset, not both")
    if params.cursor is not None and (paged or params.offset is not None):
        raise invalid("cursor", "cannot be combined with offset or page")
    if paged:
        limit = params.page_size or DEFAULT_LIMIT
        return Window(limit, ((params.page or 1) - 1) * limit)
    return Window(params.limit or DEFAULT_LIMIT, params.offset or 0)


def customer_filter(params: CustomerFilterParams) -> CustomerFilter:
    return CustomerFilter(
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
        usage_from=params.usage_from,
        usage_to=params.usage_to,
        usage_only=bool(params.usage_only),
        models=tuple(sorted(set(params.model))),
    )


def resume_cursor(call: Call[ListParams, None], params: ListParams, q: ListQuery) -> ListQuery:
    if params.cursor is None:
        return q
    cursors = call.request.app[appkeys.CURSORS]
    return resume(q, cursors.decode(params.cursor), explicit_sort=params.sort_by is not None)


def page_links(listed: Listed[ListParams]) -> tuple[str | None, str | None, str | None]:
    """(next URL, previous URL, next_cursor) in the pagination style the request used."""
    request, params, q, page = listed.call.request, listed.params, listed.query, listed.page
    cursors = request.app[appkeys.CURSORS]
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


def envelope(listed: Listed[ListParams]) -> dict[str, object]:
    nxt, prev, next_cursor = page_links(listed)
    return {
        "count": listed.page.count,
        "next": nxt,
        "previous": prev,
        "next_cursor": next_cursor,
        "as_of": listed.page.as_of,
    }


LIST = ListAdapter[ListParams](
    rows="results",
    window=window,
    sort=lambda params: Sort.parse(params.sort_by or DEFAULT_SORT),
    shape=expanded_shape,
    envelope=envelope,
    filter=customer_filter,
    resume=resume_cursor,
)


def new_customer(body: CustomerCreate) -> NewCustomer:
    values = body.columns()
    values.pop("customer_identifier", None)
    values.pop("environment", None)
    return NewCustomer(body.customer_identifier, values, body.environment)


ONE = CustomerAdapter[RetrieveParams](
    shape=expanded_shape,
    written=canonical_shape(False, False),
    columns=CustomerPatch.columns,
    new=new_customer,
    location="/v1/customers/",
)


async def customer_usage(call: Call[UsageParams, None]) -> web.Response:
    params, principal = call.query, call.principal
    identifier = call.request.match_info["customer_identifier"]
    if params.top is not None and params.group_by is None:
        raise invalid("top", "only with group_by=model or group_by=provider")
    async with dbaccess.connection(call.request, read=True) as conn:
        today, zone = await usage_store.today(conn, principal.organization_id)
        end = params.to or today
        start = params.from_ or end - timedelta(days=DEFAULT_SERIES_DAYS - 1)
        series = await core.usage_series(
            conn,
            principal.organization_id,
            key_environment(principal, params),
            identifier,
            start,
            end,
            params.granularity,
            models=tuple(params.model),
            group_by=params.group_by,
            top=params.top or usage_store.DEFAULT_TOP,
        )
    envelope = {
        "customer_identifier": identifier,
        "granularity": params.granularity,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "time_zone": zone,
        "group_by": params.group_by,
    }
    return web.Response(body=json_with(envelope, "results", series), content_type=JSON)


IDENTIFIER = {"customer_identifier": "Your identifier for the customer (unique per environment)."}
# /v1/customers/changes is the change feed (service/api/changefeed.py) and /v1/customers/export
# the export (service/api/export.py), not customers called "changes" or "export" (as Respan's
# /api/users/list/ is its list: service/api/compat/respan.py).
NOT_A_CUSTOMER = {"customer_identifier": r"(?!(?:changes|export)$)[^/]+"}
TAG = "Customers"

ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/customers",
        LIST.handle,
        "List customers",
        TAG,
        "read",
        cached=True,
        query=ListParams,
        response=CustomerList,
        description="Paged, sorted, filtered list. count is over all pages; next/previous keep the "
        "pagination style of the request; next_cursor continues at constant cost.",
        operation_id="customers_list_customers",
    ),
    Endpoint(
        "POST",
        "/v1/customers",
        ONE.create,
        "Create a customer",
        TAG,
        "write",
        body=CustomerCreate,
        response=Customer,
        status=201,
        errors=(409,),
        max_body=WRITE_BODY_BYTES,
        operation_id="customers_create_customer",
    ),
    Endpoint(
        "GET",
        "/v1/customers/{customer_identifier}",
        ONE.retrieve,
        "Retrieve a customer",
        TAG,
        "read",
        cached=True,
        query=RetrieveParams,
        response=CustomerExpanded,
        path_params=IDENTIFIER,
        path_patterns=NOT_A_CUSTOMER,
        operation_id="customers_retrieve_customer",
    ),
    Endpoint(
        "PATCH",
        "/v1/customers/{customer_identifier}",
        ONE.update,
        "Update a customer",
        TAG,
        "write",
        query=RetrieveParams,
        body=CustomerPatch,
        response=Customer,
        path_params=IDENTIFIER,
        path_patterns=NOT_A_CUSTOMER,
        description="Only the fields sent change. Read-only or unknown fields are a 400 naming them.",
        max_body=WRITE_BODY_BYTES,
        operation_id="customers_update_customer",
    ),
    Endpoint(
        "DELETE",
        "/v1/customers/{customer_identifier}",
        ONE.delete,
        "Delete a customer",
        TAG,
        "write",
        query=RetrieveParams,
        status=204,
        path_params=IDENTIFIER,
        path_patterns=NOT_A_CUSTOMER,
        operation_id="customers_delete_customer",
    ),
    Endpoint(
        "GET",
        "/v1/customers/{customer_identifier}/usage",
        customer_usage,
        "Usage time series",
        TAG,
        "read",
        cached=True,
        query=UsageParams,
        response=UsageSeries,
        path_params=IDENTIFIER,
        description="One zero-filled bucket per day, week or month from 'from' to 'to' (days of the "
        "organization's reporting time zone, inclusive, "
        f"given as dates; 'to' at most {core.MAX_SERIES_DAYS} days after 'from'); without them, the last "
        f"{DEFAULT_SERIES_DAYS} days up to today. model= keeps only those models' usage; group_by=model (or "
        "provider) gives, per bucket with usage, a row per model: the top ones by cost over the range, the rest "
        "summed as 'other', and usage without a model under null.",
    ),
]
