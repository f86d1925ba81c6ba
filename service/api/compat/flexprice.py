"""Flexprice's customers API (Flexprice's API reference, Customers, and what Flexprice's SDKs
send): ``/compat/flexprice/v1/customers``.

Routes: ``GET /v1/customers`` (the API reference's List customers), ``POST /v1/customers/search`` (the SDKs'
list: the same filters in a JSON body, ``sort`` as a list of ``{field, direction}``, generic
``filters``, a created-at time range), ``GET /v1/customers/{id}``, ``GET
/v1/customers/external/{external_id}``, ``POST /v1/customers``, ``PUT /v1/customers?id=…``
(or ``?external_customer_id=…``) and ``DELETE /v1/customers/{id}``. A key is accepted as
``Authorization: Bearer <key>`` or, as the SDKs send it, ``x-api-key: <key>``.

Mapping: ``external_id`` is tally's customer_identifier, ``id`` tally's customer uuid,
``tenant_id`` the organization id, ``environment_id`` the environment (``prod``/``test``: the
key's); a write's ``contact`` is tally's phone (responses keep the API reference's fields). ``name``,
``email`` and the address fields are strings,
``""`` when tally has none (as in Flexprice: its example shows ``"address_line2": ""``),
never null.

``metadata`` is a map of strings, as Flexprice's SDKs type it (``Dict[str, str]``): a
string value as it is, any other JSON value as its JSON text (``true`` -> ``"true"``, ``5``
-> ``"5"``, an object as its JSON, as PostgreSQL writes jsonb: ``{"a": 1}``).

Statuses: Flexprice has ``published``, ``archived`` and ``deleted``. Rendered: ``active`` and
``draft`` are ``published``; ``archived``, ``blacklisted`` and ``deactivated`` are
``archived``. Filtered: ``published`` is active or draft, ``archived`` is archived,
blacklisted or deactivated, ``draft`` (the API reference names it) is draft; ``deleted`` matches
nothing, as tally keeps no deleted customers (a delete removes the row). Written (PUT has no
status field): never.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from service.api import dbaccess, examples
from service.api.customers import write_stamp
from service.api.listing import json_with, run_list
from service.api.models import choice
from service.api.params import FILTER_BODY_BYTES, WRITE_BODY_BYTES, parse_body, parse_query, validation_error
from service.api.routing import API_KEY_HEADER, PRINCIPAL, Endpoint
from service.api.shapes import customer_shape
from service.domain.errors import InvalidInput, NotFound
from service.domain.keys import Principal, as_uuid
from service.domain.listing import (
    MAX_CONDITIONS,
    SORT_FIELD_NAMES,
    Condition,
    CustomerFilter,
    ListQuery,
    Sort,
    condition,
)
from service.domain.profile import Email, Identifier, ProfileUpdate, ShortText, Timestamp
from service.store import customers as core
from service.store.listing import Col, Shape

BASE = "/compat/flexprice"
TAG = "Flexprice customers API"
JSON = "application/json"

# Flexprice's status filter -> tally's statuses (an empty tuple matches nothing).
STATUS_TO_TALLY: dict[str, tuple[str, ...]] = {
    "published": ("active", "draft"),
    "draft": ("draft",),
    "archived": ("archived", "blacklisted", "deactivated"),
    "deleted": (),
}
# tally's status -> the one Flexprice shows.
STATUS_FROM_TALLY = (
    ("active", "published"),
    ("draft", "published"),
    ("blacklisted", "archived"),
    ("deactivated", "archived"),
)
FlexStatus = Literal["published", "draft", "archived", "deleted"]
_SORT = choice(["external_id", *SORT_FIELD_NAMES], "created_at")
SortField = Annotated[str, _SORT[0], _SORT[1]]
# Generic filter fields -> the core's; operators likewise ("before"/"after" on times).
FILTER_FIELDS = {
    "external_id": "customer_identifier",
    "name": "name",
    "email": "email",
    "created_at": "created_at",
    "updated_at": "updated_at",
}
OPERATORS = {
    "eq": "eq",
    "in": "eq",
    "not_in": "ne",
    "contains": "contains",
    "not_contains": "not_contains",
    "gt": "gt",
    "gte": "gte",
    "lt": "lt",
    "lte": "lte",
    "before": "lt",
    "after": "gt",
}


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=1000, description="Customers per page, 1-1000.")
    offset: int = Field(0, ge=0, le=10_000_000, description="Customers to skip.")
    sort: SortField = Field("created_at", description="Field to sort by (e.g. created_at, name, email).")
    order: Literal["asc", "desc"] = Field("desc", description="Sort order.")
    status: FlexStatus | None = None
    customer_ids: list[UUID] = Field(default_factory=list, max_length=1000, description="Comma-separated ids.")
    external_ids: list[Identifier] = Field(default_factory=list, max_length=1000, description="Comma-separated.")
    external_id: Identifier | None = None
    email: ShortText | None = None
    parent_customer_ids: list[UUID] = Field(default_factory=list, max_length=1000)
    expand: Literal["parent_customer"] | None = None


class FlexpriceFilterValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    array: list[str] | None = Field(None, max_length=1000)
    boolean: StrictBool | None = None
    date: str | None = None
    number: StrictFloat | None = None
    string: str | None = None


class FlexpriceFilterCondition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description=f"One of: {', '.join(FILTER_FIELDS)}.")
    operator: str = Field("eq", description=f"One of: {', '.join(OPERATORS)}.")
    data_type: Literal["string", "number", "date", "array"] | None = None
    value: FlexpriceFilterValue = Field(default_factory=FlexpriceFilterValue)


class FlexpriceSortCondition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: SortField
    direction: Literal["asc", "desc"] = "desc"


class FlexpriceSearch(BaseModel):
    """The SDKs' ``CustomerFilter``: the list's filters, in a body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"external_ids": ["user_123"]}]})

    limit: StrictInt = Field(50, ge=1, le=1000)
    offset: StrictInt = Field(0, ge=0, le=10_000_000)
    order: Literal["asc", "desc"] = Field("desc", description="With no sort: created_at in this order.")
    sort: list[FlexpriceSortCondition] | None = Field(
        None, max_length=1, description="At most one: tally sorts by one field."
    )
    status: FlexStatus | None = None
    customer_ids: list[UUID] | None = Field(None, max_length=1000)
    external_ids: list[Identifier] | None = Field(None, max_length=1000)
    external_id: Identifier | None = None
    email: ShortText | None = None
    metadata: dict[str, ShortText] | None = Field(None, max_length=50, description="Every key=value must match.")
    filters: list[FlexpriceFilterCondition] | None = Field(None, max_length=MAX_CONDITIONS)
    start_time: Timestamp | None = Field(None, description="Created at or after.")
    end_time: Timestamp | None = Field(None, description="Created at or before.")
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
    metadata: Annotated[dict[str, str], Col("metadata", "string_map")] = Field(
        description="A map of strings: non-string values as their JSON text."
    )
    environment_id: Annotated[str, Col("environment")]
    tenant_id: Annotated[UUID, Col("organization_id")]
    status: Annotated[Literal["published", "archived"], Col("status", values=STATUS_FROM_TALLY)]
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


class FlexpriceCustomerWrite(BaseModel):
    """The fields of Flexprice's create and update requests that tally holds. The SDKs'
    ``billing_currency``, ``contact_persons``, ``integration_entity_mapping``,
    ``tax_treatment`` and ``timezone`` have no counterpart: they are refused (400)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "Acme", "email": "a@acme.dev"}]})

    external_id: Identifier | None = None
    name: ShortText | None = None
    email: Email | None = None
    contact: ShortText | None = Field(None, description="tally's phone.")
    address_line1: ShortText | None = None
    address_line2: ShortText | None = None
    address_city: ShortText | None = None
    address_state: ShortText | None = None
    address_postal_code: ShortText | None = None
    address_country: ShortText | None = None
    metadata: dict[str, ShortText] | None = Field(None, max_length=100, description="Replaces the whole map.")

    def profile(self) -> dict[str, object]:
        """The sent fields as tally's writable columns, checked by the canonical model."""
        sent = self.model_dump(exclude_unset=True, exclude={"external_id"})
        address = {k.removeprefix("address_"): sent.pop(k) for k in list(sent) if k.startswith("address_")}
        if "contact" in sent:
            sent["phone"] = sent.pop("contact")
        if address:
            sent["address"] = address
        try:
            return ProfileUpdate.model_validate(sent).columns()
        except ValidationError as exc:
            raise validation_error(exc, "body") from None


class FlexpriceCustomerCreate(FlexpriceCustomerWrite):
    # external_id is required here: an example without it would make "Try it out" a 400.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"external_id": "user_67890", "name": "Tech Startup Inc", "email": "admin@techstartup.com"}]
        }
    )

    external_id: Identifier


class FlexpriceUpdateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Customer ID (tally's uuid).")
    external_customer_id: str | None = Field(None, description="Customer external ID.")


SHAPES = {
    False: customer_shape(FlexpriceCustomer),
    True: customer_shape(FlexpriceCustomer, parent_key="parent_customer"),
}
ONE = SHAPES[False]


class _Identifier(BaseModel):
    customer_identifier: str


IDENTIFIER_SHAPE = customer_shape(_Identifier)


def _statuses(status: str | None) -> dict[str, Any]:
    if status is None:
        return {}
    statuses = STATUS_TO_TALLY[status]
    return {"statuses": statuses} if statuses else {"nothing": True}


def _conditions(body: FlexpriceSearch) -> tuple[Condition, ...]:
    found: list[Condition] = []
    for i, cond in enumerate(body.filters or ()):
        param = f"filters.{i}"
        if cond.field not in FILTER_FIELDS:
            raise InvalidInput(param, f"cannot filter on '{cond.field}'; filterable: {', '.join(FILTER_FIELDS)}")
        if cond.operator not in OPERATORS:
            raise InvalidInput(param, f"unknown operator '{cond.operator}'; one of {', '.join(OPERATORS)}")
        v = cond.value
        if v.boolean is not None:
            raise InvalidInput(param, "no filterable field is a boolean")
        given: list[object] = [v.string, v.number, v.date]
        values = [*v.array] if v.array is not None else [x for x in given if x is not None][:1]
        found.append(condition(FILTER_FIELDS[cond.field], OPERATORS[cond.operator], values, param))
    if body.start_time is not None:
        found.append(condition("created_at", "gte", [body.start_time], "start_time"))
    if body.end_time is not None:
        found.append(condition("created_at", "lte", [body.end_time], "end_time"))
    return tuple(found)


async def _page(request: web.Request, q: ListQuery, expand: bool, limit: int, offset: int) -> web.Response:
    page = await run_list(request, q, SHAPES[expand])
    envelope = {"pagination": {"total": page.count, "limit": limit, "offset": offset}}
    return web.Response(body=json_with(envelope, "items", page.docs), content_type=JSON)


async def list_customers(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, ListParams)
    identifiers = tuple(dict.fromkeys([*params.external_ids, *([params.external_id] if params.external_id else [])]))
    q = ListQuery(
        organization_id=principal.organization_id,
        environment=principal.environment,
        filter=CustomerFilter(
            email=params.email,
            ids=tuple(params.customer_ids),
            identifiers=identifiers,
            parent_ids=tuple(params.parent_customer_ids),
            **_statuses(params.status),
        ),
        sort=Sort("customer_identifier" if params.sort == "external_id" else params.sort, params.order == "desc"),
        limit=params.limit,
        offset=params.offset,
    )
    return await _page(request, q, params.expand == "parent_customer", params.limit, params.offset)


async def search_customers(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    body = await parse_body(request, FlexpriceSearch)
    identifiers = [*(body.external_ids or ()), *([body.external_id] if body.external_id else [])]
    if body.sort:
        field = body.sort[0].field
        sort = Sort("customer_identifier" if field == "external_id" else field, body.sort[0].direction == "desc")
    else:
        sort = Sort("created_at", body.order == "desc")
    q = ListQuery(
        organization_id=principal.organization_id,
        environment=principal.environment,
        filter=CustomerFilter(
            email=body.email,
            ids=tuple(body.customer_ids or ()),
            identifiers=tuple(dict.fromkeys(identifiers)),
            metadata=tuple(sorted((body.metadata or {}).items())),
            conditions=_conditions(body),
            **_statuses(body.status),
        ),
        sort=sort,
        limit=body.limit,
        offset=body.offset,
    )
    return await _page(request, q, body.expand == "parent_customer", body.limit, body.offset)


async def _by_id(request: web.Request, principal: Principal, text: str, shape: Shape) -> str:
    """The customer whose tally uuid is ``text``, in ``shape``; NotFound otherwise."""
    customer_id = as_uuid(text)
    if customer_id is not None:
        q = ListQuery(
            organization_id=principal.organization_id,
            environment=principal.environment,
            filter=CustomerFilter(ids=(customer_id,)),
            limit=1,
            count=False,
        )
        page = await run_list(request, q, shape)
        if page.docs:
            return page.docs[0]
    raise NotFound(f"no customer '{text}' in environment '{principal.environment}'")


async def _identifier(request: web.Request, principal: Principal, text: str) -> str:
    identifier = orjson.loads(await _by_id(request, principal, text, IDENTIFIER_SHAPE))["customer_identifier"]
    assert isinstance(identifier, str)
    return identifier


async def get_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return web.Response(text=await _by_id(request, principal, request.match_info["id"], ONE), content_type=JSON)


async def get_customer_by_external_id(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    async with dbaccess.connection(request, read=True) as conn:
        doc = await core.get_customer(
            conn, principal.organization_id, principal.environment, request.match_info["external_id"], ONE
        )
    return web.Response(text=doc, content_type=JSON)


async def create_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    body = await parse_body(request, FlexpriceCustomerCreate)
    async with dbaccess.connection(request) as conn:
        doc = await core.create_customer(
            conn,
            principal.organization_id,
            principal.environment,
            body.external_id,
            body.profile(),
            ONE,
            **write_stamp(request),
        )
    return web.Response(text=doc, status=201, content_type=JSON)


async def update_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    params = parse_query(request, FlexpriceUpdateParams)
    body = await parse_body(request, FlexpriceCustomerWrite)
    if params.id is not None:
        identifier = await _identifier(request, principal, params.id)
        if params.external_customer_id is not None and params.external_customer_id != identifier:
            raise InvalidInput("external_customer_id", "names another customer than id")
    elif params.external_customer_id is not None:
        identifier = params.external_customer_id
    else:
        raise InvalidInput("id", "give id or external_customer_id")
    if body.external_id is not None and body.external_id != identifier:
        raise InvalidInput("external_id", "tally cannot change a customer's external_id")
    async with dbaccess.connection(request) as conn:
        doc = await core.update_customer(
            conn,
            principal.organization_id,
            principal.environment,
            identifier,
            body.profile(),
            ONE,
            **write_stamp(request),
        )
    return web.Response(text=doc, content_type=JSON)


async def delete_customer(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    identifier = await _identifier(request, principal, request.match_info["id"])
    async with dbaccess.connection(request) as conn:
        await core.delete_customer(
            conn, principal.organization_id, principal.environment, identifier, **write_stamp(request)
        )
    return web.Response(status=204)


ID = {"id": "Customer ID (tally's customer uuid)."}
# /v1/customers/search and /v1/customers/external/… are routes, not customer ids.
NOT_A_ROUTE = {"id": r"(?!search$|external$)[^/]+"}
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
        api_key_header=API_KEY_HEADER,
    ),
    Endpoint(
        "POST",
        BASE + "/v1/customers/search",
        search_customers,
        "Query customers",
        TAG,
        "read",
        body=FlexpriceSearch,
        response=FlexpriceCustomerList,
        errors=(400, 401, 403, 413, 429),
        api_key_header=API_KEY_HEADER,
        max_body=FILTER_BODY_BYTES,
    ),
    Endpoint(
        "GET",
        BASE + "/v1/customers/external/{external_id}",
        get_customer_by_external_id,
        "Get customer by external ID",
        TAG,
        "read",
        response=FlexpriceCustomer,
        errors=(401, 403, 404, 429),
        path_params={"external_id": "The customer's external ID (tally's customer_identifier)."},
        api_key_header=API_KEY_HEADER,
    ),
    Endpoint(
        "GET",
        BASE + "/v1/customers/{id}",
        get_customer,
        "Get customer",
        TAG,
        "read",
        response=FlexpriceCustomer,
        errors=(401, 403, 404, 429),
        path_params=ID,
        path_patterns=NOT_A_ROUTE,
        api_key_header=API_KEY_HEADER,
    ),
    Endpoint(
        "POST",
        BASE + "/v1/customers",
        create_customer,
        "Create customer",
        TAG,
        "write",
        body=FlexpriceCustomerCreate,
        response=FlexpriceCustomer,
        status=201,
        errors=(400, 401, 403, 409, 413, 429),
        api_key_header=API_KEY_HEADER,
        max_body=WRITE_BODY_BYTES,
    ),
    Endpoint(
        "PUT",
        BASE + "/v1/customers",
        update_customer,
        "Update customer",
        TAG,
        "write",
        query=FlexpriceUpdateParams,
        body=FlexpriceCustomerWrite,
        response=FlexpriceCustomer,
        errors=(400, 401, 403, 404, 413, 429),
        api_key_header=API_KEY_HEADER,
        max_body=WRITE_BODY_BYTES,
    ),
    Endpoint(
        "DELETE",
        BASE + "/v1/customers/{id}",
        delete_customer,
        "Delete customer",
        TAG,
        "write",
        status=204,
        errors=(401, 403, 404, 429),
        path_params=ID,
        path_patterns=NOT_A_ROUTE,
        api_key_header=API_KEY_HEADER,
    ),
]
