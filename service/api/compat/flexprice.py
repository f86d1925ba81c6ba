"""Flexprice (seed 003): ``/compat/flexprice/v1/customers``.

Mapping: ``external_id`` is tally's customer_identifier, ``id`` tally's customer uuid,
``tenant_id`` the organization id, ``environment_id`` the environment (``prod``/``test``).
Flexprice's statuses map onto tally's: ``published`` is ``active``; ``draft`` and
``archived`` are themselves (a blacklisted or deactivated customer shows tally's status).
``sort`` accepts ``external_id`` and every canonical sort field. ``name``, ``email`` and the
address fields are strings, ``""`` when tally has none (as in flexprice: the seed's example shows
``"address_line2": ""``), never null.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service.api import examples
from service.api.listing import json_with, run_list
from service.api.models import choice
from service.api.params import parse_query
from service.api.routing import PRINCIPAL, Endpoint
from service.api.shapes import customer_shape
from service.core.profile import Identifier, ShortText
from service.core.query import SORT_FIELDS, Col, CustomerFilter, ListQuery, Sort

BASE = "/compat/flexprice"
TAG = "Flexprice customers API"
STATUS_TO_TALLY = {"published": "active", "draft": "draft", "archived": "archived"}
_SORT = choice(["external_id", *SORT_FIELDS], "created_at")
SortField = Annotated[str, _SORT[0], _SORT[1]]


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=1000, description="Customers per page, 1-1000.")
    offset: int = Field(0, ge=0, le=10_000_000, description="Customers to skip.")
    sort: SortField = Field("created_at", description="Field to sort by (e.g. created_at, name, email).")
    order: Literal["asc", "desc"] = Field("desc", description="Sort order.")
    status: Literal["published", "draft", "archived"] | None = None
    customer_ids: list[UUID] = Field(default_factory=list, max_length=1000, description="Comma-separated ids.")
    external_ids: list[Identifier] = Field(default_factory=list, max_length=1000, description="Comma-separated.")
    external_id: Identifier | None = None
    email: ShortText | None = None
    parent_customer_ids: list[UUID] = Field(default_factory=list, max_length=1000)
    expand: Literal["parent_customer"] | None = None


class FlexpriceCustomer(BaseModel):
    id: UUID
    external_id: Annotated[str, Col("customer_identifier")]
    name: Annotated[str, Col("name", "text")]
    email: Annotated[str, Col("email", "text")]
    address_line1: Annotated[str, Col("address_line1", "text")]
    address_line2: Annotated[str, Col("address_line2", "text")]
    address_city: Annotated[str, Col("address_city", "text")]
    address_state: Annotated[str, Col("address_state", "text")]
    address_postal_code: Annotated[str, Col("address_postal_code", "text")]
    address_country: Annotated[str, Col("address_country", "text")]
    parent_customer_id: UUID | None
    metadata: dict[str, Any]
    environment_id: Annotated[str, Col("environment")]
    tenant_id: Annotated[UUID, Col("organization_id")]
    status: Annotated[str, Col("status", values=(("active", "published"),))]
    created_at: Annotated[datetime, Col("created_at", "iso_z")]
    updated_at: Annotated[datetime, Col("updated_at", "iso_z")]


class FlexpriceCustomerExpanded(FlexpriceCustomer):
    parent_customer: FlexpriceCustomer | None = Field(None, description="With expand=parent_customer.")


class FlexpricePagination(BaseModel):
    total: int
    limit: int
    offset: int


class FlexpriceCustomerList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.FLEXPRICE_CUSTOMER_LIST]})

    items: list[FlexpriceCustomerExpanded]
    pagination: FlexpricePagination


SHAPES = {
    False: customer_shape(FlexpriceCustomer),
    True: customer_shape(FlexpriceCustomer, parent_key="parent_customer"),
}


async def list_customers(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, ListParams)
    identifiers = tuple(dict.fromkeys([*params.external_ids, *([params.external_id] if params.external_id else [])]))
    q = ListQuery(
        organization_id=principal.organization_id,
        environment=principal.environment,
        filter=CustomerFilter(
            statuses=(STATUS_TO_TALLY[params.status],) if params.status else (),
            email=params.email,
            ids=tuple(params.customer_ids),
            identifiers=identifiers,
            parent_ids=tuple(params.parent_customer_ids),
        ),
        sort=Sort("customer_identifier" if params.sort == "external_id" else params.sort, params.order == "desc"),
        limit=params.limit,
        offset=params.offset,
    )
    page = await run_list(request, q, SHAPES[params.expand == "parent_customer"])
    envelope = {"pagination": {"total": page.count, "limit": params.limit, "offset": params.offset}}
    return web.Response(body=json_with(envelope, "items", page.docs), content_type="application/json")


ENDPOINTS = [
    Endpoint(
        "GET",
        BASE + "/v1/customers",
        list_customers,
        "List customers",
        TAG,
        "read",
        query=ListParams,
        response=FlexpriceCustomerList,
        errors=(400, 401, 403, 429),
    ),
]
