"""Respan (seeds 000, 001): ``/compat/respan/api/users/list/`` and ``/api/users/{id}/``.

Unstated by the seed and chosen here: ``page`` is an integer ≥ 1; ``sort_by`` accepts the
canonical sort fields; the detail route's ``id`` is the customer_identifier (as in the seed's
example) while the list's ``id`` is customer_identifier + environment + organization uuid.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service.api import appkeys, dbaccess, examples
from service.api.customers import write_stamp
from service.api.listing import json_with, link, run_list
from service.api.models import SORT_CHOICES, choice
from service.api.params import parse_body, parse_query
from service.api.routing import PRINCIPAL, Endpoint
from service.api.shapes import customer_shape
from service.core import customers as core
from service.core.profile import Email, Money, ProfileUpdate, ShortText
from service.core.query import Col, ListQuery, Sort
from service.core.vocabulary import BudgetDuration, Environment

BASE = "/compat/respan"
TAG = "Respan users API"


# Respan's own name for last_active is accepted too.
SORT_ALIASES = {"last_active_timeframe": "last_active", "-last_active_timeframe": "-last_active"}
_SORT = choice([*SORT_CHOICES, *SORT_ALIASES], "-first_seen")
RespanSortBy = Annotated[str, _SORT[0], _SORT[1]]


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    page: int = Field(1, ge=1, le=10_000_000, description="Page number.")
    page_size: int = Field(50, ge=1, le=1000, description="Customers per page. Maximum is 1000.")
    sort_by: RespanSortBy = Field("-first_seen", description="Sort field; prefix '-' for descending.")
    environment: Environment = Field("prod", description="prod or test.")


class DetailParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: Environment | None = Field(None, description="Defaults to the key's environment.")


class RespanUser(BaseModel):
    id: Annotated[str, Col("scoped_id")] = Field(description="customer_identifier + environment + organization id")
    unique_organization_id: Annotated[UUID, Col("organization_id")]
    customer_identifier: str
    environment: Environment
    name: str | None
    email: str | None
    first_seen: Annotated[datetime | None, Col("first_seen", "iso_z")]
    last_active_timeframe: Annotated[datetime | None, Col("last_active", "iso_z")]
    active_days: int
    number_of_requests: int
    total_tokens: int
    total_cost: Annotated[float, Col("total_cost", "number")]
    average_latency: float | None
    average_ttft: float | None


class RespanUserList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.RESPAN_USER_LIST]})

    count: int
    next: str | None
    previous: str | None
    results: list[RespanUser]


class RespanUserDetail(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.RESPAN_USER_DETAIL]})

    id: Annotated[str, Col("customer_identifier")]
    name: str | None
    email: str | None
    customer_identifier: str
    environment: Environment
    total_budget: Annotated[float | None, Col("total_budget", "number")]
    period_budget: Annotated[float | None, Col("period_budget", "number")]
    organization_name: str | None
    total_period_usage: Annotated[float, Col("total_period_usage", "number")]
    period_start: Annotated[datetime | None, Col("period_start", "iso_z")]
    period_end: Annotated[datetime | None, Col("period_end", "iso_z")]
    budget_duration: BudgetDuration | None
    updated_at: Annotated[datetime, Col("updated_at", "iso_z")]


class RespanUserPatch(BaseModel):
    """The editable fields of seed 001."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [examples.RESPAN_USER_PATCH]})

    name: ShortText | None = None
    email: Email | None = None
    total_budget: Money | None = None
    period_budget: Money | None = None
    budget_duration: BudgetDuration | None = None


LIST_SHAPE = customer_shape(RespanUser)
DETAIL_SHAPE = customer_shape(RespanUserDetail)
JSON = "application/json"


async def list_users(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, ListParams)
    q = ListQuery(
        organization_id=principal.organization_id,
        environment=params.environment,
        sort=Sort.parse(SORT_ALIASES.get(params.sort_by, params.sort_by)),
        limit=params.page_size,
        offset=(params.page - 1) * params.page_size,
    )
    page = await run_list(request, q, LIST_SHAPE)
    envelope = {
        "count": page.count,
        "next": link(request, page=params.page + 1) if page.next_position else None,
        "previous": link(request, page=params.page - 1) if params.page > 1 else None,
    }
    return web.Response(body=json_with(envelope, "results", page.docs), content_type=JSON)


def _where(request: web.Request) -> tuple[UUID, str, str]:
    principal = request[PRINCIPAL]
    params = parse_query(request, DetailParams)
    return (
        principal.organization_id,
        params.environment or principal.environment,
        request.match_info["customer_identifier"],
    )


async def retrieve_user(request: web.Request) -> web.Response:
    org, env, identifier = _where(request)
    async with dbaccess.connection(request, read=True) as conn:
        doc = await core.get_customer(conn, org, env, identifier, DETAIL_SHAPE)
    return web.Response(text=doc, content_type=JSON)


async def update_user(request: web.Request) -> web.Response:
    org, env, identifier = _where(request)
    body = await parse_body(request, RespanUserPatch, request.app[appkeys.SETTINGS].max_body_bytes)
    values = ProfileUpdate.model_validate(body.model_dump(exclude_unset=True)).columns()
    async with dbaccess.connection(request) as conn:
        doc = await core.update_customer(
            conn,
            org,
            env,
            identifier,
            values,
            DETAIL_SHAPE,
            **write_stamp(request),
        )
    return web.Response(text=doc, content_type=JSON)


async def delete_user(request: web.Request) -> web.Response:
    org, env, identifier = _where(request)
    async with dbaccess.connection(request) as conn:
        await core.delete_customer(conn, org, env, identifier, **write_stamp(request))
    return web.Response(status=204)


IDENTIFIER = {"customer_identifier": "Your unique identifier for this customer."}
# /api/users/list/ is the list route, not a customer called "list" (as in Respan's own API).
NOT_LIST = {"customer_identifier": r"(?!list(?:/|$))[^/]+"}
ENDPOINTS = [
    Endpoint(
        "GET",
        BASE + "/api/users/list/",
        list_users,
        "List customers",
        TAG,
        "read",
        query=ListParams,
        response=RespanUserList,
        errors=(400, 401, 429),
    ),
    Endpoint(
        "GET",
        BASE + "/api/users/{customer_identifier}/",
        retrieve_user,
        "Retrieve a customer",
        TAG,
        "read",
        query=DetailParams,
        response=RespanUserDetail,
        errors=(400, 401, 404, 429),
        path_params=IDENTIFIER,
        path_patterns=NOT_LIST,
    ),
    Endpoint(
        "PATCH",
        BASE + "/api/users/{customer_identifier}/",
        update_user,
        "Update a customer",
        TAG,
        "write",
        query=DetailParams,
        body=RespanUserPatch,
        response=RespanUserDetail,
        errors=(400, 401, 404, 429),
        path_params=IDENTIFIER,
        path_patterns=NOT_LIST,
    ),
    Endpoint(
        "DELETE",
        BASE + "/api/users/{customer_identifier}/",
        delete_user,
        "Delete a customer",
        TAG,
        "write",
        query=DetailParams,
        status=204,
        errors=(400, 401, 404, 429),
        path_params=IDENTIFIER,
        path_patterns=NOT_LIST,
    ),
]
