"""Respan's users API (Respan's API reference, Users: List customers, Retrieve, Update and
Delete a customer): ``/compat/respan/api/users/list/`` and ``/api/users/{id}/``.

Unstated by Respan's docs and chosen here: ``page`` is an integer ≥ 1; ``sort_by`` accepts the
canonical sort fields; the detail route's ``id`` is the customer_identifier (as in Respan's
example) while the list's ``id`` is customer_identifier + environment + organization uuid.

The list answers GET (the List customers page's examples) and POST (its "POST List customers",
and what Respan's SDK sends): the same query string, and on POST a JSON body ``{"filters": {...}}``
whose conditions (``{"<field>": {"operator": "<op>", "value": [...]}}``, or a list of them
for one field) map onto the core's generic conditions. Respan's operator and field names are
translated here; which fields, operators and bounds exist is the core's
(``service/domain/listing.py`` FILTER_FIELDS).

The environment, on every route, is the key's: the ``environment`` parameter (or, on the list,
a ``filters.environment`` equality with one value) may name it, and naming the other one is a
403 — a key reaches its own environment only, so a customer the list returns is always found
by retrieve, update and delete.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema

from service.api import examples
from service.api.conditions import Term, Vocabulary
from service.api.detail import CustomerAdapter
from service.api.links import link
from service.api.listing import ListAdapter, Listed, Window
from service.api.models import ENVIRONMENT, SORT_CHOICES, choice
from service.api.params import FILTER_BODY_BYTES, MAX_BODY_DEPTH, WRITE_BODY_BYTES
from service.api.routing import Call, Endpoint
from service.api.shapes import customer_shape
from service.domain.errors import InvalidInput
from service.domain.listing import Condition, CustomerFilter, Sort
from service.domain.profile import Email, Metadata, Money, ProfileUpdate, ShortText, json_fault
from service.domain.vocabulary import BudgetDuration, Environment
from service.store.rendering import Col

BASE = "/compat/respan"
TAG = "Respan users API"


# Respan's own name for last_active is accepted too.
SORT_ALIASES = {"last_active_timeframe": "last_active", "-last_active_timeframe": "-last_active"}
_SORT = choice([*SORT_CHOICES, *SORT_ALIASES], "-first_seen")
RespanSortBy = Annotated[str, _SORT[0], _SORT[1]]


# The filters of a POST list ride in its next/previous links as this query parameter:
# base64url (unpadded) of their compact JSON, so that a client following a link (a GET, or a
# POST without a body) gets the same filtered list, not every customer.
FILTERS_PARAM = "filters"
MAX_FILTERS_PARAM = 64_000


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    page: int = Field(1, ge=1, le=10_000_000, description="Page number.")
    page_size: int = Field(50, ge=1, le=1000, description="Customers per page. Maximum is 1000.")
    sort_by: RespanSortBy = Field("-first_seen", description="Sort field; prefix '-' for descending.")
    environment: Environment | None = Field(None, description=ENVIRONMENT)
    filters: Annotated[str, StringConstraints(max_length=MAX_FILTERS_PARAM)] | None = Field(
        None,
        description="The filters of a POST list as its next and previous links carry them (base64url of their "
        "JSON): a GET, or a POST without filters in its body, with this parameter lists the same customers.",
    )


def encode_filters(filters: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(filters, option=orjson.OPT_SORT_KEYS)).rstrip(b"=").decode()


def decode_filters(text: str) -> dict[str, Any]:
    """The filters a link carries; InvalidInput naming the parameter if it holds none."""
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        decoded = None
    if not isinstance(decoded, dict):
        raise InvalidInput(FILTERS_PARAM, "is not the filters of a list link (base64url of a JSON object)")
    fault = json_fault(decoded, max_depth=MAX_BODY_DEPTH)
    if fault is not None:
        raise InvalidInput(FILTERS_PARAM, str(fault))
    return decoded


# Respan's filter operators -> the core's. "" (the default) and "in" match any listed value,
# "not" and "not_in" none of them.
OPERATORS = {
    "": "eq",
    "in": "eq",
    "not": "ne",
    "not_in": "ne",
    **{op: op for op in ("lt", "lte", "gt", "gte", "empty", "not_empty")},
    **{op: op for op in ("contains", "not_contains", "icontains")},
    **{op: op for op in ("startswith", "not_startswith", "endswith", "not_endswith")},
}
# Respan's filter fields -> the core's.
FILTER_FIELDS = {
    "customer_identifier": "customer_identifier",
    "name": "name",
    "email": "email",
    "environment": "environment",
    "number_of_requests": "number_of_requests",
    "total_cost": "total_cost",
    "total_tokens": "total_tokens",
    "total_prompt_tokens": "prompt_tokens",
    "total_completion_tokens": "completion_tokens",
    "average_latency": "average_latency",
    "average_ttft": "average_ttft",
    "active_days": "active_days",
    "first_seen": "first_seen",
    "last_active_timeframe": "last_active",
}
FILTERS = Vocabulary(FILTER_FIELDS, OPERATORS)


class RespanFilter(BaseModel):
    """One condition: ``operator`` (``""``, the default, is equals) and its values."""

    model_config = ConfigDict(extra="forbid")

    operator: str | None = Field(None, description=f"One of: {', '.join(repr(op) for op in OPERATORS)}.")
    value: list[Any] = Field(max_length=1000, description="The values; one for comparisons and text matches.")


_CONDITION_SCHEMA = {
    "type": "object",
    "properties": {
        "operator": {"type": "string", "enum": list(OPERATORS), "default": ""},
        "value": {"type": "array", "maxItems": 1000},
    },
    "required": ["value"],
    "additionalProperties": False,
}
FILTERS_SCHEMA = {
    "type": "object",
    "propertyNames": {"enum": list(FILTER_FIELDS)},
    "additionalProperties": {"anyOf": [_CONDITION_SCHEMA, {"type": "array", "items": _CONDITION_SCHEMA}]},
}


class RespanUserFilters(BaseModel):
    """POST body of the list: conditions every customer returned must meet."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "filters": {
                        "total_cost": {"operator": "gte", "value": [10]},
                        "email": {"operator": "endswith", "value": ["@acme.dev"]},
                    }
                }
            ]
        },
    )

    # Each value is checked as the list reads it (terms(), then FILTERS.conditions), so that
    # a 400 names filters.<field>, as the schema below says.
    filters: Annotated[dict[str, Any], WithJsonSchema(FILTERS_SCHEMA)] | None = Field(
        None,
        max_length=len(FILTER_FIELDS),
        description=f"Field -> condition (or a list of conditions). Fields: {', '.join(FILTER_FIELDS)}.",
    )


def terms(filters: dict[str, Any]) -> Iterator[Term]:
    """Respan's filters (a field's condition, or a list of them) as terms in Respan's names."""
    for name, spec in filters.items():
        param = f"filters.{name}"
        for one in spec if isinstance(spec, list) else [spec]:
            try:
                parsed = RespanFilter.model_validate(one)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(part) for part in first["loc"])
                raise InvalidInput(param, f"{where + ': ' if where else ''}{first['msg']}") from None
            yield Term(param, name, parsed.operator or "", parsed.value)


def chosen_environment(conds: tuple[Condition, ...]) -> tuple[str | None, tuple[Condition, ...]]:
    """The environment a single-valued ``filters.environment`` equality names (and the other
    conditions), else None and all of them."""
    named = [c for c in conds if c.field == "environment"]
    if len(named) == 1 and named[0].operator == "eq" and len(named[0].values) == 1:
        value = str(named[0].values[0])
        if value in ("prod", "test"):
            return value, tuple(c for c in conds if c is not named[0])
    return None, conds


class DetailParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: Environment | None = Field(None, description=ENVIRONMENT)


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
    """The editable fields of Respan's Update a customer, and ``metadata`` (Respan's SDK offers it). The SDK's
    ``period_start``, ``period_end`` and ``markup_percentage`` have no counterpart in tally
    (periods follow ``budget_duration``): they are refused (400), never silently dropped."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [examples.RESPAN_USER_PATCH]})

    name: ShortText | None = None
    email: Email | None = None
    metadata: Metadata | None = Field(None, description="Replaces the whole metadata object.")
    total_budget: Money | None = None
    period_budget: Money | None = None
    budget_duration: BudgetDuration | None = None


LIST_SHAPE = customer_shape(RespanUser)
DETAIL_SHAPE = customer_shape(RespanUserDetail)


@dataclass(frozen=True)
class Listing:
    """A list request: its query string, the filters it carries (in its body, or in the
    ``filters`` parameter of a link), and the environment and conditions they come to."""

    query: ListParams
    filters: dict[str, Any] | None
    environment: str
    conditions: tuple[Condition, ...]


def listing(call: Call[ListParams, RespanUserFilters | None]) -> Listing:
    """The list a GET or a POST asks for: the filters sent once (a body's, or a link's
    ``filters`` parameter), and the environment the parameter, or else a filter, names."""
    params, principal = call.query, call.principal
    filters = decode_filters(params.filters) if params.filters is not None else None
    if call.body is not None and call.body.filters:
        if filters is not None and call.body.filters != filters:
            raise InvalidInput(FILTERS_PARAM, "differs from the body's filters: send the filters once")
        filters = call.body.filters
    conds = FILTERS.conditions(terms(filters or {}))
    if params.environment is None:
        named, conds = chosen_environment(conds)
        environment = principal.environment_for(named, "filters.environment")
    else:
        environment = principal.environment_for(params.environment)
    return Listing(params, filters, environment, conds)


def _envelope(listed: Listed[Listing]) -> dict[str, object]:
    request, page, number = listed.call.request, listed.page, listed.params.query.page
    carried = encode_filters(listed.params.filters) if listed.params.filters else None
    return {
        "count": page.count,
        "next": link(request, page=number + 1, filters=carried) if page.next_position else None,
        "previous": link(request, page=number - 1, filters=carried) if number > 1 else None,
    }


LIST = ListAdapter[Listing](
    rows="results",
    params=listing,
    environment=lambda _, listed: listed.environment,
    filter=lambda listed: CustomerFilter(conditions=listed.conditions),
    sort=lambda listed: Sort.parse(SORT_ALIASES.get(listed.query.sort_by, listed.query.sort_by)),
    window=lambda listed: Window(listed.query.page_size, (listed.query.page - 1) * listed.query.page_size),
    shape=lambda _: LIST_SHAPE,
    envelope=_envelope,
)


def _columns(body: RespanUserPatch) -> dict[str, object]:
    return ProfileUpdate.model_validate(body.model_dump(exclude_unset=True)).columns()


ONE = CustomerAdapter[DetailParams](shape=lambda _: DETAIL_SHAPE, written=DETAIL_SHAPE, columns=_columns)


IDENTIFIER = {"customer_identifier": "Your unique identifier for this customer."}
# /api/users/list/ is the list route, not a customer called "list" (as in Respan's own API).
NOT_LIST = {"customer_identifier": r"(?!list(?:/|$))[^/]+"}
ENDPOINTS = [
    Endpoint(
        "GET",
        BASE + "/api/users/list/",
        LIST.handle,
        "List customers",
        TAG,
        "read",
        cached=True,
        query=ListParams,
        response=RespanUserList,
        description="As Respan's API reference lists customers. POST takes the same parameters and, in its body, "
        "filters.",
        operation_id="respan_list_users",
    ),
    Endpoint(
        "POST",
        BASE + "/api/users/list/",
        LIST.handle,
        "List customers (with filters)",
        TAG,
        "read",
        query=ListParams,
        body=RespanUserFilters,
        body_required=False,
        response=RespanUserList,
        description="What Respan's SDK sends: the query string of the GET form, and filters in the body.",
        max_body=FILTER_BODY_BYTES,
        operation_id="respan_filter_users",
    ),
    Endpoint(
        "GET",
        BASE + "/api/users/{customer_identifier}/",
        ONE.retrieve,
        "Retrieve a customer",
        TAG,
        "read",
        cached=True,
        query=DetailParams,
        response=RespanUserDetail,
        path_params=IDENTIFIER,
        path_patterns=NOT_LIST,
        operation_id="respan_retrieve_user",
    ),
    Endpoint(
        "PATCH",
        BASE + "/api/users/{customer_identifier}/",
        ONE.update,
        "Update a customer",
        TAG,
        "write",
        query=DetailParams,
        body=RespanUserPatch,
        response=RespanUserDetail,
        path_params=IDENTIFIER,
        path_patterns=NOT_LIST,
        max_body=WRITE_BODY_BYTES,
        operation_id="respan_update_user",
    ),
    Endpoint(
        "DELETE",
        BASE + "/api/users/{customer_identifier}/",
        ONE.delete,
        "Delete a customer",
        TAG,
        "write",
        query=DetailParams,
        status=204,
        path_params=IDENTIFIER,
        path_patterns=NOT_LIST,
        operation_id="respan_delete_user",
    ),
]
