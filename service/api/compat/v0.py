"""Devdraft's customers API (Devdraft's docs, Customers: List customers,
https://docs.devdraft.ai/developers/customers/list-customers): ``/compat/v0/api/v0/customers``,
authenticated by the ``x-client-key`` + ``x-client-secret`` header pair (``tally keys create
--json`` prints it).

Unstated by Devdraft's docs and chosen here: the response is
``{"customers": [...], "total", "skip", "take"}`` where ``take`` is the number of customers
returned (the docs: "Number of records returned in this response"); customers are sorted
newest first (``createdAt`` descending); ``status`` is tally's status in upper case, so
besides ACTIVE, BLACKLISTED and DEACTIVATED a customer may show DRAFT or ARCHIVED.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from service.api import examples
from service.api.listing import ListAdapter, Window
from service.api.routing import Endpoint
from service.api.shapes import customer_shape
from service.domain.listing import CustomerFilter
from service.domain.profile import ShortText
from service.store.rendering import Col

BASE = "/compat/v0"
TAG = "Devdraft customers API"


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    skip: int = Field(0, ge=0, le=10_000_000, description="Number of records to skip (must be non-negative).")
    take: int = Field(10, ge=1, le=100, description="Number of records to take (1-100).")
    status: Literal["ACTIVE", "BLACKLISTED", "DEACTIVATED"] | None = Field(None, description="Customer status.")
    name: ShortText | None = Field(None, description="Partial match, case-insensitive.")
    email: ShortText | None = Field(None, description="Exact match, case-insensitive.")


class V0Customer(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    id: UUID
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    customer_type: str | None
    status: Annotated[str, Col("status", "upper")]
    last_transaction_amount: Annotated[float | None, Col("last_transaction_amount", "number")]
    last_purchase_date: Annotated[datetime | None, Col("last_purchase_date", "iso_ms")]
    application_id: str | None
    created_at: Annotated[datetime, Col("created_at", "iso_ms")]
    updated_at: Annotated[datetime, Col("updated_at", "iso_ms")]


class V0CustomerList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.V0_CUSTOMER_LIST]})

    customers: list[V0Customer]
    total: int = Field(description="Customers matching the filters.")
    skip: int = Field(description="Records skipped.")
    take: int = Field(description="Records returned in this response.")


SHAPE = customer_shape(V0Customer)


def _filter(params: ListParams) -> CustomerFilter:
    return CustomerFilter(
        statuses=(params.status.lower(),) if params.status else (),
        name_contains=params.name,
        email=params.email,
    )


LIST = ListAdapter[ListParams](
    rows="customers",
    window=lambda params: Window(params.take, params.skip),
    shape=lambda _: SHAPE,
    envelope=lambda listed: {"total": listed.page.count, "skip": listed.params.skip, "take": len(listed.page.docs)},
    filter=_filter,
)


ENDPOINTS = [
    Endpoint(
        "GET",
        BASE + "/api/v0/customers",
        LIST.handle,
        "List customers",
        TAG,
        "read",
        cached=True,
        query=ListParams,
        response=V0CustomerList,
        operation_id="v0_list_customers",
    ),
]
