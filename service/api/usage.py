"""``GET /v1/usage``: the organization's usage over a range of its days (of its reporting time
zone), in total per bucket or grouped by customer, model or provider (the meter query OpenMeter's
and Stripe's APIs offer), exact, from the same daily rows as a customer's usage series."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from service.api import dbaccess
from service.api.errors import invalid
from service.api.listing import JSON, json_with, key_environment
from service.api.models import UsageQueryParams, UsageReport
from service.api.routing import Call, Endpoint
from service.store import usage as store
from service.store.customers import MAX_SERIES_DAYS

DEFAULT_DAYS = 30
# Customers per page with group_by=customer.
DEFAULT_PAGE = 100


async def usage_report(call: Call[UsageQueryParams, None]) -> web.Response:
    params, principal = call.query, call.principal
    if params.group_by != "customer" and (params.after is not None or params.limit is not None):
        raise invalid("after" if params.after is not None else "limit", "pages only with group_by=customer")
    if params.top is not None and params.group_by not in store.DIMENSIONS:
        raise invalid("top", "only with group_by=model or group_by=provider")
    async with dbaccess.connection(call.request, read=True) as conn:
        today, zone = await store.today(conn, principal.organization_id)
        end = params.to or today
        start = params.from_ or end - timedelta(days=DEFAULT_DAYS - 1)
        if end < start:
            raise invalid("to", "must not be before 'from'")
        if (end - start).days > MAX_SERIES_DAYS:
            raise invalid("to", f"at most {MAX_SERIES_DAYS} days after 'from'")
        q = store.UsageQuery(
            principal.organization_id,
            key_environment(principal, params),
            start,
            end,
            params.granularity,
            tuple(params.customer_identifiers),
            tuple(params.model),
        )
        envelope: dict[str, object] = {
            "granularity": params.granularity,
            "from": start.isoformat(),
            "to": end.isoformat(),
            "time_zone": zone,
            "group_by": params.group_by,
        }
        results: str | list[str]
        if params.group_by is None:
            results = await store.totals(conn, q)
            envelope["next_after"] = None
        elif params.group_by in store.DIMENSIONS:
            results = await store.by_dimension(conn, q, params.group_by, params.top or store.DEFAULT_TOP)
            envelope["next_after"] = None
        else:
            rows, after = await store.by_customer(conn, q, params.after, params.limit or DEFAULT_PAGE)
            results = rows
            envelope["next_after"] = str(after) if after else None
    return web.Response(body=json_with(envelope, "results", results), content_type=JSON)


ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/usage",
        usage_report,
        "Organization usage",
        "Customers",
        "read",
        cached=True,
        query=UsageQueryParams,
        response=UsageReport,
        description="The organization's usage per day, ISO week or month from 'from' to 'to' (days of the "
        "organization's reporting time zone, inclusive; 'time_zone' in the response names it): in total "
        "(every bucket, zero-filled), or with group_by=customer each customer's buckets "
        "with usage, a page of customers at a time, or with group_by=model (or provider) each bucket's usage per "
        "model: the top ones by cost over the range, the rest summed as 'other', usage without a model under null. "
        f"model= keeps only those models' usage. 'to' at most {MAX_SERIES_DAYS} days after 'from'.",
        operation_id="usage_usage_report",
    ),
]
