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

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from service.api import examples
from service.api.conditions import Term, Vocabulary
from service.api.detail import ById, ByIdentifier, CustomerAdapter, Named, NewCustomer, in_path
from service.api.listing import ListAdapter, Listed, Window
from service.api.models import choice
from service.api.params import FILTER_BODY_BYTES, WRITE_BODY_BYTES, validation_error
from service.api.routing import API_KEY_HEADER, Call, Endpoint
from service.api.shapes import customer_shape
from service.domain.errors import InvalidInput
from service.domain.listing import MAX_CONDITIONS, SORT_FIELD_NAMES, CustomerFilter, Sort
from service.domain.profile import Email, Identifier, ProfileUpdate, ShortText, Timestamp
from service.store.rendering import Col

BASE = "/compat/flexprice"
TAG = "Flexprice customers API"

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
# Flexprice's sort fields: the core's, and external_id for tally's customer_identifier.
SORT_FIELDS = {"external_id": "customer_identifier"}
_SORT = choice([*SORT_FIELDS, *SORT_FIELD_NAMES], "created_at")
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
FILTERS = Vocabulary(FILTER_FIELDS, OPERATORS)


def _statuses(status: str | None) -> dict[str, Any]:
    if status is None:
        return {}
    statuses = STATUS_TO_TALLY[status]
    return {"statuses": statuses} if statuses else {"nothing": True}


def _filter(params: ListParams | FlexpriceSearch, **more: Any) -> CustomerFilter:
    """What the list's parameters and the search's body filter alike, and ``more``."""
    identifiers = [*(params.external_ids or ()), *([params.external_id] if params.external_id else [])]
    return CustomerFilter(
        email=params.email,
        ids=tuple(params.customer_ids or ()),
        identifiers=tuple(dict.fromkeys(identifiers)),
        **_statuses(params.status),
        **more,
    )


def _terms(body: FlexpriceSearch) -> Iterator[Term]:
    """The search's generic filters and its created-at range, as terms in Flexprice's names."""
    for i, cond in enumerate(body.filters or ()):
        v = cond.value
        if v.boolean is not None:
            raise InvalidInput(f"filters.{i}", "no filterable field is a boolean")
        given: list[object] = [v.string, v.number, v.date]
        values = [*v.array] if v.array is not None else [x for x in given if x is not None][:1]
        yield Term(f"filters.{i}", cond.field, cond.operator, values)
    if body.start_time is not None:
        yield Term("start_time", "created_at", "gte", [body.start_time])
    if body.end_time is not None:
        yield Term("end_time", "created_at", "lte", [body.end_time])


def _search_filter(body: FlexpriceSearch) -> CustomerFilter:
    metadata = tuple(sorted((body.metadata or {}).items()))
    return _filter(body, metadata=metadata, conditions=FILTERS.conditions(_terms(body)))


def _sort(field: str, direction: str) -> Sort:
    return Sort(SORT_FIELDS.get(field, field), descending=direction == "desc")


def _search_sort(body: FlexpriceSearch) -> Sort:
    """The first sort condition's (the SDKs send a list; tally sorts by one field), else created_at."""
    return _sort(body.sort[0].field, body.sort[0].direction) if body.sort else _sort("created_at", body.order)


def _envelope(listed: Listed[Any]) -> dict[str, object]:
    q = listed.query
    return {"pagination": {"total": listed.page.count, "limit": q.limit, "offset": q.offset}}


LIST = ListAdapter[ListParams](
    rows="items",
    window=lambda params: Window(params.limit, params.offset),
    sort=lambda params: _sort(params.sort, params.order),
    shape=lambda params: SHAPES[params.expand == "parent_customer"],
    envelope=_envelope,
    filter=lambda params: _filter(params, parent_ids=tuple(params.parent_customer_ids)),
)
SEARCH = ListAdapter[FlexpriceSearch](
    rows="items",
    params=lambda call: call.body,
    window=lambda body: Window(body.limit, body.offset),
    sort=_search_sort,
    shape=lambda body: SHAPES[body.expand == "parent_customer"],
    envelope=_envelope,
    filter=_search_filter,
)


def _new(body: FlexpriceCustomerCreate) -> NewCustomer:
    return NewCustomer(body.external_id, body.profile())


def _put_named(call: Call[FlexpriceUpdateParams, FlexpriceCustomerWrite]) -> Named:
    """PUT names its customer by id or external_customer_id, or both (which must agree); the
    body's external_id, if sent, must be the customer's: tally cannot change it."""
    params, body = call.query, call.body

    def check(identifier: str) -> None:
        if params.external_customer_id is not None and params.external_customer_id != identifier:
            raise InvalidInput("external_customer_id", "names another customer than id")
        if body.external_id is not None and body.external_id != identifier:
            raise InvalidInput("external_id", "tally cannot change a customer's external_id")

    if params.id is not None:
        return ById(params.id, check)
    if params.external_customer_id is not None:
        return ByIdentifier(params.external_customer_id, check)
    raise InvalidInput("id", "give id or external_customer_id")


# One customer: named by the path's id (tally's uuid), by the path's external_id, or by PUT's query.
BY_ID = CustomerAdapter[Any](
    shape=lambda _: SHAPES[False],
    written=SHAPES[False],
    named=in_path("id", by_id=True),
    columns=FlexpriceCustomerWrite.profile,
    new=_new,
)
BY_EXTERNAL_ID = replace(BY_ID, named=in_path("external_id"))
BY_QUERY = replace(BY_ID, named=_put_named)


ID = {"id": "Customer ID (tally's customer uuid)."}
# /v1/customers/search and /v1/customers/external/… are routes, not customer ids.
NOT_A_ROUTE = {"id": r"(?!search$|external$)[^/]+"}
ENDPOINTS = [
    Endpoint(
        "GET",
        BASE + "/v1/customers",
        LIST.handle,
        "List customers",
        TAG,
        "read",
        cached=True,
        query=ListParams,
        response=FlexpriceCustomerList,
        api_key_header=API_KEY_HEADER,
        operation_id="flexprice_list_customers",
    ),
    Endpoint(
        "POST",
        BASE + "/v1/customers/search",
        SEARCH.handle,
        "Query customers",
        TAG,
        "read",
        body=FlexpriceSearch,
        response=FlexpriceCustomerList,
        api_key_header=API_KEY_HEADER,
        max_body=FILTER_BODY_BYTES,
        operation_id="flexprice_search_customers",
    ),
    Endpoint(
        "GET",
        BASE + "/v1/customers/external/{external_id}",
        BY_EXTERNAL_ID.retrieve,
        "Get customer by external ID",
        TAG,
        "read",
        cached=True,
        response=FlexpriceCustomer,
        path_params={"external_id": "The customer's external ID (tally's customer_identifier)."},
        api_key_header=API_KEY_HEADER,
        operation_id="flexprice_get_customer_by_external_id",
    ),
    Endpoint(
        "GET",
        BASE + "/v1/customers/{id}",
        BY_ID.retrieve,
        "Get customer",
        TAG,
        "read",
        cached=True,
        response=FlexpriceCustomer,
        path_params=ID,
        path_patterns=NOT_A_ROUTE,
        api_key_header=API_KEY_HEADER,
        operation_id="flexprice_get_customer",
    ),
    Endpoint(
        "POST",
        BASE + "/v1/customers",
        BY_ID.create,
        "Create customer",
        TAG,
        "write",
        body=FlexpriceCustomerCreate,
        response=FlexpriceCustomer,
        status=201,
        errors=(409,),
        api_key_header=API_KEY_HEADER,
        max_body=WRITE_BODY_BYTES,
        operation_id="flexprice_create_customer",
    ),
    Endpoint(
        "PUT",
        BASE + "/v1/customers",
        BY_QUERY.update,
        "Update customer",
        TAG,
        "write",
        query=FlexpriceUpdateParams,
        body=FlexpriceCustomerWrite,
        response=FlexpriceCustomer,
        errors=(404,),
        api_key_header=API_KEY_HEADER,
        max_body=WRITE_BODY_BYTES,
        operation_id="flexprice_update_customer",
    ),
    Endpoint(
        "DELETE",
        BASE + "/v1/customers/{id}",
        BY_ID.delete,
        "Delete customer",
        TAG,
        "write",
        status=204,
        path_params=ID,
        path_patterns=NOT_A_ROUTE,
        api_key_header=API_KEY_HEADER,
        operation_id="flexprice_delete_customer",
    ),
]
